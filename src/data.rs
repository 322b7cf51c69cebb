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

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::Rng;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

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

// ---------------------------------------------------------------------------------------------
// Interaction files
// ---------------------------------------------------------------------------------------------

/// One row of a `.inter` file.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub user: String,
    pub item: String,
    /// Seconds since 1970-01-01 UTC (or whatever unit a numeric column uses); 0 without a
    /// timestamp column.
    pub timestamp: f64,
}

/// Read a RecBole atomic `.inter` file (see the module docs for the format).
pub fn read_inter(path: &Path) -> Result<Vec<Interaction>> {
    let text = read_text(path)?;
    parse_inter(&text, &path.display().to_string())
}

/// Parse the text of a `.inter` file; `file` names it in error messages.
pub fn parse_inter(text: &str, file: &str) -> Result<Vec<Interaction>> {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or("");
    let header = header.strip_prefix('\u{feff}').unwrap_or(header);
    if header.trim().is_empty() {
        return data_err(file, 1, "empty file: expected a header line such as `user_id:token<TAB>item_id:token<TAB>timestamp:float`");
    }
    let fields: Vec<&str> = header.split('\t').collect();
    let names: Vec<&str> = fields.iter().map(|f| f.split(':').next().unwrap_or("").trim()).collect();
    let find = |want: &str| -> Result<Option<usize>> {
        let hits: Vec<usize> = names.iter().enumerate().filter(|(_, n)| **n == want).map(|(i, _)| i).collect();
        if hits.len() > 1 {
            return data_err(file, 1, format!("header names the field `{want}` {} times", hits.len()));
        }
        Ok(hits.first().copied())
    };
    let required = |want: &str, spelled: &str| -> Result<usize> {
        find(want)?.ok_or_else(|| Error::Data {
            file: file.to_string(),
            line: 1,
            msg: format!("header has no `{spelled}` field (found: {})", fields.join(", ")),
        })
    };
    let ucol = required("user_id", "user_id:token")?;
    let icol = required("item_id", "item_id:token")?;
    let tcol = find("timestamp")?;
    let ncols = fields.len();

    let mut out = Vec::new();
    for (k, line) in lines.enumerate() {
        let lineno = k + 2;
        if line.trim().is_empty() {
            continue;
        }
        let vals: Vec<&str> = line.split('\t').collect();
        if vals.len() != ncols {
            return data_err(file, lineno, format!("expected {ncols} tab-separated fields as in the header, found {}", vals.len()));
        }
        let (user, item) = (vals[ucol], vals[icol]);
        if user.is_empty() {
            return data_err(file, lineno, "empty user_id");
        }
        if item.is_empty() {
            return data_err(file, lineno, "empty item_id");
        }
        let timestamp = match tcol {
            None => 0.0,
            Some(c) => parse_timestamp(vals[c]).ok_or_else(|| Error::Data {
                file: file.to_string(),
                line: lineno,
                msg: format!("cannot parse timestamp `{}` (expected a finite number or a date YYYY-MM-DD[THH:MM:SS])", short(vals[c])),
            })?,
        };
        out.push(Interaction { user: user.to_string(), item: item.to_string(), timestamp });
    }
    Ok(out)
}

/// Parse a timestamp: a finite number, or an ISO date `YYYY-MM-DD` optionally followed by a time
/// `THH:MM[:SS[.fff]]` (or with a space instead of `T`) and an optional `Z`, read as UTC.
/// Returns seconds since 1970-01-01 for dates, the number itself otherwise.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    parse_iso_datetime(s)
}

fn ascii_number(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')))
}

fn parse_iso_datetime(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (ascii_number(&b[0..4])?, ascii_number(&b[5..7])?, ascii_number(&b[8..10])?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y as i64, m) {
        return None;
    }
    let mut secs = days_from_civil(y as i64, m, d) as f64 * 86400.0;
    let rest = &b[10..];
    if rest.is_empty() {
        return Some(secs);
    }
    if rest[0] != b'T' && rest[0] != b' ' {
        return None;
    }
    let rest = &rest[1..];
    let rest = rest.strip_suffix(b"Z").unwrap_or(rest);
    let parts: Vec<&[u8]> = rest.split(|c| *c == b':').collect();
    if parts.len() < 2 || parts.len() > 3 || parts[0].len() != 2 || parts[1].len() != 2 {
        return None;
    }
    let (h, mi) = (ascii_number(parts[0])?, ascii_number(parts[1])?);
    let sec = match parts.get(2) {
        None => 0.0,
        Some(p) => {
            let (whole, frac) = match p.iter().position(|c| *c == b'.') {
                Some(i) => (&p[..i], Some(&p[i + 1..])),
                None => (&p[..], None),
            };
            if whole.len() != 2 {
                return None;
            }
            let mut v = f64::from(ascii_number(whole)?);
            if let Some(f) = frac {
                if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
                    return None;
                }
                let digits = &f[..f.len().min(9)];
                v += f64::from(ascii_number(digits)?) / 10f64.powi(digits.len() as i32);
            }
            v
        }
    };
    if h > 23 || mi > 59 || sec >= 60.0 {
        return None;
    }
    secs += f64::from(h) * 3600.0 + f64::from(mi) * 60.0 + sec;
    Some(secs)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------------
// Options, features
// ---------------------------------------------------------------------------------------------

/// What to do with an item of the `.inter` file that has no row in `NAME.items.txt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MissingFeatures {
    /// Fail, naming the items (default).
    #[default]
    Error,
    /// Give the item all-zero rows and a count of 0 in every modality.
    Zero,
}

/// Options of [`Dataset::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Users with fewer interactions (after de-duplication) are dropped. Default 5.
    pub min_user_inter: usize,
    /// Items without features: an error (default) or zero features.
    pub missing_features: MissingFeatures,
    /// Fail when the directory has no `NAME.features.safetensors`. Default false.
    pub require_features: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { min_user_inter: 5, missing_features: MissingFeatures::Error, require_features: false }
    }
}

/// One modality's item features.
///
/// Inside a [`Dataset`] the arrays are aligned to item indices: `data` is laid out
/// `[I + 1, rows, dim]` and `lens` is `[I + 1]`, with row 0 (padding) all zero and count 0. As
/// returned by [`read_features`] they follow the lines of `items.txt` instead (`[N, rows, dim]`).
/// Rows at or past an item's count are always zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Modality {
    /// Rows per item: S (sentences) or V (images).
    pub rows: usize,
    /// Feature size d.
    pub dim: usize,
    pub data: Vec<f32>,
    /// Valid rows per item, `0..=rows`.
    pub lens: Vec<u32>,
}

impl Modality {
    /// Number of items (including the padding row inside a dataset).
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// The `[rows, dim]` block of item `i` (`None` when out of range).
    pub fn item(&self, i: usize) -> Option<&[f32]> {
        let n = self.rows * self.dim;
        self.data.get(i * n..(i + 1) * n)
    }
}

/// The contents of a `NAME.features.safetensors` + `NAME.items.txt` pair, rows in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemFeatures {
    /// Line `i + 1` of `items.txt` = row `i`.
    pub tokens: Vec<String>,
    pub text: Option<Modality>,
    pub image: Option<Modality>,
    /// The safetensors file, for error messages.
    pub file: String,
}

/// The safetensors bytes of item features (`text`/`image` f32, `*_len` int32). Metadata entries
/// are written in hash order: pass at most one for byte-identical output.
pub fn features_bytes(text: Option<&Modality>, image: Option<&Modality>, metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, m) in [("text", text), ("image", image)] {
        if let Some(m) = m {
            let data: Vec<u8> = m.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            bufs.push((name.to_string(), Dtype::F32, vec![m.lens.len(), m.rows, m.dim], data));
            let lens: Vec<u8> = m.lens.iter().flat_map(|&l| (l as i32).to_le_bytes()).collect();
            bufs.push((format!("{name}_len"), Dtype::I32, vec![m.lens.len()], lens));
        }
    }
    let views = bufs
        .iter()
        .map(|(name, dt, shape, data)| {
            TensorView::new(*dt, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Invalid(format!("features tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Invalid(format!("cannot serialise features: {e}")))
}

/// Read the item token list: one token per line, no blank lines, no duplicates.
pub fn read_item_tokens(path: &Path) -> Result<Vec<String>> {
    let file = path.display().to_string();
    let text = read_text(path)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let body = text.strip_suffix('\n').unwrap_or(text);
    if body.is_empty() {
        return data_err(&file, 0, "empty file: expected one item token per line");
    }
    let mut tokens = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (k, line) in body.split('\n').enumerate() {
        let tok = line.strip_suffix('\r').unwrap_or(line);
        if tok.is_empty() {
            return data_err(&file, k + 1, "empty item token");
        }
        if let Some(first) = seen.insert(tok, k + 1) {
            return data_err(&file, k + 1, format!("duplicate item token \"{}\" (first on line {first})", short(tok)));
        }
        tokens.push(tok.to_string());
    }
    Ok(tokens)
}

fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let b = view.data();
    Some(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

fn to_i64(view: &TensorView<'_>) -> Option<Vec<i64>> {
    let b = view.data();
    Some(match view.dtype() {
        Dtype::I32 => b.chunks_exact(4).map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]]))).collect(),
        Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect(),
        _ => return None,
    })
}

/// Largest feature magnitude accepted (sentence and image embeddings are about unit length).
pub const MAX_FEATURE_ABS: f32 = 1e4;

fn read_modality(st: &SafeTensors<'_>, name: &str, tokens: &[String], file: &str, items_file: &str) -> Result<Option<Modality>> {
    let len_name = format!("{name}_len");
    let x = st.tensor(name).ok();
    let lens = st.tensor(&len_name).ok();
    let (x, lv) = match (x, lens) {
        (None, None) => return Ok(None),
        (None, Some(_)) => return data_err(file, 0, format!("tensor `{len_name}` is present but `{name}` is missing")),
        (Some(_), None) => return data_err(file, 0, format!("tensor `{name}` is present but `{len_name}` is missing")),
        (Some(x), Some(l)) => (x, l),
    };
    let n = tokens.len();
    let shape = x.shape().to_vec();
    if shape.len() != 3 {
        return data_err(file, 0, format!("tensor `{name}` must have shape [N, rows, d], found {shape:?}"));
    }
    let (rows, dim) = (shape[1], shape[2]);
    if shape[0] != n {
        return data_err(file, 0, format!("tensor `{name}` has {} item rows but {items_file} has {n} lines", shape[0]));
    }
    if rows == 0 || dim == 0 {
        return data_err(file, 0, format!("tensor `{name}` has an empty dimension: shape {shape:?}"));
    }
    if lv.shape() != [n] {
        return data_err(
            file,
            0,
            format!("tensor `{len_name}` must have shape [{n}] (one count per line of {items_file}), found {:?}", lv.shape()),
        );
    }
    let lens = to_i64(&lv).ok_or_else(|| Error::Data {
        file: file.to_string(),
        line: 0,
        msg: format!("tensor `{len_name}` must be int32 (or int64), found {:?}", lv.dtype()),
    })?;
    let mut data = to_f32(&x).ok_or_else(|| Error::Data {
        file: file.to_string(),
        line: 0,
        msg: format!("tensor `{name}` must be f32 or f16, found {:?}", x.dtype()),
    })?;
    let block = rows * dim;
    let mut out_lens = Vec::with_capacity(n);
    for (i, &len) in lens.iter().enumerate() {
        let tok = &tokens[i];
        if len < 0 || len as usize > rows {
            return data_err(
                file,
                0,
                format!("`{len_name}` row {i} (item \"{tok}\", {items_file} line {}): count {len} is outside 0..={rows}", i + 1),
            );
        }
        let len = len as usize;
        let item = &mut data[i * block..(i + 1) * block];
        if let Some(p) = item[..len * dim].iter().position(|v| !v.is_finite()) {
            return data_err(
                file,
                0,
                format!(
                    "tensor `{name}` row {i} (item \"{tok}\", {items_file} line {}) has a non-finite value ({}) in {} {}",
                    i + 1,
                    item[p],
                    if name == "text" { "sentence" } else { "row" },
                    p / dim
                ),
            );
        }
        item[len * dim..].fill(0.0);
        out_lens.push(len as u32);
    }
    if out_lens.iter().all(|&l| l == 0) {
        return data_err(
            file,
            0,
            format!("`{len_name}` is 0 for every item: the {name} modality has no rows (leave `{name}` and `{len_name}` out to train without it)"),
        );
    }
    // Valid rows only (the rest was zeroed above).
    let (imax, vmax) = data.iter().enumerate().fold((0, 0.0f32), |(bi, bv), (i, &v)| if v.abs() > bv { (i, v.abs()) } else { (bi, bv) });
    if vmax > MAX_FEATURE_ABS {
        let i = imax / block;
        return data_err(
            file,
            0,
            format!(
                "tensor `{name}` has a value of magnitude {vmax:e} (item \"{}\", {items_file} line {}); features above {MAX_FEATURE_ABS:e} \
                 saturate the encoders' softmax and LayerNorm (sentence and image embeddings are about unit length): rescale them",
                tokens[i],
                i + 1
            ),
        );
    }
    Ok(Some(Modality { rows, dim, data, lens: out_lens }))
}

/// Read and validate `features` (safetensors) against the token list `items` (`items.txt`).
pub fn read_features(features: &Path, items: &Path) -> Result<ItemFeatures> {
    let file = features.display().to_string();
    let items_file = items.display().to_string();
    let tokens = read_item_tokens(items)?;
    let bytes = std::fs::read(features).map_err(|e| io_err(features, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Data {
        file: file.clone(),
        line: 0,
        msg: format!("not a valid safetensors file: {e}"),
    })?;
    let text = read_modality(&st, "text", &tokens, &file, &items_file)?;
    let image = read_modality(&st, "image", &tokens, &file, &items_file)?;
    if text.is_none() && image.is_none() {
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        return data_err(&file, 0, format!("has neither `text` nor `image` features (tensors found: {})", names.join(", ")));
    }
    Ok(ItemFeatures { tokens, text, image, file })
}

impl ItemFeatures {
    /// Re-order the rows to follow `item_tokens` (index 0 = padding, all zero). Tokens of
    /// `item_tokens[1..]` without a row are an error naming them, or zero rows with
    /// [`MissingFeatures::Zero`]; rows of tokens not in `item_tokens` are ignored.
    pub fn align(&self, item_tokens: &[String], missing: MissingFeatures) -> Result<(Option<Modality>, Option<Modality>)> {
        let index: HashMap<&str, usize> = self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        let rows: Vec<Option<usize>> =
            item_tokens.iter().enumerate().map(|(i, t)| if i == 0 { None } else { index.get(t.as_str()).copied() }).collect();
        let absent: Vec<&str> = rows.iter().zip(item_tokens).skip(1).filter(|(r, _)| r.is_none()).map(|(_, t)| t.as_str()).collect();
        if !absent.is_empty() && missing == MissingFeatures::Error {
            let shown: Vec<String> = absent.iter().take(10).map(|t| format!("\"{t}\"")).collect();
            return data_err(
                &self.file,
                0,
                format!(
                    "{} item(s) of the interactions have no features: {}{} (add them to the items file, or pass --missing-features zero to give them zero features)",
                    absent.len(),
                    shown.join(", "),
                    if absent.len() > 10 { ", ..." } else { "" }
                ),
            );
        }
        let pick = |m: &Option<Modality>| {
            m.as_ref().map(|m| {
                let block = m.rows * m.dim;
                let mut data = vec![0.0f32; rows.len() * block];
                let mut lens = vec![0u32; rows.len()];
                for (i, r) in rows.iter().enumerate() {
                    if let Some(r) = *r {
                        data[i * block..(i + 1) * block].copy_from_slice(&m.data[r * block..(r + 1) * block]);
                        lens[i] = m.lens[r];
                    }
                }
                Modality { rows: m.rows, dim: m.dim, data, lens }
            })
        };
        Ok((pick(&self.text), pick(&self.image)))
    }
}

// ---------------------------------------------------------------------------------------------
// Dataset
// ---------------------------------------------------------------------------------------------

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
                if let Some(what) = crate::checkpoint::not_a_regular_file(&p) {
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

// ---------------------------------------------------------------------------------------------
// Samples and batches
// ---------------------------------------------------------------------------------------------

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
