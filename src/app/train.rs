//! `msm4sr train`, `pretrain` and `finetune`: one training job (its stages, its files, resume),
//! checked before any work, then the test metrics.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use super::runs::{build_model, check_outputs, check_samples, load_dataset, metrics_of, model_name, ranks_tsv, RunResult, Samples};
use super::{missing_of, print_result, MissingArg, Where};
use crate::config::{self, Flags, ModelKind, RunConfig, Stage};
use crate::data::{Dataset, MissingFeatures};
use crate::files::{checkpoint_arg, config_path, stage_path, RunFiles};
use crate::model::msm4sr::Model;
use crate::train::{self, checkpoint};
use crate::{Error, Result};

/// Dataset, configuration and hyper-parameter flags shared by the training commands. Every
/// hyper-parameter flag overrides the `--config` file, which overrides the defaults of SPEC.md.
#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Dataset directory: one NAME.inter, optionally NAME.features.safetensors + NAME.items.txt.
    #[arg(long)]
    data: PathBuf,
    /// TOML file with [model] and [train] sections (any subset of keys; see `--print-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Items in .inter without features: fail (error) or give them zero features (zero).
    #[arg(long, value_enum, default_value = "error")]
    missing_features: MissingArg,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Write the run into this directory (model.safetensors, model.epochs.csv, ...) instead of
    /// beside --out.
    #[arg(long, conflicts_with = "out")]
    run_dir: Option<PathBuf>,
    /// Replace an earlier run's output files (without it, existing outputs are refused unless
    /// --resume continues that run).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    flags: Flags,
}

impl RunArgs {
    /// The training command's job: the effective configuration and where it writes. `None` when
    /// only `--print-config` was asked (printed here).
    pub fn job(
        &self,
        plan: impl FnOnce(&RunConfig) -> Plan,
        out: Option<PathBuf>,
        init: Option<PathBuf>,
        resume: bool,
    ) -> Result<Option<TrainJob>> {
        let cfg = config::resolve(self.config.as_deref(), &self.flags)?;
        if self.print_config {
            out!("{}", config::to_toml(&cfg));
            return Ok(None);
        }
        let plan = plan(&cfg);
        if let Some(dir) = self.run_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
            return Err(crate::Error::Invalid(format!("--run-dir {}: it is a file; give a directory (new or of this run)", dir.display())));
        }
        let out = match (&self.run_dir, out) {
            (Some(dir), _) => crate::files::run_dir_checkpoint(dir),
            (None, Some(out)) => out,
            (None, None) => default_out(&self.data, &cfg),
        };
        Ok(Some(TrainJob {
            data: self.data.clone(),
            config_file: self.config.clone(),
            cfg,
            plan,
            out,
            init,
            resume,
            overwrite: self.overwrite,
            missing: missing_of(self.missing_features),
            quiet: self.json,
        }))
    }
}

/// Pre-train and fine-tune a model (both stages for msm4sr), then evaluate on the test split.
#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Best fine-tuned weights go here (pre-training to <stem>.pretrain.safetensors; the run's
    /// log and results to <stem>.epochs.csv, ...; default runs/DATA-MODEL.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip pre-training (MSM4SR w/o pre-train).
    #[arg(long)]
    pub no_pretrain: bool,
    /// One stage with the pre-training and fine-tuning losses summed (MSM4SR E2E).
    #[arg(long)]
    pub e2e: bool,
    /// Continue an interrupted run from <stem>.last.safetensors.
    #[arg(long)]
    pub resume: bool,
}

/// `msm4sr train`.
pub fn train(args: TrainArgs, at: Where) -> Result<ExitCode> {
    let TrainArgs { run, out, no_pretrain, e2e, resume } = args;
    if no_pretrain && e2e {
        return Err(crate::Error::Invalid(
            "--e2e trains the pre-training and fine-tuning losses together; --no-pretrain leaves out pre-training: pass one".into(),
        ));
    }
    let job = run.job(|cfg| Plan::train(cfg, no_pretrain, e2e), out, None, resume)?;
    train_cmd(job, run.json, at)
}

/// Pre-train the M²SE backbone only (NIP + CMCL).
#[derive(clap::Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The best pre-trained weights go here (start `finetune --init` from them); the run's other
    /// files are named by its stem.
    #[arg(long, required_unless_present = "run_dir")]
    pub out: Option<PathBuf>,
    /// Continue an interrupted run from <stem>.last.safetensors.
    #[arg(long)]
    pub resume: bool,
}

/// `msm4sr pretrain`.
pub fn pretrain(args: PretrainArgs, at: Where) -> Result<ExitCode> {
    let PretrainArgs { run, out, resume } = args;
    train_cmd(run.job(|_| Plan::PRETRAIN, out, None, resume)?, run.json, at)
}

/// Fine-tune (from pre-trained weights with --init), then evaluate on the test split.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The best fine-tuned weights go here; the run's other files are named by its stem.
    #[arg(long, required_unless_present = "run_dir")]
    pub out: Option<PathBuf>,
    /// Start from these weights (e.g. a `pretrain` checkpoint).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue an interrupted run from <stem>.last.safetensors.
    #[arg(long)]
    pub resume: bool,
}

/// `msm4sr finetune`.
pub fn finetune(args: FinetuneArgs, at: Where) -> Result<ExitCode> {
    let FinetuneArgs { run, out, init, resume } = args;
    train_cmd(run.job(|_| Plan::FINETUNE, out, init, resume)?, run.json, at)
}

/// Run a training job (none: `--print-config` only) and print its result.
fn train_cmd(job: Option<TrainJob>, json: bool, at: Where) -> Result<ExitCode> {
    if let Some(job) = job {
        print_result(&train_job(&job, at)?, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Which stages a training command runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub pretrain: bool,
    pub finetune: bool,
    pub e2e: bool,
}

impl Plan {
    /// `pretrain`: the M²SE backbone alone, written to `--out` itself.
    pub const PRETRAIN: Plan = Plan { pretrain: true, finetune: false, e2e: false };
    /// `finetune`: one fine-tuning stage (from `--init` weights, or from scratch).
    pub const FINETUNE: Plan = Plan { pretrain: false, finetune: true, e2e: false };

    /// `train`: both stages for msm4sr (fine-tuning only with `no_pretrain` or for the baselines),
    /// or with `e2e` one stage with both losses summed (msm4sr only).
    pub fn train(cfg: &RunConfig, no_pretrain: bool, e2e: bool) -> Plan {
        if e2e {
            return Plan { pretrain: false, finetune: false, e2e: true };
        }
        Plan { pretrain: cfg.model.model == ModelKind::Msm4sr && !no_pretrain, finetune: true, e2e: false }
    }

    /// Pre-training and E2E exist for msm4sr only (the baselines have no pre-training loss).
    fn check(&self, cfg: &RunConfig) -> Result<()> {
        if cfg.train.cross_domain && *self != Plan::FINETUNE {
            return Err(Error::Invalid(
                "--cross-domain is fine-tuning from another dataset's checkpoint: use `finetune --init SOURCE`".into(),
            ));
        }
        let kind = cfg.model.model;
        if kind != ModelKind::Msm4sr && (self.pretrain || self.e2e) {
            let name = format!("{kind:?}").to_lowercase();
            return Err(Error::Invalid(if self.e2e {
                format!("--e2e sums MSM4SR's pre-training and fine-tuning losses; --model {name} has no pre-training loss (drop --e2e)")
            } else {
                format!("pre-training trains MSM4SR's backbone; --model {name} has no pre-training loss (use train or finetune)")
            }));
        }
        // NIP and CMCL contrast each sample with the others of its batch: with one sample every
        // term is 0 and nothing trains.
        if self.pretrain && cfg.train.pretrain_batch < 2 {
            return Err(Error::Invalid(format!(
                "--pretrain-batch {}: pre-training contrasts each sample with the rest of its batch, so it needs at least 2",
                cfg.train.pretrain_batch
            )));
        }
        if self.e2e && cfg.train.batch < 2 {
            return Err(Error::Invalid(format!(
                "--batch {} with --e2e: the pre-training losses contrast each sample with the rest of its batch, so it needs at least 2",
                cfg.train.batch
            )));
        }
        Ok(())
    }

    /// Where the pre-training stage writes: `--out` itself when it is the only stage, else
    /// `<out stem>.pretrain.safetensors`.
    pub fn pretrain_out(&self, out: &Path) -> PathBuf {
        if self.finetune || self.e2e {
            stage_path(out, "pretrain")
        } else {
            out.to_path_buf()
        }
    }

    /// Every file the run may write: the checkpoint(s), their resume states, the saved
    /// configuration and the run's log and results ([`RunFiles`]).
    pub fn outputs(&self, out: &Path) -> Vec<PathBuf> {
        let f = RunFiles::of(out);
        let mut v = vec![out.to_path_buf(), crate::files::last_path(out), config_path(out), f.jsonl, f.csv, f.log, f.result, f.ranks];
        let pre = self.pretrain_out(out);
        if self.pretrain && pre != out {
            v.push(crate::files::last_path(&pre));
            v.push(pre);
        }
        v
    }
}

/// `train` without `--out`: `runs/<data dir name>-<model>.safetensors`.
pub fn default_out(data: &Path, cfg: &RunConfig) -> PathBuf {
    let name = format!("{:?}", cfg.model.model).to_lowercase();
    PathBuf::from(format!("runs/{}-{name}.safetensors", data.file_name().and_then(|n| n.to_str()).unwrap_or("data")))
}

/// One training command (`train`, `pretrain` or `finetune`), as the command line gave it.
#[derive(Clone, Debug)]
pub struct TrainJob {
    /// `--data`: the dataset directory.
    pub data: PathBuf,
    /// `--config`: the file the configuration came from (an input the run must not overwrite).
    pub config_file: Option<PathBuf>,
    /// The effective configuration ([`crate::config::resolve`]).
    pub cfg: RunConfig,
    pub plan: Plan,
    /// The best weights of the last stage go here.
    pub out: PathBuf,
    /// `--init`: start from these weights.
    pub init: Option<PathBuf>,
    /// Continue the interrupted run at `out`.
    pub resume: bool,
    /// Replace an earlier run's outputs.
    pub overwrite: bool,
    pub missing: MissingFeatures,
    /// `--json`: nothing on stderr but errors and progress.
    pub quiet: bool,
}

/// Run a training command: every check before any work (the plan against the model, the outputs
/// against the inputs and earlier runs, the dataset's split, the model's memory), the configuration
/// saved beside the checkpoint once the run is validated, then the stages and the evaluation.
pub fn train_job(job: &TrainJob, at: Where) -> Result<RunResult> {
    let (cfg, out) = (&job.cfg, job.out.as_path());
    cfg.validate()?;
    job.plan.check(cfg)?;
    let mut inputs: Vec<(&str, &Path)> = vec![("--data", &job.data)];
    inputs.extend(job.config_file.as_deref().map(|c| ("--config", c)));
    inputs.extend(job.init.as_deref().map(|c| ("--init", c)));
    let how = "pass --resume to continue that run or --overwrite to replace it";
    // One writer per run, before anything is checked or written (the lock goes when the run ends).
    let lock_path = RunFiles::of(out).lock;
    let what = match out.parent() {
        Some(d) if out.file_name().is_some_and(|n| n == "model.safetensors") => format!("run directory {}", d.display()),
        _ => format!("run {}", out.display()),
    };
    let _lock = crate::files::RunLock::acquire(&lock_path, &what)?;
    check_outputs(&job.plan.outputs(out), &inputs, job.resume || job.overwrite, how)?;
    let (dev, desc) = at.resolve()?;
    let ds = load_dataset(&job.data, cfg, job.missing)?;
    let samples = check_samples(&ds, cfg)?;
    let model = build_model(cfg, &ds, cfg.train.seed, dev)?;
    let init_msg = apply_init(&model, &ds, job)?;
    if job.resume {
        check_resume(job, &ds, &samples)?;
    }
    // A resumed run's settings are checked against the interrupted run's first (train::fit), and
    // saved once they are.
    if !job.resume {
        save_config(out, cfg)?;
    }
    let files = RunFiles::of(out);
    if !job.resume {
        // A fresh run's console log starts empty (--overwrite replaces an earlier one).
        let _ = std::fs::remove_file(&files.log);
    }
    crate::console::open(&files.log)?;
    let say = |m: String| if job.quiet { crate::console::log_only(&m) } else { crate::console::line(&m) };
    say(format!("msm4sr {}{}", env!("CARGO_PKG_VERSION"), if job.resume { " (resumed)" } else { "" }));
    say(format!("device: {desc}"));
    say(format!("{ds}"));
    say(format!("effective configuration:\n{}", config::to_toml(cfg)));
    if let Some(m) = init_msg {
        say(m);
    }
    let r = run_stages(&model, &ds, &samples, job, &files);
    crate::console::close();
    let (r, ranks) = r?;
    if job.resume {
        save_config(out, cfg)?;
    }
    crate::files::write_atomic(&files.ranks, ranks.as_bytes())?;
    let json = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::files::write_atomic(&files.result, format!("{json}\n").as_bytes())?;
    Ok(r)
}

/// Save the effective config beside the checkpoint (`<stem>.config.toml`).
fn save_config(out: &Path, cfg: &RunConfig) -> Result<()> {
    crate::files::write_atomic(&config_path(out), config::to_toml(cfg).as_bytes())
}

/// Before a resumed run does any work: the resume states it will continue are this run's (its
/// command's stages, data and settings), so a mismatch is found before pre-training runs again.
fn check_resume(job: &TrainJob, ds: &Dataset, samples: &Samples) -> Result<()> {
    let (plan, out) = (job.plan, job.out.as_path());
    let pre_out = stage_path(out, "pretrain");
    let pre_files = [pre_out.clone(), crate::files::last_path(&pre_out)].into_iter().any(|p| p.exists());
    if !plan.pretrain && (plan.finetune || plan.e2e) && pre_files {
        return Err(Error::Invalid(format!(
            "--resume: {} belongs to a run that pre-trains and then fine-tunes (it has {}); resume it with `train ... --resume`",
            out.display(),
            pre_out.display()
        )));
    }
    if plan.pretrain && plan.finetune && !pre_files && crate::files::last_path(out).exists() {
        return Err(Error::Invalid(format!(
            "--resume: {} belongs to a run without pre-training (no {}); resume it with the command that started it",
            out.display(),
            pre_out.display()
        )));
    }
    let mut states = Vec::new();
    if plan.pretrain {
        states.push((crate::files::last_path(&plan.pretrain_out(out)), Stage::Pretrain, samples.pretrain_split()));
    }
    if plan.finetune || plan.e2e {
        states.push((crate::files::last_path(out), if plan.e2e { Stage::E2e } else { Stage::Finetune }, samples.split.clone()));
    }
    for (last, stage, split) in states {
        if last.exists() {
            train::read_resume_state(&last, stage, &train::DataFingerprint::of(&ds.item_tokens, &split), &job.cfg)?;
        }
    }
    Ok(())
}

/// Load `--init` into the model (checked against this dataset), before anything of the run is
/// written; the line to log about it.
fn apply_init(model: &Model, ds: &Dataset, job: &TrainJob) -> Result<Option<String>> {
    let cfg = &job.cfg;
    if cfg.train.cross_domain && job.init.is_none() {
        return Err(Error::Invalid("--cross-domain fine-tunes from a checkpoint of another dataset: give it with --init".into()));
    }
    if let (true, Some(init)) = (cfg.train.cross_domain, &job.init) {
        let init = &checkpoint_arg(init);
        let ck = checkpoint::load(init)?;
        let (carried, left) = train::load_transfer(model, &ck, init)?;
        let groups = |v: &[String]| {
            let mut g: Vec<&str> = v.iter().map(|n| n.split('.').next().unwrap_or(n)).collect();
            g.dedup();
            g.join(", ")
        };
        return Ok(Some(format!(
            "cross-domain: carried {} tensors ({}) from {}; initialised here: {}; transformer {}, ID embeddings {}",
            carried.len(),
            groups(&carried),
            init.display(),
            if left.is_empty() { "none".to_string() } else { groups(&left) },
            if cfg.train.freeze == crate::config::Freeze::Transformer { "frozen" } else { "trained" },
            if cfg.model.ids { "trained" } else { "unused" }
        )));
    } else if let Some(init) = &job.init {
        let init = &checkpoint_arg(init);
        let ck = checkpoint::load(init)?;
        let n = train::load_weights(model, &ck, &ds.item_tokens, false)?;
        if n == 0 {
            return Err(Error::Invalid(format!(
                "--init {}: none of its tensors belongs to this model (is it an msm4sr checkpoint of this model?)",
                init.display()
            )));
        }
        return Ok(Some(format!("initialised {n} tensors from {}", init.display())));
    }
    Ok(None)
}

/// Train the job's stages and evaluate the best weights of the last on
/// valid and test.
/// Also returns the per-user ranks as TSV.
fn run_stages(model: &Model, ds: &Dataset, samples: &Samples, job: &TrainJob, files: &RunFiles) -> Result<(RunResult, String)> {
    let split = &samples.split;
    let (cfg, plan, out, quiet) = (&job.cfg, job.plan, job.out.as_path(), job.quiet);
    let mut log = train::RunLog::new(files.jsonl.clone(), files.csv.clone());
    let say = |m: String| if quiet { crate::console::log_only(&m) } else { crate::console::line(&m) };
    let mut epochs = 0;
    if plan.pretrain {
        let pre_out = plan.pretrain_out(out);
        let pre_split = samples.pretrain_split();
        let s = train::fit_logged(model, &pre_split, cfg, Stage::Pretrain, &ds.item_tokens, &pre_out, job.resume, quiet, Some(&log))?;
        epochs += s.epochs;
        say(format!(
            "pre-training: best epoch {} of {}, valid recall@20 {:.4} (modality scores only), weights in {}",
            s.best_epoch,
            s.epochs,
            s.valid.recall20,
            pre_out.display()
        ));
        log.earlier.extend(s.history);
    }
    let stage = if plan.e2e { Stage::E2e } else { Stage::Finetune };
    if plan.finetune || plan.e2e {
        let s = train::fit_logged(model, split, cfg, stage, &ds.item_tokens, out, job.resume, quiet, Some(&log))?;
        epochs += s.epochs;
        say(format!("{stage:?}: best epoch {} of {}, weights in {}", s.best_epoch, s.epochs, out.display()));
        log.earlier.extend(s.history);
    }
    // The log as the stages left it (also when a resumed run had no epoch left to run).
    log.write(&[])?;
    // A pre-training run is scored as it was selected: modality scores alone.
    let with_id = plan.finetune || plan.e2e;
    let tc = &cfg.train;
    let scoring = Instant::now();
    let valid_ranks = train::ranks(model, &split.valid, tc.eval_batch, with_id, tc.mask_history)?;
    let test_ranks = train::ranks(model, &split.test, tc.eval_batch, with_id, tc.mask_history)?;
    let tsv = ranks_tsv(ds, &[("valid", &split.valid, &valid_ranks), ("test", &split.test, &test_ranks)]);
    let r = RunResult {
        model: model_name(cfg),
        valid: metrics_of(&valid_ranks),
        test: metrics_of(&test_ranks),
        epochs,
        // Every epoch's time (those before a resume too) and the final scoring; `start` alone
        // would count only this call.
        seconds: super::runs::epoch_seconds(&log.earlier) + scoring.elapsed().as_secs_f64(),
        history: log.earlier,
        groups: None,
    };
    Ok((r, tsv))
}
