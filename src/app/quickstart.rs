//! `msm4sr quickstart`: the product's main job end to end on built-in data, in about a minute on
//! a 2-core CPU — a small synthetic dataset, SASRec and MSM4SR (pre-training, then fine-tuning)
//! trained on it, their test metrics side by side with a paired bootstrap, three users' top-5
//! recommendations by name, a report with SVG curves, and the commands to try next.
//!
//! Everything lands in one directory (default `runs/quickstart`): `data/` (the dataset),
//! `sasrec/` and `msm4sr/` (run directories, as `train --run-dir` writes them), `report/`
//! (`report`'s table, paired comparison and curves) and `recommendations.tsv`. Run again, it
//! reuses what is finished and resumes what was interrupted, as `sweep` does; `--overwrite`
//! starts over.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use super::recommend::{recommend_from, Who};
use super::report::{report, ReportOptions};
use super::runs::RunResult;
use super::train::{train_job, Plan, TrainJob};
use super::Where;
use crate::data::synth::SynthConfig;
use crate::data::MissingFeatures;
use crate::{Error, Result};

/// The dataset: 500 users, 800 items in 16 topics (the generator's defaults otherwise).
const USERS: usize = 500;
const ITEMS: usize = 800;
/// The two models and their short schedules (any key of `train --print-config`); the rest is
/// SPEC.md's defaults.
const SASREC: &str = r#"
[model]
model = "sasrec"
[train]
epochs = 30
batch = 256
"#;
const MSM4SR: &str = r#"
[model]
model = "msm4sr"
[train]
pretrain_epochs = 8
epochs = 15
batch = 256
pretrain_batch = 256
"#;
/// Whose recommendations are shown: the first three users of the dataset.
const SHOWN_USERS: usize = 3;

/// Train SASRec and MSM4SR on a small synthetic dataset and show what msm4sr does: test metrics
/// side by side, recommendations, a report with plots.
#[derive(clap::Args)]
pub struct Args {
    /// Directory for everything the quickstart writes (dataset, two runs, report).
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    /// Start over: replace the dataset, runs and report an earlier quickstart left in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// One model of the quickstart: its label, its configuration, where its run goes.
struct Model {
    label: &'static str,
    toml: &'static str,
    dir: &'static str,
}

const MODELS: [Model; 2] = [Model { label: "SASRec", toml: SASREC, dir: "sasrec" }, Model { label: "MSM4SR", toml: MSM4SR, dir: "msm4sr" }];

/// `msm4sr quickstart`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { out, overwrite } = args;
    let t0 = Instant::now();
    let (_, desc) = at.resolve()?;
    eprintln!("msm4sr quickstart: everything goes to {} (device: {desc})", out.display());

    let data = out.join("data");
    let synth_cfg = SynthConfig { users: USERS, items: ITEMS, ..SynthConfig::default() };
    let have_data = SynthConfig::outputs(&data).iter().all(|p| p.is_file());
    if have_data && !overwrite {
        eprintln!("[1/4] dataset: {} (made earlier)", data.display());
    } else {
        super::synth::synth(&data, &synth_cfg, None, overwrite)?;
        eprintln!(
            "[1/4] dataset: {USERS} synthetic users, {ITEMS} items in {} topics, text and image features -> {}",
            synth_cfg.topics,
            data.display()
        );
    }

    let mut results = Vec::new();
    for (i, m) in MODELS.iter().enumerate() {
        let r = train_one(m, &data, &out, overwrite, at, i + 2)?;
        results.push((m, r));
    }

    // Test metrics side by side, and whether the difference is more than the users' noise.
    let rows: Vec<(&str, &crate::data::metrics::Metrics)> =
        results.iter().filter_map(|(m, r)| r.test.as_ref().map(|t| (m.label, t))).collect();
    outln!();
    outln!("Test metrics ({USERS} users; each user's last item ranked against all {ITEMS} items):");
    outln!("{}", crate::data::metrics::table(&rows));
    let rep = report(&ReportOptions {
        runs: MODELS.iter().map(|m| format!("{}={}", m.label, out.join(m.dir).display())).collect(),
        out: out.join("report"),
        compare: vec!["MSM4SR:SASRec".into()],
        split: "test".into(),
        resamples: 10_000,
        seed: 2024,
        overwrite: true,
        groups: None,
    })?;
    let paired = std::fs::read_to_string(out.join("report").join("paired.md")).unwrap_or_default();
    let paired: Vec<&str> = paired.lines().filter(|l| l.starts_with('|')).collect();
    if !paired.is_empty() {
        outln!("MSM4SR - SASRec on the same test users (paired bootstrap, 95% interval):");
        for l in paired {
            outln!("{l}");
        }
    }

    // Recommendations of the fine-tuned MSM4SR for three users, by item name.
    let ds_users = first_users(&data, SHOWN_USERS)?;
    let ckpt = crate::files::run_dir_checkpoint(&out.join("msm4sr"));
    let tsv = out.join("recommendations.tsv");
    let recs = recommend_from(
        &data,
        &ckpt,
        &Who::Users(ds_users.iter().map(|(u, _)| u.clone()).collect()),
        5,
        true,
        MissingFeatures::Error,
        Some((&tsv, true)),
        at,
        true,
    )?;
    let names = super::recommend::titles(&data, crate::data::synth::NAME)?;
    let name = |item: &str| names.get(item).cloned().unwrap_or_else(|| item.to_string());
    outln!();
    outln!("MSM4SR's top 5 for three users (items they have not seen; their last three items first):");
    for ((user, history), (_, items)) in ds_users.iter().zip(&recs) {
        let recent: Vec<String> = history.iter().rev().take(3).rev().map(|i| name(i)).collect();
        outln!("  user {user}, recently: {}", recent.join(" -> "));
        for (r, x) in items.iter().enumerate() {
            outln!("    {}. {}", r + 1, name(&x.item));
        }
    }

    outln!();
    outln!("Written ({:.0} s in all):", t0.elapsed().as_secs_f64());
    outln!("  {}/sasrec, {}/msm4sr   run directories (weights, per-epoch CSV/JSONL, ranks, log)", out.display(), out.display());
    for f in rep.files.iter().filter(|f| f.extension().is_some_and(|e| e == "svg" || e == "md")) {
        outln!("  {}", f.display());
    }
    outln!("  {}", tsv.display());
    outln!();
    outln!("Next:");
    let who = ds_users.first().map_or("u1", |(u, _)| u.as_str());
    outln!("  msm4sr recommend --data {} --ckpt {}/msm4sr --user {who}   # any user, or --history i1,i2", data.display(), out.display());
    outln!("  msm4sr train --data DIR --model msm4sr --run-dir runs/mine   # your data: NAME.inter (+ features; README: Data)");
    outln!("  msm4sr import amazon --reviews R.json.gz --meta M.json.gz --out runs/mine   # Amazon's raw files -> a dataset");
    outln!("  msm4sr sweep experiments/synth_table.toml --data runs/synth --out runs/t   # a paper table as a grid (from a clone)");
    Ok(ExitCode::SUCCESS)
}

/// Train (or reuse, or resume) one model's run under `out`.
fn train_one(m: &Model, data: &Path, out: &Path, overwrite: bool, at: Where, step: usize) -> Result<RunResult> {
    let table: toml::Table = toml::from_str(m.toml).map_err(|e| Error::Invalid(format!("quickstart {}: {e}", m.label)))?;
    let cfg = crate::config::from_layers(&[table])?;
    let ck = crate::files::run_dir_checkpoint(&out.join(m.dir));
    let files = crate::files::RunFiles::of(&ck);
    let finished = files.result.is_file()
        && crate::config::read_config(&crate::files::config_path(&ck))
            .is_ok_and(|was| crate::config::to_toml(&was) == crate::config::to_toml(&cfg));
    if finished && !overwrite {
        eprintln!("[{step}/4] {}: finished earlier ({})", m.label, out.join(m.dir).display());
        let mut r = super::report::load_run(&out.join(m.dir).display().to_string())?.result;
        // The saved result has the metrics, not how many users they average over: from the ranks.
        let ranks: Vec<u32> = super::report::paired::read_ranks(&files.ranks, "test")?.into_values().collect();
        r.test = super::runs::metrics_of(&ranks);
        return Ok(r);
    }
    let resume = !overwrite && crate::files::config_path(&ck).is_file();
    let stages = if cfg.model.model == crate::config::ModelKind::Msm4sr {
        format!("{} pre-training + {} fine-tuning epochs", cfg.train.pretrain_epochs, cfg.train.epochs)
    } else {
        format!("{} epochs", cfg.train.epochs)
    };
    eprintln!("[{step}/4] {}: {stages}{}", m.label, if resume { " (resuming)" } else { "" });
    let t = Instant::now();
    let job = TrainJob {
        data: data.to_path_buf(),
        config_file: None,
        plan: Plan::train(&cfg, false, false),
        cfg,
        out: ck,
        init: None,
        resume,
        overwrite,
        missing: MissingFeatures::Error,
        quiet: true,
    };
    let r = train_job(&job, at)?;
    eprintln!("        done in {:.0} s", t.elapsed().as_secs_f64());
    Ok(r)
}

/// The first `n` users of the dataset (after filtering) with their item tokens, oldest first.
fn first_users(data: &Path, n: usize) -> Result<Vec<(String, Vec<String>)>> {
    let cfg = crate::config::RunConfig::default();
    let ds = super::runs::load_dataset(data, &cfg, MissingFeatures::Error)?;
    Ok(ds
        .user_tokens
        .iter()
        .zip(&ds.seqs)
        .take(n)
        .map(|(u, s)| (u.clone(), s.iter().map(|&i| ds.item_tokens[i as usize].clone()).collect()))
        .collect())
}
