//! `msm4sr recommend`: the top-k items for users of the dataset (one, a list, or all), or for a
//! new user given only their item history. The item side is encoded once; users are scored on the
//! model's device in batches of `eval_batch` and each row's top k is selected on the host. Items are
//! named by the dataset's `NAME.item` title field when there is one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::runs::{check_outputs, load_dataset, open_checkpoint};
use super::{missing_of, MissingArg, Where};
use crate::data::{make_batch, Dataset, MissingFeatures, Sample};
use crate::engine::no_grad;
use crate::files::checkpoint_arg;
use crate::model::msm4sr::Model;
use crate::model::nn::Seeds;
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
/// already interacted with. `with_id`: add the ID embeddings (see `runs::Restored::with_id`);
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

/// Top-k recommendations for users of the dataset (one, a list or all) or for a new user's
/// item history.
#[derive(clap::Args)]
pub struct Args {
    /// Dataset directory (the one the checkpoint was trained on).
    #[arg(long)]
    pub data: PathBuf,
    /// A checkpoint written by train, pretrain or finetune (or a --run-dir directory).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// One user's token in NAME.inter.
    #[arg(long, conflicts_with_all = ["users", "history"], required_unless_present_any = ["users", "history"])]
    pub user: Option<String>,
    /// Many users: `all`, or a file with one user token per line.
    #[arg(long, conflicts_with = "history")]
    pub users: Option<String>,
    /// A user not in the dataset: their item tokens, oldest first, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub history: Option<Vec<String>>,
    /// Items to recommend per user.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Leave out the items each user has already interacted with.
    #[arg(long)]
    pub mask_history: bool,
    /// Write the recommendations here as TSV (user, rank, item, score, in_history, title).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the recommendations as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Items in .inter without features: fail (error) or give them zero features (zero).
    #[arg(long, value_enum, default_value = "error")]
    pub missing_features: MissingArg,
}

/// `msm4sr recommend`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args { data, ckpt, user, users, history, k, mask_history, out, overwrite, json, missing_features } = args;
    use crate::app::recommend::Who;
    let who = match (user, users, history) {
        (Some(u), _, _) => Who::Users(vec![u]),
        (_, Some(all), _) if all == "all" => Who::All,
        (_, Some(file), _) => {
            let text = std::fs::read_to_string(&file).map_err(|e| crate::Error::Io { path: file.clone(), source: e })?;
            let list: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if list.is_empty() {
                return Err(crate::Error::Data {
                    file: file.clone(),
                    line: 0,
                    msg: "no user tokens (expected one per line; --users all recommends for everyone)".into(),
                });
            }
            Who::Users(list)
        }
        (_, _, Some(h)) => Who::History(h),
        _ => return Err(crate::Error::Invalid("give --user, --users or --history".into())),
    };
    let target = out.as_deref().map(|o| (o, overwrite));
    let recs = recommend_from(&data, &ckpt, &who, k, mask_history, missing_of(missing_features), target, at, json)?;
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&recs.iter().map(|(u, r)| serde_json::json!({"user": u, "items": r})).collect::<Vec<_>>())
                .unwrap()
        );
    } else if let Some(o) = &out {
        eprintln!("wrote {} recommendations for {} users to {}", recs.iter().map(|r| r.1.len()).sum::<usize>(), recs.len(), o.display());
    } else if recs.len() == 1 {
        outln!("{:>4}  {:<20} {:>10}  {:<10} title", "rank", "item", "score", "in history");
        for (r, x) in recs[0].1.iter().enumerate() {
            outln!(
                "{:>4}  {:<20} {:>10.4}  {:<10} {}",
                r + 1,
                x.item,
                x.score,
                if x.in_history { "yes" } else { "" },
                x.title.as_deref().unwrap_or("")
            );
        }
    } else {
        out!("{}", crate::app::recommend::tsv(&recs));
    }
    Ok(ExitCode::SUCCESS)
}

/// `recommend`: the top `k` items for `who` by the checkpoint at `ckpt` (see
/// [`crate::app::recommend`]); written to `out` as TSV when given (checked first, as every output).
#[allow(clippy::too_many_arguments)]
pub fn recommend_from(
    data: &Path,
    ckpt: &Path,
    who: &crate::app::recommend::Who,
    k: usize,
    mask_history: bool,
    missing: MissingFeatures,
    out: Option<(&Path, bool)>,
    at: Where,
    quiet: bool,
) -> Result<crate::app::recommend::Recs> {
    let ckpt = &checkpoint_arg(ckpt);
    if let Some((o, overwrite)) = out {
        let inputs: [(&str, &Path); 2] = [("--data", data), ("--ckpt", ckpt)];
        check_outputs(&[o.to_path_buf()], &inputs, overwrite, "pass --overwrite to replace it")?;
    }
    if k == 0 {
        return Err(Error::Invalid("--k 0: must be at least 1 (the number of items to recommend)".into()));
    }
    let (dev, _) = at.resolve()?;
    let opened = open_checkpoint(ckpt)?;
    let ds = load_dataset(data, &opened.cfg, missing)?;
    let r = opened.restore(&ds, dev)?;
    let titles = crate::app::recommend::titles(data, &ds.name)?;
    let recs = crate::app::recommend::recommend(&r.model, &ds, who, k, mask_history, r.with_id(), r.cfg.train.eval_batch, &titles, quiet)?;
    if let Some((o, _)) = out {
        crate::files::write_atomic(o, crate::app::recommend::tsv(&recs).as_bytes())?;
    }
    Ok(recs)
}
