//! Sentence-BERT inference on the engine: a BERT encoder (HF `BertModel` weights) followed by mean
//! pooling over each sentence's tokens and L2 normalisation, the sentence-transformers pipeline of
//! all-MiniLM-L6-v2 and other BERT sentence models. Inference only (under [`no_grad`]), on any
//! [`Device`].
//!
//! A model folder holds (as `tools/get_minilm.sh` writes it):
//! - `model.safetensors`: HF `BertModel` tensors (`embeddings.word_embeddings.weight`,
//!   `encoder.layer.{i}.attention.self.query.weight`, ...), with or without a prefix such as `bert.`
//!   or `0.auto_model.`; f32, f16 or bf16;
//! - `tokenizer.json`: the HF fast tokenizer (WordPiece for BERT); its own padding is turned off;
//! - `config.json` (optional): `num_attention_heads`, `layer_norm_eps`, `hidden_act` (must be
//!   `gelu`, the erf form). Without it the heads are 12 for hidden size 384 (the MiniLM family) and
//!   hidden / 64 otherwise, and eps is 1e-12. Hidden size, layers, intermediate size, vocabulary and
//!   maximum positions are read from the tensor shapes (and must agree with `config.json`);
//! - `sentence_bert_config.json` (optional): `max_seq_length` (default 256).
//!
//! Sentences are truncated to min(max_seq_length, max positions) tokens including `[CLS]` and
//! `[SEP]`. A batch of B sentences travels ragged: its N = sum n_b token ids packed one sentence after
//! another, no padding (see [`Ragged`]). One forward pass, ids (N), pos (N) each token's position in
//! its sentence:
//!
//! ```text
//! h = LayerNorm(word[ids] + pos_emb[pos] + type[0])                      (N, hidden)
//! per layer (nn::TransformerLayer, post-LN, bidirectional, no dropout):
//!     a = LayerNorm(h + (Attn(h Wq + bq, h Wk + bk, h Wv + bv) Wo + bo))
//!     h = LayerNorm(a + gelu(a W1 + b1) W2 + b2)
//! e_b = l2norm(mean of sentence b's rows of h)                           (B, hidden)
//! ```
//!
//! with multi-head attention within each sentence over all its tokens (`attention_ragged(..,
//! causal = false)`) and the mean by `mean_ragged`. HF stores linear weights as (out, in); they are
//! transposed once at load time into the engine's (in, out) layout. Sentences are sorted by length
//! (longest first, so memory peaks in the first batch) and cut, in that order, into batches of at
//! most `batch` sentences, [`MAX_BATCH_TOKENS`] packed tokens and [`MAX_BATCH_PROBS`] attention
//! scores (heads * sum n_b^2); a sentence that would cross a bound starts the next batch. Results
//! come back in input order.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use safetensors::{Dtype, SafeTensors};
use tokenizers::{Tokenizer, TruncationParams};

use crate::engine::ops::{add, embedding, l2norm, mean_ragged};
use crate::engine::{no_grad, Device, Indices, Ragged, Tensor};
use crate::model::nn::{LayerNorm, Linear, Seeds, TransformerLayer};
use crate::{Error, Result};

/// Default sentences per batch.
pub const DEFAULT_BATCH: usize = 64;
/// Token limit of sentence-transformers models without a `sentence_bert_config.json`.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Upper bound on one batch's packed tokens (sum n_b), so its activations (tokens x intermediate
/// size) stay well inside GPU buffer limits.
pub const MAX_BATCH_TOKENS: usize = 16384;
/// Upper bound on one batch's attention scores (heads * sum n_b^2), so a batch of long sentences
/// is not one very long attention dispatch.
pub const MAX_BATCH_PROBS: usize = 16 << 20;

/// The sizes of a BERT encoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BertConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub type_vocab: usize,
    pub eps: f32,
}

/// A BERT sentence encoder (tokenizer + weights on one device).
pub struct SentenceEncoder {
    pub config: BertConfig,
    /// Tokens per sentence after truncation, `[CLS]` and `[SEP]` included.
    pub max_tokens: usize,
    /// Sentences per batch (at most; long sentences make smaller batches, see the module docs).
    pub batch: usize,
    pub dir: PathBuf,
    dev: Device,
    tokenizer: Tokenizer,
    word: Tensor,
    /// Position embeddings with token type 0 added, (max_positions, hidden).
    pos_type: Tensor,
    /// The embeddings' LayerNorm.
    ln: LayerNorm,
    layers: Vec<TransformerLayer>,
}

/// Throughput of [`SentenceEncoder::bench`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub sentences: usize,
    pub tokens: usize,
    pub seconds: f64,
    pub sentences_per_s: f64,
    pub tokens_per_s: f64,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

pub(crate) fn data_err(file: &Path, msg: impl Into<String>) -> Error {
    Error::Data { file: file.display().to_string(), line: 0, msg: msg.into() }
}

fn missing(path: &Path) -> Error {
    invalid(format!(
        "{}: not found. A BERT sentence model folder needs model.safetensors and tokenizer.json; \
         run tools/get_minilm.sh to fetch all-MiniLM-L6-v2 into models/all-MiniLM-L6-v2/",
        path.display()
    ))
}

/// The tensors of a `model.safetensors`, names without their prefix, values as f32 (also read by
/// [`crate::model::clip`]).
pub(crate) struct Weights<'a> {
    pub(crate) st: SafeTensors<'a>,
    pub(crate) prefix: String,
    pub(crate) file: PathBuf,
}

impl Weights<'_> {
    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st.tensor(&format!("{}{name}", self.prefix)).ok().map(|t| t.shape().to_vec())
    }

    /// Tensor `name` as f32, checked against `shape`.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let full = format!("{}{name}", self.prefix);
        let t = self.st.tensor(&full).map_err(|_| data_err(&self.file, format!("tensor `{full}` is missing")))?;
        if t.shape() != shape {
            return Err(data_err(&self.file, format!("tensor `{full}` has shape {:?}, expected {shape:?}", t.shape())));
        }
        let b = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            d => return Err(data_err(&self.file, format!("tensor `{full}` has dtype {d:?}; expected F32, F16 or BF16"))),
        })
    }

    pub(crate) fn upload(&self, name: &str, shape: &[usize], dev: Device) -> Result<Tensor> {
        Tensor::from_vec(self.get(name, shape)?, shape, dev)
    }

    /// An HF linear layer `name` (weight (out, in), bias (out)) with the engine's (in, out) weight.
    pub(crate) fn linear(&self, name: &str, inp: usize, out: usize, dev: Device) -> Result<Linear> {
        let w = self.transposed(&format!("{name}.weight"), out, inp, dev)?;
        Ok(Linear { w, b: Some(self.upload(&format!("{name}.bias"), &[out], dev)?) })
    }

    /// Tensor `name` (rows, cols) transposed to (cols, rows): an HF (out, in) weight in the engine's layout.
    pub(crate) fn transposed(&self, name: &str, rows: usize, cols: usize, dev: Device) -> Result<Tensor> {
        self.transposed_as(name, &[rows, cols], rows, cols, dev)
    }

    /// Tensor `name` of `shape`, read as (rows, cols) row-major and transposed to (cols, rows) (e.g.
    /// a convolution kernel (h, 3, p, p) as (h, 3 p p)).
    pub(crate) fn transposed_as(&self, name: &str, shape: &[usize], rows: usize, cols: usize, dev: Device) -> Result<Tensor> {
        let w = self.get(name, shape)?;
        let mut wt = vec![0.0f32; w.len()];
        for o in 0..rows {
            for i in 0..cols {
                wt[i * rows + o] = w[o * cols + i];
            }
        }
        Tensor::from_vec(wt, &[cols, rows], dev)
    }

    pub(crate) fn layernorm(&self, name: &str, n: usize, eps: f32, dev: Device) -> Result<LayerNorm> {
        Ok(LayerNorm { g: self.upload(&format!("{name}.weight"), &[n], dev)?, b: self.upload(&format!("{name}.bias"), &[n], dev)?, eps })
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    serde_json::from_str(&text).map(Some).map_err(|e| data_err(path, format!("not valid JSON: {e}")))
}

/// Sizes from the tensor shapes, checked against `config.json` where it has them.
fn config_of(w: &Weights<'_>, cfg: Option<&serde_json::Value>, cfg_path: &Path) -> Result<BertConfig> {
    let need = |name: &str| w.shape(name).ok_or_else(|| data_err(&w.file, format!("tensor `{}{name}` is missing", w.prefix)));
    let word = need("embeddings.word_embeddings.weight")?;
    let pos = need("embeddings.position_embeddings.weight")?;
    let typ = need("embeddings.token_type_embeddings.weight")?;
    let inter = need("encoder.layer.0.intermediate.dense.weight")?;
    let layers = (0..).take_while(|i| w.shape(&format!("encoder.layer.{i}.attention.self.query.weight")).is_some()).count();
    if word.len() != 2 || pos.len() != 2 || typ.len() != 2 || inter.len() != 2 {
        return Err(data_err(&w.file, "embedding and intermediate weights must be 2-D"));
    }
    let hidden = word[1];
    let get = |k: &str| cfg.and_then(|c| c.get(k));
    let num = |k: &str| get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    if let Some(act) = get("hidden_act").and_then(|v| v.as_str()) {
        if act != "gelu" {
            return Err(data_err(cfg_path, format!("hidden_act is \"{act}\"; only \"gelu\" (the erf form) is supported")));
        }
    }
    if let Some(p) = get("position_embedding_type").and_then(|v| v.as_str()) {
        if p != "absolute" {
            return Err(data_err(cfg_path, format!("position_embedding_type is \"{p}\"; only \"absolute\" is supported")));
        }
    }
    let heads = num("num_attention_heads").unwrap_or(if hidden == 384 { 12 } else { (hidden / 64).max(1) });
    let eps = get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-12) as f32;
    let c = BertConfig { vocab: word[0], hidden, heads, layers, intermediate: inter[0], max_positions: pos[0], type_vocab: typ[0], eps };
    for (key, have) in [
        ("hidden_size", c.hidden),
        ("num_hidden_layers", c.layers),
        ("intermediate_size", c.intermediate),
        ("max_position_embeddings", c.max_positions),
        ("vocab_size", c.vocab),
    ] {
        if let Some(want) = num(key) {
            if want != have {
                return Err(data_err(cfg_path, format!("{key} is {want} but the weights in {} have {have}", w.file.display())));
            }
        }
    }
    if c.layers == 0 || c.heads == 0 || !c.hidden.is_multiple_of(c.heads) || c.type_vocab == 0 {
        return Err(data_err(
            &w.file,
            format!("unusable sizes: {} layers, hidden {} with {} heads, {} token types", c.layers, c.hidden, c.heads, c.type_vocab),
        ));
    }
    Ok(c)
}

impl SentenceEncoder {
    /// Load the model folder `dir` (see the module docs) onto `dev`.
    pub fn load(dir: &Path, dev: Device) -> Result<Self> {
        let model_path = dir.join("model.safetensors");
        let tok_path = dir.join("tokenizer.json");
        for p in [&model_path, &tok_path] {
            if !p.is_file() {
                return Err(missing(p));
            }
        }
        let cfg_path = dir.join("config.json");
        let cfg = read_json(&cfg_path)?;
        let st_cfg = read_json(&dir.join("sentence_bert_config.json"))?;

        let bytes = std::fs::read(&model_path).map_err(|e| Error::Io { path: model_path.display().to_string(), source: e })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| data_err(&model_path, format!("not a safetensors file: {e}")))?;
        const ANCHOR: &str = "embeddings.word_embeddings.weight";
        let prefix = st
            .names()
            .into_iter()
            .filter_map(|n| n.strip_suffix(ANCHOR))
            .min_by_key(|p| p.len())
            .map(str::to_string)
            .ok_or_else(|| data_err(&model_path, format!("no `{ANCHOR}` tensor: not a BERT model")))?;
        let w = Weights { st, prefix, file: model_path.clone() };
        let config = config_of(&w, cfg.as_ref(), &cfg_path)?;
        let (h, f) = (config.hidden, config.intermediate);

        let word = w.upload("embeddings.word_embeddings.weight", &[config.vocab, h], dev)?;
        let mut pos = w.get("embeddings.position_embeddings.weight", &[config.max_positions, h])?;
        let typ = w.get("embeddings.token_type_embeddings.weight", &[config.type_vocab, h])?;
        for row in pos.chunks_exact_mut(h) {
            row.iter_mut().zip(&typ[..h]).for_each(|(p, t)| *p += t);
        }
        let pos_type = Tensor::from_vec(pos, &[config.max_positions, h], dev)?;
        let eps = config.eps;
        let ln = w.layernorm("embeddings.LayerNorm", h, eps, dev)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("encoder.layer.{i}");
            layers.push(TransformerLayer {
                q: w.linear(&format!("{p}.attention.self.query"), h, h, dev)?,
                k: w.linear(&format!("{p}.attention.self.key"), h, h, dev)?,
                v: w.linear(&format!("{p}.attention.self.value"), h, h, dev)?,
                o: w.linear(&format!("{p}.attention.output.dense"), h, h, dev)?,
                ln1: w.layernorm(&format!("{p}.attention.output.LayerNorm"), h, eps, dev)?,
                ff1: w.linear(&format!("{p}.intermediate.dense"), h, f, dev)?,
                ff2: w.linear(&format!("{p}.output.dense"), f, h, dev)?,
                ln2: w.layernorm(&format!("{p}.output.LayerNorm"), h, eps, dev)?,
                heads: config.heads,
                p_hidden: 0.0,
                p_attn: 0.0,
                causal: false,
                pre_ln: false,
                act: crate::model::nn::Activation::Gelu,
            });
        }

        let seq = st_cfg.as_ref().and_then(|c| c.get("max_seq_length")).and_then(|v| v.as_u64()).map(|v| v as usize);
        let max_tokens = seq.unwrap_or(DEFAULT_MAX_TOKENS).min(config.max_positions).max(2);
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| data_err(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| data_err(&tok_path, format!("cannot set truncation to {max_tokens} tokens: {e}")))?;
        Ok(SentenceEncoder { config, max_tokens, batch: DEFAULT_BATCH, dir: dir.to_path_buf(), dev, tokenizer, word, pos_type, ln, layers })
    }

    pub fn device(&self) -> Device {
        self.dev
    }

    /// Output size d of a sentence vector (the hidden size).
    pub fn dim(&self) -> usize {
        self.config.hidden
    }

    /// Token ids of each sentence: `[CLS] ... [SEP]`, truncated to `max_tokens`, no padding.
    pub fn tokenize(&self, sentences: &[String]) -> Result<Vec<Vec<u32>>> {
        sentences
            .iter()
            .map(|s| {
                let enc = self.tokenizer.encode(s.as_str(), true).map_err(|e| invalid(format!("tokenizer failed on {s:?}: {e}")))?;
                let ids = enc.get_ids().to_vec();
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab) {
                    return Err(invalid(format!(
                        "tokenizer.json gives id {bad} for {s:?}, but the model has a vocabulary of {}",
                        self.config.vocab
                    )));
                }
                Ok(ids)
            })
            .collect()
    }

    /// L2-normalised sentence vectors (each `dim()` long), in the order of `sentences`.
    pub fn encode(&self, sentences: &[String]) -> Result<Vec<Vec<f32>>> {
        self.encode_with_progress(sentences, &ProgressBar::hidden())
    }

    /// [`encode`](Self::encode), advancing `bar` by one per sentence.
    pub fn encode_with_progress(&self, sentences: &[String], bar: &ProgressBar) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(sentences)?;
        self.encode_ids(&ids, bar)
    }

    /// Sentence vectors of already tokenized sentences (see [`tokenize`](Self::tokenize)).
    pub fn encode_ids(&self, ids: &[Vec<u32>], bar: &ProgressBar) -> Result<Vec<Vec<f32>>> {
        if let Some((i, s)) = ids.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > self.config.max_positions) {
            return Err(invalid(format!("sentence {i} has {} tokens; expected 1..={}", s.len(), self.config.max_positions)));
        }
        // Longest first, so the slowest batches come first and memory peaks early.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
        let heads = self.config.heads;
        let mut out = vec![Vec::new(); ids.len()];
        let mut start = 0;
        while start < order.len() {
            // Extend the batch while it stays within every bound (it always takes one sentence). The
            // first sentence is the longest: B of its length squared must fit the layout's u32 keys.
            let longest = ids[order[start]].len();
            let (mut end, mut tokens, mut probs) = (start, 0, 0);
            while end < order.len() && end - start < self.batch.max(1) {
                let n = ids[order[end]].len();
                let full = tokens + n > MAX_BATCH_TOKENS || probs + heads * n * n > MAX_BATCH_PROBS;
                if end > start && (full || (end - start + 1) * longest * longest > u32::MAX as usize) {
                    break;
                }
                (tokens, probs) = (tokens + n, probs + heads * n * n);
                end += 1;
            }
            let batch: Vec<&[u32]> = order[start..end].iter().map(|&i| ids[i].as_slice()).collect();
            let vecs = self.forward(&batch)?;
            for (k, v) in vecs.into_iter().enumerate() {
                out[order[start + k]] = v;
            }
            bar.inc((end - start) as u64);
            start = end;
        }
        Ok(out)
    }

    /// One batch: B sentences' ids, packed without padding -> B sentence vectors.
    fn forward(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let h = self.config.hidden;
        let lens: Vec<u32> = batch.iter().map(|s| s.len() as u32).collect();
        let longest = lens.iter().copied().max().unwrap_or(1) as usize;
        let r = Ragged::new(&lens, longest)?;
        let ids = Indices::new(batch.concat());
        let e = no_grad(|| -> Result<Tensor> {
            let x = embedding(&self.word, &ids, &[r.rows()])?;
            let pos = embedding(&self.pos_type, &r.pos, &[r.rows()])?;
            let mut x = self.ln.forward(&add(&x, &pos)?)?;
            // Dropout is off (p = 0), so the seeds the layers draw change nothing.
            let mut seeds = Seeds::new(0);
            for layer in &self.layers {
                x = layer.forward(&x, &r, false, &mut seeds)?;
            }
            l2norm(&mean_ragged(&x, &r)?, 1e-12)
        })?;
        Ok(e.to_vec()?.chunks_exact(h).map(|r| r.to_vec()).collect())
    }

    /// Throughput on `n` made-up sentences of 3 to about 40 words (sentences/s and tokens/s,
    /// tokenization included), after one warm-up batch.
    pub fn bench(&self, n: usize) -> Result<BenchReport> {
        const WORDS: &str = "the organic coffee movie released in 1995 with a dark roast comedy about two friends travelling";
        let words: Vec<&str> = WORDS.split(' ').collect();
        let sentences: Vec<String> = (0..n.max(1))
            .map(|i| {
                let len = 3 + (i * 7919) % 38;
                let mut s: Vec<&str> = (0..len).map(|j| words[(i * 31 + j * 17 + j * j) % words.len()]).collect();
                s.push(".");
                s.join(" ")
            })
            .collect();
        self.encode(&sentences[..sentences.len().min(self.batch.max(1))])?;
        let t0 = Instant::now();
        let ids = self.tokenize(&sentences)?;
        self.encode_ids(&ids, &ProgressBar::hidden())?;
        let seconds = t0.elapsed().as_secs_f64();
        let tokens = ids.iter().map(Vec::len).sum();
        Ok(BenchReport {
            sentences: sentences.len(),
            tokens,
            seconds,
            sentences_per_s: sentences.len() as f64 / seconds,
            tokens_per_s: tokens as f64 / seconds,
        })
    }
}

/// A progress bar over `n` sentences showing sentences/s (hidden when `quiet`).
pub fn progress_bar(n: usize, quiet: bool) -> ProgressBar {
    progress_bar_of(n, "sentences", quiet)
}

/// A progress bar over `n` things called `unit`, showing their rate and the time left.
pub fn progress_bar_of(n: usize, unit: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"))
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_prefix("embedding");
    bar
}

/// Load `dir` on `dev` and measure [`SentenceEncoder::bench`] on `n` sentences.
pub fn bench(dir: &Path, dev: Device, n: usize) -> Result<BenchReport> {
    SentenceEncoder::load(dir, dev)?.bench(n)
}
