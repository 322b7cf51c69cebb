//! Resume states: what `<out>.last.safetensors` records besides the weights and Adam moments, the
//! metadata every checkpoint carries, and the checks that a resumed run is the same run.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Checkpoint};
use super::log::EpochRecord;
use crate::config::{RunConfig, Stage};
use crate::data::metrics::Metrics;
use crate::data::Split;
use crate::{Error, Result};

pub(super) fn stage_tag(s: Stage) -> u64 {
    match s {
        Stage::Pretrain => 1,
        Stage::Finetune => 2,
        Stage::E2e => 3,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

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
