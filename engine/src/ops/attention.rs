//! Multi-head self-attention with key padding and attention dropout: causal as in RecBole's SASRec,
//! or bidirectional (every valid key) as in BERT.
//!
//! - `attention_masked(q, k, v, lens, heads, p, seed, causal)`: q, k, v (B, L, C), lens (B) ->
//!   out (B, L, C), C = heads * dh; head h uses channels [h*dh, (h+1)*dh).
//!   s[b,h,i,j] = q_h[i] . k_h[j] / sqrt(dh) + mask, mask = 0 where j < lens[b] (and j <= i when
//!   `causal`), else -10000;
//!   P = softmax_j(s); P' = dropout(P) (kept when rand01(seed, idx) >= p, scaled by 1/(1-p), idx the
//!   flat (B, heads, L, L) index, the same mask as `dropout`); out[b,i,h*dh+c] = sum_j P'[i,j] v[b,j,h*dh+c].
//!   Backward: dP' = dO V^T, dP = keep * dP' / (1-p), dS = P * (dP - sum_j dP * P),
//!   dq = dS K / sqrt(dh), dk = dS^T Q / sqrt(dh), dv = P'^T dO.
//! - `attention(q, k, v, lens, heads, p, seed)` = `attention_masked(.., causal = true)` (SASRec).
//! - `attention_ragged(q, k, v, r, heads, p, seed, causal)`: q, k, v (N, C) packed by a [`Ragged`]
//!   batch (sequence b owns rows offsets[b] .. offsets[b + 1], n_b of them) -> out (N, C). Query i of
//!   sequence b attends over its keys j <= i (causal) or j < n_b; no padding, so no mask. Dropout of
//!   (b, h, i, j) keys on ((b * heads + h) * key_len + i) * key_len + j, the padded op's flat index
//!   for a batch of width key_len: the two draw the same masks. P is saved per sequence as a
//!   (heads, n_b, n_b) block (only when a gradient is needed); the backward is the padded one's.
//!
//! The additive mask is evaluated exactly: a masked key's weight exp(s - 10000 - max) underflows to 0
//! in f32 and f64 (for scores less than ~9000 apart), so a row attends over its valid keys
//! j < n only, n = min(i + 1, lens[b]) when causal, n = lens[b] when not. Padding query rows
//! (i >= lens[b]) of a bidirectional attention attend over the valid keys, as in BERT. A row with no
//! valid key (lens[b] = 0) has the constant -10000 on every key, which cancels in the softmax: it
//! attends over all L keys with the plain scores. (Adding -10000 in f32 would round those scores to
//! ~1e-3; this avoids that noise.)
//!
//! GPU: the ragged kernels (`attention_ragged.wgsl`) run one workgroup per (row, head), finding
//! the row's sequence through a packed index (offsets, P-block starts, sequence of each row).
//! The padded forward runs one workgroup per (b, h, i) query row (scores, softmax, dropout, P'V); the
//! backward one workgroup per query row (dS and dq) and one per key column (dk and dv). A row of P
//! lives in workgroup memory, so the GPU path takes L <= 1024.

use super::elementwise::{pcg, rand01, rand01_hashed};
use super::wgsl;
use crate::cpu::{dot, par, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::ragged::Ragged;
use crate::tensor::{same_device, Indices, Storage, Tensor};

const SRC: &str = wgsl!("attention.wgsl");
static FWD: Kernel<AttentionParams> = Kernel::new("attention", SRC, "attn_fwd", &[Read, Read, Read, Read, ReadWrite, ReadWrite]);
static BWD_ROWS: Kernel<AttentionParams> =
    Kernel::new("attention", SRC, "attn_bwd_rows", &[Read, Read, Read, Read, Read, ReadWrite, ReadWrite]);
static BWD_COLS: Kernel<AttentionParams> = Kernel::new("attention", SRC, "attn_bwd_cols", &[Read, Read, ReadWrite, ReadWrite, Read, Read]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![
        FWD.contract(),
        BWD_ROWS.contract(),
        BWD_COLS.contract(),
        RAGGED_FWD.contract(),
        RAGGED_BWD_ROWS.contract(),
        RAGGED_BWD_COLS.contract(),
    ]
}

kernel_params! {
    /// `struct P` of attention.wgsl (all three kernels).
    struct AttentionParams {
        batch: u32,
        len: u32,
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
    }
}

/// Longest sequence the GPU kernels take (a row of P is held in workgroup memory).
pub const MAX_LEN_GPU: usize = 1024;

/// Problem sizes, the dropout setting and the mask: batch, sequence length, heads, channels per
/// head, dropout probability and seed, causal (SASRec) or bidirectional (BERT).
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub b: usize,
    pub l: usize,
    pub heads: usize,
    pub dh: usize,
    pub p: f32,
    pub seed: u32,
    pub causal: bool,
}

impl Dims {
    pub fn c(&self) -> usize {
        self.heads * self.dh
    }
    /// Keys query i of sequence `len` attends to (see the module docs).
    pub fn valid(&self, len: u32, i: usize) -> usize {
        let n = if self.causal { (i + 1).min(len as usize) } else { len as usize };
        match n {
            0 => self.l,
            n => n,
        }
    }
    /// Dropout factor of flat (B, heads, L, L) element `idx`: 0 or 1/(1-p).
    pub fn keep<T: Real>(&self, idx: usize) -> T {
        if self.p == 0.0 {
            T::one()
        } else if rand01(self.seed, idx as u32) >= self.p {
            T::c(1.0 / (1.0 - self.p as f64))
        } else {
            T::zero()
        }
    }
    fn params(&self) -> AttentionParams {
        let d = self;
        AttentionParams {
            batch: d.b as u32,
            len: d.l as u32,
            heads: d.heads as u32,
            dh: d.dh as u32,
            scale: (1.0 / (d.dh as f64).sqrt()) as f32,
            p: d.p,
            inv_keep: (1.0 / (1.0 - d.p as f64)) as f32,
            seed: d.seed,
            causal: d.causal as u32,
        }
    }
}

// ---- CPU references -------------------------------------------------------------------------

/// `Dims::keep` with the seed's hash computed once.
fn keeper<T: Real>(d: &Dims) -> impl Fn(usize) -> T + Sync + Send {
    let (p, hs, inv) = (d.p, pcg(d.seed), T::c(1.0 / (1.0 - d.p as f64)));
    move |idx| {
        if p == 0.0 {
            T::one()
        } else if rand01_hashed(hs, idx as u32) >= p {
            inv
        } else {
            T::zero()
        }
    }
}

/// One query row of one head, shared by the padded and ragged forms: key j's channels start at
/// `kbase + j * c` in k and v, j < pr.len(). Writes P (before dropout) into `pr` and adds
/// sum_j keep(j) P_j v_j into `or`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn attend_row<T: Real>(
    qr: &[T],
    k: &[T],
    v: &[T],
    kbase: usize,
    c: usize,
    scale: T,
    pr: &mut [T],
    or: &mut [T],
    keep: impl Fn(usize) -> T,
) {
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
        let pd = *pj * keep(j);
        let vo = kbase + j * c;
        for (o, &y) in or.iter_mut().zip(&v[vo..vo + dh]) {
            *o += pd * y;
        }
    }
}

/// Backward of one query row (see `attend_row`): from its P row `prow` (j < prow.len()) and dO row
/// `dor`, dP = keep * dO V^T, dS = P * (dP - sum_j dP * P); adds dS K * scale into `dqr`, and into
/// the sequence's dk / dv blocks at `lbase + j * c`: scale * dS_j q and P'_j dO. `ds`, `kp` are
/// scratch rows at least prow.len() long.
#[allow(clippy::too_many_arguments)]
#[inline]
fn attend_row_bwd<T: Real>(
    (qr, dor): (&[T], &[T]),
    (k, v): (&[T], &[T]),
    (kbase, lbase, c): (usize, usize, usize),
    scale: T,
    prow: &[T],
    keep: impl Fn(usize) -> T,
    (ds, kp): (&mut [T], &mut [T]),
    dqr: &mut [T],
    (dkb, dvb): (&mut [T], &mut [T]),
) {
    let (dh, n) = (qr.len(), prow.len());
    let mut t = T::zero();
    for j in 0..n {
        let vo = kbase + j * c;
        let dp = dot(dor, &v[vo..vo + dh]);
        kp[j] = keep(j);
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

/// Forward: (out (B, L, C), P (B, heads, L, L)) with P before dropout. Sequences in parallel.
pub fn attention_cpu<T: Real>(q: &[T], k: &[T], v: &[T], lens: &[u32], d: Dims) -> (Vec<T>, Vec<T>) {
    let (l, dh, c, heads) = (d.l, d.dh, d.c(), d.heads);
    let scale = T::c(1.0 / (dh as f64).sqrt());
    let keep = keeper::<T>(&d);
    // Sequence b owns out[b] (L, C) and P[b] (heads, L, L).
    par::rows2(d.b, 2 * heads * l * l * dh, l * c, heads * l * l, |b, ob, pb| {
        let len = lens[b];
        for h in 0..heads {
            for i in 0..l {
                let n = d.valid(len, i);
                let qo = (b * l + i) * c + h * dh;
                let row = ((b * heads + h) * l + i) * l;
                let qr = &q[qo..qo + dh];
                let or = &mut ob[i * c + h * dh..i * c + (h + 1) * dh];
                let pr = &mut pb[(h * l + i) * l..(h * l + i) * l + n];
                attend_row(qr, k, v, b * l * c + h * dh, c, scale, pr, or, |j| keep(row + j));
            }
        }
    })
}

/// Backward: (dq, dk, dv), each (B, L, C). Sequences in parallel: every sum runs over the query
/// rows i (then keys j) of one sequence in the same order as a sequential loop.
pub fn attention_bwd_cpu<T: Real>(q: &[T], k: &[T], v: &[T], lens: &[u32], probs: &[T], dout: &[T], d: Dims) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (l, dh, c, heads) = (d.l, d.dh, d.c(), d.heads);
    let scale = T::c(1.0 / (dh as f64).sqrt());
    let keep = keeper::<T>(&d);
    let lc = l * c;
    par::rows3(d.b, 4 * heads * l * l * dh, (lc, lc, lc), |b, dqb, dkb, dvb| {
        let len = lens[b];
        let (mut ds, mut kp) = (vec![T::zero(); l], vec![T::zero(); l]);
        for h in 0..heads {
            for i in 0..l {
                let n = d.valid(len, i);
                let qo = (b * l + i) * c + h * dh;
                let row = ((b * heads + h) * l + i) * l;
                let (qr, dor) = (&q[qo..qo + dh], &dout[qo..qo + dh]);
                let dqr = &mut dqb[i * c + h * dh..i * c + (h + 1) * dh];
                attend_row_bwd(
                    (qr, dor),
                    (k, v),
                    (b * l * c + h * dh, h * dh, c),
                    scale,
                    &probs[row..row + n],
                    |j| keep(row + j),
                    (&mut ds, &mut kp),
                    dqr,
                    (&mut *dkb, &mut *dvb),
                );
            }
        }
    })
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
    fn as_dims(&self) -> Dims {
        Dims { b: 0, l: self.key_len, heads: self.heads, dh: self.dh, p: self.p, seed: self.seed, causal: self.causal }
    }
}

/// Ragged forward: q, k, v (N, C) packed by `r` -> (out (N, C), P) with P the probabilities before
/// dropout, sequence b's block (heads, n_b, n_b) at heads * r.pblock(b) (row i holds keys j < n_b,
/// zero past the valid ones); P is empty unless `save`. Sequences in parallel.
pub fn attention_ragged_cpu<T: Real>(q: &[T], k: &[T], v: &[T], r: &Ragged, d: RaggedDims, save: bool) -> (Vec<T>, Vec<T>) {
    let (dh, c, heads) = (d.dh, d.c(), d.heads);
    let scale = T::c(1.0 / (dh as f64).sqrt());
    let keep = keeper::<T>(&d.as_dims());
    let oo: Vec<usize> = r.offsets.iter().map(|&o| o as usize * c).collect();
    let po: Vec<usize> =
        if save { (0..=r.batch()).map(|b| heads * if b < r.batch() { r.pblock(b) } else { r.pairs() }).collect() } else { vec![] };
    let work = 2 * heads * dh * r.pairs() / r.batch().max(1) + c;
    let (offs, lens) = (&r.offsets[..], &r.lens[..]);
    let (out, probs, _) = par::segs3::<T, T, u8>(r.batch(), work, (&oo, &po, &[]), |b, ob, pb, _| {
        let (o, n) = (offs[b] as usize, lens[b] as usize);
        let mut scratch = if save { Vec::new() } else { vec![T::zero(); n] };
        for h in 0..heads {
            for i in 0..n {
                let nk = if d.causal { i + 1 } else { n };
                let pr = if save { &mut pb[(h * n + i) * n..(h * n + i) * n + nk] } else { &mut scratch[..nk] };
                let qo = (o + i) * c + h * dh;
                let or = &mut ob[i * c + h * dh..i * c + (h + 1) * dh];
                attend_row(&q[qo..qo + dh], k, v, o * c + h * dh, c, scale, pr, or, |j| keep(d.key(b, h, i, j)));
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
    let keep = keeper::<T>(&d.as_dims());
    let oo: Vec<usize> = r.offsets.iter().map(|&o| o as usize * c).collect();
    let work = 4 * heads * dh * r.pairs() / r.batch().max(1) + c;
    let (offs, lens) = (&r.offsets[..], &r.lens[..]);
    let pblocks: Vec<usize> = (0..r.batch()).map(|b| r.pblock(b)).collect();
    par::segs3(r.batch(), work, (&oo, &oo, &oo), |b, dqb, dkb, dvb| {
        let (o, n) = (offs[b] as usize, lens[b] as usize);
        let pbase = heads * pblocks[b];
        let (mut ds, mut kp) = (vec![T::zero(); n], vec![T::zero(); n]);
        for h in 0..heads {
            for i in 0..n {
                let nk = if d.causal { i + 1 } else { n };
                let qo = (o + i) * c + h * dh;
                let prow = &probs[pbase + (h * n + i) * n..pbase + (h * n + i) * n + nk];
                let dqr = &mut dqb[i * c + h * dh..i * c + (h + 1) * dh];
                attend_row_bwd(
                    (&q[qo..qo + dh], &dout[qo..qo + dh]),
                    (k, v),
                    (o * c + h * dh, h * dh, c),
                    scale,
                    prow,
                    |j| keep(d.key(b, h, i, j)),
                    (&mut ds, &mut kp),
                    dqr,
                    (&mut *dkb, &mut *dvb),
                );
            }
        }
    })
}

// ---- GPU ------------------------------------------------------------------------------------

fn attention_gpu(q: &GpuBuf, k: &GpuBuf, v: &GpuBuf, lens: &GpuBuf, d: Dims) -> Result<(Storage, Storage)> {
    let g = gpu()?;
    let out = g.alloc(4 * (d.b * d.l * d.c()) as u64)?;
    let probs = g.alloc(4 * (d.b * d.heads * d.l * d.l) as u64)?;
    g.dispatch(&FWD, &[lens, q, k, v, &out, &probs], &d.params(), row_groups(d.b * d.heads * d.l))?;
    Ok((Storage::Gpu(out), Storage::Gpu(probs)))
}

fn attention_bwd_gpu(
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    lens: &GpuBuf,
    probs: &GpuBuf,
    dout: &GpuBuf,
    d: Dims,
) -> Result<(Storage, Storage, Storage)> {
    let g = gpu()?;
    let n = 4 * (d.b * d.l * d.c()) as u64;
    let ds = g.alloc(4 * (d.b * d.heads * d.l * d.l) as u64)?;
    let (dq, dk, dv) = (g.alloc(n)?, g.alloc(n)?, g.alloc(n)?);
    let groups = row_groups(d.b * d.heads * d.l);
    g.dispatch(&BWD_ROWS, &[lens, probs, k, v, dout, &ds, &dq], &d.params(), groups)?;
    g.dispatch(&BWD_COLS, &[q, probs, &dk, &dv, dout, &ds], &d.params(), groups)?;
    Ok((Storage::Gpu(dq), Storage::Gpu(dk), Storage::Gpu(dv)))
}

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

fn attention_ragged_gpu(q: &GpuBuf, k: &GpuBuf, v: &GpuBuf, r: &Ragged, d: RaggedDims, save: bool) -> Result<(Storage, Option<Storage>)> {
    let g = gpu()?;
    let out = g.alloc(4 * (r.rows() * d.c()) as u64)?;
    let probs = g.alloc(4 * if save { d.heads * r.pairs() } else { 1 } as u64)?;
    let prm = RaggedParams::new(r, d, save);
    g.dispatch(&RAGGED_FWD, &[r.meta.gpu()?, q, k, v, &out, &probs], &prm, row_groups(r.rows() * d.heads))?;
    Ok((Storage::Gpu(out), save.then_some(Storage::Gpu(probs))))
}

fn attention_ragged_bwd_gpu(
    q: &GpuBuf,
    k: &GpuBuf,
    v: &GpuBuf,
    r: &Ragged,
    probs: &GpuBuf,
    dout: &GpuBuf,
    d: RaggedDims,
) -> Result<(Storage, Storage, Storage)> {
    let g = gpu()?;
    let n = 4 * (r.rows() * d.c()) as u64;
    let ds = g.alloc(4 * (d.heads * r.pairs()) as u64)?;
    let (dq, dk, dv) = (g.alloc(n)?, g.alloc(n)?, g.alloc(n)?);
    let prm = RaggedParams::new(r, d, true);
    let groups = row_groups(r.rows() * d.heads);
    let lay = r.meta.gpu()?;
    g.dispatch(&RAGGED_BWD_ROWS, &[lay, probs, k, v, dout, &ds, &dq], &prm, groups)?;
    g.dispatch(&RAGGED_BWD_COLS, &[lay, q, probs, &ds, dout, &dk, &dv], &prm, groups)?;
    Ok((Storage::Gpu(dq), Storage::Gpu(dk), Storage::Gpu(dv)))
}

// ---- op -------------------------------------------------------------------------------------

/// SASRec (causal) multi-head attention of q, k, v (B, L, C) with `heads` heads; see the module docs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, lens: &Indices, heads: usize, p_drop: f32, seed: u32) -> Result<Tensor> {
    attention_masked(q, k, v, lens, heads, p_drop, seed, true)
}

/// Multi-head attention of q, k, v (B, L, C) with `heads` heads over the keys j < lens[b], and
/// j <= i as well when `causal`; see the module docs.
#[allow(clippy::too_many_arguments)]
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &Indices,
    heads: usize,
    p_drop: f32,
    seed: u32,
    causal: bool,
) -> Result<Tensor> {
    let op = "attention";
    let [b, l, c] = *q.shape() else {
        return Err(Error::Shape { op, msg: format!("q {:?} must be (B, L, C)", q.shape()) });
    };
    if k.shape() != q.shape() || v.shape() != q.shape() {
        return Err(Error::Shape { op, msg: format!("q {:?}, k {:?} and v {:?} must have one shape", q.shape(), k.shape(), v.shape()) });
    }
    if heads == 0 || c % heads != 0 || c == 0 {
        return Err(Error::Shape { op, msg: format!("{c} channels of q {:?} do not split into {heads} heads", q.shape()) });
    }
    if lens.len() != b {
        return Err(Error::Shape { op, msg: format!("{} lengths for a batch of {b} (q {:?})", lens.len(), q.shape()) });
    }
    if let Some((i, &n)) = lens.host().iter().enumerate().find(|(_, &n)| n as usize > l) {
        return Err(Error::Index { op, msg: format!("length {n} of sequence {i} exceeds the sequence length {l}") });
    }
    if !(0.0..1.0).contains(&p_drop) {
        return Err(Error::Invalid(format!("attention: dropout probability must be in [0, 1), got {p_drop}")));
    }
    let dev = same_device(op, &[q, k, v])?;
    if dev == crate::device::Device::Gpu && l > MAX_LEN_GPU {
        return Err(Error::Shape {
            op,
            msg: format!("sequence length {l} of q {:?} exceeds the GPU kernels' limit {MAX_LEN_GPU}", q.shape()),
        });
    }
    let d = Dims { b, l, heads, dh: c / heads, p: p_drop, seed, causal };
    let (out, probs) = on_device!(dev, T => {
        let (o, p) = attention_cpu::<T>(&q.host::<T>()?, &k.host::<T>()?, &v.host::<T>()?, lens.host(), d);
        (T::wrap(o), T::wrap(p))
    }, attention_gpu(&*q.gbuf()?, &*k.gbuf()?, &*v.gbuf()?, lens.gpu()?, d)?);
    let probs = Tensor::from_storage(probs, vec![b, heads, l, l]);
    let (qc, kc, vc, lens) = (q.detach(), k.detach(), v.detach(), lens.clone());
    Ok(Tensor::from_op(op, out, q.shape().to_vec(), &[q, k, v], move |g| {
        let (dq, dk, dv) = on_device!(g.device(), T => {
            let (dq, dk, dv) = attention_bwd_cpu::<T>(
                &qc.host::<T>()?, &kc.host::<T>()?, &vc.host::<T>()?, lens.host(), &probs.host::<T>()?, &g.host::<T>()?, d);
            (T::wrap(dq), T::wrap(dk), T::wrap(dv))
        }, attention_bwd_gpu(&*qc.gbuf()?, &*kc.gbuf()?, &*vc.gbuf()?, lens.gpu()?, &*probs.gbuf()?, &*g.gbuf()?, d)?);
        let shape = g.shape().to_vec();
        Ok(vec![
            Some(Tensor::from_storage(dq, shape.clone())),
            Some(Tensor::from_storage(dk, shape.clone())),
            Some(Tensor::from_storage(dv, shape)),
        ])
    }))
}

/// Multi-head attention over a ragged batch: q, k, v (N, C) packed by `r` (N = r.rows()), `heads`
/// heads, query i of each sequence attending over its keys j <= i (`causal`) or all its keys;
/// dropout `p_drop` keyed as the padded op keys it (see [`Ragged`]). -> (N, C). Without gradients
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
    let save = crate::tensor::grad_enabled() && [q, k, v].iter().any(|t| t.requires_grad());
    let (out, probs) = on_device!(dev, T => {
        let (o, p) = attention_ragged_cpu::<T>(&q.host::<T>()?, &k.host::<T>()?, &v.host::<T>()?, r, d, save);
        (T::wrap(o), save.then(|| T::wrap(p)))
    }, attention_ragged_gpu(&*q.gbuf()?, &*k.gbuf()?, &*v.gbuf()?, r, d, save)?);
    let Some(probs) = probs else {
        return Ok(Tensor::from_storage(out, vec![n, c]));
    };
    let probs = Tensor::from_storage(probs, vec![heads * r.pairs()]);
    let (qc, kc, vc, r) = (q.detach(), k.detach(), v.detach(), r.clone());
    Ok(Tensor::from_op(op, out, vec![n, c], &[q, k, v], move |g| {
        let (dq, dk, dv) = on_device!(g.device(), T => {
            let (dq, dk, dv) = attention_ragged_bwd_cpu::<T>(
                &qc.host::<T>()?, &kc.host::<T>()?, &vc.host::<T>()?, &r, &probs.host::<T>()?, &g.host::<T>()?, d);
            (T::wrap(dq), T::wrap(dk), T::wrap(dv))
        }, attention_ragged_bwd_gpu(&*qc.gbuf()?, &*kc.gbuf()?, &*vc.gbuf()?, &r, &*probs.gbuf()?, &*g.gbuf()?, d)?);
        let shape = g.shape().to_vec();
        Ok(vec![
            Some(Tensor::from_storage(dq, shape.clone())),
            Some(Tensor::from_storage(dk, shape.clone())),
            Some(Tensor::from_storage(dv, shape)),
        ])
    }))
}
