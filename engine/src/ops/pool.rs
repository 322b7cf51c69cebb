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
//! - `moe(logits, experts)`: logits (N, O), experts (N, O, D) -> z (N, D) = sum_k g[n, k] E[n, k]
//!   with g = softmax(logits[n]); backward as above with lens = O.
//! - `mean_ragged(x, r)`: x (N, C) packed by a [`Ragged`] batch (sequence b owns rows offsets[b] ..
//!   offsets[b + 1], n_b >= 1 of them) -> e (B, C), e[b] = (sum of sequence b's rows) / n_b, the rows
//!   summed in order. Backward: dx[t] = de[b] / n_b for each row t of sequence b.

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::ragged::Ragged;
use crate::tensor::{Indices, Tensor};

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

/// Forward: a (N, S), x (N, S, D), lens (N) -> (e (N, D), alpha (N, S)).
pub fn pool_cpu<T: Real>(a: &[T], x: &[T], lens: &[u32], n: usize, s: usize, d: usize) -> (Vec<T>, Vec<T>) {
    par::rows2(n, s * (d + 2), d, s, |r, er, al| {
        let len = lens[r] as usize;
        let ar = &a[r * s..r * s + len];
        let m = ar.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let z: T = ar.iter().map(|&v| (v - m).exp()).sum();
        for j in 0..len {
            let w = (ar[j] - m).exp() / z;
            al[j] = w;
            for (o, &xv) in er.iter_mut().zip(&x[(r * s + j) * d..(r * s + j + 1) * d]) {
                *o += w * xv;
            }
        }
    })
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
    par::rows2(n, s * (d + 2) + dxw, s, dxw, |r, dar, dxr| {
        let len = lens[r] as usize;
        let der = &de[r * d..(r + 1) * d];
        // dalpha[j] = dot(de[r], x[r, j]) for up to 8 j at once: each sum still runs over d in
        // order from -0.0 (as `Iterator::sum` does), but 8 independent sums hide the add latency.
        for j0 in (0..len).step_by(8) {
            let w = (len - j0).min(8);
            let mut acc = [-T::zero(); 8];
            let xs = &x[(r * s + j0) * d..(r * s + j0 + w) * d];
            for (k, &g) in der.iter().enumerate() {
                for (jj, a) in acc[..w].iter_mut().enumerate() {
                    *a += g * xs[jj * d + k];
                }
            }
            dar[j0..j0 + w].copy_from_slice(&acc[..w]);
        }
        let mut tot = T::zero();
        for j in 0..len {
            tot += alpha[r * s + j] * dar[j];
        }
        for j in 0..len {
            let w = alpha[r * s + j];
            dar[j] = w * (dar[j] - tot);
            if want_dx {
                for (o, &g) in dxr[j * d..(j + 1) * d].iter_mut().zip(der) {
                    *o = w * g;
                }
            }
        }
    })
}

/// Ragged mean forward: x (N, C) packed by `r` -> e (B, C). Sequences in parallel.
pub fn mean_ragged_cpu<T: Real>(x: &[T], r: &Ragged, c: usize) -> Vec<T> {
    let work = c * (r.rows() / r.batch().max(1) + 1);
    let offs = &r.offsets[..];
    par::rows(r.batch(), work, c, |b, er| {
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
    if lens.len() != sa[0] {
        return shape_err("attention_pool", format!("{} lengths for {} rows (x {sx:?})", lens.len(), sa[0]));
    }
    if let Some((pos, &l)) = lens.host().iter().enumerate().find(|(_, &l)| l as usize > sa[1]) {
        return Err(Error::Index { op: "attention_pool", msg: format!("length {l} at position {pos} exceeds S = {} (x {sx:?})", sa[1]) });
    }
    softmax_pool("attention_pool", a, x, lens.clone())
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
