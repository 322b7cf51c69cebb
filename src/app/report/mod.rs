//! `msm4sr report`: runs (and sweeps) summarised as a Markdown table (mean ± sd over seeds), a paired
//! bootstrap over users between groups of runs, and SVG plots — training loss and validation
//! Recall@20 / NDCG@20 per epoch across both stages (one line per group, the seeds as a band), test
//! metrics per user group, and sweep lines.
//!
//! A run is given as its directory (`--run-dir`), its checkpoint or stem (`runs/m.safetensors`,
//! `runs/m`), or its result JSON (`train --json` output); `LABEL=RUN` names its group. Unlabelled
//! runs are grouped by their configuration without the seed (and by the stages they ran), labelled by
//! the model and by the settings that differ between groups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::Where;
use crate::app::runs::{self, RunResult};
use crate::config::{RunConfig, Stage};
use crate::files::RunFiles;
use crate::{Error, Result};

pub mod paired;
mod plots;

pub use paired::*;
pub use plots::*;

/// The six metrics of every table, in column order.
pub const KEYS: [&str; 6] = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"];

/// One finished run.
#[derive(Clone, Debug)]
pub struct Run {
    /// What the command line called it.
    pub arg: String,
    /// The group label given (`LABEL=RUN`), if any.
    pub label: Option<String>,
    pub result: RunResult,
    /// The run's configuration (`<stem>.config.toml`), when there is one.
    pub config: Option<RunConfig>,
    /// `<stem>.ranks.tsv`, when there is one.
    pub ranks: Option<PathBuf>,
}

fn io(p: &Path, e: std::io::Error) -> Error {
    Error::Io { path: p.display().to_string(), source: e }
}

/// Read a run from `LABEL=RUN` or `RUN` (see the module docs).
pub fn load_run(arg: &str) -> Result<Run> {
    // LABEL=RUN: the first `=` after which a path exists (a label may hold `=` itself).
    let split = (!Path::new(arg).exists())
        .then(|| arg.match_indices('=').map(|(i, _)| i).find(|&i| i > 0 && Path::new(&arg[i + 1..]).exists()))
        .flatten();
    let (label, path) = match split {
        Some(i) => (Some(arg[..i].to_string()), PathBuf::from(&arg[i + 1..])),
        None => (None, PathBuf::from(arg)),
    };
    let (result_path, stem): (PathBuf, Option<PathBuf>) = if path.is_dir() {
        let ck = crate::files::run_dir_checkpoint(&path);
        (RunFiles::of(&ck).result, Some(ck))
    } else if path.extension().is_some_and(|e| e == "json") {
        (path.clone(), None)
    } else {
        let ck = if path.extension().is_some_and(|e| e == "safetensors") { path.clone() } else { path.with_extension("safetensors") };
        (RunFiles::of(&ck).result, Some(ck))
    };
    let text = std::fs::read_to_string(&result_path).map_err(|e| {
        Error::Invalid(format!("{arg}: no result at {} ({e}); is it a finished run (train --run-dir or --out)?", result_path.display()))
    })?;
    let mut result: RunResult = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", result_path.display())))?;
    // Results written before `seconds` covered the epochs run before a resume counted only the
    // last call; the epoch log holds the whole run.
    result.seconds = result.seconds.max(runs::epoch_seconds(&result.history));
    let (mut config, mut ranks) = (None, None);
    if let Some(ck) = &stem {
        let cp = crate::files::config_path(ck);
        if cp.is_file() {
            config = Some(crate::config::read_config(&cp)?);
        }
        let r = RunFiles::of(ck).ranks;
        ranks = r.is_file().then_some(r);
    }
    Ok(Run { arg: arg.to_string(), label, result, config, ranks })
}

/// Runs that differ only in their seed.
#[derive(Clone, Debug)]
pub struct Group {
    pub label: String,
    pub runs: Vec<Run>,
}

/// The stages a run went through, from its history.
fn stages(r: &Run) -> Vec<Stage> {
    let mut s: Vec<Stage> = Vec::new();
    for h in &r.result.history {
        if s.last() != Some(&h.stage) {
            s.push(h.stage);
        }
    }
    s
}

/// The configuration as `section.key` -> value, without the seed.
fn flat(c: &RunConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(t)) = toml::Value::try_from(c) {
        for (sec, v) in t {
            if let toml::Value::Table(keys) = v {
                for (k, v) in keys {
                    // The f32 settings (learning rates, dropout, ...) as given, not as their f64 widening
                    // (0.001, not 0.0010000000474974513).
                    let text = match v {
                        toml::Value::Float(x) if (x as f32) as f64 == x => format!("{}", x as f32),
                        v => v.to_string(),
                    };
                    out.insert(format!("{sec}.{k}"), text);
                }
            }
        }
    }
    out.remove("train.seed");
    out
}

/// Group runs: by their label where given, else by configuration and stages (module docs), in the
/// order of first appearance.
pub fn group(runs: Vec<Run>) -> Vec<Group> {
    type Key = (Option<String>, BTreeMap<String, String>, Vec<Stage>, String);
    let key = |r: &Run| -> Key {
        match &r.label {
            Some(l) => (Some(l.clone()), BTreeMap::new(), Vec::new(), String::new()),
            None => (None, r.config.as_ref().map(flat).unwrap_or_default(), stages(r), r.result.model.clone()),
        }
    };
    let mut keys: Vec<Key> = Vec::new();
    let mut groups: Vec<Vec<Run>> = Vec::new();
    for r in runs {
        let k = key(&r);
        match keys.iter().position(|x| *x == k) {
            Some(i) => groups[i].push(r),
            None => {
                keys.push(k);
                groups.push(vec![r]);
            }
        }
    }
    // Settings that differ between the unlabelled groups name them.
    let unlabelled: Vec<&Key> = keys.iter().filter(|k| k.0.is_none()).collect();
    let mut varying: Vec<String> = Vec::new();
    if let Some(first) = unlabelled.first() {
        let all_keys: std::collections::BTreeSet<&String> = unlabelled.iter().flat_map(|k| k.1.keys()).collect();
        for name in all_keys {
            if name != "model.model" && unlabelled.iter().any(|k| k.1.get(name) != first.1.get(name)) {
                varying.push(name.clone());
            }
        }
    }
    let any_pretrain = unlabelled.iter().any(|k| k.2.contains(&Stage::Pretrain));
    keys.iter()
        .zip(groups)
        .map(|(k, runs)| {
            let label = match &k.0 {
                Some(l) => l.clone(),
                None => {
                    let mut l = k.3.clone();
                    if any_pretrain && !k.2.contains(&Stage::Pretrain) && l.starts_with("msm4sr") && !k.2.contains(&Stage::E2e) {
                        l.push_str(" w/o pre-train");
                    }
                    if k.2.contains(&Stage::E2e) {
                        l.push_str(" e2e");
                    }
                    for v in &varying {
                        if let Some(x) = k.1.get(v) {
                            l.push_str(&format!(" {}={}", v.rsplit('.').next().unwrap_or(v), x.trim_matches('"')));
                        }
                    }
                    l
                }
            };
            Group { label, runs }
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (n - 1), 0 for one value.
fn sd(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// The Markdown table of test metrics, one row per group: mean ± sd over its runs (the value alone
/// for one run), mean epochs and seconds.
pub fn table(groups: &[Group]) -> String {
    let mut out = String::from("| model | runs | ");
    out += &KEYS.iter().map(|k| format!("test {k}")).collect::<Vec<_>>().join(" | ");
    out += " | epochs | seconds |\n|---|---|";
    out += &"---|".repeat(KEYS.len() + 2);
    out.push('\n');
    for g in groups {
        let tested: Vec<&Run> = g.runs.iter().filter(|r| r.result.test.is_some()).collect();
        let mut cells = Vec::new();
        for k in KEYS {
            let v: Vec<f64> = tested.iter().filter_map(|r| r.result.test.as_ref().and_then(|m| m.get(k))).collect();
            cells.push(match v.len() {
                0 => "-".to_string(),
                1 => format!("{:.4}", v[0]),
                _ => format!("{:.4} ± {:.4}", mean(&v), sd(&v)),
            });
        }
        let ep = mean(&g.runs.iter().map(|r| r.result.epochs as f64).collect::<Vec<_>>());
        let sec = mean(&g.runs.iter().map(|r| r.result.seconds).collect::<Vec<_>>());
        out += &format!("| {} | {} | {} | {ep:.0} | {sec:.0} |\n", g.label, g.runs.len(), cells.join(" | "));
    }
    out
}

/// What `report` writes into its output directory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub table: String,
}

/// Options of `report`.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Runs, `LABEL=RUN` or `RUN` (module docs); a sweep directory stands for its runs.
    pub runs: Vec<String>,
    pub out: PathBuf,
    /// Paired comparisons `A:B` by group label; none: the first group against each other one.
    pub compare: Vec<String>,
    pub split: String,
    pub resamples: usize,
    pub seed: u64,
    pub overwrite: bool,
    /// User groups by history length (`--groups N --data DIR`): `groups.md` and `groups.svg`.
    pub groups: Option<(usize, PathBuf)>,
}

/// Test metrics per user group (by history length in `data`), mean over each group's runs:
/// (model group label, per user group (history range, users, metrics averaged over runs)).
pub fn user_groups(groups: &[Group], n: usize, data: &Path) -> Result<(String, GroupBars)> {
    let min_inter = groups.iter().flat_map(|g| &g.runs).find_map(|r| r.config.as_ref()).map_or(5, |c| c.train.min_user_inter);
    let opts = crate::data::LoadOptions {
        min_user_inter: min_inter,
        missing_features: crate::data::MissingFeatures::Zero,
        require_features: false,
    };
    let ds = crate::data::Dataset::load(data, &opts)?;
    let lens: std::collections::HashMap<&str, usize> =
        ds.user_tokens.iter().zip(&ds.seqs).map(|(u, s)| (u.as_str(), s.len().saturating_sub(1))).collect();
    // Each run's test targets must be this dataset's (the last item of each user's sequence): the
    // same user tokens in another dataset would otherwise be grouped by the wrong histories.
    let targets: std::collections::HashMap<&str, &str> = ds
        .user_tokens
        .iter()
        .zip(&ds.seqs)
        .filter_map(|(u, s)| s.last().map(|&i| (u.as_str(), ds.item_tokens[i as usize].as_str())))
        .collect();
    for r in groups.iter().flat_map(|g| &g.runs) {
        let Some(path) = &r.ranks else { continue };
        let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
        let wrong = text
            .lines()
            .skip(1)
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .filter(|f| f.len() == 4 && f[0] == "test")
            .find(|f| targets.get(f[1]) != Some(&f[2]));
        if let Some(f) = wrong {
            return Err(Error::Invalid(format!(
                "{}: user {}'s test target is {} there but {} in {}: the run was trained on other data than --data",
                path.display(),
                f[1],
                f[2],
                targets.get(f[1]).copied().unwrap_or("(no such user)"),
                data.display()
            )));
        }
    }
    let mut md = String::new();
    let mut out = Vec::new();
    for g in groups {
        let mut per_run = Vec::new();
        for r in &g.runs {
            let Some(path) = &r.ranks else { continue };
            let ranks = read_ranks(path, "test")?;
            let users: Vec<(usize, u32)> = ranks
                .iter()
                .map(|(u, &rank)| {
                    lens.get(u.as_str())
                        .map(|&l| (l, rank))
                        .ok_or_else(|| Error::Invalid(format!("{}: user {u} is not in {}", path.display(), data.display())))
                })
                .collect::<Result<_>>()?;
            per_run.push(crate::data::groups::user_groups(&users, n)?);
        }
        let Some(first) = per_run.first().cloned() else { continue };
        // Mean over runs of each user group's metrics (the same users in every run).
        let mut avg = first;
        for (k, ug) in avg.iter_mut().enumerate() {
            if let Some(m) = ug.metrics.as_mut() {
                let all: Vec<crate::data::metrics::Metrics> = per_run.iter().filter_map(|p| p[k].metrics).collect();
                let f = |get: fn(&crate::data::metrics::Metrics) -> f64| all.iter().map(get).sum::<f64>() / all.len() as f64;
                m.recall5 = f(|m| m.recall5);
                m.recall10 = f(|m| m.recall10);
                m.recall20 = f(|m| m.recall20);
                m.ndcg5 = f(|m| m.ndcg5);
                m.ndcg10 = f(|m| m.ndcg10);
                m.ndcg20 = f(|m| m.ndcg20);
            }
        }
        md += &format!("{} ({} runs, mean over runs)\n\n{}\n", g.label, per_run.len(), crate::data::groups::table(&avg));
        out.push((g.label.clone(), avg));
    }
    Ok((md, out))
}

/// Per model group: its label and its metrics per user group.
pub type GroupBars = Vec<(String, Vec<crate::data::groups::UserGroup>)>;

/// Expand sweep directories (holding `sweep.json`) into their runs, labelled by their point.
/// Also returns each sweep with one numeric axis: (setting, [(series, x, run label)]).
#[allow(clippy::type_complexity)]
fn expand(args: &[String]) -> Result<(Vec<String>, Vec<(String, Vec<(String, f64, String)>)>)> {
    let mut out = Vec::new();
    let mut sweeps = Vec::new();
    for a in args {
        let manifest = Path::new(a).join("sweep.json");
        if manifest.is_file() {
            let m: crate::files::Manifest = serde_json::from_str(&std::fs::read_to_string(&manifest).map_err(|e| io(&manifest, e))?)
                .map_err(|e| Error::Invalid(format!("{}: {e}", manifest.display())))?;
            let mut points = Vec::new();
            for r in &m.runs {
                if Path::new(a).join(&r.dir).join("model.result.json").is_file() {
                    out.push(format!("{}={}", r.point, Path::new(a).join(&r.dir).display()));
                    if let Some(x) = r.x {
                        points.push((if r.variant.is_empty() { "MSM4SR".to_string() } else { r.variant.clone() }, x, r.point.clone()));
                    }
                }
            }
            if let (Some(axis), false) = (&m.axis, points.is_empty()) {
                sweeps.push((axis.clone(), points));
            }
        } else {
            out.push(a.clone());
        }
    }
    Ok((out, sweeps))
}

/// `msm4sr report`: `table.md` (test metrics), `paired.md` (bootstrap comparisons), `curves.svg`
/// and `report.json` in `opts.out`.
pub fn report(opts: &ReportOptions) -> Result<Written> {
    if !(1..=MAX_RESAMPLES).contains(&opts.resamples) {
        return Err(Error::Invalid(format!(
            "--resamples {}: the paired bootstrap needs between 1 and {MAX_RESAMPLES} resamples (10000 is plenty)",
            opts.resamples
        )));
    }
    let (args, sweeps) = expand(&opts.runs)?;
    if args.is_empty() {
        return Err(Error::Invalid("report needs at least one finished run".into()));
    }
    let runs = args.iter().map(|a| load_run(a)).collect::<Result<Vec<_>>>()?;
    let groups = group(runs);
    let mut names = vec!["table.md", "paired.md", "curves.svg", "report.json"];
    if opts.groups.is_some() {
        names.extend(["groups.md", "groups.svg"]);
    }
    let sweep_names: Vec<String> =
        (0..sweeps.len()).map(|i| if i == 0 { "sweep.svg".to_string() } else { format!("sweep-{}.svg", i + 1) }).collect();
    let mut files: Vec<PathBuf> = names.iter().map(|f| opts.out.join(f)).collect();
    files.extend(sweep_names.iter().map(|f| opts.out.join(f)));
    let inputs: Vec<(&str, &Path)> = args.iter().map(|r| ("run", Path::new(r.rsplit_once('=').map_or(r.as_str(), |x| x.1)))).collect();
    runs::check_outputs(&files, &inputs, opts.overwrite, "pass --overwrite to replace it")?;
    let table = table(&groups);
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    if opts.compare.is_empty() {
        pairs.extend((1..groups.len()).map(|j| (0, j)));
    } else {
        for c in &opts.compare {
            let (a, b) = c.split_once(':').ok_or_else(|| Error::Invalid(format!("--compare {c}: expected A:B (two group labels)")))?;
            let find = |l: &str| {
                groups.iter().position(|g| g.label == l).ok_or_else(|| {
                    let known: Vec<&str> = groups.iter().map(|g| g.label.as_str()).collect();
                    Error::Invalid(format!("--compare {c}: no group labelled {l:?} (groups: {known:?})"))
                })
            };
            pairs.push((find(a)?, find(b)?));
        }
    }
    let mut paired_md = String::new();
    let mut paired_json = Vec::new();
    for (i, j) in pairs {
        let ranks = |g: &Group| -> Option<Vec<PathBuf>> { g.runs.iter().map(|r| r.ranks.clone()).collect() };
        let (Some(a), Some(b)) = (ranks(&groups[i]), ranks(&groups[j])) else {
            paired_md += &format!("{} - {}: skipped (a run without per-user ranks)\n\n", groups[i].label, groups[j].label);
            continue;
        };
        let n = read_ranks(&a[0], &opts.split)?.len();
        // The resamples are held as indices: bound them by memory, not only by count.
        if (opts.resamples as u128) * (n as u128) > MAX_RESAMPLED_INDICES as u128 {
            return Err(Error::Invalid(format!(
                "--resamples {} over {n} users would hold {:.1} GiB of resampled indices (at most {} GiB): use fewer resamples",
                opts.resamples,
                (opts.resamples as f64) * (n as f64) * 8.0 / (1u64 << 30) as f64,
                (MAX_RESAMPLED_INDICES * 8) >> 30
            )));
        }
        let idx = resample_indices(n, opts.resamples, opts.seed);
        let rows = paired(&a, &b, &opts.split, &idx)?;
        paired_md += &format!(
            "A = {} ({} runs), B = {} ({} runs): {n} users, split {}, {} resamples\n\n{}\n",
            groups[i].label,
            a.len(),
            groups[j].label,
            b.len(),
            opts.split,
            opts.resamples,
            paired_table(&rows)
        );
        paired_json.push(serde_json::json!({"a": groups[i].label, "b": groups[j].label, "users": n, "rows": rows}));
    }
    crate::files::write_atomic(&files[0], table.as_bytes())?;
    crate::files::write_atomic(&files[1], paired_md.as_bytes())?;
    write_svg(&files[2], |p| curves_svg(&groups, p))?;
    if let Some((n, data)) = &opts.groups {
        let (md, per) = user_groups(&groups, *n, data)?;
        crate::files::write_atomic(&files[4], md.as_bytes())?;
        write_svg(&files[5], |p| groups_svg(&per, p))?;
    }
    for ((axis, points), name) in sweeps.iter().zip(&sweep_names) {
        // Mean test metrics per point over its seeds.
        let mut pts: Vec<(String, f64, f64, f64)> = Vec::new();
        for (series, x, label) in points {
            if pts.iter().any(|p| p.0 == *series && p.1 == *x) {
                continue;
            }
            let Some(g) = groups.iter().find(|g| g.label == *label) else { continue };
            let t: Vec<crate::data::metrics::Metrics> = g.runs.iter().filter_map(|r| r.result.test).collect();
            if t.is_empty() {
                continue;
            }
            let k = t.len() as f64;
            pts.push((series.clone(), *x, t.iter().map(|m| m.recall20).sum::<f64>() / k, t.iter().map(|m| m.ndcg20).sum::<f64>() / k));
        }
        let xs: Vec<f64> = pts.iter().map(|p| p.1).collect();
        let (lo, hi) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let log_x = lo > 0.0 && hi / lo >= 100.0;
        write_svg(&opts.out.join(name), |p| sweep_svg(axis, &pts, log_x, p))?;
    }
    let json = serde_json::json!({
        "groups": groups.iter().map(|g| serde_json::json!({
            "label": g.label, "runs": g.runs.iter().map(|r| &r.arg).collect::<Vec<_>>(),
            "test": g.runs.iter().map(|r| r.result.test).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "paired": paired_json,
    });
    crate::files::write_atomic(&files[3], serde_json::to_string_pretty(&json).unwrap_or_default().as_bytes())?;
    Ok(Written { files, table })
}

/// Summarise runs: a Markdown table (mean ± sd over seeds), paired bootstrap comparisons and
/// SVG plots (loss and validation curves, sweep lines) in --out.
#[derive(clap::Args)]
pub struct Args {
    /// Runs: a run directory, a checkpoint or stem, a result JSON, or a sweep directory;
    /// LABEL=RUN names the group (runs with one label are seeds of one model).
    #[arg(required = true)]
    pub runs: Vec<String>,
    /// Output directory (table.md, paired.md, curves.svg, report.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Paired comparison A:B of two group labels (repeatable); default: the first group
    /// against each other one.
    #[arg(long)]
    pub compare: Vec<String>,
    /// Split of the paired comparisons: valid or test.
    #[arg(long, default_value = "test", value_parser = ["valid", "test"])]
    pub split: String,
    /// Bootstrap resamples of the users (1 to 1000000).
    #[arg(long, default_value_t = 10_000)]
    pub resamples: usize,
    /// Seed of the bootstrap resamples.
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// Replace an earlier report in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Also split the test users into N groups by history length (needs --data; 1 to 100):
    /// groups.md and groups.svg.
    #[arg(long, requires = "data", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    pub groups: Option<usize>,
    /// The dataset the runs were trained on (for --groups).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// `msm4sr report`.
pub fn run(args: Args, _at: Where) -> Result<ExitCode> {
    let Args { runs, out, compare, split, resamples, seed, overwrite, groups, data } = args;
    let groups = groups.zip(data);
    let opts = crate::app::report::ReportOptions { runs, out, compare, split, resamples, seed, overwrite, groups };
    let w = crate::app::report::report(&opts)?;
    out!("{}", w.table);
    for f in &w.files {
        eprintln!("wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}
