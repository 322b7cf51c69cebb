//! `msm4sr recommend`: the top-k items for users of the dataset (one, a list, or all), or for a
//! new user given only their item history. The item side is encoded once; users are scored on the
//! model's device in batches of `eval_batch` and each row's top k is selected on the host. Items are
//! named by the dataset's `NAME.item` title field when there is one.

use std::collections::HashMap;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::{make_batch, Dataset, Sample};
use crate::engine::no_grad;
use crate::model::Model;
use crate::nn::Seeds;
use crate::{Error, Result};

/// One recommended item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rec {
    pub item: String,
    /// From NAME.item, when the dataset has one with a title field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub score: f32,
    pub in_history: bool,
}

/// Whom to recommend for.
#[derive(Clone, Debug)]
pub enum Who {
    /// Users of the dataset by token, in this order.
    Users(Vec<String>),
    /// Every user of the dataset.
    All,
    /// A user who is not in the dataset: their item tokens, oldest first.
    History(Vec<String>),
}

/// Per recommended-for row: its name (user token, or "history") and its top k.
pub type Recs = Vec<(String, Vec<Rec>)>;

/// Item titles from `DIR/NAME.item` (the field `title`, else the first field whose name contains
/// "title"), by item token; empty when there is no such file or field.
pub fn titles(dir: &Path, name: &str) -> Result<HashMap<String, String>> {
    let path = dir.join(format!("{name}.item"));
    if !path.is_file() {
        return Ok(HashMap::new());
    }
    let t = crate::featurize::read_item_table(&path)?;
    let col = t.field("title").or_else(|| t.fields.iter().position(|f| f.contains("title")));
    Ok(match col {
        Some(c) => t.tokens.iter().zip(&t.rows).filter_map(|(tok, row)| row.get(c).map(|v| (tok.clone(), v.clone()))).collect(),
        None => HashMap::new(),
    })
}

/// Top `k` items for `who` (see the module docs); `mask_history` leaves out what each user has
/// already interacted with. `with_id`: add the ID embeddings (see `cli_run::Restored::with_id`);
/// a new user (`Who::History`) is scored the same way, from their items alone.
#[allow(clippy::too_many_arguments)]
pub fn recommend(
    model: &Model,
    ds: &Dataset,
    who: &Who,
    k: usize,
    mask_history: bool,
    with_id: bool,
    eval_batch: usize,
    titles: &HashMap<String, String>,
    quiet: bool,
) -> Result<Recs> {
    if k == 0 {
        return Err(Error::Invalid("--k 0: must be at least 1 (the number of items to recommend)".into()));
    }
    let index: HashMap<&str, usize> = ds.user_tokens.iter().enumerate().map(|(i, u)| (u.as_str(), i)).collect();
    let rows: Vec<(String, Vec<u32>)> = match who {
        Who::All => ds.user_tokens.iter().cloned().zip(ds.seqs.iter().cloned()).collect(),
        Who::Users(us) => us
            .iter()
            .map(|u| {
                index.get(u.as_str()).map(|&i| (u.clone(), ds.seqs[i].clone())).ok_or_else(|| {
                    Error::Invalid(format!("unknown user '{u}' (not in the dataset after filtering; --history serves a new user)"))
                })
            })
            .collect::<Result<_>>()?,
        Who::History(items) => {
            let item_index: HashMap<&str, u32> = ds.item_tokens.iter().enumerate().skip(1).map(|(i, t)| (t.as_str(), i as u32)).collect();
            let seq = items
                .iter()
                .map(|t| item_index.get(t.as_str()).copied().ok_or_else(|| Error::Invalid(format!("--history: unknown item '{t}'"))))
                .collect::<Result<Vec<u32>>>()?;
            if seq.is_empty() {
                return Err(Error::Invalid("--history: give at least one item".into()));
            }
            vec![("history".to_string(), seq)]
        }
    };
    let l = model.cfg.max_len;
    let bar = if quiet || rows.len() < 2 { ProgressBar::hidden() } else { ProgressBar::new(rows.len() as u64) };
    bar.set_style(
        ProgressStyle::with_template("recommend [{bar:30}] {pos}/{len} users {per_sec} ETA {eta}").unwrap().progress_chars("=> "),
    );
    let mut out = Vec::with_capacity(rows.len());
    no_grad(|| -> Result<()> {
        let mut seeds = Seeds::new(0);
        let tables = model.score_tables(false, with_id, &mut seeds)?;
        for chunk in rows.chunks(eval_batch.max(1)) {
            let samples: Vec<Sample> =
                chunk.iter().map(|(_, h)| Sample { user: 0, seq: h[h.len().saturating_sub(l)..].to_vec(), target: 1 }).collect();
            let refs: Vec<&Sample> = samples.iter().collect();
            let scores = model.scores_with(&tables, &make_batch(&refs), false, &mut seeds)?.to_vec()?;
            let n = ds.num_items();
            for (r, (name, hist)) in chunk.iter().enumerate() {
                let row = &scores[r * n..(r + 1) * n];
                if let Some(j) = row.iter().position(|s| !s.is_finite()) {
                    return Err(Error::Invalid(format!("the model gives item {} a non-finite score ({})", ds.item_tokens[j + 1], row[j])));
                }
                let seen: std::collections::HashSet<u32> = hist.iter().copied().collect();
                let mut cand: Vec<usize> = (0..n).filter(|&j| !(mask_history && seen.contains(&(j as u32 + 1)))).collect();
                // Highest score first; ties by item order.
                let better = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
                let kk = k.min(cand.len());
                if kk < cand.len() {
                    cand.select_nth_unstable_by(kk, better);
                    cand.truncate(kk);
                }
                cand.sort_by(better);
                let recs = cand
                    .into_iter()
                    .map(|j| {
                        let item = ds.item_tokens[j + 1].clone();
                        Rec { title: titles.get(&item).cloned(), item, score: row[j], in_history: seen.contains(&(j as u32 + 1)) }
                    })
                    .collect();
                out.push((name.clone(), recs));
            }
            bar.inc(chunk.len() as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(out)
}

/// The recommendations as TSV: `user`, `rank` (1-based), `item`, `score`, `in_history` and, when
/// there are titles, `title`.
pub fn tsv(recs: &Recs) -> String {
    let with_title = recs.iter().any(|(_, r)| r.iter().any(|x| x.title.is_some()));
    let mut s = String::from("user\trank\titem\tscore\tin_history");
    if with_title {
        s += "\ttitle";
    }
    s.push('\n');
    for (u, rs) in recs {
        for (i, r) in rs.iter().enumerate() {
            s += &format!("{u}\t{}\t{}\t{}\t{}", i + 1, r.item, r.score, r.in_history);
            if with_title {
                s += &format!("\t{}", r.title.as_deref().unwrap_or("").replace(['\t', '\n'], " "));
            }
            s.push('\n');
        }
    }
    s
}
