//! `msm4sr bench`: kernel rates, a training step per model, BERT and CLIP inference.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::Where;
use crate::engine::{gpu, Device};
use crate::harness::bench;
use crate::harness::same_batch::Plan;
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
    /// Instead of the kernels: time the three training steps on one batch of this dataset's
    /// training prefixes (paper-size random features), printing each stage's loss at the initial
    /// weights without dropout; tools/same_batch.sh runs the PyTorch peer on the same batch beside it.
    #[arg(long, value_name = "DATA")]
    pub steps_from: Option<PathBuf>,
    /// With --steps-from: samples in the batch.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// With --steps-from: the seed of the batch, the features and the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// With --steps-from: timed repetitions of each stage (median, min and max are reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// With --steps-from: steps per repetition.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// With --steps-from: write the batch, the features and the initial weights to this new
    /// safetensors file, for tools/torch_step.py --from.
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// With --steps-from: time only this stage (e.g. under a profiler).
    #[arg(long, value_parser = ["sasrec", "pretrain", "finetune"])]
    pub stage: Option<String>,
    /// With --steps-from: also show where each step's time goes: forward, backward and Adam, and
    /// each op's CPU form (ms per step; timing every op makes the step a little slower).
    #[arg(long)]
    pub ops: bool,
    /// With --steps-from on the CPU with more than one thread: time each repetition's steps on one
    /// thread too, right before or after those on all threads, and report the speed-up (the median
    /// of the repetitions' one-thread / all-thread ratios); with --ops, each op's speed-up too.
    #[arg(long)]
    pub scaling: bool,
}

/// `msm4sr bench`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args {
        json,
        secs,
        quick,
        bert,
        no_steps,
        model_dir,
        sentences,
        matmul_variants,
        clip,
        steps_from,
        batch,
        seed,
        reps,
        steps,
        export,
        stage,
        ops,
        scaling,
    } = args;
    let (dev, desc) = at.choice.resolve(at.named)?;
    eprintln!("bench on {desc}");
    if let Some(data) = steps_from {
        let plan = Plan { reps, steps, only: stage.as_deref(), profile: ops, scaling };
        return same_batch(&data, dev, (batch, seed), plan, export.as_deref(), json);
    }
    if export.is_some() || ops || scaling {
        let flag = if ops {
            "--ops"
        } else if scaling {
            "--scaling"
        } else {
            "--export"
        };
        return Err(crate::Error::Invalid(format!("{flag} belongs to --steps-from: give --steps-from DATA too")));
    }
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

/// `msm4sr bench --steps-from DATA`: the training steps on one real batch (see `harness::same_batch`);
/// `(batch, seed)` and `plan` as the flags say.
fn same_batch(data: &Path, dev: Device, (batch, seed): (usize, u64), plan: Plan, export: Option<&Path>, json: bool) -> Result<ExitCode> {
    use crate::harness::same_batch::{run, SameBatch};
    if let Some(path) = export {
        if path.exists() {
            return Err(crate::Error::Invalid(format!("--export {}: the file exists; name a new one", path.display())));
        }
    }
    let sb = SameBatch::load(data, batch, seed, 10, 768)?;
    eprintln!(
        "batch {} of {}: {} real positions (longest {}), {} items, features 10x768",
        sb.batch.b,
        data.display(),
        sb.tokens,
        sb.batch.l,
        sb.n_items
    );
    if let Some(path) = export {
        let meta = [("format", "msm4sr same-batch 1"), ("seed", &seed.to_string())]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::train::checkpoint::save(path, &sb.tensors(seed)?, &meta)?;
        eprintln!("wrote {}", path.display());
    }
    let results = run(&sb, dev, seed, plan)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&serde_json::json!({ "same_batch": results })).unwrap());
    } else {
        outln!(
            "{:<10} {:>10} {:>8} {:>8} {:>9} {:>14} {:>10} {:>9} {:>8} {:>8}  device",
            "stage",
            "median ms",
            "min ms",
            "max ms",
            "us/token",
            "check loss",
            "GEMM GFLOP",
            "GEMM time",
            "GFLOP/s",
            "of peak"
        );
        for r in &results {
            outln!(
                "{:<10} {:>10.1} {:>8.1} {:>8.1} {:>9.1} {:>14.8} {:>10.2} {:>8.0}% {:>8.1} {:>7.0}%  {}",
                r.stage,
                r.median_ms,
                r.min_ms,
                r.max_ms,
                r.us_per_token,
                r.check_loss,
                r.gemm_gflop_per_step,
                100.0 * r.gemm_time_share,
                r.gflops,
                100.0 * r.peak_fraction,
                r.device
            );
        }
        if results.iter().any(|r| r.scaling.is_some()) {
            outln!(
                "\n{:<10} {:>13} {:>13} {:>8} {:>19} {:>20}",
                "stage",
                "1 thread ms",
                format!("{} threads ms", results[0].threads),
                "scaling",
                "1 thread: of peak",
                format!("{} threads: of peak", results[0].threads)
            );
            for r in &results {
                if let (Some(one), Some(x), Some(f)) = (r.median_ms_one_thread, r.scaling, r.peak_fraction_one_thread) {
                    outln!(
                        "{:<10} {:>13.1} {:>13.1} {:>7.2}x {:>18.0}% {:>19.0}%",
                        r.stage,
                        one,
                        r.median_ms,
                        x,
                        100.0 * f,
                        100.0 * r.peak_fraction
                    );
                }
            }
            outln!("(medians of the repetitions; scaling: the median of each repetition's one-thread / all-thread ratio, measured moments apart)");
        }
        for r in results.iter().filter(|r| r.phases_ms.is_some()) {
            let p = r.phases_ms.as_ref().unwrap();
            let in_ops: f64 = r.ops.iter().map(|o| o.ms_per_step).sum();
            outln!(
                "\n{}: ms per step (mean, profiled, {}): forward {:.1}, backward {:.1}, Adam {:.1}; in ops {:.1}",
                r.stage,
                if r.threads == 1 { "1 thread".to_string() } else { format!("{} threads", r.threads) },
                p.forward,
                p.backward,
                p.adam,
                in_ops
            );
            let total = p.forward + p.backward + p.adam;
            if r.scaling.is_some() {
                let all = format!("{} threads ms", r.threads);
                outln!("  {:<18} {:>8} {:>13} {:>7} {:>13} {:>8}", "op (CPU form)", "calls", all, "share", "1 thread ms", "scaling");
                for o in &r.ops {
                    let (one, x) = (o.ms_per_step_one_thread.unwrap_or(0.0), o.scaling.unwrap_or(0.0));
                    let share = 100.0 * o.ms_per_step / total;
                    outln!("  {:<18} {:>8.0} {:>13.2} {:>6.1}% {:>13.2} {:>7.2}x", o.op, o.calls_per_step, o.ms_per_step, share, one, x);
                }
            } else {
                outln!("  {:<18} {:>8} {:>10} {:>7}", "op (CPU form)", "calls", "ms/step", "share");
                for o in &r.ops {
                    outln!("  {:<18} {:>8.0} {:>10.2} {:>6.1}%", o.op, o.calls_per_step, o.ms_per_step, 100.0 * o.ms_per_step / total);
                }
            }
        }
        if let Some(r) = results.first().filter(|r| r.peak_gflops > 0.0) {
            outln!(
                "GEMM peak of these cores: {:.1} GFLOP/s ((1024x1024) . (1024x1024), best of 12){}; FLOPs of the matrix products only",
                r.peak_gflops,
                r.peak_gflops_one_thread.map(|p| format!(", {p:.1} on one thread")).unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
