//! The `msm4sr` command line: a thin shell over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use msm4sr::engine::gpu::{self, list_adapters};
use msm4sr::engine::{Device, DeviceChoice};
use msm4sr::{bench, gradcheck};

#[derive(Parser)]
#[command(name = "msm4sr", version, about = "MSM4SR multimodal sequential recommendation on a wgpu compute engine")]
struct Cli {
    /// Where to run: a hardware GPU if present (auto), a GPU adapter (gpu), or the native CPU backend.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Pick a GPU adapter by (part of) its name, e.g. "llvmpipe" for Mesa's software Vulkan.
    #[arg(long, global = true, env = "MSM4SR_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List GPU adapters, the chosen device, its limits and features.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Check every op: f64 finite differences on the CPU, and the GPU kernels against the CPU.
    Gradcheck {
        #[arg(long)]
        json: bool,
        /// Only these ops (repeatable), e.g. --op matmul --op attention.
        #[arg(long)]
        op: Vec<String>,
    },
    /// Benchmark kernels at the model's shapes.
    Bench {
        #[arg(long)]
        json: bool,
        /// Seconds to spend on each entry (at least one call).
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        /// Shrink the shapes 8x (for software adapters).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    gpu::request_adapter(cli.adapter.clone());
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> msm4sr::Result<ExitCode> {
    let named = cli.adapter.is_some();
    match cli.cmd {
        Cmd::Info { json } => info(cli.device, named, json),
        Cmd::Gradcheck { json, op } => {
            // Verifying kernels is the point here: any adapter (software included) counts unless --device cpu.
            let use_gpu = match cli.device {
                DeviceChoice::Cpu => false,
                DeviceChoice::Gpu => true,
                DeviceChoice::Auto => gpu::gpu().is_ok(),
            };
            if use_gpu {
                let g = gpu::gpu()?;
                eprintln!("gradcheck: fd on the f64 CPU backend; gpu checks on {} ({})", g.adapter.name, g.adapter.backend);
            } else {
                eprintln!("gradcheck: fd on the f64 CPU backend; no GPU checks (--device cpu or no adapter)");
            }
            let results = gradcheck::run(&op, use_gpu);
            if results.is_empty() {
                eprintln!("no op matches {:?}", op);
                return Ok(ExitCode::FAILURE);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&results).unwrap());
            } else {
                println!("{:<15} {:<32} {:<5} {:>12} {:>12}  pass", "op", "shape", "check", "max_abs_err", "max_rel_err");
                for r in &results {
                    println!(
                        "{:<15} {:<32} {:<5} {:>12.3e} {:>12.3e}  {}{}",
                        r.op,
                        r.shape,
                        r.check,
                        r.max_abs_err,
                        r.max_rel_err,
                        if r.pass { "yes" } else { "NO" },
                        r.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
                    );
                }
                let failed = results.iter().filter(|r| !r.pass).count();
                println!("{} checks, {} passed, {} failed", results.len(), results.len() - failed, failed);
            }
            Ok(if results.iter().all(|r| r.pass) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Cmd::Bench { json, secs, quick } => {
            let (dev, desc) = cli.device.resolve(named)?;
            eprintln!("bench on {desc}");
            let results = bench::run(dev, secs, quick || (dev == Device::Gpu && gpu::gpu()?.adapter.is_software()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&results).unwrap());
            } else {
                println!("{:<10} {:<26} {:>12} {:>10} {:>6}  device", "kernel", "shape", "ms/call", "GFLOP/s", "iters");
                for r in &results {
                    let gf = r.gflops.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
                    println!("{:<10} {:<26} {:>12.3} {:>10} {:>6}  {}", r.name, r.shape, r.seconds * 1e3, gf, r.iters, r.device);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn info(choice: DeviceChoice, named: bool, json: bool) -> msm4sr::Result<ExitCode> {
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
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(ExitCode::SUCCESS);
    }
    println!("GPU adapters ({}):", adapters.len());
    for (a, l) in &adapters {
        println!(
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
        println!("  (none: install a Vulkan driver, e.g. `apt-get install mesa-vulkan-drivers` for software Vulkan)");
    }
    let (dev, desc) = chosen?;
    println!("chosen device: {desc}");
    if dev == Device::Gpu {
        let g = gpu::gpu()?;
        let l = &g.limits;
        println!("limits:");
        println!("  max_storage_buffer_binding_size     {}", l.max_storage_buffer_binding_size);
        println!("  max_buffer_size                     {}", l.max_buffer_size);
        println!("  max_storage_buffers_per_shader_stage {}", l.max_storage_buffers_per_shader_stage);
        println!("  max_compute_workgroup_storage_size  {}", l.max_compute_workgroup_storage_size);
        println!("  max_compute_invocations_per_workgroup {}", l.max_compute_invocations_per_workgroup);
        println!("  max_compute_workgroups_per_dimension {}", l.max_compute_workgroups_per_dimension);
        println!("  min_subgroup_size / max              {} / {}", g.adapter.subgroup_min_size, g.adapter.subgroup_max_size);
        println!("features: {:?}", g.features);
    }
    Ok(ExitCode::SUCCESS)
}
