//! What the commands share: loading the dataset and its samples under the run's protocol, checking
//! outputs before any work, building a model or restoring one from a checkpoint, the result of a run
//! and its per-user ranks.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::config::{ModelKind, RunConfig, Stage};
use crate::data::metrics::Metrics;
use crate::data::{Dataset, LoadOptions, MissingFeatures, Sample, Split};
use crate::engine::Device;
use crate::model::msm4sr::Model;
use crate::train::{self, checkpoint};
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
    /// Compute time of the whole run: every epoch's training and validation (also those run before
    /// a resume) and the final scoring of validation and test.
    pub seconds: f64,
    /// Every epoch of every stage (training commands only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<train::EpochRecord>,
    /// Test metrics per user group by history length (`evaluate --groups N`).
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub groups: Option<Vec<crate::data::groups::UserGroup>>,
}

/// Training and validation seconds of the given epochs.
pub fn epoch_seconds(history: &[train::EpochRecord]) -> f64 {
    history.iter().map(|h| h.train_seconds + h.valid_seconds).sum()
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
        if let Some(what) = crate::files::not_a_regular_file(out) {
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
            crate::config::Protocol::Standard => Samples { split: ds.split(cfg.model.max_len), pretrain: None, cold_items: None },
            crate::config::Protocol::ColdStart => {
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
