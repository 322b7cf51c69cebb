//! Layers built from the engine's ops: Linear, LayerNorm, the RecBole/SASRec transformer, the
//! attention-pooling + MoE item encoder of MSM4SR (M²SE), and the pre-training losses.
//!
//! Parameters are plain tensors marked with [`Tensor::param`]; every layer lists them by name with
//! `params()` (the names are the checkpoint's tensor names). Linear weights are stored (in, out).
//! Dropout masks come from [`Seeds`], so a run with the same seed draws the same masks on every device.

use rand::Rng;

use crate::engine::ops::{
    add, add_layernorm, attention_pool, attention_pool_dot, attention_ragged, dropout, dropout_rows, embedding, info_nce, l2norm,
    layernorm, linear, linear_gelu, matmul, moe_adaptor, quick_gelu, scale, MoeWeights,
};
use crate::engine::{Device, Indices, Ragged, Tensor};
use crate::Result;

/// A stream of dropout seeds: one per dropout call, reproducible from the run's seed.
pub struct Seeds(u64);

impl Seeds {
    pub fn new(seed: u64) -> Seeds {
        Seeds(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    pub fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as u32
    }
}

/// The dropout's (p, seed) where it applies (training, p > 0), the seed drawn; else none (and no
/// seed drawn).
fn draw(p: f32, train: bool, seeds: &mut Seeds) -> Option<(f32, u32)> {
    (train && p > 0.0).then(|| (p, seeds.next()))
}

/// Dropout that is the identity outside training.
pub fn drop(x: &Tensor, p: f32, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
    match draw(p, train, seeds) {
        Some((p, seed)) => dropout(x, p, seed),
        None => Ok(x.clone()),
    }
}

/// `drop` for the packed rows of a ragged batch, masks keyed as the padded layout's (see [`Ragged`]).
pub fn drop_rows(x: &Tensor, p: f32, train: bool, seeds: &mut Seeds, r: &Ragged) -> Result<Tensor> {
    match draw(p, train, seeds) {
        Some((p, seed)) => dropout_rows(x, p, seed, &r.keys),
        None => Ok(x.clone()),
    }
}

fn named(prefix: &str, v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)).collect()
}

/// y = x W + b. W (in, out) ~ N(0, 0.02), b = 0.
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn new(din: usize, dout: usize, bias: bool, rng: &mut impl Rng, dev: Device) -> Result<Linear> {
        Ok(Linear {
            w: Tensor::randn(&[din, dout], 0.02, rng, dev)?.param(),
            b: if bias { Some(Tensor::zeros(&[dout], dev)?.param()) } else { None },
        })
    }
    /// x (.., in) -> (.., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("weight".to_string(), self.w.clone())];
        if let Some(b) = &self.b {
            v.push(("bias".into(), b.clone()));
        }
        v
    }
}

/// LayerNorm over the last axis; gamma/beta (C) or (G, C) (one per group of rows, for MoE experts).
pub struct LayerNorm {
    pub g: Tensor,
    pub b: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(shape: &[usize], eps: f32, dev: Device) -> Result<LayerNorm> {
        Ok(LayerNorm { g: Tensor::full(shape, 1.0, dev)?.param(), b: Tensor::zeros(shape, dev)?.param(), eps })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layernorm(x, &self.g, &self.b, self.eps)
    }
    /// LN(a + x), the residual sum and the normalization in one kernel on the GPU.
    pub fn forward_add(&self, a: &Tensor, x: &Tensor) -> Result<Tensor> {
        add_layernorm(a, x, &self.g, &self.b, self.eps)
    }
    pub fn params(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.g.clone()), ("bias".into(), self.b.clone())]
    }
}

/// The feed-forward activation of a [`TransformerLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x Phi(x), the erf form (RecBole, BERT).
    Gelu,
    /// x sigmoid(1.702 x) (OpenAI's CLIP).
    QuickGelu,
}

/// One transformer layer. Post-LN, exactly as RecBole's SASRec (causal) and BERT (bidirectional)
/// write it: a = dropout((softmax(q k^T / sqrt(dh) + mask) -> dropout) v Wo); x1 = LN(a + x);
/// f = dropout(act(x1 W1) W2); out = LN(f + x1). Pre-LN (`pre_ln`, CLIP's order):
/// x1 = x + dropout(Attn(LN1(x)) Wo); out = x1 + dropout(act(LN2(x1) W1) W2).
///
/// It runs on ragged batches: x is (N, C), the packed rows of a [`Ragged`] batch. Linear maps,
/// GELU, residuals and LayerNorm act on the rows; attention stays within each sequence.
/// The tests hold the same layer on a padded (B, L, C) batch (`kernels-tests/padded.rs`) as the
/// reference the ragged path is checked against (the two agree on every valid row, dropout included).
///
/// [`crate::model::bert::SentenceEncoder`] builds its layers from a BERT checkpoint's weights with
/// `causal = false`, the checkpoint's LayerNorm eps and no dropout; [`crate::model::clip::Clip`] builds
/// pre-LN layers (causal in the text tower, bidirectional in the vision tower) with the checkpoint's
/// activation.
pub struct TransformerLayer {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ln1: LayerNorm,
    pub ff1: Linear,
    pub ff2: Linear,
    pub ln2: LayerNorm,
    pub heads: usize,
    pub p_hidden: f32,
    pub p_attn: f32,
    /// Causal attention (SASRec) or bidirectional (BERT).
    pub causal: bool,
    /// LayerNorm before each block (CLIP) instead of after the residual sum (RecBole, BERT).
    pub pre_ln: bool,
    pub act: Activation,
}

impl TransformerLayer {
    /// A causal layer with LayerNorm eps 1e-12 (RecBole's SASRec), weights ~ N(0, 0.02).
    pub fn new(c: usize, inner: usize, heads: usize, p_hidden: f32, p_attn: f32, rng: &mut impl Rng, dev: Device) -> Result<Self> {
        Ok(TransformerLayer {
            q: Linear::new(c, c, true, rng, dev)?,
            k: Linear::new(c, c, true, rng, dev)?,
            v: Linear::new(c, c, true, rng, dev)?,
            o: Linear::new(c, c, true, rng, dev)?,
            ln1: LayerNorm::new(&[c], 1e-12, dev)?,
            ff1: Linear::new(c, inner, true, rng, dev)?,
            ff2: Linear::new(inner, c, true, rng, dev)?,
            ln2: LayerNorm::new(&[c], 1e-12, dev)?,
            heads,
            p_hidden,
            p_attn,
            causal: true,
            pre_ln: false,
            act: Activation::Gelu,
        })
    }

    /// x (N, C) packed by `r` -> (N, C)
    pub fn forward(&self, x: &Tensor, r: &Ragged, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
        let pa = if train { self.p_attn } else { 0.0 };
        let attn_in = if self.pre_ln { self.ln1.forward(x)? } else { x.clone() };
        let (q, k, v) = (self.q.forward(&attn_in)?, self.k.forward(&attn_in)?, self.v.forward(&attn_in)?);
        let ctx = attention_ragged(&q, &k, &v, r, self.heads, pa, seeds.next(), self.causal)?;
        let a = drop_rows(&self.o.forward(&ctx)?, self.p_hidden, train, seeds, r)?;
        if self.pre_ln {
            let x1 = add(x, &a)?;
            let f = drop_rows(&self.ff2.forward(&self.ffn_act(&self.ln2.forward(&x1)?)?)?, self.p_hidden, train, seeds, r)?;
            return add(&x1, &f);
        }
        let x1 = self.ln1.forward_add(&a, x)?;
        let f = drop_rows(&self.ff2.forward(&self.ffn_act(&x1)?)?, self.p_hidden, train, seeds, r)?;
        self.ln2.forward_add(&f, &x1)
    }

    /// act(x W1 + b1); the GELU form is the product's fused epilogue.
    fn ffn_act(&self, x: &Tensor) -> Result<Tensor> {
        match self.act {
            Activation::Gelu => linear_gelu(x, &self.ff1.w, self.ff1.b.as_ref()),
            Activation::QuickGelu => quick_gelu(&self.ff1.forward(x)?),
        }
    }

    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (n, l) in
            [("query", &self.q), ("key", &self.k), ("value", &self.v), ("dense", &self.o), ("ffn1", &self.ff1), ("ffn2", &self.ff2)]
        {
            v.extend(named(n, l.params()));
        }
        v.extend(named("ln1", self.ln1.params()));
        v.extend(named("ln2", self.ln2.params()));
        v
    }
}

/// Learned positions + LayerNorm + dropout + a stack of layers; the output at each sequence's last
/// valid position (sequences are left-aligned).
pub struct Transformer {
    pub pos: Tensor,
    pub ln: LayerNorm,
    pub layers: Vec<TransformerLayer>,
    pub p_hidden: f32,
}

impl Transformer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        max_len: usize,
        c: usize,
        inner: usize,
        layers: usize,
        heads: usize,
        p_hidden: f32,
        p_attn: f32,
        rng: &mut impl Rng,
        dev: Device,
    ) -> Result<Self> {
        Ok(Transformer {
            pos: Tensor::randn(&[max_len, c], 0.02, rng, dev)?.param(),
            ln: LayerNorm::new(&[c], 1e-12, dev)?,
            layers: (0..layers).map(|_| TransformerLayer::new(c, inner, heads, p_hidden, p_attn, rng, dev)).collect::<Result<_>>()?,
            p_hidden,
        })
    }

    /// m (N, C) item representations packed by `r` -> h (B, C), each sequence's last row.
    pub fn forward(&self, m: &Tensor, r: &Ragged, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
        let pos = embedding(&self.pos, &r.pos, &[r.rows()])?;
        let mut x = drop_rows(&self.ln.forward_add(m, &pos)?, self.p_hidden, train, seeds, r)?;
        for layer in &self.layers {
            x = layer.forward(&x, r, train, seeds)?;
        }
        embedding(&x, &r.last, &[r.batch()])
    }

    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("position".to_string(), self.pos.clone())];
        v.extend(named("ln", self.ln.params()));
        for (i, l) in self.layers.iter().enumerate() {
            v.extend(named(&format!("layer{i}"), l.params()));
        }
        v
    }
}

/// Attention pooling over an item's sentence (or image) vectors (paper eq. 3):
/// a = (x W1 + b1) W2 + b2, alpha = softmax over valid rows, e = sum alpha x.
///
/// There is no activation between the two maps, so a = x (W1 W2) + (b1 W2 + b2): one d-vector
/// w = W1 W2 per modality instead of a (rows, d) x (d, 64) product over every sentence row, and
/// `attention_pool_dot` makes the energies x w as it reads each item's rows for the pooling. The
/// constant b1 W2 + b2 is the same for every row of an item and cancels in the softmax, so it is
/// dropped: the energies differ from the direct form by that constant only, alpha and e not at
/// all, and b1, b2 get exactly zero gradient (they stay parameters, saved in checkpoints). With
/// g_j = dL/da_j and dw = sum_j x_j^T g_j the tape gives dW1 = dw W2^T, dW2 = W1^T dw.
/// `forward_direct` is the textbook form, kept as the reference.
pub struct AttentionPool {
    pub w1: Linear,
    pub w2: Linear,
}

impl AttentionPool {
    pub fn new(d: usize, hidden: usize, rng: &mut impl Rng, dev: Device) -> Result<Self> {
        Ok(AttentionPool { w1: Linear::new(d, hidden, true, rng, dev)?, w2: Linear::new(hidden, 1, true, rng, dev)? })
    }
    /// x (N, S, d), lens (N) -> e (N, d); with `items` (N), x is a table (M, S, d) whose rows
    /// `items` are pooled (read in place, not copied).
    pub fn forward(&self, x: &Tensor, items: Option<&Indices>, lens: &Indices) -> Result<Tensor> {
        let w = matmul(&self.w1.w, &self.w2.w, false, false)?; // (d, 1)
        attention_pool_dot(x, &w, lens, items)
    }

    /// The direct form a = (x W1 + b1) W2 + b2 (same e; see the type's docs).
    pub fn forward_direct(&self, x: &Tensor, lens: &Indices) -> Result<Tensor> {
        let (n, s) = (x.shape()[0], x.shape()[1]);
        let a = self.w2.forward(&self.w1.forward(x)?)?.reshape(&[n, s])?;
        attention_pool(&a, x, lens)
    }
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = named("w1", self.w1.params());
        v.extend(named("w2", self.w2.params()));
        v
    }
}

/// Mixture-of-experts adaptor (paper eq. 4-5): expert k = LN_k(dropout(e W_k + b_k)), gate
/// g = softmax(e W3) with W3 initialised to zeros, z = sum_k g_k E_k.
pub struct MoeAdaptor {
    pub experts: Linear,
    pub ln: LayerNorm,
    pub gate: Tensor,
    pub n_experts: usize,
    pub d0: usize,
    pub p: f32,
}

impl MoeAdaptor {
    pub fn new(d: usize, d0: usize, n_experts: usize, p: f32, rng: &mut impl Rng, dev: Device) -> Result<Self> {
        Ok(MoeAdaptor {
            experts: Linear::new(d, n_experts * d0, true, rng, dev)?,
            ln: LayerNorm::new(&[n_experts, d0], 1e-12, dev)?,
            gate: Tensor::zeros(&[d, n_experts], dev)?.param(),
            n_experts,
            d0,
            p,
        })
    }
    /// e (N, d) -> z (N, d0)
    pub fn forward(&self, e: &Tensor, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
        let b = self.experts.b.as_ref().ok_or_else(|| crate::engine::Error::Invalid("the MoE adaptor's experts need a bias".into()))?;
        let wt = MoeWeights { w: &self.experts.w, b, gate: &self.gate, gamma: &self.ln.g, beta: &self.ln.b };
        moe_adaptor(e, &wt, self.ln.eps, draw(self.p, train, seeds))
    }
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = named("experts", self.experts.params());
        v.extend(named("ln", self.ln.params()));
        v.push(("gate".into(), self.gate.clone()));
        v
    }
}

/// One modality's item encoder: attention pooling then the MoE adaptor.
pub struct ItemEncoder {
    pub pool: AttentionPool,
    pub moe: MoeAdaptor,
}

impl ItemEncoder {
    pub fn new(d: usize, d0: usize, n_experts: usize, p: f32, rng: &mut impl Rng, dev: Device) -> Result<Self> {
        Ok(ItemEncoder { pool: AttentionPool::new(d, 64, rng, dev)?, moe: MoeAdaptor::new(d, d0, n_experts, p, rng, dev)? })
    }
    /// x (N, S, d), lens (N) -> z (N, d0); `items` as in [`AttentionPool::forward`].
    pub fn forward(&self, x: &Tensor, items: Option<&Indices>, lens: &Indices, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
        self.moe.forward(&self.pool.forward(x, items, lens)?, train, seeds)
    }
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v = named("pool", self.pool.params());
        v.extend(named("moe", self.moe.params()));
        v
    }
}

/// Cosine similarities: a (B, D), b (B2, D) -> (B, B2).
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul(&l2norm(a, 1e-12)?, &l2norm(b, 1e-12)?, false, true)
}

/// NIP (paper eq. 7) as a batch mean: both views of each sequence against every target's encoding,
/// same-target negatives removed.  m_hat, m_til (B, D), z (B, D) targets' encodings.
pub fn nip_loss(m_hat: &Tensor, m_til: &Tensor, z: &Tensor, targets: &Indices, tau: f32) -> Result<Tensor> {
    info_nce(&[&cosine(m_hat, z)?, &cosine(m_til, z)?], targets, &[true, true], &[false, false], 1.0 / tau)
}

/// One direction of CMCL (eq. 9): l(a, b) with inter-view (a_j, b_j') and intra-view (a_j, a_j')
/// negatives; returns the batch mean of -l.
fn cmcl_dir(a: &Tensor, b: &Tensor, targets: &Indices, tau: f32) -> Result<Tensor> {
    info_nce(&[&cosine(a, b)?, &cosine(a, a)?], targets, &[true, false], &[false, true], 1.0 / tau)
}

/// Symmetric CMCL (eq. 9-10) as a batch mean: (l(a, b) + l(b, a)) / 2.
pub fn cmcl_loss(a: &Tensor, b: &Tensor, targets: &Indices, tau: f32) -> Result<Tensor> {
    scale(&add(&cmcl_dir(a, b, targets, tau)?, &cmcl_dir(b, a, targets, tau)?)?, 0.5)
}

/// NIP with one view (the `--no-heads` form): h (B, D) against the targets' encodings z (B, D).
pub fn nip_single(h: &Tensor, z: &Tensor, targets: &Indices, tau: f32) -> Result<Tensor> {
    info_nce(&[&cosine(h, z)?], targets, &[true], &[false], 1.0 / tau)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::AttentionPool;
    use crate::engine::ops::{mul, sum};
    use crate::engine::{backward, Device, Indices, Tensor};

    fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
        let (a, b) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
        a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol * y.abs().max(1.0))
    }

    /// The one-vector energies give the direct form's pooled vectors and weight gradients, and
    /// zero gradient to the biases (the direct form's bias gradients are zero up to rounding).
    #[test]
    fn pooling_energies_in_one_vector_equal_the_direct_form() {
        let dev = Device::Cpu64;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let pool = AttentionPool::new(12, 5, &mut rng, dev).unwrap();
        // Non-zero biases, and weights large enough that the softmax is far from uniform.
        for (t, s) in [(&pool.w1.w, 1.0), (&pool.w2.w, 1.0), (pool.w1.b.as_ref().unwrap(), 0.7), (pool.w2.b.as_ref().unwrap(), 0.7)] {
            t.assign(&Tensor::randn(t.shape(), s, &mut rng, dev).unwrap()).unwrap();
        }
        let x = Tensor::randn(&[4, 3, 12], 1.0, &mut rng, dev).unwrap();
        let lens = Indices::new(vec![3, 1, 2, 3]);
        let w = Tensor::randn(&[4, 12], 1.0, &mut rng, dev).unwrap();
        let (e_fast, e_direct) = (pool.forward(&x, None, &lens).unwrap(), pool.forward_direct(&x, &lens).unwrap());
        assert!(close(&e_fast, &e_direct, 1e-12));
        let g_fast = backward(&sum(&mul(&e_fast, &w).unwrap()).unwrap()).unwrap();
        let g_direct = backward(&sum(&mul(&e_direct, &w).unwrap()).unwrap()).unwrap();
        for p in [&pool.w1.w, &pool.w2.w] {
            assert!(close(g_fast.get(p).unwrap(), g_direct.get(p).unwrap(), 1e-10));
        }
        for b in [pool.w1.b.as_ref().unwrap(), pool.w2.b.as_ref().unwrap()] {
            assert!(g_fast.get(b).is_none(), "a bias has a gradient in the one-vector form");
            assert!(g_direct.get(b).unwrap().to_vec_f64().unwrap().iter().all(|v| v.abs() < 1e-12));
        }
    }
}
