//! Kernel benchmarks at the model's shapes, shared by `msm4sr bench` and `cargo bench`.
//!
//! Each entry is timed after one warm-up run, repeating until `min_secs` have passed (at least once);
//! GPU timings include queueing and one submit + wait per repetition, as a training step would pay.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::Modality;
use crate::engine::gpu::gpu;
use crate::engine::ops::{attention_ragged, layernorm, matmul, softmax};
use crate::engine::{no_grad, Device, Ragged, Tensor};
use crate::Result;

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub name: String,
    pub shape: String,
    pub device: String,
    /// Mean seconds per call.
    pub seconds: f64,
    /// For matmuls: 2*M*N*K / seconds / 1e9.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    pub iters: usize,
}

/// Device name as reported in results.
pub fn device_name(dev: Device) -> String {
    match dev {
        Device::Gpu => gpu().map(|g| format!("{} ({})", g.adapter.name, g.adapter.backend)).unwrap_or_else(|_| "gpu".into()),
        Device::Cpu | Device::Cpu64 => format!("cpu ({} threads)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    }
}

fn sync(dev: Device) -> Result<()> {
    if dev == Device::Gpu {
        gpu()?.sync()?;
    }
    Ok(())
}

fn time(dev: Device, min_secs: f64, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, usize)> {
    drop(f()?);
    sync(dev)?;
    let start = Instant::now();
    let mut iters = 0;
    while iters == 0 || start.elapsed().as_secs_f64() < min_secs {
        drop(f()?);
        sync(dev)?;
        iters += 1;
    }
    Ok((start.elapsed().as_secs_f64() / iters as f64, iters))
}

/// The matmul shapes (M, K, N) of the model: transformer projections, the FFN, full-ranking scores
/// and the item encoders' first layer at paper size.
pub const MATMUL_SHAPES: [(usize, usize, usize); 4] = [(51200, 64, 64), (51200, 64, 256), (1024, 64, 7671), (7670, 768, 512)];

/// Run every benchmark on `dev`. `quick` shrinks the matmul shapes by 8x along M (for slow devices).
pub fn run(dev: Device, min_secs: f64, quick: bool) -> Result<Vec<BenchResult>> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let name = device_name(dev);
    let mut out = Vec::new();
    no_grad(|| -> Result<()> {
        for (m, k, n) in MATMUL_SHAPES {
            let m = if quick { m.div_ceil(8) } else { m };
            let a = Tensor::randn(&[m, k], 1.0, &mut rng, dev)?;
            let b = Tensor::randn(&[k, n], 1.0, &mut rng, dev)?;
            let (s, iters) = time(dev, min_secs, || matmul(&a, &b, false, false))?;
            out.push(BenchResult {
                name: "matmul".into(),
                shape: format!("({m}x{k}).({k}x{n})"),
                device: name.clone(),
                seconds: s,
                gflops: Some(2.0 * (m * n * k) as f64 / s / 1e9),
                iters,
            });
        }
        let (b, l, c) = if quick { (128, 50, 64) } else { (1024, 50, 64) };
        let x = Tensor::randn(&[b, l, c], 1.0, &mut rng, dev)?;
        let gamma = Tensor::full(&[c], 1.0, dev)?;
        let beta = Tensor::zeros(&[c], dev)?;
        let (s, iters) = time(dev, min_secs, || layernorm(&x, &gamma, &beta, 1e-12))?;
        out.push(BenchResult {
            name: "layernorm".into(),
            shape: format!("({b},{l},{c})"),
            device: name.clone(),
            seconds: s,
            gflops: None,
            iters,
        });
        let (s, iters) = time(dev, min_secs, || softmax(&x, None))?;
        out.push(BenchResult {
            name: "softmax".into(),
            shape: format!("({b},{l},{c})"),
            device: name.clone(),
            seconds: s,
            gflops: None,
            iters,
        });
        // Sequences of every length 1..=l in turn, packed into their real rows.
        let lens: Vec<u32> = (0..b).map(|i| (1 + i % l) as u32).collect();
        let r = Ragged::new(&lens, l)?;
        let n = r.rows();
        let (q, kk, v) = (
            Tensor::randn(&[n, c], 1.0, &mut rng, dev)?,
            Tensor::randn(&[n, c], 1.0, &mut rng, dev)?,
            Tensor::randn(&[n, c], 1.0, &mut rng, dev)?,
        );
        let (s, iters) = time(dev, min_secs, || attention_ragged(&q, &kk, &v, &r, 2, 0.0, 0, true))?;
        out.push(BenchResult {
            name: "attention".into(),
            shape: format!("{b} seqs of 1..={l}, {n} rows x {c}, 2 heads"),
            device: name.clone(),
            seconds: s,
            gflops: None,
            iters,
        });
        Ok(())
    })?;
    Ok(out)
}

/// One training step's cost for a model and stage at the paper's shapes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepResult {
    /// "sasrec", "msm4sr pre-training", "msm4sr fine-tuning".
    pub model: String,
    pub shape: String,
    pub device: String,
    /// Mean seconds per step (forward, backward, Adam, loss read back).
    pub seconds: f64,
    /// Real (unpadded) sequence positions per second.
    pub tokens_per_s: f64,
    pub samples_per_s: f64,
    pub steps: usize,
    /// GPU: compute dispatches, queue submits and buffer copies per step (None on the CPU backend).
    pub dispatches_per_step: Option<f64>,
    pub submits_per_step: Option<f64>,
    pub copies_per_step: Option<f64>,
}

/// One matmul kernel variant at one shape: its rate and its largest error against the CPU product
/// (relative to the largest |value| of the CPU product), or why it did not run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    pub variant: crate::engine::ops::MatmulVariant,
    /// The variant's number in the ladder.
    pub number: usize,
    pub shape: String,
    pub device: String,
    /// "ok", or "not eligible: ..." / "skipped: ..." (then there are no timings).
    pub status: String,
    pub seconds: Option<f64>,
    pub gflops: Option<f64>,
    pub max_err: Option<f64>,
    pub iters: usize,
    /// Whether the autotune (run fresh, in memory) picks this variant at this shape.
    pub autotune_pick: bool,
}

/// Every GPU matmul variant side by side (the llm.c `dev/cuda` way) at the model's shapes, 4096^2,
/// the item-encoder shape (4926x768).(768x512) and the attention-pooling energies of 10 sentence rows
/// per item (49260x768).(768x1), each checked against the CPU product first, with the variant the
/// autotune picks. `quick` shrinks the rows 8x (software adapters).
pub fn matmul_variants(min_secs: f64, quick: bool) -> Result<Vec<VariantResult>> {
    use crate::engine::ops::matmul::tune::{Policy, Tuner};
    use crate::engine::ops::{matmul_tuned, matmul_variant, matmul_variant_support, MatmulVariant, Support};
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let name = device_name(Device::Gpu);
    let mut shapes: Vec<(usize, usize, usize)> = MATMUL_SHAPES.to_vec();
    shapes.extend([(4096, 4096, 4096), (4926, 768, 512), (49260, 768, 1)]);
    let mut tuner = Tuner::new(Policy { forced: None, tune: true, cache: None });
    let mut out = Vec::new();
    no_grad(|| -> Result<()> {
        for (m, k, n) in shapes {
            let (m, k) = if quick { (m.div_ceil(8), if k >= 4096 { k / 8 } else { k }) } else { (m, k) };
            let a = Tensor::randn(&[m, k], 1.0, &mut rng, Device::Cpu)?;
            let b = Tensor::randn(&[k, n], 1.0, &mut rng, Device::Cpu)?;
            let want = matmul(&a, &b, false, false)?.to_vec()?;
            let top = want.iter().fold(0f32, |x, y| x.max(y.abs())).max(1e-30) as f64;
            let (ga, gb) = (a.to_device(Device::Gpu)?, b.to_device(Device::Gpu)?);
            let (_, pick) = matmul_tuned(&ga, &gb, false, false, None, &mut tuner)?;
            for v in MatmulVariant::ALL {
                let mut r = VariantResult {
                    variant: v,
                    number: v.number(),
                    shape: format!("({m}x{k}).({k}x{n})"),
                    device: name.clone(),
                    status: "ok".into(),
                    seconds: None,
                    gflops: None,
                    max_err: None,
                    iters: 0,
                    autotune_pick: v == pick,
                };
                let support = matmul_variant_support(&[m, k], &[k, n], false, false, v)?;
                if support != Support::Yes {
                    r.status = support.to_string();
                    out.push(r);
                    continue;
                }
                let got = matmul_variant(&ga, &gb, false, false, None, v)?.to_vec()?;
                r.max_err = Some(got.iter().zip(&want).map(|(g, w)| ((g - w).abs() as f64) / top).fold(0.0, f64::max));
                let (s, iters) = time(Device::Gpu, min_secs, || matmul_variant(&ga, &gb, false, false, None, v))?;
                (r.seconds, r.gflops, r.iters) = (Some(s), Some(2.0 * (m * n * k) as f64 / s / 1e9), iters);
                out.push(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Item features for `items` real items (and the padding row 0, with no valid rows): `rows` rows of
/// `dim` values uniform in [-0.5, 0.5) per item.
pub fn random_modality(items: usize, rows: usize, dim: usize, rng: &mut impl rand::Rng) -> Modality {
    Modality {
        rows,
        dim,
        data: (0..(items + 1) * rows * dim).map(|_| rng.random::<f32>() - 0.5).collect(),
        lens: std::iter::once(0).chain((0..items).map(|_| rows as u32)).collect(),
    }
}

/// Training steps at the paper's shapes on synthetic data: hidden 64, 2 layers, 2 heads, max
/// length 50, random sequence lengths 1..=10 (about the 5.3-item average training prefix of the
/// Pantry data); for MSM4SR 5000 items with 10 sentence and 10 image rows of 768 values per item
/// and batch 1024, for SASRec batch 2048. `quick` (software adapters) shrinks items, feature size
/// and batch 8x.
pub fn train_steps(dev: Device, min_secs: f64, quick: bool) -> Result<Vec<StepResult>> {
    use crate::config::{ModelConfig, ModelKind};
    use crate::data::{make_batch, Sample};
    use crate::engine::backward;
    use crate::engine::optim::{Adam, AdamConfig};
    use crate::model::msm4sr::Model;
    use crate::model::nn::Seeds;
    use rand::Rng;

    let q = if quick { 8 } else { 1 };
    let (items, d, rows) = (5000 / q, 768 / q, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (text, image) = (random_modality(items, rows, d, &mut rng), random_modality(items, rows, d, &mut rng));
    let samples = |n: usize, rng: &mut ChaCha8Rng| -> Vec<Sample> {
        (0..n)
            .map(|u| {
                let len = rng.random_range(1..=10);
                Sample {
                    user: u as u32,
                    seq: (0..len).map(|_| rng.random_range(1..=items as u32)).collect(),
                    target: rng.random_range(1..=items as u32),
                }
            })
            .collect()
    };
    let name = device_name(dev);
    let mut out = Vec::new();
    for (label, kind, pretrain, batch) in [
        ("sasrec", ModelKind::Sasrec, false, 2048 / q),
        ("msm4sr pre-training", ModelKind::Msm4sr, true, 1024 / q),
        ("msm4sr fine-tuning", ModelKind::Msm4sr, false, 1024 / q),
    ] {
        let cfg = ModelConfig { model: kind, proj_heads: false, ..ModelConfig::default() };
        let model = Model::new(cfg, items, Some(&text), Some(&image), &mut rng, dev)?;
        let params = if pretrain { model.pretrain_params() } else { model.finetune_params() };
        let mut opt = Adam::new(params.into_iter().map(|(_, t)| t).collect(), AdamConfig::default())?;
        let mut seeds = Seeds::new(1);
        let data = samples(batch, &mut rng);
        let batch_t = make_batch(&data.iter().collect::<Vec<_>>());
        let tokens: usize = batch_t.lens.iter().map(|&n| n as usize).sum();
        let mut step = || -> Result<()> {
            let loss = if pretrain {
                model.pretrain_loss(&batch_t, 0.25, &mut rng, &mut seeds)?
            } else {
                model.finetune_loss(&batch_t, &mut seeds)?
            };
            opt.step(&backward(&loss)?)?;
            loss.item()?;
            Ok(())
        };
        step()?; // warm-up (pipelines, pool)
        let c0 = crate::engine::stats::gpu_counters(dev);
        let start = Instant::now();
        let mut steps = 0;
        while steps == 0 || start.elapsed().as_secs_f64() < min_secs {
            step()?;
            steps += 1;
        }
        let s = start.elapsed().as_secs_f64() / steps as f64;
        let per = |f: fn(crate::engine::gpu::Counters) -> u64| {
            c0.zip(crate::engine::stats::gpu_counters(dev)).map(|(a, b)| (f(b) - f(a)) as f64 / steps as f64)
        };
        out.push(StepResult {
            model: label.into(),
            shape: format!("batch {batch}, {tokens} tokens, {items} items, features {rows}x{d}"),
            device: name.clone(),
            seconds: s,
            tokens_per_s: tokens as f64 / s,
            samples_per_s: batch as f64 / s,
            steps,
            dispatches_per_step: per(|c| c.dispatches),
            submits_per_step: per(|c| c.submits),
            copies_per_step: per(|c| c.copies),
        });
    }
    Ok(out)
}
