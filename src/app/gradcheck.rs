//! `msm4sr gradcheck`: every op against finite differences, and the GPU kernels against the CPU.

use std::process::ExitCode;

use super::Where;
use crate::engine::{gpu, DeviceChoice};
use crate::harness::gradcheck;
use crate::Result;

/// Check every op: f64 finite differences on the CPU, and the GPU kernels against the CPU.
#[derive(clap::Args)]
pub struct Args {
    /// Print every check as JSON.
    #[arg(long)]
    pub json: bool,
    /// Only these ops (repeatable), e.g. --op matmul --op attention.
    #[arg(long)]
    pub op: Vec<String>,
}

/// `msm4sr gradcheck`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { json, op } = args;
    // Verifying kernels is the point here: any adapter (software included) counts unless --device cpu.
    let use_gpu = match at.choice {
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
        outln!("{}", serde_json::to_string_pretty(&results).unwrap());
    } else {
        outln!("{:<15} {:<32} {:<5} {:>12} {:>12}  pass", "op", "shape", "check", "max_abs_err", "max_rel_err");
        for r in &results {
            outln!(
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
        outln!("{} checks, {} passed, {} failed", results.len(), results.len() - failed, failed);
    }
    Ok(if results.iter().all(|r| r.pass) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
