//! `msm4sr sweep GRID.toml --data DIR --out SWEEP`: named variants × the Cartesian product of setting
//! values × seeds, one run directory each under SWEEP, resumable — a finished run (its
//! `model.result.json` exists) is skipped, an interrupted one resumes — and a table at the end with
//! the point that is best on validation Recall@20 (mean over seeds; test metrics are never used to
//! choose). `sweep.json` lists the runs, so `msm4sr report SWEEP` finds them.
//!
//! A grid file (every table optional; keys are `[model]` / `[train]` config keys):
//!
//! ```toml
//! seeds = [1, 2, 3]
//! [base.train]            # every run
//! batch = 256
//! [[variant]]             # named points, e.g. ablations
//! name = "MSM4SR"
//! [[variant]]
//! name = "w/o NIP"
//! model = { nip = false }
//! [[variant]]
//! name = "w/o pre-train"
//! plan = "no-pretrain"    # train (default), no-pretrain or e2e
//! [grid]                  # every combination of these values, per variant
//! "model.lambda" = [0.001, 0.01, 0.1, 1.0]
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};

use super::{missing_of, MissingArg};
use crate::app::train::{train_job, Plan, TrainJob};
use crate::app::Where;
use crate::config::RunConfig;
use crate::data::MissingFeatures;
use crate::files::{Manifest, ManifestRun};
use crate::{Error, Result};

/// A grid file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Settings of every run (`[base.model]`, `[base.train]`).
    #[serde(default)]
    pub base: toml::Table,
    #[serde(default, rename = "variant")]
    pub variants: Vec<Variant>,
    /// `"section.key" = [values]`.
    #[serde(default)]
    pub grid: toml::Table,
    /// Fine-tune every run from these weights (a `pretrain` checkpoint or run directory) instead of
    /// pre-training each (as `finetune --init`); relative to the working directory.
    #[serde(default)]
    pub init: Option<PathBuf>,
}

fn default_seeds() -> Vec<u64> {
    vec![2024]
}

/// A named point: settings over the base, and the stages it runs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default)]
    pub model: toml::Table,
    #[serde(default)]
    pub train: toml::Table,
    #[serde(default)]
    pub plan: PlanName,
    /// Fine-tune from scratch although the grid has an `init` (the baseline of a transfer).
    #[serde(default)]
    pub from_scratch: bool,
}

/// The stages of a sweep run (as `train`, `train --no-pretrain`, `train --e2e`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanName {
    #[default]
    Train,
    NoPretrain,
    E2e,
}

/// A run to do: where, its configuration and stages.
#[derive(Clone, Debug)]
pub struct Planned {
    pub entry: ManifestRun,
    pub cfg: RunConfig,
    pub plan: Plan,
    pub init: Option<PathBuf>,
}

/// Read a grid file; each of `sets` (`section.key=value`, a TOML value or a bare string) then
/// overrides its base settings.
pub fn read_grid(path: &Path, sets: &[String]) -> Result<Grid> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let mut g: Grid = toml::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {}", path.display(), crate::config::with_suggestion(e.to_string()))))?;
    for s in sets {
        let bad = || Error::Invalid(format!("--set {s}: expected section.key=value, e.g. train.epochs=20"));
        let (key, value) = s.split_once('=').ok_or_else(bad)?;
        let (sec, name) = key.split_once('.').ok_or_else(bad)?;
        let v: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        match g.base.entry(sec.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new())) {
            toml::Value::Table(t) => {
                t.insert(name.to_string(), v);
            }
            _ => return Err(bad()),
        }
    }
    Ok(g)
}

/// A directory name from a label: letters, digits, `.` and `-` kept, the rest `_`.
fn dir_name(label: &str) -> String {
    let s: String = label.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    s.trim_matches('_').to_string()
}

/// Every run of the grid, in order: variants, then grid points, then seeds; each configuration
/// validated.
pub fn expand(grid: &Grid) -> Result<(Manifest, Vec<Planned>)> {
    let variants =
        if grid.variants.is_empty() { vec![Variant { name: String::new(), ..Variant::default() }] } else { grid.variants.clone() };
    let mut names: Vec<&String> = variants.iter().map(|v| &v.name).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Invalid(format!("two variants are named {:?}", w[0])));
    }
    if grid.seeds.is_empty() {
        return Err(Error::Invalid("seeds = []: a sweep needs at least one seed".into()));
    }
    // The grid's axes: key, values.
    let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
    for (k, v) in &grid.grid {
        let vals = v
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| Error::Invalid(format!("[grid] {k}: expected a non-empty list of values")))?;
        if !k.contains('.') {
            return Err(Error::Invalid(format!("[grid] {k}: expected section.key, e.g. model.lambda")));
        }
        axes.push((k.clone(), vals.clone()));
    }
    let numeric = |v: &toml::Value| v.as_float().or(v.as_integer().map(|i| i as f64));
    let axis = match axes.as_slice() {
        [(k, vals)] if vals.iter().all(|v| numeric(v).is_some()) => Some(k.clone()),
        _ => None,
    };
    let mut points: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (k, vals) in &axes {
        points = points.into_iter().flat_map(|p| vals.iter().map(move |v| [p.clone(), vec![(k.clone(), v.clone())]].concat())).collect();
    }
    let mut runs = Vec::new();
    let mut planned = Vec::new();
    for v in &variants {
        for p in &points {
            let mut label = v.name.clone();
            for (k, val) in p {
                let short = k.rsplit('.').next().unwrap_or(k);
                if !label.is_empty() {
                    label.push(' ');
                }
                label += &format!("{short}={}", val.to_string().trim_matches('"'));
            }
            if label.is_empty() {
                label = "run".into();
            }
            for &seed in &grid.seeds {
                let mut layers = vec![grid.base.clone()];
                let mut own = toml::Table::new();
                own.insert("model".into(), toml::Value::Table(v.model.clone()));
                own.insert("train".into(), toml::Value::Table(v.train.clone()));
                layers.push(own);
                let mut point = toml::Table::new();
                for (k, val) in p {
                    let (sec, key) = k.split_once('.').unwrap_or(("", k));
                    let t = point.entry(sec.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(t) = t {
                        t.insert(key.to_string(), val.clone());
                    }
                }
                let mut s = toml::Table::new();
                s.insert(
                    "train".into(),
                    toml::Value::Table(toml::Table::from_iter([("seed".to_string(), toml::Value::Integer(seed as i64))])),
                );
                layers.push(point);
                if v.from_scratch {
                    // Nothing to carry: the same model trained on the target alone (and so none of
                    // cross-domain's defaults).
                    s.insert(
                        "train".into(),
                        toml::Value::Table(toml::Table::from_iter([
                            ("seed".to_string(), toml::Value::Integer(seed as i64)),
                            ("cross_domain".to_string(), toml::Value::Boolean(false)),
                        ])),
                    );
                }
                layers.push(s);
                let cfg =
                    crate::config::from_layers(&layers).map_err(|e| Error::Invalid(format!("sweep point {label:?} seed {seed}: {e}")))?;
                let init = grid.init.clone().filter(|_| !v.from_scratch);
                let plan = match v.plan {
                    _ if grid.init.is_some() => Plan::FINETUNE,
                    PlanName::Train => Plan::train(&cfg, false, false),
                    PlanName::NoPretrain => Plan::train(&cfg, true, false),
                    PlanName::E2e => Plan::train(&cfg, false, true),
                };
                let entry = ManifestRun {
                    dir: format!("{}-s{seed}", dir_name(&label)),
                    point: label.clone(),
                    variant: v.name.clone(),
                    seed,
                    x: axis.as_ref().and_then(|_| p.first().and_then(|(_, v)| numeric(v))),
                };
                runs.push(entry.clone());
                planned.push(Planned { entry, cfg, plan, init });
            }
        }
    }
    let mut seeds = grid.seeds.clone();
    seeds.sort_unstable();
    if let Some(w) = seeds.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Invalid(format!("seed {} is listed twice in `seeds`; each seed runs once per point", w[0])));
    }
    let mut dirs: Vec<&String> = runs.iter().map(|r| &r.dir).collect();
    dirs.sort();
    if let Some(w) = dirs.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::Invalid(format!("two sweep points share the directory {:?}; rename a variant", w[0])));
    }
    Ok((Manifest { axis, runs }, planned))
}

/// What one run of the sweep did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Finished in an earlier call.
    Skipped,
    Resumed,
    Ran,
    /// Being trained by another process (its run lock is held): left to it.
    Elsewhere(String),
    Failed(String),
}

/// Run every point of `grid` on `data` into `out` (see the module docs); returns each run's
/// outcome. A failed run does not stop the others; the next call retries it (resuming).
#[allow(clippy::too_many_arguments)]
pub fn run_grid(
    grid_path: &Path,
    sets: &[String],
    data: &Path,
    out: &Path,
    missing: MissingFeatures,
    at: Where,
    quiet: bool,
) -> Result<Vec<(ManifestRun, Outcome)>> {
    let grid = read_grid(grid_path, sets)?;
    let (manifest, planned) = expand(&grid)?;
    std::fs::create_dir_all(out).map_err(|e| Error::Io { path: out.display().to_string(), source: e })?;
    let mpath = out.join("sweep.json");
    if mpath.is_file() {
        let was: Manifest =
            serde_json::from_str(&std::fs::read_to_string(&mpath).map_err(|e| Error::Io { path: mpath.display().to_string(), source: e })?)
                .map_err(|e| Error::Invalid(format!("{}: {e}", mpath.display())))?;
        let dirs = |m: &Manifest| m.runs.iter().map(|r| r.dir.clone()).collect::<Vec<_>>();
        if dirs(&was) != dirs(&manifest) {
            return Err(Error::Invalid(format!(
                "{} holds another sweep (other points or seeds); give a new --out for this grid",
                out.display()
            )));
        }
    }
    crate::files::write_atomic(&mpath, serde_json::to_string_pretty(&manifest).unwrap_or_default().as_bytes())?;
    let mut outcomes = Vec::new();
    let n = planned.len();
    for (i, p) in planned.into_iter().enumerate() {
        let dir = out.join(&p.entry.dir);
        let ck = crate::files::run_dir_checkpoint(&dir);
        let files = crate::files::RunFiles::of(&ck);
        if files.result.is_file() {
            // A finished run counts only if it is this point as the grid now defines it.
            let was = crate::config::read_config(&crate::files::config_path(&ck))?;
            if crate::config::to_toml(&was) != crate::config::to_toml(&p.cfg) {
                let what = crate::train::config_difference(&was, &p.cfg)
                    .unwrap_or_else(|| "its schedule (epochs or patience) differs".to_string());
                return Err(Error::Invalid(format!(
                    "{} was finished with other settings than the grid gives it now ({what}); remove that run directory \
                     to redo it, or give the changed grid a new --out",
                    dir.display()
                )));
            }
            eprintln!("[{}/{n}] {} seed {}: done earlier, skipped", i + 1, p.entry.point, p.entry.seed);
            outcomes.push((p.entry, Outcome::Skipped));
            continue;
        }
        let resume = crate::files::config_path(&ck).is_file();
        eprintln!("[{}/{n}] {} seed {}{}", i + 1, p.entry.point, p.entry.seed, if resume { " (resuming)" } else { "" });
        let job = TrainJob {
            data: data.to_path_buf(),
            config_file: Some(grid_path.to_path_buf()),
            cfg: p.cfg,
            plan: p.plan,
            out: ck,
            init: p.init.clone(),
            resume,
            overwrite: false,
            missing,
            quiet,
        };
        let o = match train_job(&job, at) {
            Ok(_) if resume => Outcome::Resumed,
            Ok(_) => Outcome::Ran,
            // The run's own advice (`--resume`) is not how a sweep continues: say what is.
            Err(Error::Interrupted(m)) => {
                let m = m.split("; run the same command").next().unwrap_or(&m).to_string();
                return Err(Error::Interrupted(format!(
                    "{m}; run the same sweep command again (without --resume: finished runs are skipped and this one resumes)"
                )));
            }
            Err(Error::Busy(m)) => {
                eprintln!("[{}/{n}] {} seed {}: running in another process, left to it ({m})", i + 1, p.entry.point, p.entry.seed);
                Outcome::Elsewhere(m)
            }
            Err(e) => {
                eprintln!("[{}/{n}] {} seed {} failed: {e}", i + 1, p.entry.point, p.entry.seed);
                Outcome::Failed(e.to_string())
            }
        };
        outcomes.push((p.entry, o));
    }
    Ok(outcomes)
}

/// The sweep's table (test metrics per point, mean ± sd over seeds) and the point best on mean
/// validation Recall@20, with its test metrics.
pub fn summary(out: &Path) -> Result<String> {
    let mpath = out.join("sweep.json");
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(&mpath).map_err(|e| Error::Io { path: mpath.display().to_string(), source: e })?)
            .map_err(|e| Error::Invalid(format!("{}: {e}", mpath.display())))?;
    let mut runs = Vec::new();
    for r in &m.runs {
        let d = out.join(&r.dir);
        if crate::files::RunFiles::of(&crate::files::run_dir_checkpoint(&d)).result.is_file() {
            runs.push(crate::app::report::load_run(&format!("{}={}", r.point, d.display()))?);
        }
    }
    let groups = crate::app::report::group(runs);
    let mut s = crate::app::report::table(&groups);
    let valid_r20 = |g: &crate::app::report::Group| {
        let v: Vec<f64> = g.runs.iter().filter_map(|r| r.result.valid.map(|m| m.recall20)).collect();
        if v.is_empty() {
            f64::NEG_INFINITY
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    if let Some(best) = groups.iter().max_by(|a, b| valid_r20(a).total_cmp(&valid_r20(b))) {
        s += &format!("\nbest on validation recall@20 (mean over seeds): {} ({:.4})\n", best.label, valid_r20(best));
    }
    Ok(s)
}

/// Train every point of a grid (variants × setting values × seeds), one run directory each;
/// finished runs are skipped and an interrupted one resumes when the command is run again.
#[derive(clap::Args)]
pub struct Args {
    /// The grid (TOML; see experiments/ for the paper's).
    pub grid: PathBuf,
    /// Dataset directory.
    #[arg(long)]
    pub data: PathBuf,
    /// The sweep directory (sweep.json and one run directory per point and seed).
    #[arg(long)]
    pub out: PathBuf,
    /// Items in .inter without features: fail (error) or give them zero features (zero).
    #[arg(long, value_enum, default_value = "error")]
    pub missing_features: MissingArg,
    /// Print each run's summary lines only (no progress bars).
    #[arg(long)]
    pub quiet: bool,
    /// Override a base setting of every run, e.g. --set train.pretrain_epochs=20 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
}

/// `msm4sr sweep`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { grid, data, out, missing_features, quiet, sets } = args;
    let outcomes = run_grid(&grid, &sets, &data, &out, missing_of(missing_features), at, quiet)?;
    out!("{}", crate::app::sweep::summary(&out)?);
    let failed: Vec<_> = outcomes.iter().filter(|(_, o)| matches!(o, crate::app::sweep::Outcome::Failed(_))).collect();
    for (r, o) in &failed {
        if let crate::app::sweep::Outcome::Failed(e) = o {
            eprintln!("failed: {} seed {}: {e}", r.point, r.seed);
        }
    }
    let elsewhere = outcomes.iter().filter(|(_, o)| matches!(o, crate::app::sweep::Outcome::Elsewhere(_))).count();
    if elsewhere > 0 {
        eprintln!(
            "{elsewhere} of {} runs are being trained by another process (listed above); the table has them once they finish",
            outcomes.len()
        );
    }
    if failed.len() + elsewhere < outcomes.len() {
        eprintln!("report: msm4sr report {} --out {}/report", out.display(), out.display());
    }
    if !failed.is_empty() {
        return Err(crate::Error::Invalid(format!(
            "{} of {} sweep runs failed (listed above); fix the cause and run the same command again (finished runs are skipped)",
            failed.len(),
            outcomes.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}
