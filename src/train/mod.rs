//! Training loops (pre-training, fine-tuning, end-to-end), full-ranking evaluation, early stopping,
//! checkpoints and resume.
//!
//! Each epoch shuffles the training samples with an RNG seeded by (seed, stage, epoch), so a resumed
//! run replays exactly the epochs it missed. After every epoch the model is validated (Recall@20 on the
//! validation targets); the best epoch's weights go to the output checkpoint, and the full training
//! state (weights, Adam moments, epoch, best score, patience) to `<out>.last.safetensors` for `--resume`.

//!
//! Files: [`trainer`] the epoch loop of one stage (early stopping, the optimizer, resume); [`eval`]
//! full-ranking evaluation; [`resume`] what a resume state records and the checks before resuming;
//! [`log`] the per-epoch run log; [`weights`] loading weights into a model; [`checkpoint`] the
//! safetensors files. The model is reached only through [`Recommender`](crate::model::Recommender).
//!
//! Uses `model` (the trait and its dropout seeds), `data`, `config`, `files`, `console`, `interrupt`,
//! `fault` and the engine; the commands (`app`) use it.

pub mod checkpoint;
mod eval;
mod log;
mod resume;
mod trainer;
mod weights;

pub use eval::{evaluate, ranks};
pub use log::{epochs_csv, EpochRecord, RunLog, LOSS_TERMS};
pub use resume::{base_meta, config_difference, read_resume_state, DataFingerprint, ResumeState, CHECKPOINT_FORMAT, RESUME_MAY_CHANGE};
pub use trainer::{fit, fit_logged, EarlyStop};
pub use weights::{load_transfer, load_weights};

use serde::Serialize;

use crate::config::Stage;
use crate::data::metrics::Metrics;

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
