//! Multi-head self-attention over a ragged batch: causal as in RecBole's SASRec, or bidirectional
//! (every key of the sequence) as in BERT, with attention dropout.
//!
//! - `attention_ragged(q, k, v, r, heads, p, seed, causal)`: q, k, v (N, C) packed by a [`Ragged`]
//!   batch (sequence b owns rows offsets[b] .. offsets[b + 1], n_b of them) -> out (N, C),
//!   C = heads * dh; head h uses channels [h*dh, (h+1)*dh). Query i of sequence b attends over its
//!   keys j <= i (causal) or j < n_b; no padding, so no mask:
//!   s[h,i,j] = q_h[i] . k_h[j] / sqrt(dh); P = softmax_j(s); P' = dropout(P) (kept when
//!   rand01(seed, key) >= p, scaled by 1/(1-p)); out[i, h*dh+c] = sum_j P'[i,j] v[j, h*dh+c].
//!   The dropout key of (b, h, i, j) is ((b * heads + h) * key_len + i) * key_len + j, the flat
//!   index of a padded (B, heads, key_len, key_len) P: a padded batch of width key_len (PyTorch's
//!   layout, kept as the tests' reference in `kernels-tests/padded.rs`) draws the same masks.
//!   Backward: dP' = dO V^T, dP = keep * dP' / (1-p), dS = P * (dP - sum_j dP * P),
//!   dq = dS K / sqrt(dh), dk = dS^T Q / sqrt(dh), dv = P'^T dO.
//!   P is saved per sequence as a (heads, n_b, n_b) block, and only when a gradient is needed.
//!
//! GPU: the kernels (`attention_ragged.wgsl`) run one workgroup per (row, head), finding the row's
//! sequence through a packed index (offsets, P-block starts, sequence of each row): the forward
//! (scores, softmax, dropout, P'V), then for the backward one pass over query rows (dS and dq) and
//! one over key columns (dk and dv). A row of P lives in workgroup memory, so the GPU path takes
//! sequences of at most 1024.

use super::elementwise::{pcg, rand01_hashed};
use super::wgsl;
use crate::cpu::{dot, par, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::op::{apply, records, run, Backward, Op};
use crate::ragged::Ragged;
use crate::tensor::{same_device, Tensor};

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![RAGGED_FWD.contract(), RAGGED_BWD_ROWS.contract(), RAGGED_BWD_COLS.contract()]
}

/// Longest sequence the GPU kernels take (a row of P is held in workgroup memory).
pub const MAX_LEN_GPU: usize = 1024;

// ---- CPU references -------------------------------------------------------------------------

/// Dropout factors of the attention probabilities, with the seed's hash computed once.
struct Keep<T> {
    p: f32,
    hashed_seed: u32,
    inv: T,
}

impl<T: Real> Keep<T> {
    fn new(d: &RaggedDims) -> Self {
        Keep { p: d.p, hashed_seed: pcg(d.seed), inv: T::c(1.0 / (1.0 - d.p as f64)) }
    }

    /// `kp[j]` = the factor of key index `base + j` (see [`RaggedDims::key`]): 0 or 1/(1-p) (1
    /// without dropout). The keys of a row are consecutive, so the hashes of a row vectorize.
    #[inline]
    fn row(&self, kp: &mut [T], base: usize) {
        if self.p == 0.0 {
            kp.fill(T::one());
            return;
        }
        let (p, hs, inv, base) = (self.p, self.hashed_seed, self.inv, base as u32);
        for (j, k) in kp.iter_mut().enumerate() {
            *k = if rand01_hashed(hs, base.wrapping_add(j as u32)) >= p { inv } else { T::zero() };
        }
    }
}

/// One query row of one head: key j's channels start at
/// `kbase + j * c` in k and v, j < pr.len(). Writes P (before dropout) into `pr` and adds
/// sum_j kp_j P_j v_j into `or` (kp: the row's dropout factors, [`Keep::row`]).
#[allow(clippy::too_many_arguments)]
#[inline]
fn attend_row<T: Real>(qr: &[T], k: &[T], v: &[T], kbase: usize, c: usize, scale: T, pr: &mut [T], or: &mut [T], kp: &[T]) {
    let dh = qr.len();
    for (j, s) in pr.iter_mut().enumerate() {
        let ko = kbase + j * c;
        *s = dot(qr, &k[ko..ko + dh]) * scale;
    }
    let mx = pr.iter().fold(T::neg_infinity(), |m, &s| m.max(s));
    let mut sum = T::zero();
    for s in pr.iter_mut() {
        *s = (*s - mx).fexp();
        sum += *s;
    }
    for (j, pj) in pr.iter_mut().enumerate() {
        *pj /= sum;
        let pd = *pj * kp[j];
        let vo = kbase + j * c;
        for (o, &y) in or.iter_mut().zip(&v[vo..vo + dh]) {
            *o += pd * y;
        }
    }
}

/// Backward of one query row (see `attend_row`): from its P row `prow` (j < prow.len()), its dropout
/// factors `kp` ([`Keep::row`]) and dO row `dor`, dP = kp * dO V^T, dS = P * (dP - sum_j dP * P);
/// adds dS K * scale into `dqr`, and into the sequence's dk / dv blocks at `lbase + j * c`:
/// scale * dS_j q and P'_j dO. `ds` is a scratch row at least prow.len() long.
#[allow(clippy::too_many_arguments)]
#[inline]
fn attend_row_bwd<T: Real>(
    (qr, dor): (&[T], &[T]),
    (k, v): (&[T], &[T]),
    (kbase, lbase, c): (usize, usize, usize),
    scale: T,
    (prow, kp): (&[T], &[T]),
    ds: &mut [T],
    dqr: &mut [T],
    (dkb, dvb): (&mut [T], &mut [T]),
) {
    let (dh, n) = (qr.len(), prow.len());
    let mut t = T::zero();
    for j in 0..n {
        let vo = kbase + j * c;
        let dp = dot(dor, &v[vo..vo + dh]);
        ds[j] = dp * kp[j];
        t += ds[j] * prow[j];
    }
    for j in 0..n {
        let p = prow[j];
        let s = p * (ds[j] - t) * scale;
        let pd = p * kp[j];
        let (ko, lo) = (kbase + j * c, lbase + j * c);
        for (o, &y) in dqr.iter_mut().zip(&k[ko..ko + dh]) {
            *o += s * y;
        }
        for (o, &y) in dkb[lo..lo + dh].iter_mut().zip(qr) {
            *o += s * y;
        }
        for (o, &y) in dvb[lo..lo + dh].iter_mut().zip(dor) {
            *o += pd * y;
        }
    }
}

/// Sizes of a ragged attention; the sequences' layout is the [`Ragged`] passed beside it.
#[derive(Clone, Copy, Debug)]
pub struct RaggedDims {
    pub heads: usize,
    pub dh: usize,
    pub p: f32,
    pub seed: u32,
    pub causal: bool,
    /// Padded width the dropout keys refer to (see [`Ragged`]).
    pub key_len: usize,
}

impl RaggedDims {
    pub fn c(&self) -> usize {
        self.heads * self.dh
    }
    /// Dropout key of (sequence b, head h, query i, key j): its flat (B, heads, key_len, key_len) index.
    pub fn key(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        ((b * self.heads + h) * self.key_len + i) * self.key_len + j
    }
}

/// Scratch rows of a sequence up to this many values stay on the stack (no allocation and free
/// per sequence and head pass: 4,096 of each per SASRec step, 0.5-0.6% of its one-core profile).
const SCRATCH: usize = 128;

/// `len` zeroed values: the start of `stack`, or `heap` grown to them when longer.
fn scratch<'a, T: Real>(stack: &'a mut [T; SCRATCH], heap: &'a mut Vec<T>, len: usize) -> &'a mut [T] {
    if len <= SCRATCH {
        return &mut stack[..len];
    }
    heap.resize(len, T::zero());
    heap
}

/// Ragged forward: q, k, v (N, C) packed by `r` -> (out (N, C), P) with P the probabilities before
/// dropout, sequence b's block (heads, n_b, n_b) at heads * r.pblock(b) (row i holds keys j < n_b,
/// zero past the valid ones); P is empty unless `save`. Sequences in parallel.
pub fn attention_ragged_cpu<T: Real>(q: &[T], k: &[T], v: &[T], r: &Ragged, d: RaggedDims, save: bool) -> (Vec<T>, Vec<T>) {
    let (dh, c, heads) = (d.dh, d.c(), d.heads);
    let scale = T::c(1.0 / (dh as f64).sqrt());
    let keep = Keep::<T>::new(&d);
    let oo: Vec<usize> = r.offsets.iter().map(|&o| o as usize * c).collect();
    let po: Vec<usize> =
        if save { (0..=r.batch()).map(|b| heads * if b < r.batch() { r.pblock(b) } else { r.pairs() }).collect() } else { vec![] };
    let work = 2 * heads * dh * r.pairs() / r.batch().max(1) + c;
    let (offs, lens) = (&r.offsets[..], &r.lens[..]);
    let (out, probs, _) = par::segs3::<T, T, u8>(r.batch(), work, (&oo, &po, &[]), |b, ob, pb, _| {
        let (o, n) = (offs[b] as usize, lens[b] as usize);
        // The row's dropout factors, then (when P is not saved) the row of P.
        let (mut stack, mut heap) = ([T::zero(); SCRATCH], Vec::new());
        let (kp, unsaved) = scratch(&mut stack, &mut heap, if save { n } else { 2 * n }).split_at_mut(n);
        for h in 0..heads {
            for i in 0..n {
                let nk = if d.causal { i + 1 } else { n };
                let pr = if save { &mut pb[(h * n + i) * n..(h * n + i) * n + nk] } else { &mut unsaved[..nk] };
                let qo = (o + i) * c + h * dh;
                let or = &mut ob[i * c + h * dh..i * c + (h + 1) * dh];
                keep.row(&mut kp[..nk], d.key(b, h, i, 0));
                attend_row(&q[qo..qo + dh], k, v, o * c + h * dh, c, scale, pr, or, &kp[..nk]);
            }
        }
    });
    (out, probs)
}

/// Ragged backward: (dq, dk, dv), each (N, C), from the saved P. Sequences in parallel.
pub fn attention_ragged_bwd_cpu<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    r: &Ragged,
    probs: &[T],
    dout: &[T],
    d: RaggedDims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (dh, c, heads) = (d.dh, d.c(), d.heads);
    let scale = T::c(1.0 / (dh as f64).sqrt());
    let keep = Keep::<T>::new(&d);
    let oo: Vec<usize> = r.offsets.iter().map(|&o| o as usize * c).collect();
    let work = 4 * heads * dh * r.pairs() / r.batch().max(1) + c;
    let (offs, lens) = (&r.offsets[..], &r.lens[..]);
    let pblocks: Vec<usize> = (0..r.batch()).map(|b| r.pblock(b)).collect();
    par::segs3(r.batch(), work, (&oo, &oo, &oo), |b, dqb, dkb, dvb| {
        let (o, n) = (offs[b] as usize, lens[b] as usize);
        let pbase = heads * pblocks[b];
        let (mut stack, mut heap) = ([T::zero(); SCRATCH], Vec::new());
        let (ds, kp) = scratch(&mut stack, &mut heap, 2 * n).split_at_mut(n);
        for h in 0..heads {
            for i in 0..n {
                let nk = if d.causal { i + 1 } else { n };
                let qo = (o + i) * c + h * dh;
                let prow = &probs[pbase + (h * n + i) * n..pbase + (h * n + i) * n + nk];
                let dqr = &mut dqb[i * c + h * dh..i * c + (h + 1) * dh];
                keep.row(&mut kp[..nk], d.key(b, h, i, 0));
                attend_row_bwd(
                    (&q[qo..qo + dh], &dout[qo..qo + dh]),
                    (k, v),
                    (o * c + h * dh, h * dh, c),
                    scale,
                    (prow, &kp[..nk]),
                    ds,
                    dqr,
                    (&mut *dkb, &mut *dvb),
                );
            }
        }
    })
}

// ---- GPU ------------------------------------------------------------------------------------

const SRC_RAGGED: &str = wgsl!("attention_ragged.wgsl");
static RAGGED_FWD: Kernel<RaggedParams> =
    Kernel::new("attention_ragged", SRC_RAGGED, "attn_ragged_fwd", &[Read, Read, Read, Read, ReadWrite, ReadWrite]);
static RAGGED_BWD_ROWS: Kernel<RaggedParams> =
    Kernel::new("attention_ragged", SRC_RAGGED, "attn_ragged_bwd_rows", &[Read, Read, Read, Read, Read, ReadWrite, ReadWrite]);
static RAGGED_BWD_COLS: Kernel<RaggedParams> =
    Kernel::new("attention_ragged", SRC_RAGGED, "attn_ragged_bwd_cols", &[Read, Read, Read, Read, Read, ReadWrite, ReadWrite]);

kernel_params! {
    /// `struct P` of attention_ragged.wgsl (every kernel).
    struct RaggedParams {
        /// B
        batch: u32,
        /// N, the packed rows.
        rows: u32,
        heads: u32,
        dh: u32,
        /// 1 / sqrt(dh)
        scale: f32,
        /// Dropout probability.
        p: f32,
        /// 1 / (1 - p)
        inv_keep: f32,
        seed: u32,
        /// 1: key j <= query i only.
        causal: u32,
        /// Padded width of the dropout keys.
        key_len: u32,
        /// Forward: 1 to write P.
        save: u32,
    }
}

impl RaggedParams {
    fn new(r: &Ragged, d: RaggedDims, save: bool) -> RaggedParams {
        RaggedParams {
            batch: r.batch() as u32,
            rows: r.rows() as u32,
            heads: d.heads as u32,
            dh: d.dh as u32,
            scale: (1.0 / (d.dh as f64).sqrt()) as f32,
            p: d.p,
            inv_keep: (1.0 / (1.0 - d.p as f64)) as f32,
            seed: d.seed,
            causal: d.causal as u32,
            key_len: d.key_len as u32,
            save: save as u32,
        }
    }
}

fn attention_ragged_gpu(q: &GpuBuf, k: &GpuBuf, v: &GpuBuf, r: &Ragged, d: RaggedDims, save: bool) -> Result<(GpuBuf, Option<GpuBuf>)> {
    let g = gpu()?;
    let out = g.alloc(4 * (r.rows() * d.c()) as u64)?;
    let probs = g.alloc(4 * if save { d.heads * r.pairs() } else { 1 } as u64)?;
    let prm = RaggedParams::new(r, d, save);
    g.dispatch(&RAGGED_FWD, &[r.meta.gpu()?, q, k, v, &out, &probs], &prm, row_groups(r.rows() * d.heads))?;
    Ok((out, save.then_some(probs)))
}

fn attention_ragged_bwd_gpu(
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    r: &Ragged,
    probs: &GpuBuf,
    dout: &GpuBuf,
    d: RaggedDims,
) -> Result<(GpuBuf, GpuBuf, GpuBuf)> {
    let g = gpu()?;
    let n = 4 * (r.rows() * d.c()) as u64;
    let ds = g.alloc(4 * (d.heads * r.pairs()) as u64)?;
    let (dq, dk, dv) = (g.alloc(n)?, g.alloc(n)?, g.alloc(n)?);
    let prm = RaggedParams::new(r, d, true);
    let groups = row_groups(r.rows() * d.heads);
    let lay = r.meta.gpu()?;
    g.dispatch(&RAGGED_BWD_ROWS, &[lay, probs, k, v, dout, &ds, &dq], &prm, groups)?;
    g.dispatch(&RAGGED_BWD_COLS, &[lay, q, probs, &ds, dout, &dk, &dv], &prm, groups)?;
    Ok((dq, dk, dv))
}

// ---- op -------------------------------------------------------------------------------------

/// Multi-head attention over a ragged batch: q, k, v (N, C) packed by `r` (N = r.rows()), `heads`
/// heads, query i of each sequence attending over its keys j <= i (`causal`) or all its keys;
/// dropout `p_drop` keyed as the padded layout's (see [`Ragged`]). -> (N, C). Without gradients
/// (under `no_grad`, or when no input needs one) no probabilities are kept.
#[allow(clippy::too_many_arguments)]
pub fn attention_ragged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    r: &Ragged,
    heads: usize,
    p_drop: f32,
    seed: u32,
    causal: bool,
) -> Result<Tensor> {
    let op = "attention_ragged";
    let [n, c] = *q.shape() else {
        return Err(Error::Shape { op, msg: format!("q {:?} must be (N, C) packed rows", q.shape()) });
    };
    if k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(Error::Shape { op, msg: format!("q {:?}, k {:?} and v {:?} must have one shape", q.shape(), k.shape(), v.shape()) });
    }
    if heads == 0 || c % heads != 0 || c == 0 {
        return Err(Error::Shape { op, msg: format!("{c} channels of q {:?} do not split into {heads} heads", q.shape()) });
    }
    if n != r.rows() {
        return Err(Error::Shape { op, msg: format!("q has {n} rows but the ragged batch packs {} ({} sequences)", r.rows(), r.batch()) });
    }
    if !(0.0..1.0).contains(&p_drop) {
        return Err(Error::Invalid(format!("attention: dropout probability must be in [0, 1), got {p_drop}")));
    }
    let dev = same_device(op, &[q, k, v])?;
    let longest = r.lens.iter().copied().max().unwrap_or(0) as usize;
    if dev == crate::device::Device::Gpu && longest > MAX_LEN_GPU {
        return Err(Error::Shape { op, msg: format!("sequence length {longest} exceeds the GPU kernels' limit {MAX_LEN_GPU}") });
    }
    let d = RaggedDims { heads, dh: c / heads, p: p_drop, seed, causal, key_len: r.key_len };
    apply(AttentionRagged { r: r.clone(), d, save: records(&[q, k, v]), backward: false }, &[q, k, v])
}

/// Ragged attention over inputs [q, k, v]: out (N, C), and with `save` the probabilities
/// (heads * pairs) as the second output; in the backward form (dq, dk, dv) over [q, k, v, P, g].
#[derive(Clone)]
struct AttentionRagged {
    r: Ragged,
    d: RaggedDims,
    save: bool,
    backward: bool,
}

impl Op for AttentionRagged {
    fn name(&self) -> &'static str {
        "attention_ragged"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let x = vec![self.r.rows(), self.d.c()];
        match (self.backward, self.save) {
            (true, _) => vec![x.clone(), x.clone(), x],
            (false, true) => vec![x, vec![self.d.heads * self.r.pairs()]],
            (false, false) => vec![x],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (r, d) = (&self.r, self.d);
        if self.backward {
            let (dq, dk, dv) = attention_ragged_bwd_cpu(x[0], x[1], x[2], r, x[3], x[4], d);
            return Ok(vec![dq, dk, dv]);
        }
        let (out, probs) = attention_ragged_cpu(x[0], x[1], x[2], r, d, self.save);
        Ok(if self.save { vec![out, probs] } else { vec![out] })
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let (r, d) = (&self.r, self.d);
        if self.backward {
            let (dq, dk, dv) = attention_ragged_bwd_gpu(x[0], x[1], x[2], r, x[3], x[4], d)?;
            return Ok(vec![dq, dk, dv]);
        }
        let (out, probs) = attention_ragged_gpu(x[0], x[1], x[2], r, d, self.save)?;
        Ok([Some(out), probs].into_iter().flatten().collect())
    }
}

impl Backward for AttentionRagged {
    /// q, k, v, the probabilities, and the op in its backward form.
    type Saved = ([Tensor; 4], AttentionRagged);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        ([x[0].detach(), x[1].detach(), x[2].detach(), out.remove(1)], AttentionRagged { backward: true, ..self })
    }
    /// See the module docs.
    fn backward(([q, k, v, probs], op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(run(op, &[q, k, v, probs, g])?.into_iter().map(Some).collect())
    }
}
