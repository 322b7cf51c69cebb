//! The padded reference layout. The product runs a batch's sequences packed into their real rows
//! (`Ragged`); PyTorch (RecBole's SASRec, BERT) runs them padded to (B, L, C) with a key mask. This
//! file keeps that padded form beside the product, as the reference it is checked against: a
//! padded attention written plainly (an op of its own through the engine's public op contract,
//! CPU only), the transformer layer and encoder on padded batches, and the test that the packed
//! path gives the same outputs and gradients on every device, dropout masks included.
//! `fixtures.rs` checks the padded form itself against PyTorch.

use msm4sr::engine::op::{apply, run, Backward, Op};
use msm4sr::engine::ops::elementwise::rand01;
use msm4sr::engine::ops::{add, embedding, gelu, mul, sum};
use msm4sr::engine::{backward, gpu::GpuBuf, Device, Error, Indices, Ragged, Real, Tensor};
use msm4sr::model::nn::{drop, Seeds, Transformer, TransformerLayer};
use msm4sr::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Multi-head attention of q, k, v (B, L, C) over the keys j < lens[b] (and j <= i when causal):
/// s = q_h k_h^T / sqrt(dh) on those keys, P = softmax(s) (a sequence of length 0 attends over
/// all L keys), P' = P * keep / (1 - p) with keep = rand01(seed, flat (B, heads, L, L) index) >= p,
/// out_h = P' v_h. Outputs out and P (B, heads, L, L); the backward form gives (dq, dk, dv) over
/// [q, k, v, P, g].
#[derive(Clone)]
pub struct PaddedAttention {
    pub lens: Indices,
    pub b: usize,
    pub l: usize,
    pub heads: usize,
    pub dh: usize,
    pub p: f32,
    pub seed: u32,
    pub causal: bool,
    pub backward: bool,
}

impl PaddedAttention {
    fn c(&self) -> usize {
        self.heads * self.dh
    }
    /// Keys query i of sequence b attends over.
    fn valid(&self, b: usize, i: usize) -> usize {
        let len = self.lens.host()[b] as usize;
        match if self.causal { (i + 1).min(len) } else { len } {
            0 => self.l,
            n => n,
        }
    }
    fn keep<T: Real>(&self, idx: usize) -> T {
        if self.p == 0.0 {
            T::one()
        } else if rand01(self.seed, idx as u32) >= self.p {
            T::c(1.0 / (1.0 - self.p as f64))
        } else {
            T::zero()
        }
    }
}

impl Op for PaddedAttention {
    fn name(&self) -> &'static str {
        "padded_attention"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let x = vec![self.b, self.l, self.c()];
        match self.backward {
            false => vec![x, vec![self.b, self.heads, self.l, self.l]],
            true => vec![x.clone(), x.clone(), x],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (l, c, dh, heads) = (self.l, self.c(), self.dh, self.heads);
        let scale = T::c(1.0 / (dh as f64).sqrt());
        let at = |b: usize, i: usize, h: usize| (b * l + i) * c + h * dh;
        let dot = |a: &[T], b: &[T]| a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y);
        if !self.backward {
            let (q, k, v) = (x[0], x[1], x[2]);
            let (mut out, mut probs) = (vec![T::zero(); self.b * l * c], vec![T::zero(); self.b * heads * l * l]);
            for b in 0..self.b {
                for h in 0..heads {
                    for i in 0..l {
                        let n = self.valid(b, i);
                        let row = ((b * heads + h) * l + i) * l;
                        let qi = &q[at(b, i, h)..at(b, i, h) + dh];
                        let s: Vec<T> = (0..n).map(|j| dot(qi, &k[at(b, j, h)..at(b, j, h) + dh]) * scale).collect();
                        let mx = s.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                        let e: Vec<T> = s.iter().map(|&x| (x - mx).exp()).collect();
                        let z = e.iter().fold(T::zero(), |a, &x| a + x);
                        for j in 0..n {
                            let pj = e[j] / z;
                            probs[row + j] = pj;
                            let w = pj * self.keep::<T>(row + j);
                            for d in 0..dh {
                                out[at(b, i, h) + d] += w * v[at(b, j, h) + d];
                            }
                        }
                    }
                }
            }
            return Ok(vec![out, probs]);
        }
        let (q, k, v, probs, dout) = (x[0], x[1], x[2], x[3], x[4]);
        let (mut dq, mut dk, mut dv) = (vec![T::zero(); q.len()], vec![T::zero(); q.len()], vec![T::zero(); q.len()]);
        for b in 0..self.b {
            for h in 0..heads {
                for i in 0..l {
                    let n = self.valid(b, i);
                    let row = ((b * heads + h) * l + i) * l;
                    let (qo, p) = (at(b, i, h), &probs[row..row + n]);
                    let dpk: Vec<T> =
                        (0..n).map(|j| dot(&dout[qo..qo + dh], &v[at(b, j, h)..at(b, j, h) + dh]) * self.keep::<T>(row + j)).collect();
                    let t = (0..n).fold(T::zero(), |a, j| a + dpk[j] * p[j]);
                    for j in 0..n {
                        let ds = p[j] * (dpk[j] - t) * scale;
                        let w = p[j] * self.keep::<T>(row + j);
                        let ko = at(b, j, h);
                        for d in 0..dh {
                            dq[qo + d] += ds * k[ko + d];
                            dk[ko + d] += ds * q[qo + d];
                            dv[ko + d] += w * dout[qo + d];
                        }
                    }
                }
            }
        }
        Ok(vec![dq, dk, dv])
    }
    fn gpu(&self, _: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Err(Error::Device("the padded reference attention runs on the CPU backends".into()))
    }
}

impl Backward for PaddedAttention {
    type Saved = ([Tensor; 4], PaddedAttention);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        ([x[0].detach(), x[1].detach(), x[2].detach(), out.remove(1)], PaddedAttention { backward: true, ..self })
    }
    fn backward(([q, k, v, probs], op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(run(op, &[q, k, v, probs, g])?.into_iter().map(Some).collect())
    }
}

/// `PaddedAttention` of q, k, v (B, L, C).
#[allow(clippy::too_many_arguments)]
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, lens: &Indices, heads: usize, p: f32, seed: u32, causal: bool) -> Result<Tensor> {
    let [b, l, c] = *q.shape() else { panic!("q {:?} must be (B, L, C)", q.shape()) };
    apply(PaddedAttention { lens: lens.clone(), b, l, heads, dh: c / heads, p, seed, causal, backward: false }, &[q, k, v])
}

/// Each sequence's last real row: x (B, L, C), lens (B) in 1..=L -> (B, C).
pub fn gather_last(x: &Tensor, lens: &Indices) -> Result<Tensor> {
    let [b, l, c] = *x.shape() else { panic!("x {:?} must be (B, L, C)", x.shape()) };
    let rows: Vec<u32> = lens.host().iter().enumerate().map(|(i, &n)| (i * l) as u32 + n - 1).collect();
    embedding(&x.reshape(&[b * l, c])?, &Indices::new(rows), &[b])
}

/// A post-LN transformer layer (RecBole's SASRec, BERT) on a padded batch x (B, L, C), the seeds
/// drawn in the order the packed layer draws them.
pub fn layer(t: &TransformerLayer, x: &Tensor, lens: &Indices, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
    assert!(!t.pre_ln, "the padded reference is the post-LN layer");
    let pa = if train { t.p_attn } else { 0.0 };
    let (q, k, v) = (t.q.forward(x)?, t.k.forward(x)?, t.v.forward(x)?);
    let ctx = attention(&q, &k, &v, lens, t.heads, pa, seeds.next(), t.causal)?;
    let a = drop(&t.o.forward(&ctx)?, t.p_hidden, train, seeds)?;
    let x1 = t.ln1.forward(&add(&a, x)?)?;
    let f = drop(&t.ff2.forward(&gelu(&t.ff1.forward(&x1)?)?)?, t.p_hidden, train, seeds)?;
    t.ln2.forward(&add(&f, &x1)?)
}

/// The encoder on a padded batch: m (B, L, C), lens (B) in 1..=L -> h (B, C).
pub fn transformer(t: &Transformer, m: &Tensor, lens: &Indices, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
    let l = m.shape()[1];
    let pos = embedding(&t.pos, &Indices::new((0..l as u32).collect()), &[l])?;
    let mut x = drop(&t.ln.forward(&add(m, &pos)?)?, t.p_hidden, train, seeds)?;
    for lay in &t.layers {
        x = layer(lay, &x, lens, train, seeds)?;
    }
    gather_last(&x, lens)
}

/// allclose: |got - want| <= atol + rtol |want| everywhere; the largest excess otherwise.
fn close(got: &[f64], want: &[f64], rtol: f64, atol: f64) -> std::result::Result<(), String> {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > atol + rtol * w.abs() || !g.is_finite() {
            return Err(format!("element {i}: {g} vs {w}"));
        }
    }
    Ok(())
}

/// Output and every gradient (the encoder's parameters, then the input) of sum(h * w).
fn outputs(t: &Transformer, m: &Tensor, w: &Tensor, h: &Tensor) -> Vec<(String, Vec<f64>)> {
    let grads = backward(&sum(&mul(h, w).unwrap()).unwrap()).unwrap();
    let mut out = vec![("h".to_string(), h.to_vec_f64().unwrap())];
    for (n, p) in t.params().into_iter().chain([("input".to_string(), m.clone())]) {
        out.push((format!("d {n}"), grads.get(&p).map(|g| g.to_vec_f64().unwrap()).unwrap_or_default()));
    }
    out
}

/// The packed encoder (causal and bidirectional, dropout off and on, two layers) on every device
/// against the padded reference in f64: the same sequence vectors and the same gradients of every
/// parameter and of the input rows.
#[test]
fn packed_batches_match_the_padded_reference() {
    let (lens, l, c) = (vec![6u32, 1, 3, 5], 6, 8);
    let b = lens.len();
    let r = Ragged::new(&lens, l).unwrap();
    let rows = Indices::new(r.pack(&(0..(b * l) as u32).collect::<Vec<_>>(), l));
    let make = |dev: Device, p: f32, causal: bool| {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut t = Transformer::new(l, c, 16, 2, 2, p, p, &mut rng, dev).unwrap();
        t.layers.iter_mut().for_each(|lay| lay.causal = causal);
        // Non-trivial LayerNorm parameters, so their gradients are checked at a general point.
        for ln in t.layers.iter().flat_map(|lay| [&lay.ln1, &lay.ln2]).chain([&t.ln]) {
            ln.g.assign(&Tensor::uniform(&[c], 1.0, &mut rng, dev).unwrap()).unwrap();
            ln.b.assign(&Tensor::uniform(&[c], 0.5, &mut rng, dev).unwrap()).unwrap();
        }
        let m = Tensor::randn(&[b, l, c], 1.0, &mut rng, dev).unwrap().param();
        let w = Tensor::randn(&[b, c], 1.0, &mut rng, dev).unwrap();
        (t, m, w)
    };
    let lens_i = Indices::new(lens.clone());
    for causal in [true, false] {
        for p in [0.0, 0.2] {
            let (t, m, w) = make(Device::Cpu64, p, causal);
            let h = transformer(&t, &m, &lens_i, true, &mut Seeds::new(3)).unwrap();
            let want = outputs(&t, &m, &w, &h);
            for (dev, rtol, atol) in [(Device::Cpu64, 1e-10, 1e-12), (Device::Cpu, 1e-4, 1e-5), (Device::Gpu, 1e-4, 1e-5)] {
                let (t, m, w) = make(dev, p, causal);
                let packed = embedding(&m.reshape(&[b * l, c]).unwrap(), &rows, &[r.rows()]).unwrap();
                let h = t.forward(&packed, &r, true, &mut Seeds::new(3)).unwrap();
                for ((n, got), (_, want)) in outputs(&t, &m, &w, &h).iter().zip(&want) {
                    if let Err(e) = close(got, want, rtol, atol) {
                        panic!("causal {causal} dropout {p} {dev:?}: {n} differs from the padded reference at {e}");
                    }
                }
            }
        }
    }
}
