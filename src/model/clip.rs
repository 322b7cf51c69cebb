//! CLIP inference on the engine: the image and text towers of a Hugging Face `CLIPModel`, for the
//! paper's image modality (eq. 2: every word of a dictionary scored against an image, the N best
//! joined into one sentence). Inference only (under [`no_grad`]), on any [`Device`].
//!
//! A model folder holds (as the Hugging Face hub has openai/clip-vit-base-patch32 and the other
//! CLIP checkpoints):
//! - `config.json`: `projection_dim`, and `vision_config` / `text_config` with `hidden_size`,
//!   `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `layer_norm_eps` (1e-5),
//!   `hidden_act` (`quick_gelu` or `gelu`); the vision tower's `image_size`, `patch_size`; the text
//!   tower's `max_position_embeddings` and `eos_token_id`. Missing keys take transformers' defaults
//!   (ViT-B/32); sizes are checked against the tensor shapes;
//! - `model.safetensors`: the `CLIPModel` tensors (`vision_model.*`, `text_model.*`,
//!   `visual_projection.weight`, `text_projection.weight`), f32, f16 or bf16;
//! - `tokenizer.json`: the CLIP BPE tokenizer (`<|startoftext|>` ... `<|endoftext|>`);
//! - `preprocessor_config.json` (optional): resizing, crop, mean and std ([`crate::data::images`]).
//!
//! **Vision tower**, one forward for B images of pixels (3, S, S), with P = (S / p)^2 patches of
//! p x p pixels; every image is a sequence of P + 1 rows, packed as a ragged batch:
//!
//! ```text
//! rows = [0; patch_1; ...; patch_P]  per image, patch_k = its 3 p p pixels in (channel, y, x) order
//! x = rows W_patch + T[pos]          W_patch (3 p p, h) the convolution's kernel, no bias;
//!                                    T = position embeddings with the class embedding added to row 0
//!                                    (the zero row makes the class token: 0 W_patch = 0)
//! x = LN_pre(x); per layer (nn::TransformerLayer, pre-LN, bidirectional):
//!     x = x + Attn(LN1(x)) Wo;  x = x + act(LN2(x) W1) W2
//! image_embeds = LN_post(x[class row]) W_visual                                (B, projection_dim)
//! ```
//!
//! **Text tower**: ids `<|startoftext|> ... <|endoftext|>` truncated at the position table's length
//! (77), packed ragged, no padding:
//!
//! ```text
//! x = E_token[ids] + E_pos[pos]; per layer: as above with causal attention
//! text_embeds = LN_final(x[eot]) W_text                                        (B, projection_dim)
//! ```
//!
//! where `eot` is the first `eos_token_id` of the sequence, or — for configs that say
//! `eos_token_id = 2`, as the original OpenAI uploads do — the position of the largest id (the
//! end-of-text token has the largest id of the vocabulary), as transformers' `CLIPTextTransformer`
//! pools. The embeddings are returned as the towers give them (not normalised); cosines are taken
//! by the caller.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use safetensors::SafeTensors;
use tokenizers::{Tokenizer, TruncationParams};

use crate::data::images::ImageProcessorConfig;
use crate::engine::ops::{add, embedding, linear, matmul};
use crate::engine::{no_grad, Device, Indices, Ragged, Tensor};
use crate::model::bert::{data_err, read_json, Weights};
use crate::model::nn::{Activation, LayerNorm, Seeds, TransformerLayer};
use crate::{Error, Result};

/// FNV-1a (64-bit): the start value, and `h` advanced over `bytes` (the word cache's keys).
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub(crate) fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h = (*h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Sizes of one tower.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TowerConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f32,
    /// `quick_gelu` or `gelu`.
    pub act: String,
}

/// The sizes of a CLIP model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClipConfig {
    pub vision: TowerConfig,
    pub text: TowerConfig,
    pub projection_dim: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub eos_token_id: u32,
}

impl ClipConfig {
    /// Patches per image (without the class token).
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// A loaded CLIP model (both towers, the tokenizer and the image preprocessing) on one device.
pub struct Clip {
    pub config: ClipConfig,
    pub processor: ImageProcessorConfig,
    pub dir: PathBuf,
    /// FNV-1a (64-bit, hex) of `model.safetensors`: the word cache's key.
    pub model_hash: String,
    /// Images per forward pass.
    pub image_batch: usize,
    /// Texts per forward pass.
    pub text_batch: usize,
    dev: Device,
    tokenizer: Tokenizer,
    // vision
    patch_w: Tensor,
    /// Position embeddings with the class embedding added to row 0, (P + 1, h).
    vis_pos: Tensor,
    pre_ln: LayerNorm,
    vis_layers: Vec<TransformerLayer>,
    post_ln: LayerNorm,
    vis_proj: Tensor,
    // text
    tok_emb: Tensor,
    txt_pos: Tensor,
    txt_layers: Vec<TransformerLayer>,
    final_ln: LayerNorm,
    txt_proj: Tensor,
}

fn tower(cfg: Option<&serde_json::Value>, key: &str, path: &Path, defaults: (usize, usize, usize, usize)) -> Result<TowerConfig> {
    let c = cfg.and_then(|c| c.get(key));
    let num = |k: &str, d: usize| c.and_then(|c| c.get(k)).and_then(|v| v.as_u64()).map(|v| v as usize).unwrap_or(d);
    let act = c.and_then(|c| c.get("hidden_act")).and_then(|v| v.as_str()).unwrap_or("quick_gelu").to_string();
    if act != "quick_gelu" && act != "gelu" {
        return Err(data_err(path, format!("{key}.hidden_act is \"{act}\"; supported: \"quick_gelu\", \"gelu\"")));
    }
    Ok(TowerConfig {
        hidden: num("hidden_size", defaults.0),
        intermediate: num("intermediate_size", defaults.1),
        layers: num("num_hidden_layers", defaults.2),
        heads: num("num_attention_heads", defaults.3),
        eps: c.and_then(|c| c.get("layer_norm_eps")).and_then(|v| v.as_f64()).unwrap_or(1e-5) as f32,
        act,
    })
}

fn activation(t: &TowerConfig) -> Activation {
    if t.act == "gelu" {
        Activation::Gelu
    } else {
        Activation::QuickGelu
    }
}

/// The pre-LN layers `{prefix}.encoder.layers.{i}` of one tower.
fn layers(w: &Weights<'_>, prefix: &str, t: &TowerConfig, causal: bool, dev: Device) -> Result<Vec<TransformerLayer>> {
    let (h, f) = (t.hidden, t.intermediate);
    (0..t.layers)
        .map(|i| {
            let p = format!("{prefix}.encoder.layers.{i}");
            Ok(TransformerLayer {
                q: w.linear(&format!("{p}.self_attn.q_proj"), h, h, dev)?,
                k: w.linear(&format!("{p}.self_attn.k_proj"), h, h, dev)?,
                v: w.linear(&format!("{p}.self_attn.v_proj"), h, h, dev)?,
                o: w.linear(&format!("{p}.self_attn.out_proj"), h, h, dev)?,
                ln1: w.layernorm(&format!("{p}.layer_norm1"), h, t.eps, dev)?,
                ff1: w.linear(&format!("{p}.mlp.fc1"), h, f, dev)?,
                ff2: w.linear(&format!("{p}.mlp.fc2"), f, h, dev)?,
                ln2: w.layernorm(&format!("{p}.layer_norm2"), h, t.eps, dev)?,
                heads: t.heads,
                p_hidden: 0.0,
                p_attn: 0.0,
                causal,
                pre_ln: true,
                act: activation(t),
            })
        })
        .collect()
}

fn missing(path: &Path) -> Error {
    Error::Invalid(format!(
        "{}: not found. A CLIP model folder needs config.json, model.safetensors and tokenizer.json \
         (e.g. openai/clip-vit-base-patch32 from the Hugging Face hub; see the README)",
        path.display()
    ))
}

impl Clip {
    /// Load the model folder `dir` (see the module docs) onto `dev`.
    pub fn load(dir: &Path, dev: Device) -> Result<Clip> {
        let model_path = dir.join("model.safetensors");
        let tok_path = dir.join("tokenizer.json");
        let cfg_path = dir.join("config.json");
        for p in [&cfg_path, &model_path, &tok_path] {
            if !p.is_file() {
                return Err(missing(p));
            }
        }
        let cfg = read_json(&cfg_path)?;
        let pre_path = dir.join("preprocessor_config.json");
        let processor = if pre_path.is_file() { ImageProcessorConfig::load(&pre_path)? } else { ImageProcessorConfig::default() };
        let bytes = std::fs::read(&model_path).map_err(|e| Error::Io { path: model_path.display().to_string(), source: e })?;
        let model_hash = {
            let mut h = FNV_OFFSET;
            fnv1a(&mut h, &bytes);
            format!("{h:016x}")
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| data_err(&model_path, format!("not a safetensors file: {e}")))?;
        let w = Weights { st, prefix: String::new(), file: model_path.clone() };
        if w.shape("vision_model.embeddings.patch_embedding.weight").is_none()
            || w.shape("text_model.embeddings.token_embedding.weight").is_none()
        {
            return Err(data_err(&model_path, "no vision_model.* / text_model.* tensors: not a CLIPModel checkpoint"));
        }

        let vision = tower(cfg.as_ref(), "vision_config", &cfg_path, (768, 3072, 12, 12))?;
        let text = tower(cfg.as_ref(), "text_config", &cfg_path, (512, 2048, 12, 8))?;
        let get = |k: &str| cfg.as_ref().and_then(|c| c.get(k));
        let sub = |t: &str, k: &str| cfg.as_ref().and_then(|c| c.get(t)).and_then(|c| c.get(k)).and_then(|v| v.as_u64());
        let tok = w.shape("text_model.embeddings.token_embedding.weight").unwrap_or_default();
        let pos = w.shape("text_model.embeddings.position_embedding.weight").unwrap_or_default();
        let proj = w.shape("visual_projection.weight").unwrap_or_default();
        let config = ClipConfig {
            projection_dim: get("projection_dim")
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .unwrap_or(proj.first().copied().unwrap_or(512)),
            image_size: sub("vision_config", "image_size").unwrap_or(224) as usize,
            patch_size: sub("vision_config", "patch_size").unwrap_or(32) as usize,
            vocab: tok.first().copied().unwrap_or(0),
            max_positions: pos.first().copied().unwrap_or(0),
            eos_token_id: sub("text_config", "eos_token_id").unwrap_or(2) as u32,
            vision,
            text,
        };
        for t in [&config.vision, &config.text] {
            if t.layers == 0 || t.heads == 0 || t.hidden == 0 || !t.hidden.is_multiple_of(t.heads) {
                return Err(data_err(
                    &cfg_path,
                    format!("unusable sizes: {} layers, hidden {} with {} heads", t.layers, t.hidden, t.heads),
                ));
            }
        }
        if config.patch_size == 0 || !config.image_size.is_multiple_of(config.patch_size) {
            return Err(data_err(
                &cfg_path,
                format!("image_size {} is not a multiple of patch_size {}", config.image_size, config.patch_size),
            ));
        }
        let [_, out_h, out_w] = crate::data::images::output_shape(&processor, config.image_size as u32, config.image_size as u32);
        let (crop_h, crop_w) = (processor.crop_size.height as usize, processor.crop_size.width as usize);
        if processor.do_center_crop && (crop_h, crop_w) != (config.image_size, config.image_size)
            || !processor.do_center_crop && (out_h, out_w) != (config.image_size, config.image_size)
        {
            return Err(data_err(
                &pre_path,
                format!("the processor makes {crop_h}x{crop_w} images but the vision tower takes {0}x{0}", config.image_size),
            ));
        }

        let (hv, ht, pd, ps) = (config.vision.hidden, config.text.hidden, config.projection_dim, config.patch_size);
        let n_pos = config.patches() + 1;
        // The convolution kernel (h, 3, p, p) read as (h, 3 p p), transposed to (3 p p, h).
        let patch_w = w.transposed_as("vision_model.embeddings.patch_embedding.weight", &[hv, 3, ps, ps], hv, 3 * ps * ps, dev)?;
        let class = w.get("vision_model.embeddings.class_embedding", &[hv])?;
        let mut vpos = w.get("vision_model.embeddings.position_embedding.weight", &[n_pos, hv])?;
        vpos[..hv].iter_mut().zip(&class).for_each(|(p, c)| *p += c);
        let vis_pos = Tensor::from_vec(vpos, &[n_pos, hv], dev)?;
        let pre_ln = w.layernorm("vision_model.pre_layrnorm", hv, config.vision.eps, dev)?;
        let vis_layers = layers(&w, "vision_model", &config.vision, false, dev)?;
        let post_ln = w.layernorm("vision_model.post_layernorm", hv, config.vision.eps, dev)?;
        let vis_proj = w.transposed("visual_projection.weight", pd, hv, dev)?;

        let tok_emb = w.upload("text_model.embeddings.token_embedding.weight", &[config.vocab, ht], dev)?;
        let txt_pos = w.upload("text_model.embeddings.position_embedding.weight", &[config.max_positions, ht], dev)?;
        let txt_layers = layers(&w, "text_model", &config.text, true, dev)?;
        let final_ln = w.layernorm("text_model.final_layer_norm", ht, config.text.eps, dev)?;
        let txt_proj = w.transposed("text_projection.weight", pd, ht, dev)?;

        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| data_err(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: config.max_positions, ..Default::default() }))
            .map_err(|e| data_err(&tok_path, format!("cannot set truncation to {} tokens: {e}", config.max_positions)))?;
        Ok(Clip {
            config,
            processor,
            dir: dir.to_path_buf(),
            model_hash,
            image_batch: 32,
            text_batch: 256,
            dev,
            tokenizer,
            patch_w,
            vis_pos,
            pre_ln,
            vis_layers,
            post_ln,
            vis_proj,
            tok_emb,
            txt_pos,
            txt_layers,
            final_ln,
            txt_proj,
        })
    }

    pub fn device(&self) -> Device {
        self.dev
    }

    /// Token ids of each text: `<|startoftext|> ... <|endoftext|>`, at most `max_positions`.
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|s| {
                let enc = self.tokenizer.encode(s.as_str(), true).map_err(|e| Error::Invalid(format!("tokenizer failed on {s:?}: {e}")))?;
                let ids = enc.get_ids().to_vec();
                if ids.is_empty() {
                    return Err(Error::Invalid(format!("the tokenizer gives no tokens for {s:?}")));
                }
                if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab) {
                    return Err(Error::Invalid(format!(
                        "tokenizer.json gives id {bad} for {s:?}; the model's vocabulary has {}",
                        self.config.vocab
                    )));
                }
                Ok(ids)
            })
            .collect()
    }

    /// Text embeddings (`projection_dim` each, not normalised) in the order of `texts`.
    pub fn encode_texts(&self, texts: &[String], bar: &ProgressBar) -> Result<Vec<Vec<f32>>> {
        let ids = self.tokenize(texts)?;
        self.encode_ids(&ids, bar)
    }

    /// Text embeddings of tokenized texts (see [`tokenize`](Self::tokenize)).
    pub fn encode_ids(&self, ids: &[Vec<u32>], bar: &ProgressBar) -> Result<Vec<Vec<f32>>> {
        if let Some((i, s)) = ids.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > self.config.max_positions) {
            return Err(Error::Invalid(format!("text {i} has {} tokens; expected 1..={}", s.len(), self.config.max_positions)));
        }
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(self.text_batch.max(1)) {
            out.extend(self.text_forward(chunk)?);
            bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }

    /// Where each text is pooled: the first end-of-text token, or the largest id (see the module docs).
    fn eot_position(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            // The first position of the largest id, as torch's argmax.
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            ids.iter().position(|&i| i == self.config.eos_token_id).unwrap_or(ids.len() - 1)
        }
    }

    fn text_forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let lens: Vec<u32> = batch.iter().map(|s| s.len() as u32).collect();
        let longest = lens.iter().copied().max().unwrap_or(1) as usize;
        let r = Ragged::new(&lens, longest)?;
        let ids = Indices::new(batch.concat());
        let rows: Vec<u32> = batch.iter().zip(&r.offsets).map(|(s, &o)| o + self.eot_position(s) as u32).collect();
        let e = no_grad(|| -> Result<Tensor> {
            let mut x = add(&embedding(&self.tok_emb, &ids, &[r.rows()])?, &embedding(&self.txt_pos, &r.pos, &[r.rows()])?)?;
            let mut seeds = Seeds::new(0);
            for layer in &self.txt_layers {
                x = layer.forward(&x, &r, false, &mut seeds)?;
            }
            let pooled = embedding(&x, &Indices::new(rows), &[batch.len()])?;
            linear(&self.final_ln.forward(&pooled)?, &self.txt_proj, None)
        })?;
        Ok(e.to_vec()?.chunks_exact(self.config.projection_dim).map(<[f32]>::to_vec).collect())
    }

    /// Image embeddings (`projection_dim` each, not normalised) of preprocessed images, each
    /// (3, S, S) as [`crate::data::images::preprocess`] gives them.
    pub fn encode_pixels(&self, pixels: &[Vec<f32>], bar: &ProgressBar) -> Result<Vec<Vec<f32>>> {
        let s = self.config.image_size;
        if let Some((i, p)) = pixels.iter().enumerate().find(|(_, p)| p.len() != 3 * s * s) {
            return Err(Error::Invalid(format!("image {i} has {} values; the vision tower takes 3 x {s} x {s}", p.len())));
        }
        let mut out = Vec::with_capacity(pixels.len());
        for chunk in pixels.chunks(self.image_batch.max(1)) {
            out.extend(self.vision_forward(chunk)?);
            bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }

    /// The rows of the patch product: per image a zero row (the class token) and its P patches.
    fn patch_rows(&self, pixels: &[Vec<f32>]) -> Vec<f32> {
        let (s, p) = (self.config.image_size, self.config.patch_size);
        let g = s / p;
        let k = 3 * p * p;
        let mut rows = vec![0.0f32; pixels.len() * (g * g + 1) * k];
        for (b, img) in pixels.iter().enumerate() {
            for py in 0..g {
                for px in 0..g {
                    let row = &mut rows[(b * (g * g + 1) + 1 + py * g + px) * k..][..k];
                    for c in 0..3 {
                        for y in 0..p {
                            let src = &img[(c * s + py * p + y) * s + px * p..][..p];
                            row[(c * p + y) * p..][..p].copy_from_slice(src);
                        }
                    }
                }
            }
        }
        rows
    }

    fn vision_forward(&self, pixels: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let n = self.config.patches() + 1;
        let b = pixels.len();
        let r = Ragged::new(&vec![n as u32; b], n)?;
        let k = 3 * self.config.patch_size * self.config.patch_size;
        let rows = Tensor::from_vec(self.patch_rows(pixels), &[b * n, k], self.dev)?;
        let class_rows = Indices::new((0..b as u32).map(|i| i * n as u32).collect());
        let e = no_grad(|| -> Result<Tensor> {
            let x = add(&matmul(&rows, &self.patch_w, false, false)?, &embedding(&self.vis_pos, &r.pos, &[r.rows()])?)?;
            let mut x = self.pre_ln.forward(&x)?;
            let mut seeds = Seeds::new(0);
            for layer in &self.vis_layers {
                x = layer.forward(&x, &r, false, &mut seeds)?;
            }
            let cls = embedding(&x, &class_rows, &[b])?;
            linear(&self.post_ln.forward(&cls)?, &self.vis_proj, None)
        })?;
        Ok(e.to_vec()?.chunks_exact(self.config.projection_dim).map(<[f32]>::to_vec).collect())
    }
}

/// Throughput of [`bench`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClipBench {
    pub images: usize,
    pub image_seconds: f64,
    pub texts: usize,
    pub text_seconds: f64,
}

/// Load `dir` on `dev` and time both towers after one warm-up batch: `images` made-up images
/// (already preprocessed) and `texts` short phrases (tokenization included).
pub fn bench(dir: &Path, dev: Device, images: usize, texts: usize) -> Result<ClipBench> {
    let clip = Clip::load(dir, dev)?;
    let s = clip.config.image_size;
    let pixels: Vec<Vec<f32>> =
        (0..images.max(1)).map(|i| (0..3 * s * s).map(|j| ((i * 131 + j * 7) % 255) as f32 / 127.0 - 1.0).collect()).collect();
    const WORDS: [&str; 12] =
        ["stapler", "blue", "paper", "calculator", "ink", "desk", "label", "pen", "office", "printer", "black", "folder"];
    let phrases: Vec<String> = (0..texts.max(1)).map(|i| format!("a photo of a {} {}.", WORDS[i % 12], WORDS[(i * 5 + 1) % 12])).collect();
    let bar = ProgressBar::hidden();
    clip.encode_pixels(&pixels[..pixels.len().min(clip.image_batch)], &bar)?;
    let t0 = std::time::Instant::now();
    clip.encode_pixels(&pixels, &bar)?;
    let image_seconds = t0.elapsed().as_secs_f64();
    clip.encode_texts(&phrases[..phrases.len().min(clip.text_batch)], &bar)?;
    let t0 = std::time::Instant::now();
    clip.encode_texts(&phrases, &bar)?;
    let text_seconds = t0.elapsed().as_secs_f64();
    Ok(ClipBench { images: pixels.len(), image_seconds, texts: phrases.len(), text_seconds })
}
