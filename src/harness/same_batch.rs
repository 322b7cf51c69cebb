//! One batch, two programs. The training steps of `bench`, on one batch of a real dataset's
//! training prefixes with random item features of the paper's size, with everything a second
//! program needs to run the identical step: the batch, the features and the models' initial
//! weights (`tensors`, which `msm4sr bench --steps-from DATA --export FILE` writes and
//! `tools/torch_step.py --from FILE` loads), and the loss of each stage at those weights with
//! dropout and mixup off (`check_loss`), which the two programs must agree on.
//!
//! The batch: the dataset's training samples (RecBole's prefixes, at most the 50 most recent items;
//! `Dataset::split`) shuffled with the seed, the first `batch` of them. Features: for each item
//! `rows` text and `rows` image rows of `dim` values uniform in [-0.5, 0.5) (the same for every
//! stage). Models at the bench's settings: hidden 64, 2 layers, 2 heads, inner 256, 8 experts,
//! MSM4SR without projection heads (the authors' command), dropout 0.2 everywhere (also in the peer),
//! mixup ratio 0.25 in pre-training.

use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::{ModelConfig, ModelKind};
use crate::data::{make_batch, Batch, Dataset, LoadOptions, Modality};
use crate::engine::cpu::with_threads;
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{backward, Device, Tensor};
use crate::model::msm4sr::Model;
use crate::model::nn::Seeds;
use crate::Result;

/// The stages, in order: (name, model kind, pre-training).
pub const STAGES: [(&str, ModelKind, bool); 3] =
    [("sasrec", ModelKind::Sasrec, false), ("pretrain", ModelKind::Msm4sr, true), ("finetune", ModelKind::Msm4sr, false)];

/// The mixup ratio of the timed pre-training steps.
const P_MIX: f64 = 0.25;

/// A batch of a real dataset with paper-size random features.
pub struct SameBatch {
    pub batch: Batch,
    pub n_items: usize,
    pub text: Modality,
    pub image: Modality,
    /// Real (unpadded) positions of the batch.
    pub tokens: usize,
}

impl SameBatch {
    /// The first `batch` of `data`'s training samples shuffled with `seed`, features drawn from it.
    pub fn load(data: &Path, batch: usize, seed: u64, rows: usize, dim: usize) -> Result<SameBatch> {
        let ds = Dataset::load(data, &LoadOptions::default())?;
        let mut train = ds.split(50).train;
        if train.len() < batch {
            return Err(crate::Error::Invalid(format!(
                "{} has {} training samples, fewer than a batch of {batch}",
                data.display(),
                train.len()
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        train.shuffle(&mut rng);
        let batch = make_batch(&train[..batch].iter().collect::<Vec<_>>());
        let n_items = ds.num_items();
        let text = super::bench::random_modality(n_items, rows, dim, &mut rng);
        let image = super::bench::random_modality(n_items, rows, dim, &mut rng);
        let tokens = batch.lens.iter().map(|&n| n as usize).sum();
        Ok(SameBatch { batch, n_items, text, image, tokens })
    }

    fn model(&self, kind: ModelKind, dropout: f32, seed: u64, dev: Device) -> Result<Model> {
        let cfg =
            ModelConfig { model: kind, proj_heads: false, dropout, attn_dropout: dropout, moe_dropout: dropout, ..ModelConfig::default() };
        Model::new(cfg, self.n_items, Some(&self.text), Some(&self.image), &mut ChaCha8Rng::seed_from_u64(seed), dev)
    }

    /// The loss of one stage's step on this batch (pre-training with mixup ratio `p_mix`).
    fn loss(&self, model: &Model, pretrain: bool, p_mix: f64, rng: &mut ChaCha8Rng, seeds: &mut Seeds) -> Result<Tensor> {
        if pretrain {
            model.pretrain_loss(&self.batch, p_mix, rng, seeds)
        } else {
            model.finetune_loss(&self.batch, seeds)
        }
    }

    /// What the peer loads: the batch (`batch.ids` (B, l), `batch.lens`, `batch.targets`, as
    /// floats), the features (`features.text`, `features.image`, (I + 1, rows, dim)) and the
    /// initial weights of each model kind under `sasrec.` and `msm4sr.` and their checkpoint names.
    pub fn tensors(&self, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let b = &self.batch;
        let float = |v: &[u32], shape: &[usize]| Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), shape, Device::Cpu);
        let mut out = vec![
            ("batch.ids".to_string(), float(&b.ids, &[b.b, b.l])?),
            ("batch.lens".to_string(), float(&b.lens, &[b.b])?),
            ("batch.targets".to_string(), float(&b.targets, &[b.b])?),
        ];
        for (name, m) in [("text", &self.text), ("image", &self.image)] {
            out.push((format!("features.{name}"), Tensor::from_vec(m.data.clone(), &[m.len(), m.rows, m.dim], Device::Cpu)?));
        }
        for (prefix, kind) in [("sasrec", ModelKind::Sasrec), ("msm4sr", ModelKind::Msm4sr)] {
            let model = self.model(kind, 0.0, seed, Device::Cpu)?;
            out.extend(model.params().into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)));
        }
        Ok(out)
    }
}

/// One stage on one batch: the loss at the initial weights without dropout or mixup, and the
/// milliseconds per step (forward, backward, Adam, loss read back) of each repetition.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageResult {
    pub stage: String,
    pub device: String,
    /// Threads the CPU kernels used (1 on the GPU).
    pub threads: usize,
    pub batch: usize,
    pub tokens: usize,
    pub items: usize,
    pub check_loss: f64,
    /// Mean ms per step of each repetition.
    pub ms: Vec<f64>,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Microseconds per real position (the median step).
    pub us_per_token: f64,
    /// Floating-point operations of the step's matrix products (2 m n k each, counted from their
    /// shapes; f32 CPU backend only, else 0), in GFLOP.
    pub gemm_gflop_per_step: f64,
    /// Share of the step's time inside matrix products.
    pub gemm_time_share: f64,
    /// The step's matrix-product FLOPs over its median time, in GFLOP/s ...
    pub gflops: f64,
    /// ... and as a fraction of the measured GEMM peak, `peak_gflops` (`gemm_peak`).
    pub peak_fraction: f64,
    pub peak_gflops: f64,
    /// With `scaling`: each repetition's ms per step on one thread (next to `ms`) and their median,
    /// and the median over repetitions of one thread's time over all threads' (the two measured
    /// moments apart) ...
    pub ms_one_thread: Vec<f64>,
    pub median_ms_one_thread: Option<f64>,
    pub scaling: Option<f64>,
    /// ... and the one-thread step's fraction of the one-thread GEMM peak.
    pub peak_fraction_one_thread: Option<f64>,
    pub peak_gflops_one_thread: Option<f64>,
    /// With `profile`: ms per step in the forward, the backward and the Adam step ...
    pub phases_ms: Option<Phases>,
    /// ... and each op's CPU form (forward and backward ops alike; the most time first).
    pub ops: Vec<OpTime>,
}

/// Where a step's time goes, in ms per step (`run` with `profile`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Phases {
    pub forward: f64,
    pub backward: f64,
    pub adam: f64,
}

/// One op's share of a step (`run` with `profile`): its CPU form, matrix products inside included.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    pub calls_per_step: f64,
    pub ms_per_step: f64,
    /// With `scaling` too: its ms per step in the one-thread repetitions and its speed-up (its
    /// one-thread time over its all-thread time, each summed over the repetitions; none for an op
    /// the clock saw take no time).
    pub ms_per_step_one_thread: Option<f64>,
    pub scaling: Option<f64>,
}

/// The GEMM rate of the CPU backend on the cores this process is given: the best of twelve
/// (1024 x 1024) . (1024 x 1024) f32 products after four untimed ones, in GFLOP/s (0 on the GPU).
/// `run` measures it before and after the steps and keeps the better.
pub fn gemm_peak(dev: Device) -> Result<f64> {
    if dev != Device::Cpu {
        return Ok(0.0);
    }
    let n = 1024;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (a, b) = (Tensor::randn(&[n, n], 1.0, &mut rng, dev)?, Tensor::randn(&[n, n], 1.0, &mut rng, dev)?);
    crate::engine::no_grad(|| -> Result<f64> {
        // Untimed products first: the pool's threads may start on one core until the scheduler
        // spreads them (a first measurement on two cores read as one core's rate).
        let mut best = f64::INFINITY;
        for i in 0..16 {
            let t0 = Instant::now();
            drop(crate::engine::ops::matmul(&a, &b, false, false)?);
            if i >= 4 {
                best = best.min(t0.elapsed().as_secs_f64());
            }
        }
        Ok(2.0 * (n * n * n) as f64 / best / 1e9)
    })
}

/// What `run` times: `reps` repetitions of `steps` steps of every stage (or `only` the one of that
/// name); with `profile`, the time of each phase and of each op too (a clock read and a lock per op:
/// a little slower); with `scaling` (CPU, more than one thread), each repetition's steps also on one
/// thread, right before or after (the order alternating), for the speed-up of all threads over one
/// measured moments apart (with `profile` too: each op's, its clocks split by thread count).
#[derive(Clone, Copy, Debug)]
pub struct Plan<'a> {
    pub reps: usize,
    pub steps: usize,
    pub only: Option<&'a str>,
    pub profile: bool,
    pub scaling: bool,
}

/// Run the stages as `plan` says, after two warm-up steps each, with the step's matrix-product
/// FLOPs and the fraction of the GEMM peak it reaches.
pub fn run(sb: &SameBatch, dev: Device, seed: u64, plan: Plan) -> Result<Vec<StageResult>> {
    let Plan { reps, steps, only, profile, scaling } = plan;
    let threads = if dev == Device::Cpu { crate::engine::cpu::threads() } else { 1 };
    let scaling = scaling && threads > 1;
    let peak = gemm_peak(dev)?;
    let peak_one = if scaling { with_threads(1, || gemm_peak(dev))? } else { 0.0 };
    let mut out = Vec::new();
    for (stage, kind, pretrain) in STAGES {
        if only.is_some_and(|o| o != stage) {
            continue;
        }
        let check = sb.model(kind, 0.0, seed, dev)?;
        let check_loss = sb.loss(&check, pretrain, 0.0, &mut ChaCha8Rng::seed_from_u64(seed), &mut Seeds::new(seed))?.to_vec_f64()?[0];
        // The same loss on one thread, bit for bit, or the scaling compares different work.
        if scaling {
            let one = with_threads(1, || -> Result<f64> {
                Ok(sb.loss(&check, pretrain, 0.0, &mut ChaCha8Rng::seed_from_u64(seed), &mut Seeds::new(seed))?.to_vec_f64()?[0])
            })?;
            if one.to_bits() != check_loss.to_bits() {
                return Err(crate::Error::Invalid(format!(
                    "{stage}: the loss on one thread ({one:e}) differs from the loss on {threads} ({check_loss:e})"
                )));
            }
        }
        drop(check);
        let model = sb.model(kind, 0.2, seed, dev)?;
        // The pool's threads kept awake through the steps, as training keeps them (`keep_awake`).
        let _awake = (dev == Device::Cpu).then(crate::engine::cpu::keep_awake);
        let params = if pretrain { model.pretrain_params() } else { model.finetune_params() };
        let mut opt = Adam::new(params.into_iter().map(|(_, t)| t).collect(), AdamConfig::default())?;
        let (mut rng, mut seeds) = (ChaCha8Rng::seed_from_u64(seed), Seeds::new(seed));
        // Seconds in the forward, the backward and Adam on all threads (only read with `profile`),
        // and (not reported) on one.
        let (mut phases, mut phases_one) = ([0f64; 3], [0f64; 3]);
        let mut step = |phases: &mut [f64; 3]| -> Result<()> {
            let t0 = Instant::now();
            let loss = sb.loss(&model, pretrain, P_MIX, &mut rng, &mut seeds)?;
            if profile {
                loss.item()?; // the forward's work done (GPU) before the clock is read
            }
            let t1 = Instant::now();
            let grads = backward(&loss)?;
            let t2 = Instant::now();
            opt.step(&grads)?;
            loss.item()?;
            let t3 = Instant::now();
            for (p, d) in phases.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2]) {
                *p += d.as_secs_f64();
            }
            Ok(())
        };
        for _ in 0..2 {
            step(&mut phases)?;
        }
        if scaling {
            with_threads(1, || step(&mut phases))?;
        }
        phases = [0.0; 3];
        crate::engine::stats::profile_ops(profile);
        // Per op: (calls, seconds) on all threads and seconds on one, from the op clocks' totals
        // before and after each repetition's steps.
        let mut op_split: Vec<(&'static str, u64, [f64; 2])> = Vec::new();
        // ms per step of one repetition's `steps` steps, on all threads or (`one`) on one.
        let mut timed = |one: bool, phases: &mut [f64; 3]| -> Result<f64> {
            let before = if profile { crate::engine::stats::op_times() } else { Vec::new() };
            let t0 = Instant::now();
            for _ in 0..steps.max(1) {
                if one {
                    with_threads(1, || step(phases))?;
                } else {
                    step(phases)?;
                }
            }
            let ms = t0.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
            if profile {
                for (op, calls, secs) in crate::engine::stats::op_times() {
                    let (c0, s0) = before.iter().find(|b| b.0 == op).map_or((0, 0.0), |b| (b.1, b.2));
                    let i = op_split.iter().position(|e| e.0 == op).unwrap_or_else(|| {
                        op_split.push((op, 0, [0.0; 2]));
                        op_split.len() - 1
                    });
                    let e = &mut op_split[i];
                    e.2[one as usize] += secs - s0;
                    if !one {
                        e.1 += calls - c0;
                    }
                }
            }
            Ok(ms)
        };
        let (mut ms, mut ms_one) = (Vec::with_capacity(reps), Vec::new());
        let (mut gemm_s, mut gemm_flop, mut all_s) = (0.0, 0.0, 0.0);
        for rep in 0..reps.max(1) {
            if scaling && rep % 2 == 0 {
                ms_one.push(timed(true, &mut phases_one)?);
            }
            let ((g_s0, g_f0), t_all) = (crate::engine::stats::gemm_counters(), Instant::now());
            ms.push(timed(false, &mut phases)?);
            let (g_s1, g_f1) = crate::engine::stats::gemm_counters();
            (gemm_s, gemm_flop, all_s) = (gemm_s + g_s1 - g_s0, gemm_flop + g_f1 - g_f0, all_s + t_all.elapsed().as_secs_f64());
            if scaling && rep % 2 == 1 {
                ms_one.push(timed(true, &mut phases_one)?);
            }
        }
        let n_steps = (reps.max(1) * steps.max(1)) as f64;
        let n_steps_one = (ms_one.len() * steps.max(1)) as f64;
        crate::engine::stats::profile_ops(false);
        op_split.sort_by(|a, b| b.2[0].total_cmp(&a.2[0]));
        let ops = op_split
            .into_iter()
            .map(|(op, calls, [all, one])| OpTime {
                op: op.into(),
                calls_per_step: calls as f64 / n_steps,
                ms_per_step: all * 1e3 / n_steps,
                ms_per_step_one_thread: scaling.then(|| one * 1e3 / n_steps_one),
                scaling: (scaling && all > 0.0).then(|| (one / n_steps_one) / (all / n_steps)),
            })
            .collect();
        let phases_ms = profile.then(|| {
            let ms = |s: f64| s * 1e3 / n_steps;
            Phases { forward: ms(phases[0]), backward: ms(phases[1]), adam: ms(phases[2]) }
        });
        let gemm_gflop_per_step = gemm_flop / n_steps / 1e9;
        let gemm_time_share = gemm_s / all_s;
        let (median_ms, min_ms, max_ms) = spread(&ms);
        let gflops = gemm_gflop_per_step / (median_ms / 1e3);
        let median_ms_one_thread = (!ms_one.is_empty()).then(|| spread(&ms_one).0);
        // Each repetition's one-thread time over its own all-thread time, then the median.
        let speedup = median_ms_one_thread.map(|_| spread(&ms_one.iter().zip(&ms).map(|(o, a)| o / a).collect::<Vec<_>>()).0);
        out.push(StageResult {
            stage: stage.into(),
            device: super::bench::device_name(dev),
            threads,
            batch: sb.batch.b,
            tokens: sb.tokens,
            items: sb.n_items,
            check_loss,
            min_ms,
            max_ms,
            us_per_token: median_ms * 1e3 / sb.tokens as f64,
            gemm_gflop_per_step,
            gemm_time_share,
            gflops,
            peak_fraction: 0.0,
            peak_gflops: 0.0,
            median_ms,
            ms,
            median_ms_one_thread,
            ms_one_thread: ms_one,
            scaling: speedup,
            peak_fraction_one_thread: None,
            peak_gflops_one_thread: None,
            phases_ms,
            ops,
        });
    }
    // The peak measured again after the steps, the better of the two kept: on a shared host one
    // measurement on two cores has read as one core's rate.
    let peak = peak.max(gemm_peak(dev)?);
    let peak_one = if scaling { peak_one.max(with_threads(1, || gemm_peak(dev))?) } else { 0.0 };
    for r in &mut out {
        r.peak_gflops = peak;
        r.peak_fraction = if peak > 0.0 { r.gflops / peak } else { 0.0 };
        if let Some(one) = r.median_ms_one_thread.filter(|_| peak_one > 0.0) {
            r.peak_gflops_one_thread = Some(peak_one);
            r.peak_fraction_one_thread = Some(r.gemm_gflop_per_step / (one / 1e3) / peak_one);
        }
    }
    Ok(out)
}

/// (median, min, max) of a non-empty list.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted[sorted.len() / 2], sorted[0], sorted[sorted.len() - 1])
}
