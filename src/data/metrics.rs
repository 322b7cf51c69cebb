//! Full-ranking evaluation: ranks of the target item, Recall@K and NDCG@K.
//!
//! A rank is 0-based: the number of real items (index 0, the padding item, never counts) other
//! than the target whose score is **greater than or equal to** the target's score. Ties therefore
//! count against the target (pessimistic), so a model that scores everything equally gets the worst
//! rank rather than the best. A NaN score counts against the target as well (a NaN target score
//! gives the worst rank).
//!
//! From a rank r: Recall@K (= hit rate, one target per user) is 1 if r < K, and
//! NDCG@K = 1 / log2(r + 2) if r < K, else 0 (SPEC's 1/log2(rank + 1) with a 1-based rank). Both are
//! averaged over users. K is 5, 10 and 20, and optionally 50.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::{Error, Result};

/// The cut-offs reported, 50 being optional.
pub const KS: [usize; 4] = [5, 10, 20, 50];

/// 0-based rank of `target` among the real items `1..scores.len()` (pessimistic ties, see the
/// module docs). A `target` of 0 (padding) or out of range gives `u32::MAX`, a miss at every K.
pub fn rank_of_target(scores: &[f32], target: usize) -> u32 {
    rank_of_target_masked(scores, target, &[])
}

/// [`rank_of_target`] with the items of `mask` (e.g. the user's history) taken out of the ranking,
/// as if scored -inf, except the target itself. Repeated and out-of-range entries are harmless.
pub fn rank_of_target_masked(scores: &[f32], target: usize, mask: &[u32]) -> u32 {
    if target == 0 || target >= scores.len() {
        return u32::MAX;
    }
    let t = scores[target];
    let beats = |s: f32| s >= t || s.is_nan() || t.is_nan(); // NaN counts against the target
    let mut rank = scores[1..].iter().enumerate().filter(|&(j, &s)| j + 1 != target && beats(s)).count();
    if !mask.is_empty() {
        let mut m: Vec<usize> = mask.iter().map(|&i| i as usize).filter(|&i| i != 0 && i != target && i < scores.len()).collect();
        m.sort_unstable();
        m.dedup();
        rank -= m.into_iter().filter(|&j| beats(scores[j])).count();
    }
    rank as u32
}

/// Ranks of every row of a batch's scores, laid out `[batch.b, width]` with `width` = I + 1
/// (column 0 = padding). With `mask_history`, each row's input sequence is masked.
pub fn rank_batch(scores: &[f32], batch: &Batch, mask_history: bool) -> Result<Vec<u32>> {
    if batch.b == 0 {
        return Ok(Vec::new());
    }
    if !scores.len().is_multiple_of(batch.b) {
        return Err(Error::Shape { op: "rank_batch", msg: format!("{} scores do not split into {} rows", scores.len(), batch.b) });
    }
    let width = scores.len() / batch.b;
    Ok((0..batch.b)
        .map(|r| {
            let row = &scores[r * width..(r + 1) * width];
            let target = batch.targets[r] as usize;
            if mask_history {
                let hist = &batch.ids[r * batch.l..r * batch.l + batch.lens[r] as usize];
                rank_of_target_masked(row, target, hist)
            } else {
                rank_of_target(row, target)
            }
        })
        .collect())
}

/// Averaged metrics. Serialises to a flat map with the keys `recall@5`, `recall@10`,
/// `recall@20`, `ndcg@5`, `ndcg@10`, `ndcg@20`, plus `recall@50` / `ndcg@50` when present.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(rename = "recall@5")]
    pub recall5: f64,
    #[serde(rename = "recall@10")]
    pub recall10: f64,
    #[serde(rename = "recall@20")]
    pub recall20: f64,
    #[serde(rename = "recall@50", default, skip_serializing_if = "Option::is_none")]
    pub recall50: Option<f64>,
    #[serde(rename = "ndcg@5")]
    pub ndcg5: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg10: f64,
    #[serde(rename = "ndcg@20")]
    pub ndcg20: f64,
    #[serde(rename = "ndcg@50", default, skip_serializing_if = "Option::is_none")]
    pub ndcg50: Option<f64>,
    /// Number of users averaged over (not serialised).
    #[serde(skip)]
    pub users: usize,
}

impl Metrics {
    /// Metrics at K = 5, 10, 20 from one rank per user.
    pub fn from_ranks(ranks: &[u32]) -> Metrics {
        let mut acc = RankAccumulator::new();
        acc.extend(ranks);
        acc.finish(false)
    }

    /// Metrics at K = 5, 10, 20 and 50.
    pub fn from_ranks_with_50(ranks: &[u32]) -> Metrics {
        let mut acc = RankAccumulator::new();
        acc.extend(ranks);
        acc.finish(true)
    }

    /// Recall@k for k in {5, 10, 20, 50}.
    pub fn recall(&self, k: usize) -> Option<f64> {
        match k {
            5 => Some(self.recall5),
            10 => Some(self.recall10),
            20 => Some(self.recall20),
            50 => self.recall50,
            _ => None,
        }
    }

    /// NDCG@k for k in {5, 10, 20, 50}.
    pub fn ndcg(&self, k: usize) -> Option<f64> {
        match k {
            5 => Some(self.ndcg5),
            10 => Some(self.ndcg10),
            20 => Some(self.ndcg20),
            50 => self.ndcg50,
            _ => None,
        }
    }

    /// A value by its key (`"recall@20"`, `"ndcg@10"`, ...).
    pub fn get(&self, key: &str) -> Option<f64> {
        let (name, k) = key.split_once('@')?;
        let k: usize = k.parse().ok()?;
        match name {
            "recall" => self.recall(k),
            "ndcg" => self.ndcg(k),
            _ => None,
        }
    }

    /// The keys present, in table order.
    pub fn keys(&self) -> Vec<String> {
        let ks: Vec<usize> = KS.iter().copied().filter(|&k| self.recall(k).is_some()).collect();
        ["recall", "ndcg"].iter().flat_map(|n| ks.iter().map(move |k| format!("{n}@{k}"))).collect()
    }
}

impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.keys().iter().map(|k| format!("{k} {:.4}", self.get(k).unwrap_or(f64::NAN))).collect();
        write!(f, "{} ({} users)", parts.join("  "), self.users)
    }
}

/// Running sums of per-user metrics, for evaluating batch by batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankAccumulator {
    count: usize,
    hits: [f64; 4],
    ndcg: [f64; 4],
}

impl RankAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one user's rank.
    pub fn add(&mut self, rank: u32) {
        self.count += 1;
        for (j, &k) in KS.iter().enumerate() {
            if (rank as usize) < k {
                self.hits[j] += 1.0;
                self.ndcg[j] += 1.0 / (f64::from(rank) + 2.0).log2();
            }
        }
    }

    pub fn extend(&mut self, ranks: &[u32]) {
        for &r in ranks {
            self.add(r);
        }
    }

    pub fn merge(&mut self, other: &RankAccumulator) {
        self.count += other.count;
        for j in 0..KS.len() {
            self.hits[j] += other.hits[j];
            self.ndcg[j] += other.ndcg[j];
        }
    }

    /// Users added so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Averages (all 0 when nothing was added); `with_50` adds K = 50.
    pub fn finish(&self, with_50: bool) -> Metrics {
        let n = self.count.max(1) as f64;
        let (h, g) = (self.hits.map(|x| x / n), self.ndcg.map(|x| x / n));
        Metrics {
            recall5: h[0],
            recall10: h[1],
            recall20: h[2],
            recall50: with_50.then_some(h[3]),
            ndcg5: g[0],
            ndcg10: g[1],
            ndcg20: g[2],
            ndcg50: with_50.then_some(g[3]),
            users: self.count,
        }
    }
}

/// A plain-text table, one row per `(label, metrics)`, one column per metric (the @50 columns
/// appear when any row has them).
pub fn table(rows: &[(&str, &Metrics)]) -> String {
    let with_50 = rows.iter().any(|(_, m)| m.recall50.is_some());
    let ks: Vec<usize> = KS.iter().copied().filter(|&k| k != 50 || with_50).collect();
    let keys: Vec<String> = ["recall", "ndcg"].iter().flat_map(|n| ks.iter().map(move |k| format!("{n}@{k}"))).collect();
    let lw = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0).max(5);
    let mut out = format!("{:<lw$}", "model");
    for k in &keys {
        out += &format!("  {:>9}", k);
    }
    out += "     users\n";
    for (label, m) in rows {
        out += &format!("{label:<lw$}");
        for k in &keys {
            match m.get(k) {
                Some(v) => out += &format!("  {v:>9.4}"),
                None => out += &format!("  {:>9}", "-"),
            }
        }
        out += &format!("  {:>8}\n", m.users);
    }
    out
}
