//! A dataset: users' interaction sequences (de-duplicated, ordered, filtered), item vocabulary,
//! features, the leave-one-out split and the cold-start protocol.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{data_err, io_err, PAD_TOKEN, *};
use crate::Result;

/// A loaded dataset: chronological item sequences per user and optional item features.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The `.inter` file's stem.
    pub name: String,
    /// Index 0 = [`PAD_TOKEN`], then real items `1..=I`.
    pub item_tokens: Vec<String>,
    /// Users `0..U`.
    pub user_tokens: Vec<String>,
    /// Per user, chronological item indices (each in `1..=I`, no repeats).
    pub seqs: Vec<Vec<u32>>,
    pub text: Option<Modality>,
    pub image: Option<Modality>,
}

/// Size summary of a [`Dataset`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub users: usize,
    /// Real items (without padding).
    pub items: usize,
    pub interactions: usize,
    pub avg_len: f64,
    pub min_len: usize,
    pub max_len: usize,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} users, {} items, {} interactions, sequence length avg {:.2} (min {}, max {})",
            self.users, self.items, self.interactions, self.avg_len, self.min_len, self.max_len
        )
    }
}

impl Dataset {
    /// Load a dataset directory: exactly one `NAME.inter`, optionally `NAME.features.safetensors` +
    /// `NAME.items.txt` (both or neither).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
        let dir_s = dir.display().to_string();
        let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
        let mut inter: Vec<PathBuf> = Vec::new();
        let mut found: Vec<String> = Vec::new();
        for e in entries {
            let p = e.map_err(|e| io_err(dir, e))?.path();
            found.push(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            if p.extension().is_some_and(|x| x == "inter") {
                if let Some(what) = crate::files::not_a_regular_file(&p) {
                    return data_err(&p.display().to_string(), 0, format!("it is {what}; the interactions must be a regular file"));
                }
                inter.push(p);
            }
        }
        found.sort();
        inter.sort();
        if inter.len() != 1 {
            let what = if inter.is_empty() {
                if found.is_empty() {
                    "the directory is empty".to_string()
                } else {
                    format!("found: {}", found.join(", "))
                }
            } else {
                let names: Vec<String> = inter.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
                format!("found {}: {}", inter.len(), names.join(", "))
            };
            return data_err(&dir_s, 0, format!("expected exactly one *.inter file in the dataset directory; {what}"));
        }
        let inter_path = &inter[0];
        let name = inter_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let rows = read_inter(inter_path)?;
        let mut ds = build(&name, &rows, opts.min_user_inter, &inter_path.display().to_string())?;

        let feat_path = dir.join(format!("{name}.features.safetensors"));
        let items_path = dir.join(format!("{name}.items.txt"));
        match (feat_path.is_file(), items_path.is_file()) {
            (false, false) => {
                if opts.require_features {
                    return data_err(
                        &dir_s,
                        0,
                        format!("item features are required but {name}.features.safetensors and {name}.items.txt are missing"),
                    );
                }
            }
            (true, false) => {
                return data_err(&feat_path.display().to_string(), 0, format!("found, but its token list {name}.items.txt is missing"))
            }
            (false, true) => {
                return data_err(
                    &items_path.display().to_string(),
                    0,
                    format!("found, but the features file {name}.features.safetensors is missing"),
                )
            }
            (true, true) => {
                let feats = read_features(&feat_path, &items_path)?;
                let (text, image) = feats.align(&ds.item_tokens, opts.missing_features)?;
                ds.text = text;
                ds.image = image;
            }
        }
        Ok(ds)
    }

    /// Build a dataset (without features) from interactions in file order, with the same rules as
    /// [`Dataset::load`].
    pub fn from_interactions(name: &str, rows: &[Interaction], min_user_inter: usize) -> Result<Dataset> {
        build(name, rows, min_user_inter, name)
    }

    /// Number of real items I (item indices are `1..=I`).
    pub fn num_items(&self) -> usize {
        self.item_tokens.len().saturating_sub(1)
    }

    pub fn num_users(&self) -> usize {
        self.seqs.len()
    }

    pub fn stats(&self) -> Stats {
        let interactions: usize = self.seqs.iter().map(Vec::len).sum();
        Stats {
            users: self.seqs.len(),
            items: self.num_items(),
            interactions,
            avg_len: if self.seqs.is_empty() { 0.0 } else { interactions as f64 / self.seqs.len() as f64 },
            min_len: self.seqs.iter().map(Vec::len).min().unwrap_or(0),
            max_len: self.seqs.iter().map(Vec::len).max().unwrap_or(0),
        }
    }

    /// Leave-one-out split with prefix samples, inputs truncated to the most recent `max_len`
    /// items (`max_len` 0 is read as 1).
    ///
    /// A user with sequence `[i1, ..., in]` gives the n - 1 samples "prefix -> next item": the last
    /// (`[i1..in-1] -> in`) is the test sample, the one before (`[i1..in-2] -> in-1`) the validation
    /// sample, and the rest (`[i1] -> i2`, ..., `[i1..in-3] -> in-2`) are training samples. So the
    /// validation input is the whole training part and the test input everything before the test
    /// target.
    ///
    /// Short users (possible only with `min_user_inter < 4`) keep at least one training sample,
    /// as RecBole's leave-one-out does: n = 3 gives one training and one test sample (no
    /// validation sample), n = 2 one training sample only, n = 1 nothing.
    pub fn split(&self, max_len: usize) -> Split {
        let max_len = max_len.max(1);
        let mut split = Split::default();
        let sample = |user: usize, seq: &[u32], k: usize| Sample {
            user: user as u32,
            seq: seq[k.saturating_sub(max_len)..k].to_vec(),
            target: seq[k],
        };
        for (u, seq) in self.seqs.iter().enumerate() {
            let n = seq.len();
            if n < 2 {
                continue;
            }
            // Targets at positions 1..n; the last one or two are held out, leaving at least one
            // training sample (RecBole's rule).
            let held_out = (n - 2).min(2);
            let train_end = n - held_out; // targets 1..train_end are training samples
            for k in 1..train_end {
                split.train.push(sample(u, seq, k));
            }
            if held_out == 2 {
                split.valid.push(sample(u, seq, n - 2));
            }
            if held_out >= 1 {
                split.test.push(sample(u, seq, n - 1));
            }
        }
        split
    }

    /// The cold-start protocol (paper Table V) with `threshold`: an item is cold when it occurs
    /// fewer than `threshold` times in the training part of the sequences (each user's items but
    /// the held-out validation and test targets). Returns the fine-tuning split (all training
    /// samples; validation and test samples whose target is cold), the pre-training samples (each
    /// training part with the cold items removed, then split into prefix -> next item as usual) and
    /// which items (by index) are cold.
    pub fn cold_start(&self, max_len: usize, threshold: usize) -> ColdStart {
        let max_len = max_len.max(1);
        let mut count = vec![0usize; self.item_tokens.len()];
        let train_end = |n: usize| n - (n.saturating_sub(2)).min(2);
        for seq in &self.seqs {
            if seq.len() >= 2 {
                for &i in &seq[..train_end(seq.len())] {
                    count[i as usize] += 1;
                }
            }
        }
        let cold: Vec<bool> = count.iter().enumerate().map(|(i, &c)| i > 0 && c < threshold).collect();
        let mut split = self.split(max_len);
        split.valid.retain(|s| cold[s.target as usize]);
        split.test.retain(|s| cold[s.target as usize]);
        let mut pretrain = Vec::new();
        for (u, seq) in self.seqs.iter().enumerate() {
            if seq.len() < 2 {
                continue;
            }
            let warm: Vec<u32> = seq[..train_end(seq.len())].iter().copied().filter(|&i| !cold[i as usize]).collect();
            for k in 1..warm.len() {
                pretrain.push(Sample { user: u as u32, seq: warm[k.saturating_sub(max_len)..k].to_vec(), target: warm[k] });
            }
        }
        ColdStart { split, pretrain, cold }
    }
}

/// What [`Dataset::cold_start`] returns.
#[derive(Debug, Clone)]
pub struct ColdStart {
    /// Fine-tuning samples (all) and the validation / test samples with a cold target.
    pub split: Split,
    /// Pre-training samples without cold items.
    pub pretrain: Vec<Sample>,
    /// Per item index (0 = padding, never cold): whether the item is cold.
    pub cold: Vec<bool>,
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.stats())?;
        for (label, m) in [("text", &self.text), ("image", &self.image)] {
            match m {
                Some(m) => {
                    let with = m.lens.iter().skip(1).filter(|l| **l > 0).count();
                    write!(f, "; {label} [{} x {}] for {with} items", m.rows, m.dim)?
                }
                None => write!(f, "; no {label}")?,
            }
        }
        Ok(())
    }
}

fn build(name: &str, rows: &[Interaction], min_user_inter: usize, file: &str) -> Result<Dataset> {
    if rows.is_empty() {
        return data_err(file, 0, "no interactions (only a header)");
    }
    // Provisional ids in order of first appearance over all rows.
    let mut uid: HashMap<&str, u32> = HashMap::new();
    let mut iid: HashMap<&str, u32> = HashMap::new();
    let mut ids = Vec::with_capacity(rows.len());
    for r in rows {
        let n = uid.len() as u32;
        let u = *uid.entry(r.user.as_str()).or_insert(n);
        let n = iid.len() as u32;
        let i = *iid.entry(r.item.as_str()).or_insert(n);
        ids.push((u, i));
    }
    // Duplicates: the latest by time wins; among equal times, the later row.
    let mut last: HashMap<(u32, u32), usize> = HashMap::with_capacity(rows.len());
    for (k, p) in ids.iter().enumerate() {
        let e = last.entry(*p).or_insert(k);
        if rows[k].timestamp >= rows[*e].timestamp {
            *e = k;
        }
    }
    let keep_row: Vec<bool> = ids.iter().enumerate().map(|(k, p)| last[p] == k).collect();
    let mut count = vec![0usize; uid.len()];
    for (k, (u, _)) in ids.iter().enumerate() {
        if keep_row[k] {
            count[*u as usize] += 1;
        }
    }
    let n_before = count.iter().filter(|c| **c > 0).count();
    // Final indices in order of first appearance among surviving rows.
    let mut user_new: Vec<Option<u32>> = vec![None; uid.len()];
    let mut item_new: Vec<Option<u32>> = vec![None; iid.len()];
    let mut user_tokens = Vec::new();
    let mut item_tokens = vec![PAD_TOKEN.to_string()];
    let mut events: Vec<Vec<(f64, u32)>> = Vec::new();
    for (k, (u, i)) in ids.iter().enumerate() {
        if !keep_row[k] || count[*u as usize] < min_user_inter {
            continue;
        }
        let nu = *user_new[*u as usize].get_or_insert_with(|| {
            user_tokens.push(rows[k].user.clone());
            events.push(Vec::new());
            (user_tokens.len() - 1) as u32
        });
        let ni = *item_new[*i as usize].get_or_insert_with(|| {
            item_tokens.push(rows[k].item.clone());
            (item_tokens.len() - 1) as u32
        });
        events[nu as usize].push((rows[k].timestamp, ni));
    }
    if user_tokens.is_empty() {
        return data_err(
            file,
            0,
            format!("no user is left after dropping users with fewer than {min_user_inter} interactions ({n_before} users before)"),
        );
    }
    let seqs = events
        .into_iter()
        .map(|mut ev| {
            ev.sort_by(|a, b| a.0.total_cmp(&b.0)); // stable: ties keep file order
            ev.into_iter().map(|(_, i)| i).collect()
        })
        .collect();
    Ok(Dataset { name: name.to_string(), item_tokens, user_tokens, seqs, text: None, image: None })
}
