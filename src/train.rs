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
#[serde(default, deny_unknown_fields)]
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
    /// Evaluation protocol: standard leave-one-out, or cold-start (paper Table V; see
    /// `Dataset::cold_start`).
    pub protocol: Protocol,
    /// Cold-start: items with fewer training interactions than this are cold.
    pub cold_threshold: usize,
    /// Parameters fine-tuning leaves as they are: none, or the transformer (with its position
    /// embeddings and input LayerNorm; cross-domain transfer).
    pub freeze: Freeze,
    /// Cross-domain fine-tuning: `--init` is a checkpoint of another item set, of which only the
    /// item-independent tensors (transformer, item encoders) are carried over.
    pub cross_domain: bool,
}

/// The evaluation protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Standard,
    /// Items seen fewer than `cold_threshold` times in training are cold: pre-training without
    /// them, fine-tuning (msm4sr) without ID embeddings, evaluation on users whose target is cold.
    ColdStart,
}

/// What fine-tuning keeps fixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Freeze {
    #[default]
    None,
    Transformer,
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
            protocol: Protocol::Standard,
            cold_threshold: 10,
            freeze: Freeze::None,
            cross_domain: false,
        }
    }
}

/// The whole effective configuration of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
}

impl RunConfig {
    /// Check every setting's range before anything runs; the error names the flag (and the config
    /// file key), the value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        let (m, t) = (&self.model, &self.train);
        // `flag` "" for settings only a config file sets.
        fn bad(flag: &str, key: &str, value: impl std::fmt::Display, want: &str) -> Result<()> {
            let what =
                if flag.is_empty() { format!("`{key} = {value}` (config file)") } else { format!("--{flag} {value} (config `{key}`)") };
            Err(Error::Invalid(format!("{what}: {want}")))
        }
        let at_least = |flag: &str, key: &str, v: usize, min: usize| {
            if v < min {
                bad(flag, key, v, &format!("must be at least {min}"))
            } else {
                Ok(())
            }
        };
        let positive = |flag: &str, key: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                bad(flag, key, v, "must be a finite number above 0")
            }
        };
        let non_negative = |flag: &str, key: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                bad(flag, key, v, "must be a finite number, 0 or more")
            }
        };
        let probability = |flag: &str, key: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                bad(flag, key, v, "must be a probability in [0, 1)")
            }
        };
        at_least("epochs", "train.epochs", t.epochs, 1)?;
        at_least("pretrain-epochs", "train.pretrain_epochs", t.pretrain_epochs, 1)?;
        at_least("batch", "train.batch", t.batch, 1)?;
        at_least("pretrain-batch", "train.pretrain_batch", t.pretrain_batch, 1)?;
        at_least("eval-batch", "train.eval_batch", t.eval_batch, 1)?;
        positive("lr", "train.lr", t.lr)?;
        positive("pretrain-lr", "train.pretrain_lr", t.pretrain_lr)?;
        non_negative("weight-decay", "train.weight_decay", t.weight_decay)?;
        non_negative("pretrain-weight-decay", "train.pretrain_weight_decay", t.pretrain_weight_decay)?;
        non_negative("clip", "train.clip", t.clip)?;
        // Leave-one-out needs a training, a validation and a test interaction per user.
        at_least("min-user-inter", "train.min_user_inter", t.min_user_inter, 3)?;
        at_least("cold-threshold", "train.cold_threshold", t.cold_threshold, 1)?;
        at_least("hidden", "model.hidden", m.hidden, 1)?;
        at_least("layers", "model.layers", m.layers, 1)?;
        at_least("heads", "model.heads", m.heads, 1)?;
        if !m.hidden.is_multiple_of(m.heads) {
            return bad(
                "heads",
                "model.heads",
                m.heads,
                &format!("must divide --hidden {} (each head gets hidden / heads channels)", m.hidden),
            );
        }
        at_least("inner", "model.inner", m.inner, 1)?;
        at_least("max-len", "model.max_len", m.max_len, 1)?;
        at_least("experts", "model.experts", m.experts, 1)?;
        probability("dropout", "model.dropout", m.dropout)?;
        probability("attn-dropout", "model.attn_dropout", m.attn_dropout)?;
        probability("moe-dropout", "model.moe_dropout", m.moe_dropout)?;
        probability("item-drop", "model.item_drop", m.item_drop)?;
        positive("tau", "model.tau", m.tau)?;
        non_negative("lambda", "model.lambda", m.lambda)?;
        // --drop-score removes one modality's term from the scores of a model that has both.
        if let (Some(d), false) = (m.drop_score, m.modalities == crate::model::Modalities::Both) {
            let name = |x: &dyn std::fmt::Debug| format!("{x:?}").to_lowercase();
            return Err(Error::Invalid(format!(
                "--drop-score {} with --modalities {}: dropping a modality's score needs both modalities (MSM4SR-T is \
                 --drop-score image, MSM4SR-V --drop-score text, each with --modalities both)",
                name(&d),
                name(&m.modalities)
            )));
        }
        Ok(())
    }
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
    /// Every epoch of the stage (those before a resume included).
    pub history: Vec<EpochRecord>,
}

/// Rank every sample's target among all real items; returns one 0-based rank per sample. The item
/// side is encoded once; each batch's scores are reduced block by block on the model's device
/// (`Model::rank_targets`), only the ranks coming back.
pub fn ranks(model: &Model, samples: &[Sample], eval_batch: usize, with_id: bool, mask_history: bool) -> Result<Vec<u32>> {
    let r = ranks_inner(model, samples, eval_batch, with_id, mask_history);
    if r.is_ok() {
        crate::fault::reached("evaluated");
    }
    r
}

fn ranks_inner(model: &Model, samples: &[Sample], eval_batch: usize, with_id: bool, mask_history: bool) -> Result<Vec<u32>> {
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
/// The `format` metadata of every checkpoint this version writes.
pub const CHECKPOINT_FORMAT: &str = "msm4sr-checkpoint-1";

pub fn base_meta(cfg: &RunConfig, item_tokens: &[String], stage: Stage) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("format".into(), CHECKPOINT_FORMAT.into());
    m.insert("config".into(), serde_json::to_string(cfg).unwrap());
    m.insert("item_tokens".into(), serde_json::to_string(item_tokens).unwrap());
    m.insert("stage".into(), serde_json::to_string(&stage).unwrap());
    m
}

/// The resume state at `last`, checked to be `stage` of this run: the same data (`data`) and the same
/// settings as `cfg` but those of [`RESUME_MAY_CHANGE`]. Also used before a resumed run does any
/// work, for every stage it will resume.
pub fn read_resume_state(last: &Path, stage: Stage, data: &DataFingerprint, cfg: &RunConfig) -> Result<(Checkpoint, ResumeState)> {
    let ck = checkpoint::load(last)?;
    let st: ResumeState = ck
        .meta
        .get("resume")
        .ok_or_else(|| Error::Invalid(format!("{} has no resume state (not written by this version's training loop)", last.display())))
        .and_then(|v| serde_json::from_str(v).map_err(|e| Error::Invalid(format!("{}: resume state: {e}", last.display()))))?;
    if st.stage != stage {
        return Err(Error::Invalid(format!(
            "--resume: {} holds stage {:?} of a run, not {stage:?}; resume a run with the command that started it",
            last.display(),
            st.stage
        )));
    }
    if st.data != *data {
        return Err(Error::Invalid(format!(
            "--resume: {} was trained on other data ({}) than this dataset ({}); start a new run (--overwrite) instead",
            last.display(),
            st.data,
            data
        )));
    }
    if let Some(d) = config_difference(&st.config, cfg) {
        return Err(Error::Invalid(format!(
            "--resume continues the run as it was, but {d}; only {} may change on resume (or start a new run with --overwrite)",
            RESUME_MAY_CHANGE.join(", ")
        )));
    }
    Ok((ck, st))
}

/// What a resume state (`<out>.last.safetensors`, metadata `resume`) records besides the weights
/// and Adam moments: where the stage stands, and which run it is (data and configuration), so that
/// `--resume` continues only that run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResumeState {
    pub stage: Stage,
    /// Epochs finished.
    pub epoch: usize,
    /// Adam's step count.
    pub adam_t: u32,
    pub best: f64,
    pub best_epoch: usize,
    pub bad_epochs: usize,
    pub best_valid: Option<Metrics>,
    pub data: DataFingerprint,
    pub config: RunConfig,
    /// The stage's epochs so far (the run log is rebuilt from it on resume).
    #[serde(default)]
    pub history: Vec<EpochRecord>,
}

/// Settings that may change when a run is resumed (config keys); every other one must match.
pub const RESUME_MAY_CHANGE: [&str; 5] =
    ["train.epochs", "train.pretrain_epochs", "train.patience", "train.pretrain_patience", "train.eval_batch"];

/// The data a run was trained on: the item order, the interaction count, and a hash of both and of
/// every sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub items: usize,
    pub interactions: usize,
    /// FNV-1a (64-bit, hex) of the item tokens in order and of every sample (user, sequence, target).
    pub hash: String,
}

impl DataFingerprint {
    pub fn of(item_tokens: &[String], split: &Split) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for t in item_tokens {
            eat(t.as_bytes());
            eat(&[0xff]);
        }
        let mut users = std::collections::HashSet::new();
        for s in split.train.iter().chain(&split.valid).chain(&split.test) {
            users.insert(s.user);
            eat(&s.user.to_le_bytes());
            eat(&(s.seq.len() as u32).to_le_bytes());
            for i in &s.seq {
                eat(&i.to_le_bytes());
            }
            eat(&s.target.to_le_bytes());
        }
        // Each user with n interactions gives n - 1 samples (targets 2..n).
        let samples = split.train.len() + split.valid.len() + split.test.len();
        DataFingerprint { items: item_tokens.len().saturating_sub(1), interactions: samples + users.len(), hash: format!("{h:016x}") }
    }
}

impl std::fmt::Display for DataFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} items, {} interactions, hash {}", self.items, self.interactions, self.hash)
    }
}

/// The first setting (config key) that differs between `was` and `now`, outside
/// [`RESUME_MAY_CHANGE`], in words.
pub fn config_difference(was: &RunConfig, now: &RunConfig) -> Option<String> {
    fn flat(c: &RunConfig) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        if let serde_json::Value::Object(sections) = serde_json::to_value(c).unwrap_or_default() {
            for (sec, v) in sections {
                if let serde_json::Value::Object(keys) = v {
                    for (k, v) in keys {
                        out.insert(format!("{sec}.{k}"), v);
                    }
                }
            }
        }
        out
    }
    let (a, b) = (flat(was), flat(now));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let found = keys.into_iter().filter(|k| !RESUME_MAY_CHANGE.contains(&k.as_str())).find_map(|k| {
        let (x, y) = (a.get(k), b.get(k));
        (x != y).then(|| {
            let show = |v: Option<&serde_json::Value>| v.map_or("unset".to_string(), |v| v.to_string());
            format!("`{k}` was {} in the interrupted run and is {} now", show(x), show(y))
        })
    });
    found
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

/// One epoch of a stage as the run log records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub stage: Stage,
    /// 1-based, counted within the stage.
    pub epoch: usize,
    /// Mean training loss over the epoch's steps.
    pub loss: f64,
    /// Mean of each loss term (see `Model::pretrain_terms`; `ce` is fine-tuning's cross-entropy),
    /// as it enters the loss (CMCL weighted by lambda).
    pub terms: BTreeMap<String, f64>,
    /// Validation metrics after the epoch (modality scores only in pre-training).
    pub valid: Metrics,
    /// Whether this epoch became the stage's best (its weights are the checkpoint).
    pub best: bool,
    pub samples_per_s: f64,
    /// Seconds of training (without validation).
    pub train_seconds: f64,
    pub valid_seconds: f64,
    pub lr: f32,
}

/// Names of the loss terms, in the order of the CSV columns.
pub const LOSS_TERMS: [&str; 6] = ["nip_text", "nip_image", "cmcl_text", "cmcl_image", "cmcl", "ce"];

/// The per-epoch log of a run: every record so far as JSON lines and as CSV, both rewritten
/// (atomically) after every epoch, so that they always match the resume state.
pub struct RunLog {
    pub jsonl: PathBuf,
    pub csv: PathBuf,
    /// Records of the run's earlier stages.
    pub earlier: Vec<EpochRecord>,
}

impl RunLog {
    pub fn new(jsonl: PathBuf, csv: PathBuf) -> Self {
        RunLog { jsonl, csv, earlier: Vec::new() }
    }

    /// Write the earlier stages' records and then `current`.
    pub fn write(&self, current: &[EpochRecord]) -> Result<()> {
        let all: Vec<&EpochRecord> = self.earlier.iter().chain(current).collect();
        let mut jsonl = String::new();
        for r in &all {
            jsonl += &serde_json::to_string(r).map_err(|e| Error::Invalid(e.to_string()))?;
            jsonl.push('\n');
        }
        checkpoint::write_atomic(&self.jsonl, jsonl.as_bytes())?;
        checkpoint::write_atomic(&self.csv, epochs_csv(&all).as_bytes())
    }
}

/// The records as CSV: stage, epoch, loss, each of [`LOSS_TERMS`] (empty where a stage has no such
/// term), the six validation metrics, best, samples/s, seconds, learning rate.
pub fn epochs_csv(records: &[&EpochRecord]) -> String {
    let mut out = String::from("stage,epoch,loss");
    for t in LOSS_TERMS {
        out += &format!(",{t}");
    }
    out += ",valid_recall@5,valid_recall@10,valid_recall@20,valid_ndcg@5,valid_ndcg@10,valid_ndcg@20,best,samples_per_s,train_seconds,valid_seconds,lr\n";
    for r in records {
        out += &format!("{},{},{}", serde_json::to_string(&r.stage).unwrap().trim_matches('"'), r.epoch, r.loss);
        for t in LOSS_TERMS {
            out.push(',');
            if let Some(v) = r.terms.get(t) {
                out += &v.to_string();
            }
        }
        let v = &r.valid;
        out += &format!(
            ",{},{},{},{},{},{},{},{:.1},{:.3},{:.3},{}\n",
            v.recall5, v.recall10, v.recall20, v.ndcg5, v.ndcg10, v.ndcg20, r.best, r.samples_per_s, r.train_seconds, r.valid_seconds, r.lr
        );
    }
    out
}

/// Train one stage with early stopping; the best weights end up both in `model` and at `out`.
/// One summary line per epoch goes to stderr; `quiet` (used with `--json`) hides the progress bar.
#[allow(clippy::too_many_arguments)]
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
    fit_logged(model, split, cfg, stage, item_tokens, out, resume, quiet, None)
}

/// [`fit`], writing the run log after every epoch when `log` is given.
#[allow(clippy::too_many_arguments)]
pub fn fit_logged(
    model: &Model,
    split: &Split,
    cfg: &RunConfig,
    stage: Stage,
    item_tokens: &[String],
    out: &Path,
    resume: bool,
    quiet: bool,
    log: Option<&RunLog>,
) -> Result<StageSummary> {
    let mut run = StageRun::new(model, split, cfg, stage, item_tokens, out)?;
    if resume {
        run.resume()?;
    }
    let start = Instant::now();
    let mut losses = Vec::new();
    while run.epoch < run.settings.epochs && !run.stop.done() {
        let trained = run.train_epoch(quiet)?;
        run.check_finite()?;
        let t0 = Instant::now();
        let valid = evaluate(model, &split.valid, &cfg.train, run.with_id).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("{stage:?} epoch {}: validation: {m}", run.epoch + 1)),
            e => e,
        })?;
        let rec = run.end_epoch(trained, valid, t0.elapsed().as_secs_f64())?;
        crate::console::line(&format!(
            "{stage:?} epoch {:>3}  loss {:.4}  train {:.1} s  {:.0} samples/s  valid recall@20 {:.4} ndcg@20 {:.4}{}",
            rec.epoch,
            rec.loss,
            rec.train_seconds,
            rec.samples_per_s,
            rec.valid.recall20,
            rec.valid.ndcg20,
            if rec.best { "  *best" } else { "" },
        ));
        if let Some(d) = trained.dispatches {
            eprintln!("{stage:?} epoch {:>3}  gpu {:.0} dispatches, {:.0} copies and {:.1} submits per step", rec.epoch, d.0, d.2, d.1);
        }
        if trained.gemm_secs > 0.0 {
            eprintln!(
                "{stage:?} epoch {:>3}  gemm {:.1} s at {:.0} GFLOP/s",
                rec.epoch,
                trained.gemm_secs,
                trained.gemm_flop / trained.gemm_secs / 1e9
            );
        }
        losses.push(rec.loss);
        run.save_state()?;
        if let Some(log) = log {
            log.write(&run.history)?;
        }
    }
    // Continue from the best weights.
    if out.exists() {
        checkpoint::load(out)?.load_into(&model.params(), true)?;
    }
    Ok(StageSummary {
        stage,
        best_epoch: run.best_epoch,
        epochs: run.epoch,
        seconds: start.elapsed().as_secs_f64(),
        valid: run.best_valid.unwrap_or_else(|| Metrics::from_ranks(&[])),
        losses,
        history: run.history,
    })
}

/// A stage's settings from the run's configuration.
#[derive(Clone, Copy, Debug)]
struct StageSettings {
    epochs: usize,
    patience: usize,
    batch: usize,
    lr: f32,
    weight_decay: f32,
}

/// What one epoch's training steps gave.
#[derive(Clone, Copy, Debug)]
struct Trained {
    loss: f64,
    /// Sums over the steps of each of [`LOSS_TERMS`] (NaN-free: only present terms are added).
    terms: [f64; LOSS_TERMS.len()],
    present: [bool; LOSS_TERMS.len()],
    steps: usize,
    seconds: f64,
    gemm_secs: f64,
    gemm_flop: f64,
    /// On the GPU: (dispatches, submits, copies) per step.
    dispatches: Option<(f64, f64, f64)>,
}

/// A stage in progress: the optimizer, early stopping and the epoch count, which the resume state
/// saves after every epoch and [`StageRun::resume`] restores.
struct StageRun<'a> {
    model: &'a Model,
    split: &'a Split,
    cfg: &'a RunConfig,
    stage: Stage,
    settings: StageSettings,
    params: Vec<(String, Tensor)>,
    /// Validation with the ID embeddings (not in pre-training, whose IDs are not trained yet).
    with_id: bool,
    opt: Adam,
    stop: EarlyStop,
    /// Epochs finished.
    epoch: usize,
    best_epoch: usize,
    best_valid: Option<Metrics>,
    history: Vec<EpochRecord>,
    data: DataFingerprint,
    meta: BTreeMap<String, String>,
    out: PathBuf,
    last: PathBuf,
}

impl<'a> StageRun<'a> {
    fn new(model: &'a Model, split: &'a Split, cfg: &'a RunConfig, stage: Stage, item_tokens: &[String], out: &Path) -> Result<Self> {
        let tc = &cfg.train;
        let settings = match stage {
            Stage::Pretrain => StageSettings {
                epochs: tc.pretrain_epochs,
                patience: tc.pretrain_patience,
                batch: tc.pretrain_batch,
                lr: tc.pretrain_lr,
                weight_decay: tc.pretrain_weight_decay,
            },
            _ => StageSettings { epochs: tc.epochs, patience: tc.patience, batch: tc.batch, lr: tc.lr, weight_decay: tc.weight_decay },
        };
        let params = match stage {
            Stage::Pretrain => model.pretrain_params(),
            Stage::Finetune if cfg.train.freeze == Freeze::Transformer => {
                model.finetune_params().into_iter().filter(|(n, _)| !n.starts_with("transformer.")).collect()
            }
            Stage::Finetune => model.finetune_params(),
            Stage::E2e => model.params(),
        };
        let opt = Adam::new(
            params.iter().map(|(_, t)| t.clone()).collect(),
            AdamConfig { lr: settings.lr, weight_decay: settings.weight_decay, max_grad_norm: tc.clip, ..AdamConfig::default() },
        )?;
        Ok(StageRun {
            model,
            split,
            cfg,
            stage,
            settings,
            params,
            with_id: stage != Stage::Pretrain,
            opt,
            stop: EarlyStop::new(settings.patience),
            epoch: 0,
            best_epoch: 0,
            best_valid: None,
            history: Vec::new(),
            data: DataFingerprint::of(item_tokens, split),
            meta: base_meta(cfg, item_tokens, stage),
            out: out.to_path_buf(),
            last: last_path(out),
        })
    }

    /// Restore the resume state at `<out>.last.safetensors` if there is one; it must be this stage
    /// of this run (same data, same settings but those of [`RESUME_MAY_CHANGE`]).
    fn resume(&mut self) -> Result<()> {
        let (last, stage) = (&self.last, self.stage);
        if !last.exists() {
            crate::console::line(&format!("no resume state at {}; starting from scratch", last.display()));
            return Ok(());
        }
        let (ck, st) = read_resume_state(last, stage, &self.data, self.cfg)?;
        ck.load_into(&self.model.params(), true)?;
        let mut moments = Vec::new();
        for (n, p) in &self.params {
            let m = ck.tensor(&format!("adam.m.{n}"), p.shape(), p.device())?;
            let v = ck.tensor(&format!("adam.v.{n}"), p.shape(), p.device())?;
            match (m, v) {
                (Some(m), Some(v)) => moments.push((m, v)),
                _ => return Err(Error::Invalid(format!("{} has no optimizer state for {n}", last.display()))),
            }
        }
        self.opt.load_state(st.adam_t, moments)?;
        self.epoch = st.epoch;
        self.stop.best = st.best;
        self.stop.bad_epochs = st.bad_epochs;
        self.best_epoch = st.best_epoch;
        self.best_valid = st.best_valid;
        self.history = st.history;
        crate::console::line(&format!("resuming {stage:?} from {} at epoch {}", last.display(), self.epoch + 1));
        Ok(())
    }

    /// One pass over the training samples (shuffled by an RNG seeded from the seed, the stage and
    /// the epoch, so a resumed run replays the same batches); stops with [`Error::Interrupted`] after
    /// the step in which Ctrl-C or SIGTERM arrived.
    fn train_epoch(&mut self, quiet: bool) -> Result<Trained> {
        let (stage, epoch, split) = (self.stage, self.epoch, self.split);
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.train.seed ^ (stage_tag(stage) << 56) ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        let mut seeds = Seeds::new(rng.random());
        let order = batches(split.train.len(), self.settings.batch, Some(&mut rng));
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(split.train.len() as u64) };
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}").unwrap().progress_chars("=> "),
        );
        bar.set_prefix(format!("{stage:?} epoch {:>3}", epoch + 1));
        let t0 = Instant::now();
        let gemm0 = crate::engine::stats::gemm_counters();
        let mut t = Trained {
            loss: 0.0,
            terms: [0.0; LOSS_TERMS.len()],
            present: [false; LOSS_TERMS.len()],
            steps: 0,
            seconds: 0.0,
            gemm_secs: 0.0,
            gemm_flop: 0.0,
            dispatches: None,
        };
        let dev = self.params.first().map(|(_, p)| p.device()).unwrap_or(crate::engine::Device::Cpu);
        let c0 = crate::engine::stats::gpu_counters(dev);
        for idx in &order {
            let (loss, values) = step_loss(self.model, split, idx, stage, self.cfg, &mut rng, &mut seeds)?;
            let grads = backward(&loss)?;
            self.opt.step(&grads)?;
            crate::fault::point("step");
            crate::fault::reached("step");
            if crate::interrupt::requested() {
                bar.finish_and_clear();
                let done = if epoch > 0 { format!("after epoch {epoch}, in {}", self.last.display()) } else { "none yet".to_string() };
                return Err(Error::Interrupted(format!(
                    "interrupted in {stage:?} epoch {} (saved state: {done}); run the same command with --resume to continue",
                    epoch + 1
                )));
            }
            // The loss and its terms in one read-back (one submit on the GPU).
            let read = if values.len() == 1 {
                vec![loss.item()?]
            } else {
                no_grad(|| -> Result<Vec<f32>> {
                    let mut xs = vec![loss.reshape(&[1])?];
                    for (_, v) in &values {
                        xs.push(v.reshape(&[1])?);
                    }
                    crate::engine::ops::concat(&xs.iter().collect::<Vec<_>>())?.to_vec()
                })?
            };
            let l = read[0];
            if !l.is_finite() {
                return Err(Error::Invalid(format!("{stage:?} epoch {}: the loss became {l} (try a lower --lr)", epoch + 1)));
            }
            for (j, (name, _)) in values.iter().enumerate() {
                let k = LOSS_TERMS.iter().position(|t| t == name).expect("a named loss term");
                t.terms[k] += if values.len() == 1 { l } else { read[j + 1] } as f64;
                t.present[k] = true;
            }
            t.loss += l as f64;
            t.steps += 1;
            bar.inc(idx.len() as u64);
            bar.set_message(format!("loss {:.4}", t.loss / t.steps as f64));
        }
        bar.finish_and_clear();
        t.seconds = t0.elapsed().as_secs_f64();
        // On the CPU backend: time in matrix products and their rate.
        let (s1, f1) = crate::engine::stats::gemm_counters();
        (t.gemm_secs, t.gemm_flop) = (s1 - gemm0.0, f1 - gemm0.1);
        let n = t.steps.max(1) as f64;
        t.dispatches = c0
            .zip(crate::engine::stats::gpu_counters(dev))
            .map(|(a, b)| ((b.dispatches - a.dispatches) as f64 / n, (b.submits - a.submits) as f64 / n, (b.copies - a.copies) as f64 / n));
        Ok(t)
    }

    /// A last step can leave finite losses but non-finite weights: never evaluate or save those.
    fn check_finite(&self) -> Result<()> {
        for (name, p) in &self.params {
            if p.to_vec()?.iter().any(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "{:?} epoch {}: parameter {name} became NaN or Inf; nothing of this epoch was saved \
                     (the best checkpoint so far is kept); try a lower learning rate (now {}) or gradient clipping",
                    self.stage,
                    self.epoch + 1,
                    self.settings.lr
                )));
            }
        }
        Ok(())
    }

    /// Record the epoch: early stopping, the best checkpoint when it improved, the log record.
    fn end_epoch(&mut self, t: Trained, valid: Metrics, valid_seconds: f64) -> Result<EpochRecord> {
        let improved = self.stop.update(valid.recall20);
        self.epoch += 1;
        if improved {
            self.best_epoch = self.epoch;
            self.best_valid = Some(valid);
            let mut m = self.meta.clone();
            m.insert("epoch".into(), self.epoch.to_string());
            m.insert("valid".into(), serde_json::to_string(&valid).unwrap());
            checkpoint::save(&self.out, &self.model.params(), &m)?;
        }
        let steps = t.steps.max(1) as f64;
        let terms =
            LOSS_TERMS.iter().zip(t.terms.iter().zip(&t.present)).filter(|(_, (_, p))| **p).map(|(n, (v, _))| (n.to_string(), v / steps));
        let rec = EpochRecord {
            stage: self.stage,
            epoch: self.epoch,
            loss: t.loss / steps,
            terms: terms.collect(),
            valid,
            best: improved,
            samples_per_s: self.split.train.len() as f64 / t.seconds,
            train_seconds: t.seconds,
            valid_seconds,
            lr: self.settings.lr,
        };
        self.history.push(rec.clone());
        Ok(rec)
    }

    /// The resume state after an epoch: weights, Adam moments, where the stage stands, its history.
    fn save_state(&mut self) -> Result<()> {
        let mut state: Vec<(String, Tensor)> = self.model.params();
        for ((n, _), (m, v)) in self.params.iter().zip(self.opt.moments()) {
            state.push((format!("adam.m.{n}"), m.clone()));
            state.push((format!("adam.v.{n}"), v.clone()));
        }
        let st = ResumeState {
            stage: self.stage,
            epoch: self.epoch,
            adam_t: self.opt.t,
            best: self.stop.best,
            best_epoch: self.best_epoch,
            bad_epochs: self.stop.bad_epochs,
            best_valid: self.best_valid,
            data: self.data.clone(),
            config: self.cfg.clone(),
            history: self.history.clone(),
        };
        self.meta.insert("resume".into(), serde_json::to_string(&st).unwrap());
        checkpoint::save(&self.last, &state, &self.meta)
    }
}

/// The loss of one batch for a stage and its named terms (fine-tuning: `ce`; E2E: pre-training's
/// and `ce`).
fn step_loss(
    model: &Model,
    split: &Split,
    idx: &[usize],
    stage: Stage,
    cfg: &RunConfig,
    rng: &mut ChaCha8Rng,
    seeds: &mut Seeds,
) -> Result<(Tensor, Vec<(&'static str, Tensor)>)> {
    let samples: Vec<&Sample> = idx.iter().map(|&i| &split.train[i]).collect();
    match stage {
        Stage::Finetune => {
            let ce = model.finetune_loss(&make_batch(&samples), seeds)?;
            Ok((ce.clone(), vec![("ce", ce)]))
        }
        Stage::Pretrain | Stage::E2e => {
            // Sequence random dropout with a per-batch ratio r ~ U(0, rho), then a mixup ratio p ~ U(0, 0.5).
            let r = rng.random::<f64>() * cfg.model.item_drop as f64;
            let dropped: Vec<Sample> =
                samples.iter().map(|s| Sample { user: s.user, seq: item_dropout(&s.seq, r, rng), target: s.target }).collect();
            let refs: Vec<&Sample> = dropped.iter().collect();
            let p_mix = rng.random::<f64>() * 0.5;
            let mut terms = model.pretrain_terms(&make_batch(&refs), p_mix, rng, seeds)?;
            let pre = crate::model::sum_terms(terms.clone())?;
            if stage == Stage::E2e {
                let ce = model.finetune_loss(&make_batch(&samples), seeds)?;
                terms.push(("ce", ce.clone()));
                Ok((add(&pre, &ce)?, terms))
            } else {
                Ok((pre, terms))
            }
        }
    }
}

/// Load model weights (and check the item order) from a checkpoint written by `fit`.
pub fn load_weights(model: &Model, ck: &Checkpoint, item_tokens: &[String], strict: bool) -> Result<usize> {
    let tokens = ck.meta.get("item_tokens").ok_or_else(|| {
        Error::Invalid(
            "the checkpoint has no item_tokens metadata (not an msm4sr checkpoint?), so its ID rows cannot be matched to the items".into(),
        )
    })?;
    let saved: Vec<String> = serde_json::from_str(tokens).map_err(|e| Error::Invalid(format!("checkpoint item_tokens: {e}")))?;
    if saved != item_tokens {
        return Err(Error::Invalid(item_set_difference(&saved, item_tokens)));
    }
    ck.load_into(&model.params(), strict)
}

/// Cross-domain: load the item-independent tensors of `ck` (the transformer and the item encoders;
/// not the ID embeddings or the pre-training heads) into `model`, whatever items `ck` was trained
/// on. Returns the names carried and those left as initialised. Every carried tensor must be in
/// `ck` with the same shape; the item encoders' input width is the features' width.
pub fn load_transfer(model: &Model, ck: &Checkpoint, src: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (mut carried, mut left) = (Vec::new(), Vec::new());
    for (name, p) in model.params() {
        if name == "item_embedding" || name.starts_with("head_") {
            left.push(name);
            continue;
        }
        let Some((shape, _)) = ck.tensors.get(&name) else {
            return Err(Error::Invalid(format!(
                "--init {}: no tensor {name} (another model kind, other --modalities, or not an msm4sr checkpoint)",
                src.display()
            )));
        };
        if shape.as_slice() != p.shape() {
            let why = if name.starts_with("text_encoder") || name.starts_with("image_encoder") {
                " (the target's features must have the source's width and the model the source's --hidden / --experts)"
            } else {
                " (the model must have the source's --hidden, --inner, --layers, --max-len)"
            };
            return Err(Error::Invalid(format!(
                "--init {}: tensor {name} is {shape:?} there and {:?} here{why}",
                src.display(),
                p.shape()
            )));
        }
        if let Some(t) = ck.tensor(&name, p.shape(), p.device())? {
            p.assign(&t)?;
        }
        carried.push(name);
    }
    Ok((carried, left))
}

/// How a checkpoint's items (`saved`, index 0 padding) differ from a dataset's, in words.
fn item_set_difference(saved: &[String], here: &[String]) -> String {
    use std::collections::HashSet;
    let (a, b): (HashSet<&String>, HashSet<&String>) = (saved.iter().skip(1).collect(), here.iter().skip(1).collect());
    if a == b {
        let k = saved.iter().zip(here).position(|(x, y)| x != y).unwrap_or(0);
        return format!(
            "the checkpoint has the same {} items as this dataset but in another order (item {k} is \"{}\" there and \"{}\" here): \
             its ID embeddings would belong to the wrong items; items are numbered by first appearance in the .inter file",
            a.len(),
            saved[k],
            here[k]
        );
    }
    let only_ck = saved.iter().skip(1).find(|t| !b.contains(t));
    let only_ds = here.iter().skip(1).find(|t| !a.contains(t));
    let mut msg = format!(
        "the checkpoint was trained on a different item set ({} items) than this dataset ({} items; fine-tuning across domains: --cross-domain)",
        a.len(),
        b.len()
    );
    if let Some(t) = only_ck {
        msg += &format!("; \"{t}\" is in the checkpoint only");
    }
    if let Some(t) = only_ds {
        msg += &format!("; \"{t}\" is in this dataset only");
    }
    msg
}

/// Whether a model kind runs the pre-training stage.
pub fn pretrains(cfg: &ModelConfig) -> bool {
    cfg.model == ModelKind::Msm4sr
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Every float that decides anything on resume (the best score, the validation metrics, the
    /// history's losses and learning rate) comes back from the resume state bit for bit; 24/66 is the
    /// score that read back one ulp high before JSON floats were parsed exactly.
    #[test]
    fn resume_state_floats_round_trip_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut values: Vec<f64> = (1..=200u32).flat_map(|n| (0..=n).map(move |k| k as f64 / n as f64)).collect();
        values.extend((0..20_000).map(|_| rng.random::<f64>()));
        values.extend((0..2_000).map(|_| rng.random::<f64>() * 1e3 - 5e2));
        let metrics = |x: f64| Metrics {
            recall5: x,
            recall10: x / 3.0,
            recall20: x,
            recall50: None,
            ndcg5: x / 7.0,
            ndcg10: x / 9.0,
            ndcg20: x / 11.0,
            ndcg50: None,
            users: 0,
        };
        for chunk in values.chunks(500) {
            let history: Vec<EpochRecord> = chunk
                .iter()
                .enumerate()
                .map(|(e, &x)| EpochRecord {
                    stage: Stage::Finetune,
                    epoch: e + 1,
                    loss: x * 17.0,
                    terms: [("ce".to_string(), x * 13.0)].into_iter().collect(),
                    valid: metrics(x),
                    best: false,
                    samples_per_s: x,
                    train_seconds: x,
                    valid_seconds: x,
                    lr: x as f32,
                })
                .collect();
            let st = ResumeState {
                stage: Stage::Finetune,
                epoch: chunk.len(),
                adam_t: 1,
                best: chunk[0],
                best_epoch: 1,
                bad_epochs: 0,
                best_valid: Some(metrics(chunk[1])),
                data: DataFingerprint { items: 1, interactions: 1, hash: "0".into() },
                config: RunConfig::default(),
                history,
            };
            let back: ResumeState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
            assert_eq!(back.best.to_bits(), st.best.to_bits(), "best {}", st.best);
            let bits = |m: &Metrics| [m.recall5, m.recall10, m.recall20, m.ndcg5, m.ndcg10, m.ndcg20].map(f64::to_bits);
            assert_eq!(bits(&back.best_valid.unwrap()), bits(&st.best_valid.unwrap()));
            for (a, b) in back.history.iter().zip(&st.history) {
                assert_eq!(bits(&a.valid), bits(&b.valid), "valid metrics of {}", b.valid.recall20);
                assert_eq!(
                    (a.loss.to_bits(), a.terms["ce"].to_bits(), a.lr.to_bits()),
                    (b.loss.to_bits(), b.terms["ce"].to_bits(), b.lr.to_bits())
                );
            }
        }
    }
}
