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

pub mod bench;
pub mod bert;
pub mod checkpoint;
pub mod cli_run;
pub mod data;
pub mod demo;
pub mod engine;
pub mod featurize;
pub mod gradcheck;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod synth;
pub mod train;

pub use engine::{Device, Tensor};

/// Every failure the library reports. Messages name the op, shape, file or adapter involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape error in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("index error in {op}: {msg}")]
    Index { op: &'static str, msg: String },
    #[error("device error: {0}")]
    Device(String),
    #[error("{0}")]
    Invalid(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Bad content in a data file: `line` is 1-based, 0 when the problem concerns the whole file
    /// (then the message is `{file}: {msg}`).
    #[error("{file}{}: {msg}", line_suffix(*line))]
    Data { file: String, line: usize, msg: String },
}

fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Build a shape error.
pub fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape { op, msg: msg.into() })
}

/// Ask the C allocator to keep freed memory for reuse (glibc on Linux; elsewhere a no-op).
///
/// The CPU backend allocates every op's output afresh. With glibc's defaults, blocks above the
/// (adaptive) mmap threshold are mapped and unmapped on every allocation and the heap top is trimmed,
/// so each step page-faults its working set back in: about 15% of CPU training time went to the
/// kernel. Call once at start-up, before threads start.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads allocate.
    unsafe {
        // 32 MiB is glibc's largest mmap threshold on 64-bit; trimming only above 1 GiB of free top.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
