//! `msm4sr info`: GPU adapters, the chosen device, its limits and features.

use std::process::ExitCode;

use super::Where;
use crate::engine::gpu::{self, list_adapters};
use crate::engine::{Device, DeviceChoice};
use crate::Result;

/// List GPU adapters, the chosen device, its limits and features.
#[derive(clap::Args)]
pub struct Args {
    /// Print the adapters, device, limits and features as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `msm4sr info`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { json } = args;
    info(at.choice, at.named, json)
}

fn info(choice: DeviceChoice, named: bool, json: bool) -> Result<ExitCode> {
    let adapters = list_adapters();
    let chosen = choice.resolve(named);
    if json {
        let mut v = serde_json::json!({
            "adapters": adapters.iter().map(|(a, l)| serde_json::json!({
                "adapter": a, "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
                "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
                "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            })).collect::<Vec<_>>(),
        });
        match &chosen {
            Ok((d, desc)) => {
                v["device"] = serde_json::json!({"kind": d, "description": desc});
                if *d == Device::Gpu {
                    let g = gpu::gpu()?;
                    v["features"] = serde_json::json!(format!("{:?}", g.features));
                    v["limits"] = serde_json::json!(format!("{:?}", g.limits));
                }
            }
            Err(e) => v["device_error"] = serde_json::json!(e.to_string()),
        }
        outln!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(ExitCode::SUCCESS);
    }
    outln!("GPU adapters ({}):", adapters.len());
    for (a, l) in &adapters {
        outln!(
            "  - {} [{}; {}; driver {} {}] max storage binding {} MiB, workgroup memory {} KiB",
            a.name,
            a.backend,
            a.device_type,
            a.driver,
            a.driver_info,
            l.max_storage_buffer_binding_size >> 20,
            l.max_compute_workgroup_storage_size >> 10
        );
    }
    if adapters.is_empty() {
        outln!("  (none: install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers` for software Vulkan)");
    }
    let (dev, desc) = chosen?;
    outln!("chosen device: {desc}");
    if dev == Device::Gpu {
        let g = gpu::gpu()?;
        let l = &g.limits;
        outln!("limits:");
        outln!("  max_storage_buffer_binding_size     {}", l.max_storage_buffer_binding_size);
        outln!("  max_buffer_size                     {}", l.max_buffer_size);
        outln!("  max_storage_buffers_per_shader_stage {}", l.max_storage_buffers_per_shader_stage);
        outln!("  max_compute_workgroup_storage_size  {}", l.max_compute_workgroup_storage_size);
        outln!("  max_compute_invocations_per_workgroup {}", l.max_compute_invocations_per_workgroup);
        outln!("  max_compute_workgroups_per_dimension {}", l.max_compute_workgroups_per_dimension);
        outln!("  min_subgroup_size / max              {} / {}", g.adapter.subgroup_min_size, g.adapter.subgroup_max_size);
        outln!("features: {:?}", g.features);
    }
    Ok(ExitCode::SUCCESS)
}
