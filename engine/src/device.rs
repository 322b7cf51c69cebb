//! Devices: where a tensor lives and which implementation of each op runs, and the user's choice
//! of one. (An op is dispatched to its CPU or GPU form by `op::run`.)

use crate::error::Result;
use crate::gpu;

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
