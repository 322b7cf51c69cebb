//! The models, written once against the engine's tensors and ops: the building blocks ([`nn`]:
//! linear layers, the transformer encoder every model reuses, the item encoder, the losses), the
//! recommenders themselves ([`msm4sr`]: MSM4SR, SASRec, SASRecM), the pretrained encoders that turn
//! item content into features ([`bert`]: Sentence-BERT; [`clip`]: CLIP), and a tiny demonstration
//! model ([`demo`]).
//!
//! Uses the engine, `config` and `data` (batches); nothing above.

pub mod bert;
pub mod clip;
pub mod demo;
pub mod msm4sr;
pub mod nn;

use rand_chacha::ChaCha8Rng;

use crate::config::{Freeze, Stage};
use crate::data::Sample;
use crate::engine::Tensor;
use crate::Result;
use nn::Seeds;

/// What training and evaluation need of a model (RecBole's `calculate_loss` / `full_sort_predict`
/// boundary): its parameters, the loss of a batch at a stage, and the rank of each target among all
/// items. The trainer (`train`) knows nothing else of a model.
pub trait Recommender {
    /// The item side of scoring, computed once per evaluation and shared by its batches.
    type Tables;

    /// Every parameter under its checkpoint name.
    fn params(&self) -> Vec<(String, Tensor)>;
    /// The parameters `stage` trains (`Freeze::Transformer`: the transformer stays as loaded).
    fn trained_params(&self, stage: Stage, freeze: Freeze) -> Vec<(String, Tensor)>;
    /// The loss of one batch of training samples at `stage`, with its named terms as they enter it;
    /// the model's own augmentation (item dropout, mixup) draws from `rng`, dropout from `seeds`.
    fn loss(&self, stage: Stage, samples: &[&Sample], rng: &mut ChaCha8Rng, seeds: &mut Seeds) -> Result<Loss>;
    /// The item side of scoring (eval mode); `with_id`: include the ID-embedding term.
    fn score_tables(&self, with_id: bool, seeds: &mut Seeds) -> Result<Self::Tables>;
    /// The 0-based rank of each sample's target among all real items.
    fn rank_targets(&self, tables: &Self::Tables, samples: &[&Sample], mask_history: bool, seeds: &mut Seeds) -> Result<Vec<u32>>;
}

/// A batch's loss and its named terms (`nip_text`, `cmcl`, `ce`, ...; see `train::LOSS_TERMS`).
pub struct Loss {
    pub total: Tensor,
    pub terms: Vec<(&'static str, Tensor)>,
}
