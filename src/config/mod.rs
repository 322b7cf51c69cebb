//! Every configuration type of a run and the one place it is built: SPEC.md's defaults < a
//! `--config` TOML file < command-line flags ([`merge`]). [`ModelConfig`] is the `[model]` section,
//! [`TrainConfig`] the `[train]` section, [`RunConfig`] both, with [`RunConfig::validate`].
//!
//! The bottom of the application: it uses nothing of msm4sr but the error type, and every layer
//! above reads its settings from here.

mod merge;
mod model;
mod train;

pub use merge::*;
pub use model::*;
pub use train::*;
