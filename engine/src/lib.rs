//! The compute engine: devices, tensors, autograd and ops.
//!
//! Model code is written once against [`Tensor`] and the functions in [`ops`]; each op checks shapes,
//! then runs either its WGSL kernel (`Device::Gpu`) or its plain-Rust reference (`Device::Cpu` in
//! f32, `Device::Cpu64` in f64 for finite differences).
//!
//! Rooms, bottom to top: [`error`](Error) and [`startup`]; [`gpu`] (the wgpu runtime) and [`cpu`] (the
//! native backend) with [`stats`]; [`tensor`] (tensors and their tape nodes) and [`ragged`]; [`ops`]
//! (one module per op family); [`autograd`] (the backward walk) and [`optim`] (Adam). The engine
//! uses nothing of the application above it.

mod error;
pub mod autograd;
pub mod cpu;
pub mod gpu;
#[cfg(test)]
mod layout;
pub mod ops;
pub mod optim;
pub mod ragged;
pub mod stats;
mod startup;
pub mod tensor;

pub use ragged::Ragged;
pub use autograd::{backward, Grads};
pub use tensor::no_grad;
pub use cpu::Real;
pub use tensor::{Indices, Storage, Tensor};

pub use error::{shape_err, Error, Result};
pub use startup::startup;

/// Where a tensor lives and which implementation of each op runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Device {
    /// Native CPU backend, f32.
    Cpu,
    /// Native CPU backend, f64 (reference for finite-difference checks).
    Cpu64,
    /// wgpu (Vulkan, Metal, DX12), f32.
    Gpu,
}

/// What the user asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DeviceChoice {
    /// A hardware GPU if there is one, else the CPU backend.
    Auto,
    Gpu,
    Cpu,
}

impl DeviceChoice {
    /// Resolve to a device. `auto` never picks a software adapter (lavapipe is ~50x slower than the
    /// CPU backend) unless one was named with `--adapter`/`MSM4SR_ADAPTER`.
    pub fn resolve(self, adapter_named: bool) -> Result<(Device, String)> {
        match self {
            DeviceChoice::Cpu => Ok((Device::Cpu, "cpu (native backend)".into())),
            DeviceChoice::Gpu => {
                let g = gpu::gpu()?;
                Ok((Device::Gpu, format!("gpu: {} ({}, {})", g.adapter.name, g.adapter.backend, g.adapter.device_type)))
            }
            DeviceChoice::Auto => {
                if adapter_named || gpu::hardware_adapter_available() {
                    match gpu::gpu() {
                        Ok(g) => {
                            return Ok((Device::Gpu, format!("gpu: {} ({}, {})", g.adapter.name, g.adapter.backend, g.adapter.device_type)))
                        }
                        Err(e) if adapter_named => return Err(e),
                        Err(_) => {}
                    }
                }
                Ok((Device::Cpu, "cpu (no hardware GPU adapter found; pass --device gpu --adapter NAME to use a software one)".into()))
            }
        }
    }
}

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

/// All tensors must be on one device; returns it.
pub fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::Device(format!("{op}: inputs on different devices ({:?} and {:?})", d, t.device())));
        }
    }
    Ok(d)
}

/// Run the CPU implementation generic over the element type, or the GPU one.
/// `on_device!(dev, T => cpu_expr_using_T, gpu_expr)`
#[macro_export]
macro_rules! on_device {
    ($dev:expr, $T:ident => $cpu:expr, $gpu:expr) => {
        match $dev {
            $crate::Device::Cpu => {
                type $T = f32;
                $cpu
            }
            $crate::Device::Cpu64 => {
                type $T = f64;
                $cpu
            }
            $crate::Device::Gpu => $gpu,
        }
    };
}
