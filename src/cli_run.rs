//! What the training commands of the CLI do, as library calls: resolve the effective configuration
//! (defaults < `--config` TOML < flags), load the dataset, build the model, run the stages, report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::checkpoint;
use crate::data::{make_batch, Dataset, LoadOptions, MissingFeatures, Sample};
use crate::engine::{no_grad, Device};
use crate::metrics::Metrics;
use crate::model::{Model, ModelKind};
use crate::nn::Seeds;
use crate::train::{self, RunConfig, Stage};
use crate::{Error, Result};

/// Read a TOML config file (sections `[model]` and `[train]`, any subset of keys).
pub fn read_config(path: &Path) -> Result<RunConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    toml::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

pub fn config_toml(cfg: &RunConfig) -> String {
    toml::to_string(cfg).unwrap_or_default()
}

pub fn load_dataset(dir: &Path, cfg: &RunConfig, missing: MissingFeatures) -> Result<Dataset> {
    Dataset::load(dir, &LoadOptions { min_user_inter: cfg.train.min_user_inter, missing_features: missing, require_features: false })
}

/// The `--json` result of train / evaluate.
#[derive(Serialize)]
pub struct RunResult {
    pub model: String,
    pub valid: Metrics,
    pub test: Metrics,
    pub epochs: usize,
    pub seconds: f64,
}

pub fn model_name(cfg: &RunConfig) -> String {
    let m = &cfg.model;
    let mut s = format!("{:?}", m.model).to_lowercase();
    if m.model == ModelKind::Msm4sr {
        if let Some(d) = m.drop_score {
            s.push_str(&format!(" drop-score {d:?}").to_lowercase());
        }
        s.push_str(&format!(" (score {:?})", m.score).to_lowercase());
    }
    s
}

/// Which stages `train` runs.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub pretrain: bool,
    pub finetune: bool,
    pub e2e: bool,
}

/// Train per `plan`, checkpoint at `out` (pre-training at `<out stem>.pretrain.safetensors`), and
/// evaluate the best fine-tuned weights on valid and test.
#[allow(clippy::too_many_arguments)]
pub fn run_training(
    ds: &Dataset,
    cfg: &RunConfig,
    plan: Plan,
    out: &Path,
    init: Option<&Path>,
    resume: bool,
    dev: Device,
    quiet: bool,
) -> Result<RunResult> {
    let split = ds.split(cfg.model.max_len);
    if split.train.is_empty() || split.valid.is_empty() || split.test.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {} gives {} training, {} validation and {} test samples; all three must be non-empty",
            ds.name,
            split.train.len(),
            split.valid.len(),
            split.test.len()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, dev)?;
    if let Some(init) = init {
        let ck = checkpoint::load(init)?;
        let n = train::load_weights(&model, &ck, &ds.item_tokens, false)?;
        if !quiet {
            eprintln!("initialised {n} tensors from {}", init.display());
        }
    }
    let start = Instant::now();
    let mut epochs = 0;
    if plan.pretrain {
        let pre_out = stage_path(out, "pretrain");
        let s = train::fit(&model, &split, cfg, Stage::Pretrain, &ds.item_tokens, &pre_out, resume, quiet)?;
        epochs += s.epochs;
        if !quiet {
            eprintln!(
                "pre-training: best epoch {} of {}, valid recall@20 {:.4} (modality scores only), weights in {}",
                s.best_epoch,
                s.epochs,
                s.valid.recall20,
                pre_out.display()
            );
        }
    }
    let stage = if plan.e2e { Stage::E2e } else { Stage::Finetune };
    if plan.finetune || plan.e2e {
        let s = train::fit(&model, &split, cfg, stage, &ds.item_tokens, out, resume, quiet)?;
        epochs += s.epochs;
        if !quiet {
            eprintln!("{stage:?}: best epoch {} of {}, weights in {}", s.best_epoch, s.epochs, out.display());
        }
    }
    let with_id = plan.finetune || plan.e2e;
    let valid = train::evaluate(&model, &split.valid, &cfg.train, with_id)?;
    let test = train::evaluate(&model, &split.test, &cfg.train, with_id)?;
    Ok(RunResult { model: model_name(cfg), valid, test, epochs, seconds: start.elapsed().as_secs_f64() })
}

/// `runs/model.safetensors` + "pretrain" -> `runs/model.pretrain.safetensors`.
pub fn stage_path(out: &Path, tag: &str) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    out.with_file_name(format!("{stem}.{tag}.safetensors"))
}

/// A model rebuilt from a checkpoint.
pub struct Restored {
    pub model: Model,
    pub cfg: RunConfig,
    /// The stage that wrote the checkpoint.
    pub stage: Stage,
}

impl Restored {
    /// Whether scores add the ID embeddings: not for a pre-training checkpoint, whose ID embeddings
    /// were never trained and whose epoch was selected on modality scores alone.
    pub fn with_id(&self) -> bool {
        self.stage != Stage::Pretrain
    }
}

/// Rebuild a model from a checkpoint's saved config and weights.
pub fn model_from_checkpoint(ds: &Dataset, ckpt: &Path, dev: Device) -> Result<Restored> {
    let ck = checkpoint::load(ckpt)?;
    let stage: Stage = ck
        .meta
        .get("stage")
        .ok_or_else(|| Error::Invalid(format!("{} has no stage metadata (not an msm4sr checkpoint?)", ckpt.display())))
        .and_then(|s| serde_json::from_str(s).map_err(|e| Error::Invalid(format!("{}: stage metadata {s:?}: {e}", ckpt.display()))))?;
    let cfg: RunConfig = ck
        .meta
        .get("config")
        .ok_or_else(|| Error::Invalid(format!("{} has no config metadata (not an msm4sr checkpoint?)", ckpt.display())))
        .and_then(|c| serde_json::from_str(c).map_err(|e| Error::Invalid(format!("{}: config metadata: {e}", ckpt.display()))))?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, dev)?;
    train::load_weights(&model, &ck, &ds.item_tokens, true)?;
    Ok(Restored { model, cfg, stage })
}

/// Per-user target ranks as TSV (`split`, `user`, `target`, `rank`; rank 0 = top, ties counted
/// against the target), one line per evaluated sample.
pub fn ranks_tsv(ds: &Dataset, parts: &[(&str, &[Sample], &[u32])]) -> String {
    let mut out = String::from("split\tuser\ttarget\trank\n");
    for (name, samples, ranks) in parts {
        for (s, r) in samples.iter().zip(ranks.iter()) {
            out += &format!("{name}\t{}\t{}\t{r}\n", ds.user_tokens[s.user as usize], ds.item_tokens[s.target as usize]);
        }
    }
    out
}

/// Top-k items for one user given their whole history; returns (item token, score, already seen).
/// `with_id`: add the ID embeddings to the item tables (see [`Restored::with_id`]).
pub fn recommend(model: &Model, ds: &Dataset, user: &str, k: usize, with_id: bool) -> Result<Vec<(String, f32, bool)>> {
    let u = ds
        .user_tokens
        .iter()
        .position(|t| t == user)
        .ok_or_else(|| Error::Invalid(format!("unknown user '{user}' (not in the dataset after filtering)")))?;
    let hist = &ds.seqs[u];
    let l = model.cfg.max_len;
    let seq = hist[hist.len().saturating_sub(l)..].to_vec();
    let sample = Sample { user: u as u32, seq, target: 1 };
    let scores = no_grad(|| model.scores(&make_batch(&[&sample]), false, with_id, &mut Seeds::new(0)))?.to_vec()?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    Ok(order.into_iter().take(k).map(|j| (ds.item_tokens[j + 1].clone(), scores[j], hist.contains(&(j as u32 + 1)))).collect())
}
