//! `msm4sr bench`: kernel rates, a training step per model, BERT and CLIP inference.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Where;
use crate::engine::{gpu, Device};
use crate::harness::bench;
use crate::Result;

/// Benchmark kernels at the model's shapes.
#[derive(clap::Args)]
pub struct Args {
    /// Print the timings as JSON.
    #[arg(long)]
    pub json: bool,
    /// Seconds to spend on each entry (at least one call).
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Shrink the shapes 8x (for software adapters).
    #[arg(long)]
    pub quick: bool,
    /// Also time Sentence-BERT inference (sentences/s) with the model in --model-dir.
    #[arg(long)]
    pub bert: bool,
    /// Skip the training-step benchmark (one step of each model at the paper's shapes).
    #[arg(long)]
    pub no_steps: bool,
    /// The BERT sentence model folder for --bert (see tools/get_minilm.sh).
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub model_dir: PathBuf,
    /// Sentences for the BERT benchmark.
    #[arg(long, default_value_t = 512)]
    pub sentences: usize,
    /// Also validate and time every GPU matmul kernel variant side by side.
    #[arg(long)]
    pub matmul_variants: bool,
    /// Also time CLIP inference (images/s through the vision tower, texts/s through the text tower) with this model folder.
    #[arg(long, value_name = "DIR")]
    pub clip: Option<PathBuf>,
}

/// `msm4sr bench`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { json, secs, quick, bert, no_steps, model_dir, sentences, matmul_variants, clip } = args;
    let (dev, desc) = at.choice.resolve(at.named)?;
    eprintln!("bench on {desc}");
    let quick = quick || (dev == Device::Gpu && gpu::gpu()?.adapter.is_software());
    let mut results = bench::run(dev, secs, quick)?;
    let steps = if no_steps { Vec::new() } else { bench::train_steps(dev, secs, quick)? };
    let variants = if matmul_variants {
        if dev != Device::Gpu {
            return Err(crate::Error::Invalid("--matmul-variants times the GPU kernels: run with --device gpu".into()));
        }
        bench::matmul_variants(secs, quick)?
    } else {
        Vec::new()
    };
    if bert {
        let r = crate::model::bert::bench(&model_dir, dev, sentences)?;
        results.push(bench::BenchResult {
            name: "bert".into(),
            shape: format!("{} sentences, {} tokens ({:.0} sentences/s)", r.sentences, r.tokens, r.sentences_per_s),
            device: bench::device_name(dev),
            seconds: r.seconds / r.sentences.max(1) as f64,
            gflops: None,
            iters: 1,
        });
    }
    if let Some(dir) = &clip {
        let r = crate::model::clip::bench(dir, dev, if quick { 8 } else { 64 }, if quick { 64 } else { 512 })?;
        for (name, n, what, s) in [("clip-image", r.images, "images", r.image_seconds), ("clip-text", r.texts, "texts", r.text_seconds)] {
            results.push(bench::BenchResult {
                name: name.into(),
                shape: format!("{n} {what} ({:.1} {what}/s)", n as f64 / s.max(1e-9)),
                device: bench::device_name(dev),
                seconds: s / n.max(1) as f64,
                gflops: None,
                iters: 1,
            });
        }
    }
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "kernels": results, "train_steps": steps, "matmul_variants": variants }))
                .unwrap()
        );
    } else {
        outln!("{:<10} {:<26} {:>12} {:>10} {:>6}  device", "kernel", "shape", "ms/call", "GFLOP/s", "iters");
        for r in &results {
            let gf = r.gflops.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into());
            outln!("{:<10} {:<26} {:>12.3} {:>10} {:>6}  {}", r.name, r.shape, r.seconds * 1e3, gf, r.iters, r.device);
        }
        if !variants.is_empty() {
            outln!();
            outln!(
                "{:<16} {:<26} {:>12} {:>10} {:>10} {:>6} {:>9}",
                "variant",
                "shape",
                "ms/call",
                "GFLOP/s",
                "max err",
                "iters",
                "autotune"
            );
            for r in &variants {
                let name = format!("{} {}", r.number, r.variant.name());
                let pick = if r.autotune_pick { "<- pick" } else { "" };
                match (r.seconds, r.gflops, r.max_err) {
                    (Some(s), Some(gf), Some(err)) => {
                        outln!("{:<16} {:<26} {:>12.3} {:>10.1} {:>10.1e} {:>6} {:>9}", name, r.shape, s * 1e3, gf, err, r.iters, pick)
                    }
                    _ => outln!("{:<16} {:<26} {}", name, r.shape, r.status),
                }
            }
        }
        if !steps.is_empty() {
            outln!();
            outln!(
                "{:<20} {:<48} {:>10} {:>10} {:>10} {:>6} {:>11} {:>8} {:>7}",
                "training step",
                "shape",
                "ms/step",
                "tokens/s",
                "samples/s",
                "steps",
                "dispatches",
                "submits",
                "copies"
            );
            let per = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
            for r in &steps {
                outln!(
                    "{:<20} {:<48} {:>10.1} {:>10.0} {:>10.0} {:>6} {:>11} {:>8} {:>7}",
                    r.model,
                    r.shape,
                    r.seconds * 1e3,
                    r.tokens_per_s,
                    r.samples_per_s,
                    r.steps,
                    per(r.dispatches_per_step),
                    per(r.submits_per_step),
                    per(r.copies_per_step)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
