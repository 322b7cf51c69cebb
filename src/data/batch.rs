//! Training samples and batches: a sample is a prefix of a user's sequence and its next item.

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// One "input sequence -> next item" example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub user: u32,
    /// Chronological item indices, at most `max_len` long.
    pub seq: Vec<u32>,
    pub target: u32,
}

/// The samples of [`Dataset::split`], users in index order, prefixes in time order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub train: Vec<Sample>,
    pub valid: Vec<Sample>,
    pub test: Vec<Sample>,
}

/// A padded batch of samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// `[b, l]` row-major, each sequence left-aligned and padded with 0 at the end.
    pub ids: Vec<u32>,
    /// Sequence lengths `[b]`.
    pub lens: Vec<u32>,
    pub targets: Vec<u32>,
    pub users: Vec<u32>,
    pub b: usize,
    /// The longest sequence of this batch (at least 1 for a non-empty batch).
    pub l: usize,
}

/// Pad `samples` into a [`Batch`] whose width is the longest sequence among them.
pub fn make_batch(samples: &[&Sample]) -> Batch {
    let b = samples.len();
    let l = samples.iter().map(|s| s.seq.len()).max().map_or(0, |m| m.max(1));
    let mut ids = vec![0u32; b * l];
    for (r, s) in samples.iter().enumerate() {
        ids[r * l..r * l + s.seq.len()].copy_from_slice(&s.seq);
    }
    Batch {
        ids,
        lens: samples.iter().map(|s| s.seq.len() as u32).collect(),
        targets: samples.iter().map(|s| s.target).collect(),
        users: samples.iter().map(|s| s.user).collect(),
        b,
        l,
    }
}

/// Split `0..n` into consecutive index lists of `batch` entries (the last may be shorter;
/// `batch` 0 is read as 1), after shuffling with `shuffle` when given.
pub fn batches<R: Rng + ?Sized>(n: usize, batch: usize, shuffle: Option<&mut R>) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    if let Some(rng) = shuffle {
        idx.shuffle(rng);
    }
    idx.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

/// Sequence random dropout (pre-training): drop each item independently with probability `r`
/// (clamped to [0, 1]), keep the order of the rest. If every item is dropped, one item chosen
/// uniformly at random is kept, so a non-empty input never gives an empty output.
pub fn item_dropout<R: Rng + ?Sized>(seq: &[u32], r: f64, rng: &mut R) -> Vec<u32> {
    let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
    let kept: Vec<u32> = seq.iter().copied().filter(|_| rng.random::<f64>() >= r).collect();
    if kept.is_empty() && !seq.is_empty() {
        return vec![seq[rng.random_range(0..seq.len())]];
    }
    kept
}
