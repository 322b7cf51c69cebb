//! The per-epoch run log (`<stem>.epochs.jsonl`, `<stem>.epochs.csv`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Stage;
use crate::data::metrics::Metrics;
use crate::{Error, Result};

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
        crate::files::write_atomic(&self.jsonl, jsonl.as_bytes())?;
        crate::files::write_atomic(&self.csv, epochs_csv(&all).as_bytes())
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
