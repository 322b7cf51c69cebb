//! What the engine has done since the process started: time and FLOPs in the CPU backend's matrix
//! products (counted in `cpu`), time per op when asked (`profile_ops`), and the GPU's dispatches, submits and copies (counted in `gpu`). Read
//! by the trainer's epoch lines and by `bench`.

use crate::device::Device;

pub use crate::cpu::{gemm_counters, in_gemm, op_times, profile_ops};

/// The GPU's dispatch, submit and copy counters when `dev` is the GPU (None on the CPU backend or
/// when no GPU context exists).
pub fn gpu_counters(dev: Device) -> Option<crate::gpu::Counters> {
    (dev == Device::Gpu).then(|| crate::gpu::gpu().ok().map(|g| g.counters())).flatten()
}
