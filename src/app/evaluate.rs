//! `msm4sr evaluate`: a checkpoint on the validation and test splits (per-user ranks, user groups).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use super::runs::{check_outputs, load_dataset, metrics_of, model_name, open_checkpoint, ranks_tsv, RunResult, Samples};
use super::{missing_of, print_result, MissingArg, Where};
use crate::data::{Dataset, MissingFeatures, Sample};
use crate::files::checkpoint_arg;
use crate::train;
use crate::{Error, Result};

/// Evaluate a checkpoint on the validation and test splits.
#[derive(clap::Args)]
pub struct Args {
    /// Dataset directory (the one the checkpoint was trained on: same items, same order).
    #[arg(long)]
    pub data: PathBuf,
    /// A checkpoint written by train, pretrain or finetune (or a --run-dir directory).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write every user's target rank (TSV: split, user, target, rank) for paired
    /// significance tests between models (`msm4sr report`).
    #[arg(long)]
    pub ranks: Option<PathBuf>,
    /// Items in .inter without features: fail (error) or give them zero features (zero).
    #[arg(long, value_enum, default_value = "error")]
    pub missing_features: MissingArg,
    /// Replace an existing --ranks file.
    #[arg(long)]
    pub overwrite: bool,
    /// Also split the test users into N equal-size groups by history length (paper Fig. 4)
    /// and report every metric per group (1 to 100).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    pub groups: Option<usize>,
}

/// `msm4sr evaluate`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { data, ckpt, json, ranks, missing_features, overwrite, groups } = args;
    let r = evaluate(&data, &ckpt, ranks.as_deref(), overwrite, missing_of(missing_features), groups, at)?;
    print_result(&r, json)?;
    if let (Some(g), false) = (&r.groups, json) {
        outln!("\ntest users by history length ({} groups):\n{}", g.len(), crate::data::groups::table(g));
    }
    Ok(ExitCode::SUCCESS)
}

/// `evaluate`: the checkpoint at `ckpt` on the validation and test splits of `data` (each user's
/// rank of their target written to `ranks` as TSV when given; see [`ranks_tsv`]).
/// With `groups`, the test users are also split into that many groups by history length
/// ([`crate::data::groups`]).
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
        crate::files::write_atomic(path, text.as_bytes())?;
        eprintln!("per-user ranks in {}", path.display());
    }
    let (valid, test) = (metrics_of(&valid_ranks), metrics_of(&test_ranks));
    let groups = match groups {
        Some(n) if !test_ranks.is_empty() => Some(crate::data::groups::user_groups(&history_lengths(&ds, &split.test, &test_ranks), n)?),
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
