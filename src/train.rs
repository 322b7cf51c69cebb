//! Training loops (pre-training, fine-tuning, end-to-end), full-ranking evaluation, early stopping,
//! checkpoints and resume.
//!
//! Each epoch shuffles the training samples with an RNG seeded by (seed, stage, epoch), so a resumed
//! run replays exactly the epochs it missed. After every epoch the model is validated (Recall@20 on the
//! validation targets); the best epoch's weights go to the output checkpoint, and the full training
//! state (weights, Adam moments, epoch, best score, patience) to `<out>.last.safetensors` for `--resume`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, Checkpoint};
use crate::data::{batches, item_dropout, make_batch, Sample, Split};
use crate::engine::ops::add;
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{backward, no_grad, Tensor};
use crate::metrics::Metrics;
use crate::model::{Model, ModelConfig, ModelKind};
use crate::nn::Seeds;
use crate::{Error, Result};

/// Optimisation and protocol settings (saved with every checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub pretrain_epochs: usize,
    pub batch: usize,
    pub pretrain_batch: usize,
    pub eval_batch: usize,
    pub lr: f32,
    pub pretrain_lr: f32,
    /// Fine-tuning (and E2E) weight decay.
    pub weight_decay: f32,
    /// Pre-training weight decay (the authors pre-train without decay).
    pub pretrain_weight_decay: f32,
    pub clip: f32,
    /// Early-stopping patience (epochs without a better validation Recall@20).
    pub patience: usize,
    pub pretrain_patience: usize,
    pub seed: u64,
    pub min_user_inter: usize,
    /// Exclude each user's history items from the ranking (off: RecBole's sequential default).
    pub mask_history: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 300,
            pretrain_epochs: 300,
            batch: 1024,
            pretrain_batch: 1024,
            eval_batch: 1024,
            lr: 1e-3,
            pretrain_lr: 1e-3,
            weight_decay: 0.0,
            pretrain_weight_decay: 0.0,
            clip: 5.0,
            patience: 10,
            pretrain_patience: 20,
            seed: 2024,
            min_user_inter: 5,
            mask_history: false,
        }
    }
}

/// The whole effective configuration of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pretrain,
    Finetune,
    /// Pre-training and fine-tuning losses summed in one stage.
    E2e,
}

/// What a stage produced.
#[derive(Clone, Debug, Serialize)]
pub struct StageSummary {
    pub stage: Stage,
    pub best_epoch: usize,
    pub epochs: usize,
    pub seconds: f64,
    pub valid: Metrics,
    /// Mean training loss of each epoch run in this call.
    pub losses: Vec<f64>,
}

/// Rank every sample's target among all real items; returns one 0-based rank per sample. The item
/// side is encoded once; each batch's scores are reduced block by block on the model's device
/// (`Model::rank_targets`), only the ranks coming back.
pub fn ranks(model: &Model, samples: &[Sample], eval_batch: usize, with_id: bool, mask_history: bool) -> Result<Vec<u32>> {
    no_grad(|| {
        let mut out = Vec::with_capacity(samples.len());
        let mut seeds = Seeds::new(0);
        if samples.is_empty() {
            return Ok(out);
        }
        let tables = model.score_tables(false, with_id, &mut seeds)?;
        for chunk in samples.chunks(eval_batch.max(1)) {
            let refs: Vec<&Sample> = chunk.iter().collect();
            out.extend(model.rank_targets(&tables, &make_batch(&refs), mask_history, &mut seeds)?);
        }
        Ok(out)
    })
}

/// Recall/NDCG@{5,10,20} of `samples`.
pub fn evaluate(model: &Model, samples: &[Sample], cfg: &TrainConfig, with_id: bool) -> Result<Metrics> {
    Ok(Metrics::from_ranks(&ranks(model, samples, cfg.eval_batch, with_id, cfg.mask_history)?))
}

fn stage_tag(s: Stage) -> u64 {
    match s {
        Stage::Pretrain => 1,
        Stage::Finetune => 2,
        Stage::E2e => 3,
    }
}

/// Path of the resume state for checkpoint `out`.
pub fn last_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    out.with_file_name(format!("{stem}.last.safetensors"))
}

/// Metadata every checkpoint carries.
pub fn base_meta(cfg: &RunConfig, item_tokens: &[String], stage: Stage) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), "msm4sr-checkpoint-1".into());
    m.insert("config".into(), serde_json::to_string(cfg).unwrap());
    m.insert("item_tokens".into(), serde_json::to_string(item_tokens).unwrap());
    m.insert("stage".into(), serde_json::to_string(&stage).unwrap());
    m
}

/// Early stopping on validation Recall@20 as RecBole's `early_stopping`: a score at least as good
/// as the best so far (a tie included) is an improvement and becomes the best; training stops once
/// `patience` + 1 epochs in a row did not improve.
#[derive(Clone, Debug, PartialEq)]
pub struct EarlyStop {
    pub patience: usize,
    /// Best score so far (-1 before the first epoch).
    pub best: f64,
    /// Epochs since the last improvement.
    pub bad_epochs: usize,
}

impl EarlyStop {
    pub fn new(patience: usize) -> Self {
        EarlyStop { patience, best: -1.0, bad_epochs: 0 }
    }
    /// Record an epoch's score; true if it is an improvement (the new best).
    pub fn update(&mut self, score: f64) -> bool {
        if score >= self.best {
            self.best = score;
            self.bad_epochs = 0;
            true
        } else {
            self.bad_epochs += 1;
            false
        }
    }
    /// Whether training should stop.
    pub fn done(&self) -> bool {
        self.bad_epochs > self.patience
    }
}

/// Train one stage with early stopping; the best weights end up both in `model` and at `out`.
/// One summary line per epoch goes to stderr; `quiet` (used with `--json`) hides the progress bar.
pub fn fit(
    model: &Model,
    split: &Split,
    cfg: &RunConfig,
    stage: Stage,
    item_tokens: &[String],
    out: &Path,
    resume: bool,
    quiet: bool,
) -> Result<StageSummary> {
    let tc = &cfg.train;
    let (epochs, patience, batch_size, lr, weight_decay) = match stage {
        Stage::Pretrain => (tc.pretrain_epochs, tc.pretrain_patience, tc.pretrain_batch, tc.pretrain_lr, tc.pretrain_weight_decay),
        _ => (tc.epochs, tc.patience, tc.batch, tc.lr, tc.weight_decay),
    };
    let params = match stage {
        Stage::Pretrain => model.pretrain_params(),
        Stage::Finetune => model.finetune_params(),
        Stage::E2e => model.params(),
    };
    // Validation during pre-training uses modality scores only (the ID embeddings are not trained yet).
    let with_id = stage != Stage::Pretrain;
    let mut opt = Adam::new(
        params.iter().map(|(_, t)| t.clone()).collect(),
        AdamConfig { lr, weight_decay, max_grad_norm: tc.clip, ..AdamConfig::default() },
    )?;
    let mut meta = base_meta(cfg, item_tokens, stage);
    let mut stop = EarlyStop::new(patience);
    let (mut start_epoch, mut best_epoch) = (0usize, 0usize);
    let mut best_valid: Option<Metrics> = None;
    let last = last_path(out);
    if resume && last.exists() {
        let ck = checkpoint::load(&last)?;
        if ck.meta.get("stage") != meta.get("stage") {
            return Err(Error::Invalid(format!("{} belongs to stage {:?}, not {:?}", last.display(), ck.meta.get("stage"), stage)));
        }
        ck.load_into(&model.params(), true)?;
        let mut moments = Vec::new();
        for (n, p) in &params {
            let m = ck.tensor(&format!("adam.m.{n}"), p.shape(), p.device())?;
            let v = ck.tensor(&format!("adam.v.{n}"), p.shape(), p.device())?;
            match (m, v) {
                (Some(m), Some(v)) => moments.push((m, v)),
                _ => return Err(Error::Invalid(format!("{} has no optimizer state for {n}", last.display()))),
            }
        }
        let num = |k: &str| -> Result<f64> {
            ck.meta.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| Error::Invalid(format!("{}: metadata '{k}' missing", last.display())))
        };
        opt.load_state(num("adam_t")? as u32, moments)?;
        start_epoch = num("epoch")? as usize;
        stop.best = num("best")?;
        best_epoch = num("best_epoch")? as usize;
        stop.bad_epochs = num("bad_epochs")? as usize;
        if let Some(v) = ck.meta.get("best_valid") {
            best_valid = serde_json::from_str(v).ok();
        }
        eprintln!("resuming {stage:?} from {} at epoch {}", last.display(), start_epoch + 1);
    } else if resume {
        eprintln!("no resume state at {}; starting from scratch", last.display());
    }
    let start = Instant::now();
    let mut losses = Vec::new();
    let mut epoch = start_epoch;
    while epoch < epochs && !stop.done() {
        let mut rng = ChaCha8Rng::seed_from_u64(tc.seed ^ (stage_tag(stage) << 56) ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        let mut seeds = Seeds::new(rng.random());
        let order = batches(split.train.len(), batch_size, Some(&mut rng));
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(split.train.len() as u64) };
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}").unwrap().progress_chars("=> "),
        );
        bar.set_prefix(format!("{stage:?} epoch {:>3}", epoch + 1));
        let t0 = Instant::now();
        let gemm0 = crate::engine::tensor::gemm_counters();
        let (mut loss_sum, mut steps) = (0.0f64, 0usize);
        for idx in &order {
            let loss = step_loss(model, split, idx, stage, cfg, &mut rng, &mut seeds)?;
            let grads = backward(&loss)?;
            opt.step(&grads)?;
            let l = loss.item()?;
            if !l.is_finite() {
                return Err(Error::Invalid(format!("{stage:?} epoch {}: the loss became {l} (try a lower --lr)", epoch + 1)));
            }
            loss_sum += l as f64;
            steps += 1;
            bar.inc(idx.len() as u64);
            bar.set_message(format!("loss {:.4}", loss_sum / steps as f64));
        }
        bar.finish_and_clear();
        let epoch_loss = loss_sum / steps.max(1) as f64;
        losses.push(epoch_loss);
        let train_secs = t0.elapsed().as_secs_f64();
        // On the CPU backend: time in matrix products and their rate.
        let (gemm_secs, gemm_flop) = {
            let (s1, f1) = crate::engine::tensor::gemm_counters();
            (s1 - gemm0.0, f1 - gemm0.1)
        };
        let valid = evaluate(model, &split.valid, tc, with_id)?;
        let r20 = valid.recall20;
        let improved = stop.update(r20);
        if improved {
            best_epoch = epoch + 1;
            best_valid = Some(valid);
            let mut m = meta.clone();
            m.insert("epoch".into(), (epoch + 1).to_string());
            m.insert("valid".into(), serde_json::to_string(&valid).unwrap());
            checkpoint::save(out, &model.params(), &m)?;
        }
        eprintln!(
            "{stage:?} epoch {:>3}  loss {:.4}  train {:.1} s  {:.0} samples/s  valid recall@20 {:.4} ndcg@20 {:.4}{}",
            epoch + 1,
            epoch_loss,
            train_secs,
            split.train.len() as f64 / train_secs,
            valid.recall20,
            valid.ndcg20,
            if improved { "  *best" } else { "" },
        );
        if gemm_secs > 0.0 {
            eprintln!("{stage:?} epoch {:>3}  gemm {gemm_secs:.1} s at {:.0} GFLOP/s", epoch + 1, gemm_flop / gemm_secs / 1e9);
        }
        epoch += 1;
        // Resume state after every epoch.
        let mut state: Vec<(String, Tensor)> = model.params();
        for ((n, _), (m, v)) in params.iter().zip(opt.moments()) {
            state.push((format!("adam.m.{n}"), m.clone()));
            state.push((format!("adam.v.{n}"), v.clone()));
        }
        meta.insert("epoch".into(), epoch.to_string());
        meta.insert("adam_t".into(), opt.t.to_string());
        meta.insert("best".into(), stop.best.to_string());
        meta.insert("best_epoch".into(), best_epoch.to_string());
        meta.insert("bad_epochs".into(), stop.bad_epochs.to_string());
        if let Some(v) = &best_valid {
            meta.insert("best_valid".into(), serde_json::to_string(v).unwrap());
        }
        checkpoint::save(&last, &state, &meta)?;
    }
    // Continue from the best weights.
    if out.exists() {
        checkpoint::load(out)?.load_into(&model.params(), true)?;
    }
    Ok(StageSummary {
        stage,
        best_epoch,
        epochs: epoch,
        seconds: start.elapsed().as_secs_f64(),
        valid: best_valid.unwrap_or_else(|| Metrics::from_ranks(&[])),
        losses,
    })
}

/// The loss of one batch for a stage.
fn step_loss(
    model: &Model,
    split: &Split,
    idx: &[usize],
    stage: Stage,
    cfg: &RunConfig,
    rng: &mut ChaCha8Rng,
    seeds: &mut Seeds,
) -> Result<Tensor> {
    let samples: Vec<&Sample> = idx.iter().map(|&i| &split.train[i]).collect();
    match stage {
        Stage::Finetune => model.finetune_loss(&make_batch(&samples), seeds),
        Stage::Pretrain | Stage::E2e => {
            // Sequence random dropout with a per-batch ratio r ~ U(0, rho), then a mixup ratio p ~ U(0, 0.5).
            let r = rng.random::<f64>() * cfg.model.item_drop as f64;
            let dropped: Vec<Sample> =
                samples.iter().map(|s| Sample { user: s.user, seq: item_dropout(&s.seq, r, rng), target: s.target }).collect();
            let refs: Vec<&Sample> = dropped.iter().collect();
            let p_mix = rng.random::<f64>() * 0.5;
            let pre = model.pretrain_loss(&make_batch(&refs), p_mix, rng, seeds)?;
            if stage == Stage::E2e {
                add(&pre, &model.finetune_loss(&make_batch(&samples), seeds)?)
            } else {
                Ok(pre)
            }
        }
    }
}

/// Load model weights (and check the item order) from a checkpoint written by `fit`.
pub fn load_weights(model: &Model, ck: &Checkpoint, item_tokens: &[String], strict: bool) -> Result<usize> {
    if let Some(tokens) = ck.meta.get("item_tokens") {
        let saved: Vec<String> = serde_json::from_str(tokens).map_err(|e| Error::Invalid(format!("checkpoint item_tokens: {e}")))?;
        if saved != item_tokens {
            return Err(Error::Invalid(format!(
                "the checkpoint was trained on a different item set ({} items) than this dataset ({} items)",
                saved.len().saturating_sub(1),
                item_tokens.len().saturating_sub(1)
            )));
        }
    }
    ck.load_into(&model.params(), strict)
}

/// Whether a model kind runs the pre-training stage.
pub fn pretrains(cfg: &ModelConfig) -> bool {
    cfg.model == ModelKind::Msm4sr
}
