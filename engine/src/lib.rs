//! The compute engine: devices, tensors, autograd and ops.
//!
//! Model code is written once against [`Tensor`] and the functions in [`ops`]; each op checks shapes,
//! then runs either its WGSL kernel (`Device::Gpu`) or its plain-Rust form (`Device::Cpu` in f32,
//! `Device::Cpu64` in f64 for finite differences), through the one op contract of [`op`].
//!
//! Rooms, bottom to top: [`error`](Error) and [`startup`]; [`gpu`] (the wgpu runtime) and [`cpu`] (the
//! native backend) with [`stats`]; [`tensor`] (tensors and their tape nodes) and [`ragged`]; [`op`]
//! (the op contract: `Op`, `Backward`, and `apply`, the one dispatch by device); [`ops`] (one module
//! per op family); [`autograd`] (the backward walk) and [`optim`] (Adam). The engine
//! uses nothing of the application above it.

pub mod autograd;
pub mod cpu;
mod device;
mod error;
pub mod gpu;
pub mod op;
pub mod ops;
pub mod optim;
pub mod ragged;
mod startup;
pub mod stats;
pub mod tensor;
#[cfg(test)]
mod tests;

pub use autograd::backward;
pub use cpu::Real;
pub use ragged::Ragged;
pub use tensor::no_grad;
pub use tensor::{same_device, Element, Grads, Indices, Storage, Tensor};

pub use device::{Device, DeviceChoice};
pub use error::{shape_err, Error, Result};
pub use startup::startup;

/// Every GPU kernel's contract with its shader, checked by the layout tests. A kernel is listed in
/// its module's `kernels()`, next to its static.
#[cfg(test)]
pub(crate) fn all_kernels() -> Vec<gpu::Contract> {
    use ops::*;
    [
        attention::kernels(),
        catalog::kernels(),
        concat::kernels(),
        elementwise::kernels(),
        embedding::kernels(),
        layernorm::kernels(),
        loss::kernels(),
        matmul::kernels(),
        norm::kernels(),
        pool::kernels(),
        rank::kernels(),
        reduce::kernels(),
        softmax::kernels(),
        optim::kernels(),
    ]
    .concat()
}
