//! The effective configuration of a run, built in one place: SPEC.md's defaults < a `--config`
//! TOML file (sections `[model]` and `[train]`) < command-line flags.
//!
//! A flag is the config key of the same name: `--max-len 20` is `[model] max_len = 20`. The merge
//! goes by name (the flags are serialised as a TOML table over the file's), so a new knob is a field
//! with its default in [`ModelConfig`](crate::config::ModelConfig) or [`TrainConfig`](crate::config::TrainConfig) and, to give it
//! a flag, an `Option` field of the same name in [`ModelFlags`] or [`TrainFlags`]; its range check
//! goes in [`RunConfig::validate`]. Two flags are shorthands: `--dropout` also sets `attn_dropout`
//! unless `--attn-dropout` is given, and the `--no-*` flags set their key to false. One rule
//! follows the merge: `protocol = "cold-start"` turns `ids` off for msm4sr; `cross_domain` turns
//! `ids` off and `freeze` to the transformer unless a layer sets them (`--target-ids`: `ids` on).

use std::path::Path;

use clap::Args;
use serde::Serialize;

use crate::config::{Freeze, Mod, Modalities, ModelKind, Protocol, RunConfig, Score};
use crate::{Error, Result};

/// Model flags: each overrides the `[model]` key of its name.
#[derive(Args, Serialize, Clone, Debug, Default)]
pub struct ModelFlags {
    /// Model: msm4sr (the paper), sasrec (IDs only) or sasrecm (IDs + both encoders summed). Default msm4sr.
    #[arg(long, value_enum)]
    pub model: Option<ModelKind>,
    /// Hidden size d0 of the transformer and the item encoders (default 64).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Transformer layers (default 2).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Attention heads; must divide --hidden (default 2).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Transformer feed-forward size (default 256).
    #[arg(long)]
    pub inner: Option<usize>,
    /// Most recent items kept per input sequence (default 50).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Hidden dropout of the transformer, in [0, 1); also the attention dropout unless
    /// --attn-dropout is given (default 0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub dropout: Option<f32>,
    /// Attention-probability dropout, in [0, 1) (default 0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub attn_dropout: Option<f32>,
    /// Dropout inside the MoE adaptor, in [0, 1) (default 0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub moe_dropout: Option<f32>,
    /// Pre-training sequence random dropout ratio rho, in [0, 1) (default 0.2).
    #[arg(long, allow_negative_numbers = true)]
    pub item_drop: Option<f32>,
    /// MoE experts per modality (default 8).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Temperature of the contrastive losses and the cosine scorer (default 0.07).
    #[arg(long, allow_negative_numbers = true)]
    pub tau: Option<f32>,
    /// Weight of the CMCL loss in pre-training (default 0.01).
    #[arg(long, allow_negative_numbers = true)]
    pub lambda: Option<f32>,
    /// Pre-train without the next-item-prediction loss (eq. 7).
    #[arg(long = "no-nip", num_args = 0, default_missing_value = "false")]
    pub nip: Option<bool>,
    /// Pre-train without the cross-modal contrastive loss (eq. 9).
    #[arg(long = "no-cmcl", num_args = 0, default_missing_value = "false")]
    pub cmcl: Option<bool>,
    /// Pre-train without complementary modality mixup.
    #[arg(long = "no-mixup", num_args = 0, default_missing_value = "false")]
    pub mixup: Option<bool>,
    /// Pre-train without the projection heads of eq. 6 (the authors' published command).
    #[arg(long = "no-heads", num_args = 0, default_missing_value = "false")]
    pub proj_heads: Option<bool>,
    /// Fine-tuning scorer: cos (cosine / tau, the released code; default) or dot (the paper).
    #[arg(long, value_enum)]
    pub score: Option<Score>,
    /// Modalities the model uses: text, image or both (default both).
    #[arg(long, value_enum)]
    pub modalities: Option<Modalities>,
    /// Drop one score term at fine-tuning: text gives MSM4SR-V, image gives MSM4SR-T.
    #[arg(long, value_enum)]
    pub drop_score: Option<Mod>,
    /// Fine-tune and score without ID embeddings (the modality encoders alone; default with
    /// --protocol cold-start for msm4sr).
    #[arg(long = "no-ids", num_args = 0, default_missing_value = "false")]
    pub ids: Option<bool>,
    /// Cross-domain: train new ID embeddings for the target's items too (sets `ids` on).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    #[serde(skip)]
    pub target_ids: Option<bool>,
}

/// Training flags: each overrides the `[train]` key of its name.
#[derive(Args, Serialize, Clone, Debug, Default)]
pub struct TrainFlags {
    /// Random seed of initialisation, shuffling and dropout (default 2024).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fine-tuning epochs (upper bound; early stopping on validation Recall@20; default 300).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Pre-training epochs (upper bound; early stopping on validation Recall@20; default 300).
    #[arg(long)]
    pub pretrain_epochs: Option<usize>,
    /// Fine-tuning samples per step (default 1024).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Pre-training samples per step (default 1024).
    #[arg(long)]
    pub pretrain_batch: Option<usize>,
    /// Users per evaluation batch (memory only: results do not depend on it; default 1024).
    #[arg(long)]
    pub eval_batch: Option<usize>,
    /// Fine-tuning learning rate, Adam (default 1e-3).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Pre-training learning rate, Adam (default 1e-3).
    #[arg(long, allow_negative_numbers = true)]
    pub pretrain_lr: Option<f32>,
    /// Fine-tuning weight decay (Adam, coupled as torch's; default 0).
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f32>,
    /// Pre-training weight decay (default 0, as the authors pre-train).
    #[arg(long, allow_negative_numbers = true)]
    pub pretrain_weight_decay: Option<f32>,
    /// Gradient clipping: the largest global L2 norm of a step's gradients (default 5; 0 turns clipping off).
    #[arg(long, allow_negative_numbers = true)]
    pub clip: Option<f32>,
    /// Fine-tuning early-stopping patience in epochs (default 10).
    #[arg(long)]
    pub patience: Option<usize>,
    /// Pre-training early-stopping patience in epochs (default 20).
    #[arg(long)]
    pub pretrain_patience: Option<usize>,
    /// Users with fewer interactions are dropped (default 5; at least 3).
    #[arg(long)]
    pub min_user_inter: Option<usize>,
    /// Exclude each user's history from the ranking.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub mask_history: Option<bool>,
    /// Evaluation protocol: standard leave-one-out, or cold-start (paper Table V).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Cold-start: items with fewer training interactions than this are cold (default 10).
    #[arg(long)]
    pub cold_threshold: Option<usize>,
    /// Keep the transformer fixed in fine-tuning (cross-domain transfer: transformer or none;
    /// default none; transformer with --cross-domain).
    #[arg(long, value_enum)]
    pub freeze: Option<Freeze>,
    /// Fine-tune from a checkpoint of another item set (--init): carry the transformer and the
    /// item encoders, frozen transformer and no ID embeddings unless --freeze none / --target-ids.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub cross_domain: Option<bool>,
}

/// Every setting a command line can override.
#[derive(Args, Serialize, Clone, Debug, Default)]
pub struct Flags {
    #[command(flatten)]
    pub model: ModelFlags,
    #[command(flatten)]
    pub train: TrainFlags,
}

/// The effective configuration: defaults < the TOML file at `file` < `flags`, range-checked.
pub fn resolve(file: Option<&Path>, flags: &Flags) -> Result<RunConfig> {
    let base = match file {
        Some(p) => read_table(p)?,
        None => toml::Table::new(),
    };
    let mut over = toml::Table::try_from(flags).map_err(|e| Error::Invalid(format!("flags: {e}")))?;
    if flags.model.target_ids == Some(true) {
        if let Some(toml::Value::Table(m)) = over.get_mut("model") {
            m.insert("ids".into(), toml::Value::Boolean(true));
        } else {
            over.insert("model".into(), toml::Value::Table(toml::Table::from_iter([("ids".to_string(), toml::Value::Boolean(true))])));
        }
    }
    // --dropout is also the attention dropout unless --attn-dropout says otherwise.
    if let (Some(d), None) = (flags.model.dropout, flags.model.attn_dropout) {
        if let Some(toml::Value::Table(m)) = over.get_mut("model") {
            m.insert("attn_dropout".into(), toml::Value::Float(d as f64));
        }
    }
    let cfg = from_layers(&[base, over])?;
    if flags.model.target_ids == Some(true) && !cfg.train.cross_domain {
        return Err(Error::Invalid(
            "--target-ids adds ID embeddings for the target items of a cross-domain transfer: it needs --cross-domain".into(),
        ));
    }
    Ok(cfg)
}

/// The defaults overridden by each of `layers` in turn (tables with `[model]` and `[train]`
/// sections, any subset of keys), range-checked; an unknown section or key is an error.
pub fn from_layers(layers: &[toml::Table]) -> Result<RunConfig> {
    let given = |sec: &str, key: &str| layers.iter().any(|l| l.get(sec).and_then(|v| v.as_table()).is_some_and(|t| t.contains_key(key)));
    let mut table = toml::Table::try_from(RunConfig::default()).map_err(|e| Error::Invalid(format!("configuration: {e}")))?;
    for layer in layers {
        for (section, values) in layer {
            let (Some(toml::Value::Table(dst)), toml::Value::Table(src)) = (table.get_mut(section), values) else {
                return Err(Error::Invalid(format!("no config section [{section}] (the sections are [model] and [train])")));
            };
            dst.extend(src.clone());
        }
    }
    let mut cfg: RunConfig = table.try_into().map_err(|e| Error::Invalid(with_suggestion(e.to_string())))?;
    // Settings that mean nothing for the model or plan given are refused, not ignored.
    if cfg.model.model == ModelKind::Sasrec {
        let m = &cfg.model;
        let msm = |what: &str| Error::Invalid(format!("{what} is a setting of the multimodal models; --model sasrec uses item IDs only"));
        if !m.ids {
            return Err(msm("--no-ids (ids = false)"));
        }
        if m.modalities != crate::config::Modalities::Both {
            return Err(msm("--modalities"));
        }
        if m.drop_score.is_some() {
            return Err(msm("--drop-score"));
        }
    }
    // Cold-start fine-tunes MSM4SR without ID embeddings: cold items have none worth the name.
    if cfg.train.protocol == Protocol::ColdStart && cfg.model.model == ModelKind::Msm4sr {
        cfg.model.ids = false;
    }
    // Cross-domain transfer trains the item encoders alone unless told otherwise.
    if cfg.train.cross_domain {
        if !given("train", "freeze") {
            cfg.train.freeze = Freeze::Transformer;
        }
        if !given("model", "ids") {
            cfg.model.ids = false;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// A TOML config file as written (checked as [`read_config`] does).
pub fn read_table(path: &Path) -> Result<toml::Table> {
    read_config(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    toml::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
}

/// Read a TOML config file (sections `[model]` and `[train]`, any subset of keys; an unknown
/// section or key is an error naming the closest valid one).
pub fn read_config(path: &Path) -> Result<RunConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    toml::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {}", path.display(), with_suggestion(e.to_string()))))
}

/// The configuration as TOML (what `--print-config` prints and `<stem>.config.toml` holds).
pub fn to_toml(cfg: &RunConfig) -> String {
    toml::to_string(cfg).unwrap_or_default()
}

/// serde's "unknown field `x`, expected one of `a`, `b`, ..." with "did you mean `a`?" added, `a`
/// being the expected name closest to `x` in edit distance (when it is close enough to be a typo).
pub fn with_suggestion(msg: String) -> String {
    let Some((_, rest)) = msg.split_once("unknown field `") else { return msg };
    let Some((bad, tail)) = rest.split_once('`') else { return msg };
    let best = tail.split('`').skip(1).step_by(2).map(|name| (edit_distance(bad, name), name)).min();
    match best {
        Some((d, name)) if d <= (bad.len().max(name.len()) / 2).max(1) => format!("{}\ndid you mean `{name}`?", msg.trim_end()),
        _ => msg,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        flags: Flags,
    }

    fn flags(args: &[&str]) -> Flags {
        let m = T::command().try_get_matches_from(std::iter::once("t").chain(args.iter().copied())).unwrap();
        T::from_arg_matches(&m).unwrap().flags
    }

    fn file(text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("msm4sr-config-test-{}-{}.toml", std::process::id(), text.len()));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Every flag is a config key of its section: a flag whose name is no key (or has the wrong
    /// type) fails the merge here, before any user meets it.
    #[test]
    fn every_flag_is_a_config_key() {
        // Every key present (an optional key with a value).
        let mut all = RunConfig::default();
        all.model.drop_score = Some(Mod::Text);
        let defaults = toml::Table::try_from(all).unwrap();
        let cmd = T::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            // `--target-ids` is a shorthand for `ids` (module docs).
            if id == "help" || id == "target_ids" {
                continue;
            }
            let long = format!("--{}", arg.get_long().unwrap());
            let section = if defaults["model"].as_table().unwrap().contains_key(id) {
                "model"
            } else {
                assert!(defaults["train"].as_table().unwrap().contains_key(id), "flag {long} is no config key ({id})");
                "train"
            };
            let mut args = vec![long.clone()];
            if arg.get_num_args().map(|n| n.takes_values()).unwrap_or(true) {
                let v = arg
                    .get_possible_values()
                    .first()
                    .map(|p| p.get_name().to_string())
                    .unwrap_or_else(|| defaults[section][id].to_string().trim_matches('"').to_string());
                args.push(v);
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let f = flags(&a);
            let over = toml::Table::try_from(&f).unwrap();
            assert!(over[section].as_table().unwrap().contains_key(id), "{a:?} did not set {section}.{id}");
            resolve(None, &f).unwrap_or_else(|e| panic!("{a:?}: {e}"));
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} flags");
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let p = file("[model]\nhidden = 32\nheads = 4\nnip = false\n[train]\nlr = 0.01\nmask_history = true\n");
        let c = resolve(Some(&p), &flags(&["--hidden", "48", "--no-cmcl", "--dropout", "0.3"])).unwrap();
        assert_eq!(c.model.hidden, 48); // flag beats file
        assert_eq!(c.model.heads, 4); // file beats default
        assert!(!c.model.nip && !c.model.cmcl && c.model.mixup);
        assert_eq!((c.model.dropout, c.model.attn_dropout), (0.3, 0.3));
        assert_eq!(c.train.lr, 0.01);
        assert!(c.train.mask_history);
        assert_eq!(c.train.batch, TrainConfig::default().batch);
        let c = resolve(Some(&p), &flags(&["--dropout", "0.3", "--attn-dropout", "0.1"])).unwrap();
        assert_eq!((c.model.dropout, c.model.attn_dropout), (0.3, 0.1));
        let c = resolve(None, &flags(&["--drop-score", "image"])).unwrap();
        assert_eq!(c.model.drop_score, Some(Mod::Image));
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn merged_settings_are_range_checked() {
        let p = file("[model]\nhidden = 30\n");
        let e = resolve(Some(&p), &flags(&["--heads", "4"])).unwrap_err().to_string();
        assert!(e.contains("--heads 4") && e.contains("--hidden 30"), "{e}");
        let _ = std::fs::remove_file(p);
    }
}
