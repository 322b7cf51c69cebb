//! Datasets: RecBole atomic files, item features, leave-one-out splits and batches.
//!
//! Plain Rust, no engine dependency. The conventions follow RecBole (see `SPEC.md`, "Data and
//! protocol" and "Item features"):
//!
//! - **Interactions** come from one tab-separated `NAME.inter` file whose header names the columns as
//!   `field:type`. `user_id` and `item_id` are required, `timestamp` is optional (a number, or an ISO
//!   date `YYYY-MM-DD` with an optional time `THH:MM:SS` / ` HH:MM:SS`, read as UTC and converted to
//!   seconds since 1970-01-01); columns are found by name in any order and every other column
//!   (`rating`, ...) is ignored. Blank lines are skipped.
//! - **Duplicates**: when a (user, item) pair occurs more than once, the latest by timestamp wins, as
//!   RecBole sorts by time and then keeps the last; among equal timestamps (or without a timestamp
//!   column) the later row in the file wins. The kept row's timestamp and file position are used.
//! - **Order**: each user's interactions are sorted by timestamp; ties keep file order (stable sort).
//!   Without a timestamp column the file order is the time order.
//! - **Filtering**: users with fewer than [`LoadOptions::min_user_inter`] interactions (default 5)
//!   are dropped. Items are not filtered, but the item vocabulary is made of the items that occur in
//!   the remaining interactions.
//! - **Indices**: item index 0 is the padding item (token `[PAD]`); real items are `1..=I`, numbered
//!   in order of their first appearance in the file among the rows that survive de-duplication and
//!   filtering. Users are `0..U`, numbered the same way.
//! - **Item features** (optional): `NAME.features.safetensors` with `text [N, S, d]` +
//!   `text_len [N]` and/or `image [N, V, d]` + `image_len [N]`, row `i` belonging to the token on
//!   line `i + 1` of `NAME.items.txt`. They are re-ordered into [`Modality`] arrays aligned to item indices.
//! - **Split**: leave-one-out with every prefix of the training part as a training sample
//!   ([`Dataset::split`]).
//!
//! Every problem with an input file is an [`Error::Data`] whose message starts with the file name
//! and, where it applies, the line (`ml-100k.inter:17: ...`) or the item token.
//!
//! The data layer: plain Rust, no engine; uses `config` and `files` only. Files: [`inter`] the
//! `.inter` reader, [`features`] the feature files, [`dataset`] datasets and splits, [`batch`]
//! samples and batches, [`synth`] the synthetic generator, [`metrics`] Recall/NDCG, [`groups`] user
//! groups by history length, [`images`] item images (listing, reading, CLIP's preprocessing).

pub mod groups;
pub mod images;
pub mod metrics;
pub mod raw;
pub mod synth;

mod batch;
mod dataset;
mod features;
mod inter;

pub use batch::*;
pub use dataset::*;
pub use features::*;
pub use inter::*;

use std::path::Path;

use crate::{Error, Result};

/// Token of the padding item, index 0 of [`Dataset::item_tokens`].
pub const PAD_TOKEN: &str = "[PAD]";

fn data_err<T>(file: &str, line: usize, msg: impl Into<String>) -> Result<T> {
    Err(Error::Data { file: file.to_string(), line, msg: msg.into() })
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// A text file's contents; bytes that are not UTF-8 are an error naming their line and column.
fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = good.len() - good.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1) + 1;
        Error::Data { file: path.display().to_string(), line, msg: format!("not UTF-8 text (invalid byte at column {col})") }
    })
}

/// A value as messages show it: at most 60 characters (a bad 5 MB line is not echoed whole).
pub fn short(v: &str) -> String {
    const MAX: usize = 60;
    match v.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... ({} characters)", &v[..cut], v.chars().count()),
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which items are cold, which users are evaluated and what pre-training sees, on a hand-made
    /// dataset (threshold 2).
    #[test]
    fn cold_start_split() {
        let ds = Dataset {
            name: "hand".into(),
            item_tokens: std::iter::once(PAD_TOKEN.to_string()).chain((1..=6).map(|i| format!("i{i}"))).collect(),
            user_tokens: (0..4).map(|u| format!("u{u}")).collect(),
            // Training parts: u0 [1 2 3], u1 [2 1], u2 [1 2], u3 [4 3 1] -> counts 1:4 2:3 3:2 4:1 5:0 6:0.
            seqs: vec![vec![1, 2, 3, 4, 5], vec![2, 1, 5, 3], vec![1, 2, 3], vec![4, 3, 1, 2, 6]],
            text: None,
            image: None,
        };
        let c = ds.cold_start(50, 2);
        assert_eq!(c.cold, vec![false, false, false, false, true, true, true]);
        let users = |v: &[Sample]| v.iter().map(|s| (s.user, s.target)).collect::<Vec<_>>();
        assert_eq!(users(&c.split.valid), [(0, 4), (1, 5)]); // u3's validation target 2 is warm
        assert_eq!(users(&c.split.test), [(0, 5), (3, 6)]); // u1's and u2's test target 3 is warm
        assert_eq!(c.split.train, ds.split(50).train, "fine-tuning trains on everything");
        let pre: Vec<(u32, Vec<u32>, u32)> = c.pretrain.iter().map(|s| (s.user, s.seq.clone(), s.target)).collect();
        assert_eq!(pre, [(0, vec![1], 2), (0, vec![1, 2], 3), (1, vec![2], 1), (2, vec![1], 2), (3, vec![3], 1)]);
        // Threshold 1: only never-seen items are cold.
        assert_eq!(ds.cold_start(50, 1).cold, vec![false, false, false, false, false, true, true]);
    }
}
