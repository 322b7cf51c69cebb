//! `[model]`: which model, its sizes and its switches (saved with every checkpoint).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Multimodal pre-training + fine-tuning (the paper's model).
    Msm4sr,
    /// ID embeddings only.
    Sasrec,
    /// SASRec whose item representation is ID embedding + text encoder + image encoder, no pre-training.
    Sasrecm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// cos(h, item) / tau (the released code's scorer).
    Cos,
    /// h . item (the paper's eq. 12).
    Dot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Modalities {
    Text,
    Image,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mod {
    Text,
    Image,
}

/// Everything that fixes the model's shape and losses (saved in checkpoints).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub model: ModelKind,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub inner: usize,
    pub max_len: usize,
    pub dropout: f32,
    pub attn_dropout: f32,
    pub moe_dropout: f32,
    pub experts: usize,
    pub tau: f32,
    pub lambda: f32,
    /// Sequence random dropout ratio rho (pre-training).
    pub item_drop: f32,
    pub nip: bool,
    pub cmcl: bool,
    pub mixup: bool,
    /// Projection heads of eq. 6 (off = the authors' published command).
    pub proj_heads: bool,
    pub score: Score,
    pub modalities: Modalities,
    /// Drop one score term at fine-tuning (MSM4SR-T keeps text: drop image).
    pub drop_score: Option<Mod>,
    /// Fine-tuning adds the ID embeddings to the item representations (msm4sr, sasrecm); off, the
    /// modality encoders alone score (cold-start, cross-domain).
    pub ids: bool,
}

impl ModelConfig {
    /// Whether fine-tuning uses (and trains) the ID embeddings: SASRec always (they are all it
    /// has), the others unless `ids` is off.
    pub fn uses_ids(&self) -> bool {
        self.ids || self.model == ModelKind::Sasrec
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            model: ModelKind::Msm4sr,
            hidden: 64,
            layers: 2,
            heads: 2,
            inner: 256,
            max_len: 50,
            dropout: 0.2,
            attn_dropout: 0.2,
            moe_dropout: 0.2,
            experts: 8,
            tau: 0.07,
            lambda: 0.01,
            item_drop: 0.2,
            nip: true,
            cmcl: true,
            mixup: true,
            proj_heads: true,
            score: Score::Cos,
            modalities: Modalities::Both,
            drop_score: None,
            ids: true,
        }
    }
}
