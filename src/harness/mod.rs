//! The engine's verification and benchmark harnesses, shared by the command line, `cargo test` and
//! `cargo bench`: [`gradcheck`] (every op's gradient against finite differences in f64) and
//! [`bench`] (kernel rates, a training step per model), [`same_batch`] (the training steps on one
//! real batch, for the PyTorch peer to time beside them).
//!
//! Uses the engine, `data` and `model`.

pub mod bench;
pub mod gradcheck;
pub mod same_batch;
