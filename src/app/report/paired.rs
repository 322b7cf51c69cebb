//! Paired comparisons of two groups of runs, user by user: per-user metrics from the ranks files,
//! bootstrap resamples of the users, the mean difference and its 95% interval.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::{Error, Result};

pub fn read_ranks(path: &Path, split: &str) -> Result<BTreeMap<String, u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let mut lines = text.lines();
    let data_err = |line: usize, msg: String| Error::Data { file: path.display().to_string(), line, msg };
    if lines.next() != Some("split\tuser\ttarget\trank") {
        return Err(data_err(1, "not a ranks file (header: split, user, target, rank)".into()));
    }
    let mut out = BTreeMap::new();
    for (n, line) in lines.enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            return Err(data_err(n + 2, format!("expected 4 tab-separated fields, got {}", f.len())));
        }
        if f[0] == split {
            let r = f[3].parse().map_err(|_| data_err(n + 2, format!("rank {:?} is not a number", f[3])))?;
            out.insert(f[1].to_string(), r);
        }
    }
    if out.is_empty() {
        return Err(data_err(0, format!("no rows for split '{split}'")));
    }
    Ok(out)
}

/// Each user's metrics averaged over `files` (one per seed, in order), users sorted by token.
fn per_user(files: &[PathBuf], split: &str) -> Result<(Vec<String>, Vec<[f64; 6]>)> {
    let mut acc: BTreeMap<String, [f64; 6]> = BTreeMap::new();
    let mut users: Option<Vec<String>> = None;
    for path in files {
        let r = read_ranks(path, split)?;
        let these: Vec<String> = r.keys().cloned().collect();
        if users.as_ref().is_some_and(|u| *u != these) {
            return Err(Error::Invalid(format!("{}: a different set of users than {}", path.display(), files[0].display())));
        }
        users = Some(these);
        let nf = files.len() as f64;
        for (u, &rank) in &r {
            let a = acc.entry(u.clone()).or_insert([0.0; 6]);
            for (j, k) in [5u32, 10, 20].into_iter().enumerate() {
                let hit = rank < k;
                a[j] += (hit as u32 as f64) / nf;
                a[3 + j] += (if hit { 1.0 / ((rank + 2) as f64).log2() } else { 0.0 }) / nf;
            }
        }
    }
    let users = users.unwrap_or_default();
    let vals = users.iter().map(|u| acc[u]).collect();
    Ok((users, vals))
}

/// One metric of a paired comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PairedRow {
    pub metric: String,
    pub a: f64,
    pub b: f64,
    /// Mean per-user difference A - B.
    pub diff: f64,
    /// 95% bootstrap interval of `diff`.
    pub lo: f64,
    pub hi: f64,
    pub better: usize,
    pub worse: usize,
}

/// The most bootstrap resamples a report takes (each holds one index per user).
pub const MAX_RESAMPLES: usize = 1_000_000;
/// The most resampled user indices held at once (resamples x users; 8 bytes each: 4 GiB).
pub const MAX_RESAMPLED_INDICES: usize = 1 << 29;

/// Bootstrap resamples of `n` users: `resamples` rows of `n` indices drawn with replacement.
pub fn resample_indices(n: usize, resamples: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..resamples).map(|_| (0..n).map(|_| rng.random_range(0..n)).collect()).collect()
}

/// A paired comparison of the runs `a` against the runs `b` on the same users (each user's metric
/// averaged over a side's runs first): the means, the mean difference and its 95% bootstrap
/// interval over the given resamples of users (the same resamples for every metric), and how many
/// users are better / worse.
pub fn paired(a: &[PathBuf], b: &[PathBuf], split: &str, indices: &[Vec<usize>]) -> Result<Vec<PairedRow>> {
    let (ua, va) = per_user(a, split)?;
    let (ub, vb) = per_user(b, split)?;
    if ua != ub {
        return Err(Error::Invalid("the two sides rank different users (another dataset or split?)".into()));
    }
    let n = ua.len();
    if let Some(bad) = indices.iter().find(|row| row.len() != n || row.iter().any(|&i| i >= n)) {
        return Err(Error::Invalid(format!("a resample has {} indices (or one out of range) for {n} users", bad.len())));
    }
    let names = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"];
    let mut rows = Vec::new();
    for (j, m) in names.iter().enumerate() {
        let d: Vec<f64> = (0..n).map(|u| va[u][j] - vb[u][j]).collect();
        let mut sum = 0.0;
        for x in &d {
            sum += x;
        }
        let mut boots: Vec<f64> = indices
            .iter()
            .map(|row| {
                let mut s = 0.0;
                for &i in row {
                    s += d[i];
                }
                s / n as f64
            })
            .collect();
        boots.sort_by(f64::total_cmp);
        let r = boots.len();
        let (lo, hi) = if r == 0 {
            (f64::NAN, f64::NAN)
        } else {
            (boots[(0.025 * r as f64) as usize], boots[((0.975 * r as f64) as usize).max(1) - 1])
        };
        let side = |v: &[[f64; 6]]| {
            let mut s = 0.0;
            for x in v {
                s += x[j];
            }
            s / n as f64
        };
        rows.push(PairedRow {
            metric: m.to_string(),
            a: side(&va),
            b: side(&vb),
            diff: sum / n as f64,
            lo,
            hi,
            better: d.iter().filter(|&&x| x > 1e-12).count(),
            worse: d.iter().filter(|&&x| x < -1e-12).count(),
        });
    }
    Ok(rows)
}

/// The paired rows as a Markdown table.
pub fn paired_table(rows: &[PairedRow]) -> String {
    let mut out = String::from("| metric | A | B | A - B | 95% interval | users A better / worse |\n|---|---|---|---|---|---|\n");
    for r in rows {
        out += &format!(
            "| {} | {:.4} | {:.4} | {:+.4} | [{:+.4}, {:+.4}] | {} / {} |\n",
            r.metric, r.a, r.b, r.diff, r.lo, r.hi, r.better, r.worse
        );
    }
    out
}
