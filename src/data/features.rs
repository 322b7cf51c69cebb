//! Item features: `NAME.features.safetensors` + `NAME.items.txt`, read and re-ordered into
//! [`Modality`] arrays aligned to item indices.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::{data_err, io_err, read_text, short};
use crate::{Error, Result};

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
