//! Weighted sums of rows. Attention pooling and mixture-of-experts gating are the same softmax-
//! weighted computation (MoE has every row valid) and share one fused kernel, one workgroup per
//! output row; the mean of a ragged batch's sequences has equal weights and kernels of its own
//! (`pool_ragged.wgsl`), one invocation per output element.
//!
//! - `attention_pool(a, x, lens)`: a (N, S) energies, x (N, S, D), lens (N) each <= S -> e (N, D)
//!   alpha[n] = softmax(a[n, :lens[n]]) (exactly 0 at j >= lens[n]; lens[n] = 0 gives a zero row),
//!   e[n] = sum_j alpha[n, j] x[n, j].
//!   Backward: dalpha[n, j] = dot(de[n], x[n, j]); da = alpha * (dalpha - sum_j alpha dalpha);
//!   dx[n, j] = alpha[n, j] de[n] (only when x is tracked: raw item features are not, and their dx,
//!   N x S x 768 values, would be written and dropped every step).
//! - `attention_pool_dot(x, w, lens, rows)`: as `attention_pool` with the energies a[n, j] =
//!   dot(x[n, j], w) of one vector w (D, 1) made inside (with `rows`, item n is row rows[n] of a
//!   table x (M, S, D), read in place), so each item's rows come from memory once per pass:
//!   the forward streams them for the energies and finds them in cache for the weighted sum; the
//!   backward streams them for dalpha and finds them in cache for dw = sum_{n, j} da[n, j] x[n, j]
//!   (summed in blocks of `DOT_BLOCK` items, then the blocks in order: the bits do not depend on the
//!   thread count). Each pass asks for the next item's rows (`cpu::Ahead`) while it works on this
//!   one's, so memory is never idle between items. dx[n, j] = alpha[n, j] de[n] + da[n, j] w when
//!   x is tracked. On the GPU it is
//!   `matmul` for the energies and dw around the kernels of `attention_pool`.
//! - `moe(logits, experts)`: logits (N, O), experts (N, O, D) -> z (N, D) = sum_k g[n, k] E[n, k]
//!   with g = softmax(logits[n]); backward as above with lens = O.
//! - `mean_ragged(x, r)`: x (N, C) packed by a [`Ragged`] batch (sequence b owns rows offsets[b] ..
//!   offsets[b + 1], n_b >= 1 of them) -> e (B, C), e[b] = (sum of sequence b's rows) / n_b, the rows
//!   summed in order. Backward: dx[t] = de[b] / n_b for each row t of sequence b.

use super::concat::owned_gpu;
use super::elementwise::add;
use super::{embedding, matmul, wgsl};
use crate::cpu::{dot_rows, par, pool, Ahead, Real};
use crate::error::{shape_err, Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::ragged::Ragged;
use crate::tensor::{Indices, Storage, Tensor};

const SRC: &str = wgsl!("pool.wgsl");
const BWD: &[Access] = &[Read, Read, Read, Read, ReadWrite];
static FWD: Kernel<PoolParams> = Kernel::new("pool", SRC, "pool_fwd", &[Read, Read, Read, ReadWrite, ReadWrite]);
static BWD_A: Kernel<PoolParams> = Kernel::new("pool", SRC, "pool_bwd_a", BWD);
static BWD_X: Kernel<PoolParams> = Kernel::new("pool", SRC, "pool_bwd_x", BWD);
const SRC_RAGGED: &str = wgsl!("pool_ragged.wgsl");
static MEAN_FWD: Kernel<MeanParams> = Kernel::new("pool_ragged", SRC_RAGGED, "mean_ragged_fwd", &[Read, Read, ReadWrite]);
static MEAN_BWD: Kernel<MeanParams> = Kernel::new("pool_ragged", SRC_RAGGED, "mean_ragged_bwd", &[Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![FWD.contract(), BWD_A.contract(), BWD_X.contract(), MEAN_FWD.contract(), MEAN_BWD.contract()]
}

kernel_params! {
    /// `struct P` of pool.wgsl (N rows of S entries of width D).
    struct PoolParams {
        n: u32,
        s: u32,
        d: u32,
    }
}

kernel_params! {
    /// `struct P` of pool_ragged.wgsl (B sequences, N packed rows of C channels).
    struct MeanParams {
        batch: u32,
        rows: u32,
        cols: u32,
    }
}

// ---- CPU references -------------------------------------------------------------------------

/// One item's pooling: `al` holds its `len` energies and becomes their softmax; `er` (zeroed)
/// becomes sum_j al[j] x[j] over its rows `xr` (len, d), asking for lines of `ahead` meanwhile.
pub(crate) fn softmax_sum<T: Real>(al: &mut [T], xr: &[T], er: &mut [T], d: usize, ahead: &mut Ahead<'_, T>) {
    let m = al.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    let z: T = al.iter().map(|&v| (v - m).exp()).sum();
    for (j, a) in al.iter_mut().enumerate() {
        let w = (*a - m).exp() / z;
        *a = w;
        axpy_ahead(w, &xr[j * d..(j + 1) * d], er, ahead);
    }
}

/// o += a x, asking for a line of `ahead` every 16 values.
#[inline(never)]
fn axpy_ahead<T: Real>(a: T, x: &[T], o: &mut [T], ahead: &mut Ahead<'_, T>) {
    let mut oc = o.chunks_exact_mut(16);
    for (oc, xc) in (&mut oc).zip(x.chunks_exact(16)) {
        ahead.one();
        for l in 0..16 {
            oc[l] += a * xc[l];
        }
    }
    for (o, &xv) in oc.into_remainder().iter_mut().zip(&x[x.len() / 16 * 16..]) {
        *o += a * xv;
    }
}

/// Forward: a (N, S), x (N, S, D), lens (N) -> (e (N, D), alpha (N, S)).
pub fn pool_cpu<T: Real>(a: &[T], x: &[T], lens: &[u32], n: usize, s: usize, d: usize) -> (Vec<T>, Vec<T>) {
    par::rows2(par::Zeroed, n, s * (d + 2), d, s, |r, er, al| {
        let len = lens[r] as usize;
        al[..len].copy_from_slice(&a[r * s..r * s + len]);
        softmax_sum(&mut al[..len], &x[r * s * d..(r * s + len) * d], er, d, &mut Ahead::none());
    })
}

/// Items per partial sum of `attention_pool_dot`'s dw.
pub const DOT_BLOCK: usize = 32;

/// Item n's rows in x: item `rows[n]` of the table, or n itself without `rows`.
fn item<'a, T>(x: &'a [T], rows: Option<&[u32]>, r: usize, (s, d): (usize, usize), len: usize) -> &'a [T] {
    let i = rows.map_or(r, |ids| ids[r] as usize);
    &x[i * s * d..(i * s + len) * d]
}

/// The rows of the item after item n (none after the last), to ask for while n is worked on.
fn next_item<'a, T>(x: &'a [T], rows: Option<&[u32]>, lens: &[u32], r: usize, sd: (usize, usize)) -> Ahead<'a, T> {
    match lens.get(r + 1) {
        Some(&len) => Ahead::new(item(x, rows, r + 1, sd, len as usize)),
        None => Ahead::none(),
    }
}

/// Forward with energies from one vector: x (M, S, D), w (D), lens (N), rows (N) each < M or none
/// (then M = N) -> (e (N, D), alpha (N, S)), a[n, j] = dot(x[rows[n], j], w) ([`dot`]'s order),
/// then as [`pool_cpu`].
pub fn pool_dot_cpu<T: Real>(x: &[T], w: &[T], lens: &[u32], rows: Option<&[u32]>, (n, s, d): (usize, usize, usize)) -> (Vec<T>, Vec<T>) {
    par::rows2(par::Zeroed, n, s * (2 * d + 2), d, s, |r, er, al| {
        let len = lens[r] as usize;
        let xr = item(x, rows, r, (s, d), len);
        let mut ahead = next_item(x, rows, lens, r, (s, d));
        dot_rows(xr, d, w, &mut al[..len], &mut ahead);
        softmax_sum(&mut al[..len], xr, er, d, &mut ahead);
    })
}

/// Backward of [`pool_dot_cpu`]: alpha (N, S), x (M, S, D), w (D), de (N, D) -> (dw (D), dx
/// (N, S, D), or empty without `want_dx`, which takes no `rows`). dalpha[n, j] = dot(de[n], x[n, j]), da as in
/// [`pool_bwd_cpu`]; dw sums each block of `DOT_BLOCK` items (items in order) and then the blocks
/// in order.
#[allow(clippy::too_many_arguments)]
pub fn pool_dot_bwd_cpu<T: Real>(
    alpha: &[T],
    x: &[T],
    w: &[T],
    de: &[T],
    lens: &[u32],
    rows: Option<&[u32]>,
    (n, s, d): (usize, usize, usize),
    want_dx: bool,
) -> (Vec<T>, Vec<T>) {
    assert!(!(want_dx && rows.is_some()), "dx of a gathered x is made by the gather's backward");
    let blocks = n.div_ceil(DOT_BLOCK);
    let (parts, da) = par::rows2(par::Zeroed, blocks, DOT_BLOCK * s * (2 * d + 2), d, DOT_BLOCK * s, |blk, part, dab| {
        for r in blk * DOT_BLOCK..n.min((blk + 1) * DOT_BLOCK) {
            let len = lens[r] as usize;
            let (xr, der, al) = (item(x, rows, r, (s, d), len), &de[r * d..(r + 1) * d], &alpha[r * s..r * s + len]);
            let dar = &mut dab[(r - blk * DOT_BLOCK) * s..][..len];
            let mut ahead = next_item(x, rows, lens, r, (s, d));
            dot_rows(xr, d, der, dar, &mut ahead);
            let tot = al.iter().zip(dar.iter()).fold(T::zero(), |t, (&a, &g)| t + a * g);
            for ((g, &a), row) in dar.iter_mut().zip(al).zip(xr.chunks_exact(d)) {
                *g = a * (*g - tot);
                axpy_ahead(*g, row, part, &mut ahead);
            }
        }
    });
    let mut dw = pool::zeros(d);
    for part in parts.chunks_exact(d) {
        dw.iter_mut().zip(part).for_each(|(o, &v)| *o += v);
    }
    pool::give(parts);
    if !want_dx {
        pool::give(da);
        return (dw, Vec::new());
    }
    let dx = par::rows(par::Zeroed, n, s * d, s * d, |r, dxr| {
        let der = &de[r * d..(r + 1) * d];
        for j in 0..lens[r] as usize {
            let (a, g) = (alpha[r * s + j], da[r * s + j]);
            for ((o, &e), &wv) in dxr[j * d..(j + 1) * d].iter_mut().zip(der).zip(w) {
                *o = a * e + g * wv;
            }
        }
    });
    pool::give(da);
    (dw, dx)
}

/// Backward: alpha (N, S), x (N, S, D), de (N, D) -> (da (N, S), dx (N, S, D), or empty without
/// `want_dx`).
#[allow(clippy::too_many_arguments)]
pub fn pool_bwd_cpu<T: Real>(
    alpha: &[T],
    x: &[T],
    de: &[T],
    lens: &[u32],
    n: usize,
    s: usize,
    d: usize,
    want_dx: bool,
) -> (Vec<T>, Vec<T>) {
    let dxw = if want_dx { s * d } else { 0 };
    par::rows2(par::Zeroed, n, s * (d + 2) + dxw, s, dxw, |r, dar, dxr| {
        let len = lens[r] as usize;
        let dxr = want_dx.then_some(dxr);
        pool_bwd_row(&alpha[r * s..r * s + len], &x[r * s * d..(r * s + len) * d], &de[r * d..(r + 1) * d], &mut dar[..len], dxr);
    })
}

/// One item's pooling backward: its weights `al` (len), rows `xr` (len, d) and de (d) -> da
/// (len) in `dar`, and, when given, dx (len, d) = al[j] de in `dxr`.
#[inline(always)]
pub(crate) fn pool_bwd_row<T: Real>(al: &[T], xr: &[T], der: &[T], dar: &mut [T], dxr: Option<&mut [T]>) {
    let (len, d) = (al.len(), der.len());
    // dalpha[j] = dot(de[r], x[r, j]) for up to 8 j at once: each sum still runs over d in
    // order from -0.0 (as `Iterator::sum` does), but 8 independent sums hide the add latency.
    for j0 in (0..len).step_by(8) {
        let w = (len - j0).min(8);
        let mut acc = [-T::zero(); 8];
        let xs = &xr[j0 * d..(j0 + w) * d];
        if w == 8 {
            // (Eight whole rows: the same sums, with the rows' lengths known to the compiler.)
            let rows: [&[T]; 8] = std::array::from_fn(|jj| &xs[jj * d..(jj + 1) * d]);
            for (k, &g) in der.iter().enumerate() {
                for (a, row) in acc.iter_mut().zip(&rows) {
                    *a += g * row[k];
                }
            }
        } else {
            for (k, &g) in der.iter().enumerate() {
                for (jj, a) in acc[..w].iter_mut().enumerate() {
                    *a += g * xs[jj * d + k];
                }
            }
        }
        dar[j0..j0 + w].copy_from_slice(&acc[..w]);
    }
    let mut tot = T::zero();
    for j in 0..len {
        tot += al[j] * dar[j];
    }
    for j in 0..len {
        dar[j] = al[j] * (dar[j] - tot);
    }
    if let Some(dxr) = dxr {
        for (j, &w) in al.iter().enumerate() {
            for (o, &g) in dxr[j * d..(j + 1) * d].iter_mut().zip(der) {
                *o = w * g;
            }
        }
    }
}

/// Ragged mean forward: x (N, C) packed by `r` -> e (B, C). Sequences in parallel.
pub fn mean_ragged_cpu<T: Real>(x: &[T], r: &Ragged, c: usize) -> Vec<T> {
    let work = c * (r.rows() / r.batch().max(1) + 1);
    let offs = &r.offsets[..];
    par::rows(par::Zeroed, r.batch(), work, c, |b, er| {
        let (start, end) = (offs[b] as usize, offs[b + 1] as usize);
        for row in x[start * c..end * c].chunks_exact(c) {
            for (o, &v) in er.iter_mut().zip(row) {
                *o += v;
            }
        }
        let n = T::c((end - start) as f64);
        er.iter_mut().for_each(|o| *o /= n);
    })
}

/// Ragged mean backward: de (B, C) -> dx (N, C), row t of sequence b = de[b] / n_b.
pub fn mean_ragged_bwd_cpu<T: Real>(de: &[T], r: &Ragged, c: usize) -> Vec<T> {
    let oo: Vec<usize> = r.offsets.iter().map(|&o| o as usize * c).collect();
    let work = c * (r.rows() / r.batch().max(1) + 1);
    let lens = &r.lens[..];
    par::segs3::<T, u8, u8>(r.batch(), work, (&oo, &[], &[]), |b, dxb, _, _| {
        let n = T::c(lens[b] as f64);
        let g = &de[b * c..(b + 1) * c];
        for row in dxb.chunks_exact_mut(c) {
            for (o, &v) in row.iter_mut().zip(g) {
                *o = v / n;
            }
        }
    })
    .0
}

// ---- GPU ------------------------------------------------------------------------------------

fn pool_gpu(a: &GpuBuf, x: &GpuBuf, lens: &GpuBuf, n: usize, s: usize, d: usize) -> Result<(GpuBuf, GpuBuf)> {
    let g = gpu()?;
    let e = g.alloc(4 * (n * d) as u64)?;
    let alpha = g.alloc(4 * (n * s) as u64)?;
    g.dispatch(&FWD, &[a, x, lens, &e, &alpha], &PoolParams { n: n as u32, s: s as u32, d: d as u32 }, row_groups(n))?;
    Ok((e, alpha))
}

#[allow(clippy::too_many_arguments)]
fn pool_bwd_gpu(
    alpha: &GpuBuf,
    x: &GpuBuf,
    lens: &GpuBuf,
    de: &GpuBuf,
    n: usize,
    s: usize,
    d: usize,
    want_dx: bool,
) -> Result<Vec<GpuBuf>> {
    let g = gpu()?;
    let da = g.alloc(4 * (n * s) as u64)?;
    let prm = PoolParams { n: n as u32, s: s as u32, d: d as u32 };
    g.dispatch(&BWD_A, &[alpha, x, lens, de, &da], &prm, row_groups(n))?;
    if !want_dx {
        return Ok(vec![da]);
    }
    let dx = g.alloc(4 * (n * s * d) as u64)?;
    g.dispatch(&BWD_X, &[alpha, x, lens, de, &dx], &prm, groups_1d(n * s * d))?;
    Ok(vec![da, dx])
}

/// x's items `rows` as (N, S, D) on the GPU (a copy by `embedding`), or x itself.
fn gathered(x: &Tensor, rows: Option<&Indices>, (n, s, d): (usize, usize, usize)) -> Result<Tensor> {
    match rows {
        None => Ok(x.detach()),
        Some(ids) => embedding(&x.detach().reshape(&[x.shape()[0], s * d])?, ids, &[n])?.reshape(&[n, s, d]),
    }
}

/// `attention_pool_dot`'s forward on the GPU: the energies by `matmul`, then the pooling kernel.
fn pool_dot_gpu(x: &Tensor, w: &Tensor, lens: &GpuBuf, rows: Option<&Indices>, (n, s, d): (usize, usize, usize)) -> Result<Vec<GpuBuf>> {
    let x = &gathered(x, rows, (n, s, d))?;
    let a = matmul(&x.detach().reshape(&[n * s, d])?, &w.detach().reshape(&[d, 1])?, false, false)?;
    let (e, alpha) = pool_gpu(&*a.gbuf()?, &*x.gbuf()?, lens, n, s, d)?;
    Ok(vec![e, alpha])
}

/// Its backward: da by the pooling's kernel, dw = x^T da by `matmul`, and (`want_dx`) dx = the
/// kernel's alpha de plus da w^T.
#[allow(clippy::too_many_arguments)]
fn pool_dot_bwd_gpu(
    x: [&Tensor; 4],
    lens: &GpuBuf,
    rows: Option<&Indices>,
    (n, s, d): (usize, usize, usize),
    want_dx: bool,
) -> Result<Vec<GpuBuf>> {
    let [alpha, x, w, de] = x;
    let x = &gathered(x, rows, (n, s, d))?;
    let mut outs = pool_bwd_gpu(&*alpha.gbuf()?, &*x.gbuf()?, lens, &*de.gbuf()?, n, s, d, want_dx)?.into_iter();
    let da = Tensor::from_storage(Storage::Gpu(outs.next().expect("da")), vec![n * s, 1]);
    let dw = owned_gpu(&matmul(&x.reshape(&[n * s, d])?, &da, true, false)?)?;
    let Some(dx_alpha) = outs.next() else {
        return Ok(vec![dw]);
    };
    let dx_alpha = Tensor::from_storage(Storage::Gpu(dx_alpha), vec![n * s, d]);
    let dx = add(&dx_alpha, &matmul(&da, &w.reshape(&[d, 1])?, false, true)?)?;
    Ok(vec![dw, owned_gpu(&dx)?])
}

fn mean_ragged_gpu(x: &GpuBuf, r: &Ragged, c: usize) -> Result<GpuBuf> {
    let g = gpu()?;
    let e = g.alloc(4 * (r.batch() * c) as u64)?;
    let prm = MeanParams { batch: r.batch() as u32, rows: r.rows() as u32, cols: c as u32 };
    g.dispatch(&MEAN_FWD, &[r.meta.gpu()?, x, &e], &prm, groups_1d(r.batch() * c))?;
    Ok(e)
}

fn mean_ragged_bwd_gpu(de: &GpuBuf, r: &Ragged, c: usize) -> Result<GpuBuf> {
    let g = gpu()?;
    let dx = g.alloc(4 * (r.rows() * c) as u64)?;
    let prm = MeanParams { batch: r.batch() as u32, rows: r.rows() as u32, cols: c as u32 };
    g.dispatch(&MEAN_BWD, &[r.meta.gpu()?, de, &dx], &prm, groups_1d(r.rows() * c))?;
    Ok(dx)
}

// ---- ops ------------------------------------------------------------------------------------

/// e (N, D) = sum_{j < lens[n]} softmax(a[n, :lens[n]])_j x[n, j] over inputs [a, x], with the
/// weights alpha (N, S) as the second output; in the backward form (da, dx) over [alpha, x, g].
#[derive(Clone)]
struct SoftmaxPool {
    name: &'static str,
    lens: Indices,
    n: usize,
    s: usize,
    d: usize,
    backward: bool,
    /// Backward only: whether x is tracked (else only da is made).
    want_dx: bool,
}

impl Op for SoftmaxPool {
    fn name(&self) -> &'static str {
        self.name
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let (n, s, d) = (self.n, self.s, self.d);
        match self.backward {
            false => vec![vec![n, d], vec![n, s]],
            true if self.want_dx => vec![vec![n, s], vec![n, s, d]],
            true => vec![vec![n, s]],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (l, n, s, d) = (self.lens.host(), self.n, self.s, self.d);
        let (a, b) = match self.backward {
            false => pool_cpu(x[0], x[1], l, n, s, d),
            true => pool_bwd_cpu(x[0], x[1], x[2], l, n, s, d, self.want_dx),
        };
        Ok(if self.backward && !self.want_dx { vec![a] } else { vec![a, b] })
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let (l, n, s, d) = (self.lens.gpu()?, self.n, self.s, self.d);
        match self.backward {
            false => pool_gpu(x[0], x[1], l, n, s, d).map(|(e, alpha)| vec![e, alpha]),
            true => pool_bwd_gpu(x[0], x[1], l, x[2], n, s, d, self.want_dx),
        }
    }
}

impl Backward for SoftmaxPool {
    /// alpha, x, and the op in its backward form.
    type Saved = (Tensor, Tensor, SoftmaxPool);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, tracked: &[bool]) -> Self::Saved {
        (out.remove(1), x[1].detach(), SoftmaxPool { backward: true, want_dx: tracked[1], ..self })
    }
    fn backward((alpha, x, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut d = run(op, &[alpha, x, g])?.into_iter();
        let da = d.next();
        Ok(vec![da, d.next()])
    }
}

/// e (N, D) = sum_{j < lens[n]} softmax(a[n, :lens[n]])_j x[n, j]; `lens` already validated.
fn softmax_pool(name: &'static str, a: &Tensor, x: &Tensor, lens: Indices) -> Result<Tensor> {
    let (n, s, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    apply(SoftmaxPool { name, lens, n, s, d, backward: false, want_dx: false }, &[a, x])
}

/// Attention pooling with lengths: a (N, S), x (N, S, D), lens (N) each <= S -> (N, D).
pub fn attention_pool(a: &Tensor, x: &Tensor, lens: &Indices) -> Result<Tensor> {
    let (sa, sx) = (a.shape(), x.shape());
    if sa.len() != 2 || sx.len() != 3 || sa != &sx[..2] {
        return shape_err("attention_pool", format!("energies {sa:?} and rows {sx:?} must be (N, S) and (N, S, D)"));
    }
    check_lens("attention_pool", lens, sx)?;
    softmax_pool("attention_pool", a, x, lens.clone())
}

/// `attention_pool_dot`: e (N, D) and alpha (N, S) over inputs [x, w]; in the backward form
/// (dw, and dx when x is tracked) over [alpha, x, w, g].
#[derive(Clone)]
struct PoolDot {
    lens: Indices,
    /// The items of x pooled (N, each < M), or none (x has N items).
    rows: Option<Indices>,
    n: usize,
    s: usize,
    d: usize,
    /// w's shape (D, 1) or (D), which dw takes.
    w_shape: Vec<usize>,
    backward: bool,
    /// Backward only: whether x is tracked (else only dw is made).
    want_dx: bool,
}

impl Op for PoolDot {
    fn name(&self) -> &'static str {
        "attention_pool_dot"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let (n, s, d) = (self.n, self.s, self.d);
        match self.backward {
            false => vec![vec![n, d], vec![n, s]],
            true if self.want_dx => vec![self.w_shape.clone(), vec![n, s, d]],
            true => vec![self.w_shape.clone()],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (l, n, s, d) = (self.lens.host(), self.n, self.s, self.d);
        if !self.backward {
            let (e, alpha) = pool_dot_cpu(x[0], x[1], l, self.rows.as_ref().map(|r| r.host()), (n, s, d));
            return Ok(vec![e, alpha]);
        }
        let (dw, dx) = pool_dot_bwd_cpu(x[0], x[1], x[2], x[3], l, self.rows.as_ref().map(|r| r.host()), (n, s, d), self.want_dx);
        Ok(if self.want_dx { vec![dw, dx] } else { vec![dw] })
    }
    fn gpu(&self, _: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        unreachable!("attention_pool_dot's GPU form is gpu_tensors")
    }
    fn gpu_tensors(&self, x: &[&Tensor]) -> Result<Vec<GpuBuf>> {
        let (l, dims) = (self.lens.gpu()?, (self.n, self.s, self.d));
        match self.backward {
            false => pool_dot_gpu(x[0], x[1], l, self.rows.as_ref(), dims),
            true => pool_dot_bwd_gpu([x[0], x[1], x[2], x[3]], l, self.rows.as_ref(), dims, self.want_dx),
        }
    }
}

impl Backward for PoolDot {
    /// alpha, x, w, and the op in its backward form.
    type Saved = (Tensor, Tensor, Tensor, PoolDot);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, tracked: &[bool]) -> Self::Saved {
        (out.remove(1), x[0].detach(), x[1].detach(), PoolDot { backward: true, want_dx: tracked[0], ..self })
    }
    fn backward((alpha, x, w, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut d = run(op, &[alpha, x, w, g])?.into_iter();
        let dw = d.next();
        Ok(vec![d.next(), dw])
    }
}

/// Attention pooling with the energies of one vector: x (N, S, D), w (D, 1) or (D), lens (N) each
/// <= S -> (N, D), a[n, j] = dot(x[n, j], w); see the module docs. With `rows` (N, each < M), x is
/// a table (M, S, D) and item n is its item rows[n], read in place (a constant table is never
/// copied; a tracked one is gathered first, so that its gradient is the gather's).
pub fn attention_pool_dot(x: &Tensor, w: &Tensor, lens: &Indices, rows: Option<&Indices>) -> Result<Tensor> {
    let op = "attention_pool_dot";
    let (sx, sw) = (x.shape(), w.shape());
    if sx.len() != 3 || !(sw == [sx[2], 1] || sw == [sx[2]]) {
        return shape_err(op, format!("rows {sx:?} and vector {sw:?} must be (N, S, D) and (D, 1) or (D)"));
    }
    let (s, d) = (sx[1], sx[2]);
    if let Some(ids) = rows {
        ids.check_below(sx[0], op, "item")?;
        if x.requires_grad() {
            let xg = embedding(&x.reshape(&[sx[0], s * d])?, ids, &[ids.len()])?.reshape(&[ids.len(), s, d])?;
            return attention_pool_dot(&xg, w, lens, None);
        }
    }
    let n = rows.map_or(sx[0], |r| r.len());
    check_lens(op, lens, &[n, s, d])?;
    let rows = rows.cloned();
    apply(PoolDot { lens: lens.clone(), rows, n, s, d, w_shape: sw.to_vec(), backward: false, want_dx: false }, &[x, w])
}

/// `lens` (N) each <= S for rows x (N, S, D).
fn check_lens(op: &'static str, lens: &Indices, sx: &[usize]) -> Result<()> {
    if lens.len() != sx[0] {
        return shape_err(op, format!("{} lengths for {} rows (x {sx:?})", lens.len(), sx[0]));
    }
    if let Some((pos, &l)) = lens.host().iter().enumerate().find(|(_, &l)| l as usize > sx[1]) {
        return Err(Error::Index { op, msg: format!("length {l} at position {pos} exceeds S = {} (x {sx:?})", sx[1]) });
    }
    Ok(())
}

/// Mixture-of-experts gating: logits (N, O), experts (N, O, D) -> (N, D) = sum_k softmax(logits[n])_k E[n, k].
pub fn moe(logits: &Tensor, experts: &Tensor) -> Result<Tensor> {
    let (sl, se) = (logits.shape(), experts.shape());
    if sl.len() != 2 || se.len() != 3 || sl != &se[..2] {
        return shape_err("moe", format!("gate logits {sl:?} and experts {se:?} must be (N, O) and (N, O, D)"));
    }
    softmax_pool("moe", logits, experts, Indices::new(vec![sl[1] as u32; sl[0]]))
}

/// Mean of each sequence's rows: x (N, C) packed by `r` (N = r.rows()) -> (B, C); see the module docs.
pub fn mean_ragged(x: &Tensor, r: &Ragged) -> Result<Tensor> {
    let [n, c] = *x.shape() else {
        return shape_err("mean_ragged", format!("x {:?} must be (N, C) packed rows", x.shape()));
    };
    if n != r.rows() {
        return shape_err("mean_ragged", format!("x has {n} rows but the ragged batch packs {} ({} sequences)", r.rows(), r.batch()));
    }
    apply(MeanRagged { r: r.clone(), c, backward: false }, &[x])
}

/// Each sequence's mean row, or (`backward`) the rows' gradient from the means'.
#[derive(Clone)]
struct MeanRagged {
    r: Ragged,
    c: usize,
    backward: bool,
}

impl Op for MeanRagged {
    fn name(&self) -> &'static str {
        "mean_ragged"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![vec![if self.backward { self.r.rows() } else { self.r.batch() }, self.c]]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![match self.backward {
            false => mean_ragged_cpu(x[0], &self.r, self.c),
            true => mean_ragged_bwd_cpu(x[0], &self.r, self.c),
        }])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Ok(vec![match self.backward {
            false => mean_ragged_gpu(x[0], &self.r, self.c)?,
            true => mean_ragged_bwd_gpu(x[0], &self.r, self.c)?,
        }])
    }
}

impl Backward for MeanRagged {
    type Saved = MeanRagged;
    fn save(self, _: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> MeanRagged {
        MeanRagged { backward: true, ..self }
    }
    /// dx = each sequence's g / its length on each of its rows
    fn backward(op: &MeanRagged, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(run(op, &[g])?.remove(0))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    #[test]
    fn rejects_bad_lengths_and_shapes() {
        let a = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
        let x = Tensor::zeros(&[2, 3, 4], Device::Cpu).unwrap();
        assert!(matches!(attention_pool(&a, &x, &Indices::new(vec![1, 4])), Err(Error::Index { .. })));
        assert!(matches!(attention_pool(&a, &x, &Indices::new(vec![1])), Err(Error::Shape { .. })));
        assert!(matches!(moe(&x, &a), Err(Error::Shape { .. })));
        let e = attention_pool(&a, &x, &Indices::new(vec![0, 3])).unwrap();
        assert_eq!(e.shape(), &[2, 4]);
        let r = Ragged::new(&[2, 1], 2).unwrap();
        assert!(matches!(mean_ragged(&a, &r), Err(Error::Shape { .. })), "2 rows for a batch packing 3");
        assert!(matches!(mean_ragged(&x, &r), Err(Error::Shape { .. })), "x must be (N, C)");
        let m = mean_ragged(&Tensor::from_vec(vec![1., 2., 3., 4., 5., 6.], &[3, 2], Device::Cpu).unwrap(), &r).unwrap();
        assert_eq!(m.to_vec().unwrap(), vec![2., 3., 5., 6.]);
    }
}
