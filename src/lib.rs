//! msm4sr: the MSM4SR multimodal sequential recommender on a small GPU compute engine.
//!
//! Layers (each uses only the ones below it):
//! - [`engine`]: devices (wgpu GPU, native CPU), tensors, reverse-mode autograd, and one module per
//!   op family under [`engine::ops`] (forward + backward kernels, the CPU reference, shapes).
//! - [`gradcheck`] and [`bench`]: the engine's verification and benchmark harnesses, shared by the
//!   CLI, `cargo test` and `cargo bench`.
//! - [`data`], [`synth`] and [`metrics`]: plain-Rust data code with no engine dependency: the
//!   RecBole atomic-file reader, item features, leave-one-out splits and batches; a synthetic
//!   multimodal dataset generator; Recall/NDCG from full rankings.

pub mod app;
pub mod config;
pub mod console;
pub mod data;
pub mod fault;
pub mod featurize;
pub mod files;
pub mod harness;
pub mod interrupt;
pub mod model;
pub mod train;

/// The compute engine (the `msm4sr-engine` crate of this workspace).
pub use ::engine;
pub use engine::{Device, Tensor};

pub use engine::{shape_err, startup, Error, Result};
