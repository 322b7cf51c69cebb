//! One stage's epoch loop: shuffled batches, the model's loss, backward, Adam, validation, early
//! stopping, the best and last checkpoints, and resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint;
use super::resume::stage_tag;
use super::*;
use crate::config::{RunConfig, Stage};
use crate::data::metrics::Metrics;
use crate::data::{batches, Sample, Split};
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{backward, no_grad, Tensor};
use crate::model::nn::Seeds;
use crate::model::{Loss, Recommender};
use crate::{Error, Result};

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
/// One summary line per epoch goes to stderr; `quiet` (used with `--json`) hides the progress bar
/// and the engine's per-epoch diagnostics (GEMM time, GPU dispatches).
#[allow(clippy::too_many_arguments)]
pub fn fit<M: Recommender>(
    model: &M,
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
pub fn fit_logged<M: Recommender>(
    model: &M,
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
    // On the CPU backend the pool's threads stay awake through the epochs (see `keep_awake`).
    let on_cpu = model.params().first().is_none_or(|(_, p)| p.device() == crate::engine::Device::Cpu);
    let _awake = on_cpu.then(crate::engine::cpu::keep_awake);
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
        // Engine diagnostics, not the run's progress: left out when `quiet`.
        if let Some(d) = trained.dispatches.filter(|_| !quiet) {
            eprintln!("{stage:?} epoch {:>3}  gpu {:.0} dispatches, {:.0} copies and {:.1} submits per step", rec.epoch, d.0, d.2, d.1);
        }
        if trained.gemm_secs > 0.0 && !quiet {
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
struct StageRun<'a, M: Recommender> {
    model: &'a M,
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

impl<'a, M: Recommender> StageRun<'a, M> {
    fn new(model: &'a M, split: &'a Split, cfg: &'a RunConfig, stage: Stage, item_tokens: &[String], out: &Path) -> Result<Self> {
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
        let params = model.trained_params(stage, cfg.train.freeze);
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
            last: crate::files::last_path(out),
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
            let samples: Vec<&Sample> = idx.iter().map(|&i| &split.train[i]).collect();
            let Loss { total: loss, terms: values } = self.model.loss(stage, &samples, &mut rng, &mut seeds)?;
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
