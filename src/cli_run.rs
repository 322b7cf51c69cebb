//! What the CLI's commands do, as library calls: [`train`] (the `train`, `pretrain` and `finetune`
//! commands: check the outputs, load the dataset, build the model, run the stages, report),
//! [`evaluate`] and [`recommend`], and the checks they share. The effective configuration comes from
//! [`crate::config::resolve`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::checkpoint;
use crate::config;
use crate::data::{Dataset, LoadOptions, MissingFeatures, Sample, Split};
use crate::engine::{Device, DeviceChoice};
use crate::metrics::Metrics;
use crate::model::{Model, ModelKind};
use crate::train::{self, RunConfig, Stage};
use crate::{Error, Result};

pub fn load_dataset(dir: &Path, cfg: &RunConfig, missing: MissingFeatures) -> Result<Dataset> {
    let ds =
        Dataset::load(dir, &LoadOptions { min_user_inter: cfg.train.min_user_inter, missing_features: missing, require_features: false })?;
    crate::fault::reached("parsed");
    Ok(ds)
}

/// The `--json` result of train / evaluate. A split without samples has no metrics (`null`),
/// never zeros.
#[derive(Serialize, serde::Deserialize, Clone, Debug)]
pub struct RunResult {
    pub model: String,
    pub valid: Option<Metrics>,
    pub test: Option<Metrics>,
    pub epochs: usize,
    pub seconds: f64,
    /// Every epoch of every stage (training commands only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<train::EpochRecord>,
    /// Test metrics per user group by history length (`evaluate --groups N`).
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub groups: Option<Vec<crate::groups::UserGroup>>,
}

/// Metrics of a split's ranks, or none for an empty split.
pub fn metrics_of(ranks: &[u32]) -> Option<Metrics> {
    (!ranks.is_empty()).then(|| Metrics::from_ranks(ranks))
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
        let mut v = vec![out.to_path_buf(), train::last_path(out), config_path(out), f.jsonl, f.csv, f.log, f.result, f.ranks];
        let pre = self.pretrain_out(out);
        if self.pretrain && pre != out {
            v.push(train::last_path(&pre));
            v.push(pre);
        }
        v
    }
}

/// The files of a run besides its checkpoints, named by the `--out` stem (in a `--run-dir` DIR the
/// stem is DIR/model).
#[derive(Clone, Debug)]
pub struct RunFiles {
    /// `<stem>.epochs.jsonl`: one [`train::EpochRecord`] per line, every stage.
    pub jsonl: PathBuf,
    /// `<stem>.epochs.csv`: the same as CSV ([`train::epochs_csv`]).
    pub csv: PathBuf,
    /// `<stem>.log`: the console lines (appended on resume).
    pub log: PathBuf,
    /// `<stem>.result.json`: the `--json` result.
    pub result: PathBuf,
    /// `<stem>.ranks.tsv`: every user's target rank on valid and test ([`ranks_tsv`]).
    pub ranks: PathBuf,
    /// `<stem>.lock`: held while a process writes the run ([`checkpoint::RunLock`]).
    pub lock: PathBuf,
}

impl RunFiles {
    pub fn of(out: &Path) -> Self {
        let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        let f = |ext: &str| out.with_file_name(format!("{stem}.{ext}"));
        RunFiles {
            jsonl: f("epochs.jsonl"),
            csv: f("epochs.csv"),
            log: f("log"),
            result: f("result.json"),
            ranks: f("ranks.tsv"),
            lock: f("lock"),
        }
    }
}

/// The checkpoint of a run directory (`--run-dir DIR`): DIR/model.safetensors.
pub fn run_dir_checkpoint(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

/// A checkpoint argument (`--ckpt`, `--init`): a file, or a run directory for its checkpoint.
pub fn checkpoint_arg(p: &Path) -> PathBuf {
    if p.is_dir() {
        run_dir_checkpoint(p)
    } else {
        p.to_path_buf()
    }
}

/// `train` without `--out`: `runs/<data dir name>-<model>.safetensors`.
pub fn default_out(data: &Path, cfg: &RunConfig) -> PathBuf {
    let name = format!("{:?}", cfg.model.model).to_lowercase();
    PathBuf::from(format!("runs/{}-{name}.safetensors", data.file_name().and_then(|n| n.to_str()).unwrap_or("data")))
}

/// Where a command runs: `--device` and whether `--adapter` named one.
#[derive(Clone, Copy, Debug)]
pub struct Where {
    pub choice: DeviceChoice,
    pub named: bool,
}

impl Where {
    fn resolve(&self) -> Result<(Device, String)> {
        self.choice.resolve(self.named)
    }
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
pub fn train(job: &TrainJob, at: Where) -> Result<RunResult> {
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
    let _lock = checkpoint::RunLock::acquire(&lock_path, &what)?;
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
    checkpoint::write_atomic(&files.ranks, ranks.as_bytes())?;
    let json = serde_json::to_string_pretty(&r).map_err(|e| Error::Invalid(e.to_string()))?;
    checkpoint::write_atomic(&files.result, format!("{json}\n").as_bytes())?;
    Ok(r)
}

/// Save the effective config beside the checkpoint (`<stem>.config.toml`).
fn save_config(out: &Path, cfg: &RunConfig) -> Result<()> {
    checkpoint::write_atomic(&config_path(out), config::to_toml(cfg).as_bytes())
}

/// Before a resumed run does any work: the resume states it will continue are this run's (its
/// command's stages, data and settings), so a mismatch is found before pre-training runs again.
fn check_resume(job: &TrainJob, ds: &Dataset, samples: &Samples) -> Result<()> {
    let (plan, out) = (job.plan, job.out.as_path());
    let pre_out = stage_path(out, "pretrain");
    let pre_files = [pre_out.clone(), train::last_path(&pre_out)].into_iter().any(|p| p.exists());
    if !plan.pretrain && (plan.finetune || plan.e2e) && pre_files {
        return Err(Error::Invalid(format!(
            "--resume: {} belongs to a run that pre-trains and then fine-tunes (it has {}); resume it with `train ... --resume`",
            out.display(),
            pre_out.display()
        )));
    }
    if plan.pretrain && plan.finetune && !pre_files && train::last_path(out).exists() {
        return Err(Error::Invalid(format!(
            "--resume: {} belongs to a run without pre-training (no {}); resume it with the command that started it",
            out.display(),
            pre_out.display()
        )));
    }
    let mut states = Vec::new();
    if plan.pretrain {
        states.push((train::last_path(&plan.pretrain_out(out)), Stage::Pretrain, samples.pretrain_split()));
    }
    if plan.finetune || plan.e2e {
        states.push((train::last_path(out), if plan.e2e { Stage::E2e } else { Stage::Finetune }, samples.split.clone()));
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
            if cfg.train.freeze == train::Freeze::Transformer { "frozen" } else { "trained" },
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
    let start = Instant::now();
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
    let valid_ranks = train::ranks(model, &split.valid, tc.eval_batch, with_id, tc.mask_history)?;
    let test_ranks = train::ranks(model, &split.test, tc.eval_batch, with_id, tc.mask_history)?;
    let tsv = ranks_tsv(ds, &[("valid", &split.valid, &valid_ranks), ("test", &split.test, &test_ranks)]);
    let r = RunResult {
        model: model_name(cfg),
        valid: metrics_of(&valid_ranks),
        test: metrics_of(&test_ranks),
        epochs,
        seconds: start.elapsed().as_secs_f64(),
        history: log.earlier,
        groups: None,
    };
    Ok((r, tsv))
}

/// `<out stem>.config.toml` beside the checkpoint.
pub fn config_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    out.with_file_name(format!("{stem}.config.toml"))
}

/// The path as the file system resolves it (an output that does not exist yet: its directory
/// resolved, then its name).
fn resolved(p: &Path) -> PathBuf {
    if let Ok(c) = p.canonicalize() {
        return c;
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (dir.canonicalize(), p.file_name()) {
        (Ok(d), Some(n)) => d.join(n),
        _ => p.to_path_buf(),
    }
}

/// Check what a command is about to write before any work: no output may be an input (a file the
/// command reads, or any file in an input directory such as `--data`), a directory, or in a
/// directory that cannot be written; and an existing output is refused unless `replace` (from
/// `--resume` or `--overwrite`), with the flags that would allow it named in `how`.
pub fn check_outputs(outputs: &[PathBuf], inputs: &[(&str, &Path)], replace: bool, how: &str) -> Result<()> {
    let mut read: Vec<(String, PathBuf)> = Vec::new();
    for (flag, p) in inputs {
        if p.is_dir() {
            for e in std::fs::read_dir(p).map_err(|e| Error::Io { path: p.display().to_string(), source: e })?.flatten() {
                read.push((format!("{flag} {}", p.display()), resolved(&e.path())));
            }
        } else {
            read.push((flag.to_string(), resolved(p)));
        }
    }
    for out in outputs {
        let r = resolved(out);
        if let Some((flag, _)) = read.iter().find(|(_, q)| *q == r) {
            return Err(Error::Invalid(format!("refusing to write {}: it is an input of this command ({flag})", out.display())));
        }
        if out.is_dir() {
            return Err(Error::Invalid(format!("cannot write {}: it is a directory (give a file name)", out.display())));
        }
        if let Some(what) = crate::checkpoint::not_a_regular_file(out) {
            return Err(Error::Invalid(format!(
                "refusing to write {}: it is {what}; an output must be a regular file or absent (--overwrite replaces only regular files)",
                out.display()
            )));
        }
        if out.exists() && !replace {
            return Err(Error::Invalid(format!("{} already exists (an earlier run's output?); {how}", out.display())));
        }
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let cannot = |e: std::io::Error| {
            Error::Invalid(format!("cannot write {}: its directory {} cannot be created or written ({e})", out.display(), dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(cannot)?;
        let probe = dir.join(format!(".msm4sr-write-check-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(cannot)?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

/// The samples of a run under its protocol: the split (fine-tuning samples; validation and test
/// samples, under cold-start only those with a cold target) and, under cold-start, pre-training's
/// own training samples (without cold items).
#[derive(Clone, Debug)]
pub struct Samples {
    pub split: Split,
    pub pretrain: Option<Vec<Sample>>,
    /// Under cold-start: how many items are cold.
    pub cold_items: Option<usize>,
}

impl Samples {
    pub fn of(ds: &Dataset, cfg: &RunConfig) -> Samples {
        match cfg.train.protocol {
            train::Protocol::Standard => Samples { split: ds.split(cfg.model.max_len), pretrain: None, cold_items: None },
            train::Protocol::ColdStart => {
                let c = ds.cold_start(cfg.model.max_len, cfg.train.cold_threshold);
                Samples { split: c.split, pretrain: Some(c.pretrain), cold_items: Some(c.cold.iter().filter(|&&x| x).count()) }
            }
        }
    }

    /// The split pre-training trains on.
    pub fn pretrain_split(&self) -> Split {
        match &self.pretrain {
            Some(p) => Split { train: p.clone(), valid: self.split.valid.clone(), test: self.split.test.clone() },
            None => self.split.clone(),
        }
    }
}

/// The run's samples, checked (training, validation and test samples all present) before anything
/// is written.
pub fn check_samples(ds: &Dataset, cfg: &RunConfig) -> Result<Samples> {
    let s = Samples::of(ds, cfg);
    if let Some(n) = s.cold_items {
        crate::console::line(&format!(
            "cold-start: {n} of {} items are cold (fewer than {} training interactions); {} validation and {} test users have a cold target",
            ds.num_items(),
            cfg.train.cold_threshold,
            s.split.valid.len(),
            s.split.test.len()
        ));
    }
    check_split_of(ds, &s.split)?;
    if s.pretrain.as_ref().is_some_and(|p| p.is_empty()) {
        return Err(Error::Invalid(format!("dataset {}: no pre-training samples are left without the cold items", ds.name)));
    }
    Ok(s)
}

/// The run's split, checked (training, validation and test samples all present) before anything
/// is written.
pub fn check_split(ds: &Dataset, cfg: &RunConfig) -> Result<Split> {
    Ok(check_samples(ds, cfg)?.split)
}

fn check_split_of(ds: &Dataset, split: &Split) -> Result<()> {
    if split.train.is_empty() || split.valid.is_empty() || split.test.is_empty() {
        return Err(Error::Invalid(format!(
            "dataset {} gives {} training, {} validation and {} test samples; all three must be non-empty",
            ds.name,
            split.train.len(),
            split.valid.len(),
            split.test.len()
        )));
    }
    Ok(())
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

/// Bytes of memory the system has available now (Linux: MemAvailable), if known.
fn available_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u128 = info.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    let mut have = kb * 1024;
    // An address-space limit (ulimit -v) bounds it too.
    #[cfg(unix)]
    {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } == 0 && r.rlim_cur != libc::RLIM_INFINITY {
            have = have.min(r.rlim_cur as u128);
        }
    }
    Some(have)
}

/// Check that the model of `cfg` for `ds` fits: its parameters, their gradients and Adam's two
/// moments (16 bytes per parameter) within the memory available now (a clear error instead of an
/// allocation failure that would abort the process).
pub fn check_model_fits(cfg: &RunConfig, ds: &Dataset) -> Result<()> {
    let m = &cfg.model;
    let params = Model::param_count(m, ds.num_items(), ds.text.as_ref().map(|t| t.dim), ds.image.as_ref().map(|t| t.dim));
    let need = params * 16;
    match available_memory() {
        Some(have) if need > have => Err(Error::Invalid(format!(
            "the model has {params} parameters (--hidden {}, --inner {}, --layers {}, --experts {}, {} items): training needs at least \
             {:.1} GB for them, their gradients and Adam's moments, but {:.1} GB of memory is available",
            m.hidden,
            m.inner,
            m.layers,
            m.experts,
            ds.num_items(),
            need as f64 / 1e9,
            have as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

/// Build the model of `cfg` for `ds` on `dev` (after [`check_model_fits`]), initialised from `seed`.
pub fn build_model(cfg: &RunConfig, ds: &Dataset, seed: u64, dev: Device) -> Result<Model> {
    check_model_fits(cfg, ds)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let m = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, dev)?;
    crate::fault::reached("model");
    Ok(m)
}

/// The file's tensors against the configuration it carries, before a model is built from it: the
/// sizes (hidden, max length, inner, layers) must be the ones its tensors have.
fn check_checkpoint_sizes(ck: &checkpoint::Checkpoint, cfg: &RunConfig, path: &Path) -> Result<()> {
    let m = &cfg.model;
    let shape = |name: &str| {
        ck.tensors.get(name).map(|(s, _)| s.clone()).ok_or_else(|| Error::Invalid(format!("{}: tensor {name} is missing", path.display())))
    };
    let mismatch = |what: &str, cfg_v: usize, file: &str, v: usize| {
        Err(Error::Invalid(format!("{}: its configuration says {what} {cfg_v}, but its tensor {file} has {v}", path.display())))
    };
    let pos = shape("transformer.position")?;
    if pos.len() != 2 || pos[0] != m.max_len || pos[1] != m.hidden {
        return Err(Error::Invalid(format!(
            "{}: tensor transformer.position is {pos:?}; its configuration says (max_len {}, hidden {})",
            path.display(),
            m.max_len,
            m.hidden
        )));
    }
    let layers = (0..).take_while(|k| ck.tensors.contains_key(&format!("transformer.layer{k}.query.weight"))).count();
    if layers != m.layers {
        return mismatch("layers", m.layers, "transformer.layer{k}.* (layers)", layers);
    }
    let ffn = shape("transformer.layer0.ffn1.weight")?;
    if ffn.get(1) != Some(&m.inner) {
        return mismatch("inner", m.inner, "transformer.layer0.ffn1.weight", ffn.get(1).copied().unwrap_or(0));
    }
    Ok(())
}

/// A checkpoint read once and its metadata checked (format, stage, configuration and its ranges,
/// the sizes its tensors have), before any dataset is loaded or model built from it.
pub struct Opened {
    ck: checkpoint::Checkpoint,
    path: PathBuf,
    pub cfg: RunConfig,
    /// The stage that wrote the checkpoint.
    pub stage: Stage,
}

/// Read the checkpoint at `path` and check its metadata (see [`Opened`]).
pub fn open_checkpoint(path: &Path) -> Result<Opened> {
    let ck = checkpoint::load(path)?;
    match ck.meta.get("format").map(String::as_str) {
        Some(train::CHECKPOINT_FORMAT) => {}
        other => {
            return Err(Error::Invalid(format!(
                "{}: format {other:?}, expected \"{}\" (not an msm4sr checkpoint, or from another version)",
                path.display(),
                train::CHECKPOINT_FORMAT
            )))
        }
    }
    let stage: Stage = ck
        .meta
        .get("stage")
        .ok_or_else(|| Error::Invalid(format!("{} has no stage metadata (not an msm4sr checkpoint?)", path.display())))
        .and_then(|s| serde_json::from_str(s).map_err(|e| Error::Invalid(format!("{}: stage metadata {s:?}: {e}", path.display()))))?;
    let cfg: RunConfig = ck
        .meta
        .get("config")
        .ok_or_else(|| Error::Invalid(format!("{} has no config metadata (not an msm4sr checkpoint?)", path.display())))
        .and_then(|c| {
            // Every field has a default, so `{}` would read as the defaults: a checkpoint must say both sections.
            let v: serde_json::Value =
                serde_json::from_str(c).map_err(|e| Error::Invalid(format!("{}: config metadata: {e}", path.display())))?;
            if !(v.get("model").is_some_and(|m| m.is_object()) && v.get("train").is_some_and(|t| t.is_object())) {
                return Err(Error::Invalid(format!(
                    "{}: the config metadata has no model and train settings (not written by msm4sr's training loop?)",
                    path.display()
                )));
            }
            serde_json::from_value(v).map_err(|e| Error::Invalid(format!("{}: config metadata: {e}", path.display())))
        })?;
    cfg.validate().map_err(|e| Error::Invalid(format!("{}: the saved configuration: {e}", path.display())))?;
    check_checkpoint_sizes(&ck, &cfg, path)?;
    Ok(Opened { ck, path: path.to_path_buf(), cfg, stage })
}

impl Opened {
    /// Build the model its configuration describes for `ds` (after the memory check) and load every
    /// tensor: a missing tensor, an extra one, a shape that differs or another item set is an error.
    pub fn restore(self, ds: &Dataset, dev: Device) -> Result<Restored> {
        let (ck, path) = (&self.ck, &self.path);
        let model = build_model(&self.cfg, ds, 0, dev)?;
        train::load_weights(&model, ck, &ds.item_tokens, true)?;
        let names: std::collections::HashSet<String> = model.params().into_iter().map(|(n, _)| n).collect();
        let mut extra: Vec<&String> = ck.tensors.keys().filter(|n| !names.contains(*n) && !n.starts_with("adam.")).collect();
        extra.sort();
        if let Some(n) = extra.first() {
            return Err(Error::Invalid(format!(
                "{}: tensor {n} (and {} more) belongs to no parameter of the model its configuration describes",
                path.display(),
                extra.len() - 1
            )));
        }
        Ok(Restored { model, cfg: self.cfg, stage: self.stage })
    }
}

/// Rebuild a model from a checkpoint's saved config and weights.
pub fn model_from_checkpoint(ds: &Dataset, ckpt: &Path, dev: Device) -> Result<Restored> {
    open_checkpoint(ckpt)?.restore(ds, dev)
}

/// `evaluate`: the checkpoint at `ckpt` on the validation and test splits of `data` (each user's
/// rank of their target written to `ranks` as TSV when given; see [`ranks_tsv`]).
/// With `groups`, the test users are also split into that many groups by history length
/// ([`crate::groups`]).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    data: &Path,
    ckpt: &Path,
    ranks: Option<&Path>,
    overwrite: bool,
    missing: MissingFeatures,
    groups: Option<usize>,
    at: Where,
) -> Result<RunResult> {
    if groups == Some(0) {
        return Err(Error::Invalid("--groups 0: must be at least 1".into()));
    }
    let ckpt = &checkpoint_arg(ckpt);
    if let Some(r) = ranks {
        let inputs: [(&str, &Path); 2] = [("--data", data), ("--ckpt", ckpt)];
        check_outputs(&[r.to_path_buf()], &inputs, overwrite, "pass --overwrite to replace it")?;
    }
    let (dev, desc) = at.resolve()?;
    eprintln!("device: {desc}");
    let opened = open_checkpoint(ckpt)?;
    let ds = load_dataset(data, &opened.cfg, missing)?;
    let restored = opened.restore(&ds, dev)?;
    let (model, cfg, with_id) = (&restored.model, &restored.cfg, restored.with_id());
    if !with_id {
        eprintln!("{} is a pre-training checkpoint: scoring with the modality encoders alone", ckpt.display());
    }
    let split = Samples::of(&ds, cfg).split;
    let start = Instant::now();
    let tc = &cfg.train;
    let valid_ranks = train::ranks(model, &split.valid, tc.eval_batch, with_id, tc.mask_history)?;
    let test_ranks = train::ranks(model, &split.test, tc.eval_batch, with_id, tc.mask_history)?;
    if let Some(path) = ranks {
        let text = ranks_tsv(&ds, &[("valid", &split.valid, &valid_ranks), ("test", &split.test, &test_ranks)]);
        checkpoint::write_atomic(path, text.as_bytes())?;
        eprintln!("per-user ranks in {}", path.display());
    }
    let (valid, test) = (metrics_of(&valid_ranks), metrics_of(&test_ranks));
    let groups = match groups {
        Some(n) if !test_ranks.is_empty() => Some(crate::groups::user_groups(&history_lengths(&ds, &split.test, &test_ranks), n)?),
        _ => None,
    };
    Ok(RunResult { model: model_name(cfg), valid, test, epochs: 0, seconds: start.elapsed().as_secs_f64(), history: Vec::new(), groups })
}

/// (untruncated history length before the target, rank) of every sample.
pub fn history_lengths(ds: &Dataset, samples: &[Sample], ranks: &[u32]) -> Vec<(usize, u32)> {
    samples
        .iter()
        .zip(ranks)
        .map(|(s, &r)| {
            let seq = &ds.seqs[s.user as usize];
            // The target's position in the user's sequence is the history before it.
            let pos = seq.iter().rposition(|&i| i == s.target).unwrap_or(seq.len().saturating_sub(1));
            (pos, r)
        })
        .collect()
}

/// `recommend`: the top `k` items for `who` by the checkpoint at `ckpt` (see
/// [`crate::recommend`]); written to `out` as TSV when given (checked first, as every output).
#[allow(clippy::too_many_arguments)]
pub fn recommend_from(
    data: &Path,
    ckpt: &Path,
    who: &crate::recommend::Who,
    k: usize,
    mask_history: bool,
    missing: MissingFeatures,
    out: Option<(&Path, bool)>,
    at: Where,
    quiet: bool,
) -> Result<crate::recommend::Recs> {
    let ckpt = &checkpoint_arg(ckpt);
    if let Some((o, overwrite)) = out {
        let inputs: [(&str, &Path); 2] = [("--data", data), ("--ckpt", ckpt)];
        check_outputs(&[o.to_path_buf()], &inputs, overwrite, "pass --overwrite to replace it")?;
    }
    if k == 0 {
        return Err(Error::Invalid("--k 0: must be at least 1 (the number of items to recommend)".into()));
    }
    let (dev, _) = at.resolve()?;
    let opened = open_checkpoint(ckpt)?;
    let ds = load_dataset(data, &opened.cfg, missing)?;
    let r = opened.restore(&ds, dev)?;
    let titles = crate::recommend::titles(data, &ds.name)?;
    let recs = crate::recommend::recommend(&r.model, &ds, who, k, mask_history, r.with_id(), r.cfg.train.eval_batch, &titles, quiet)?;
    if let Some((o, _)) = out {
        checkpoint::write_atomic(o, crate::recommend::tsv(&recs).as_bytes())?;
    }
    Ok(recs)
}

/// `featurize`: its outputs checked (not an input, not an earlier dataset's unless `overwrite`)
/// before the sentence model is loaded, then [`crate::featurize::run`].
pub fn featurize(opts: &crate::featurize::FeaturizeOptions, overwrite: bool, quiet: bool, at: Where) -> Result<crate::featurize::Summary> {
    let name = opts.items.file_stem().and_then(|n| n.to_str()).unwrap_or("items").to_string();
    let mut files = vec![opts.out.join(format!("{name}.features.safetensors")), opts.out.join(format!("{name}.items.txt"))];
    if !opts.image_words_from.is_empty() || opts.images.is_some() {
        files.push(opts.out.join(format!("{name}.image_words.tsv")));
    }
    let mut inputs: Vec<(&str, &Path)> = vec![("--items", &opts.items), ("--model-dir", &opts.model_dir)];
    inputs.extend(opts.image_keywords.as_deref().map(|k| ("--image-keywords", k)));
    inputs.extend(opts.images.as_deref().map(|k| ("--images", k)));
    inputs.extend(opts.clip.as_deref().map(|k| ("--clip", k)));
    inputs.extend(opts.vocab.as_deref().map(|k| ("--vocab", k)));
    check_outputs(&files, &inputs, overwrite, "pass --overwrite to replace it")?;
    let (dev, desc) = at.resolve()?;
    eprintln!("device: {desc}");
    crate::featurize::run(opts, dev, quiet)
}

/// `synth`: its outputs checked (not `config_file`, not an earlier dataset's unless `overwrite`),
/// then [`crate::synth::write`].
pub fn synth(out: &Path, cfg: &crate::synth::SynthConfig, config_file: Option<&Path>, overwrite: bool) -> Result<()> {
    let inputs: Vec<(&str, &Path)> = config_file.map(|c| ("--config", c)).into_iter().collect();
    check_outputs(&crate::synth::SynthConfig::outputs(out), &inputs, overwrite, "pass --overwrite to replace it")?;
    crate::synth::write(out, cfg)
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
