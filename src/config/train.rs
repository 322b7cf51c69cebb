//! `[train]`: optimisation, schedule and protocol, and the run's whole configuration
//! ([`RunConfig`]: `[model]` + `[train]`) with its range checks.

use serde::{Deserialize, Serialize};

use super::model::*;
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
        if let (Some(d), false) = (m.drop_score, m.modalities == crate::config::Modalities::Both) {
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

/// A training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pretrain,
    Finetune,
    /// Pre-training and fine-tuning losses summed in one stage.
    E2e,
}
