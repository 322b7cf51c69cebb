//! The engine's verification and benchmark harnesses, shared by the command line, `cargo test` and
//! `cargo bench`: [`gradcheck`] (every op's gradient against finite differences in f64) and
//! [`bench`] (kernel rates, a training step per model).
//!
//! Uses the engine, `data` and `model`.

pub mod bench;
pub mod gradcheck;
