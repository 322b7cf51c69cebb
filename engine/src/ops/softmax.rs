//! Softmax along the last axis, optionally over a prefix of each row.
//!
//! - `softmax(x, lens)`: x (.., S), lens (R) or None -> y (.., S), R = rows of the flattened (R, S) view.
//!   Row r takes part over its first lens[r] entries (all S without lens); the rest of the row is
//!   exactly 0, and a row with lens 0 is all zeros. Stable: exp(x - row max).
//!   Backward: dx = y * (g - sum(g * y)) (zero wherever y is), with g shifted by its value at the row's
//!   largest y first (exact in real arithmetic, and accurate in f32 where y is close to 1).
//!
//! The forward keeps a running (max, sum) per lane (online softmax), so a row is read twice.

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::{Indices, Tensor};

const SRC: &str = wgsl!("softmax.wgsl");
static FWD: Kernel<SoftmaxParams> = Kernel::new("softmax", SRC, "softmax_fwd", &[Read, Read, ReadWrite]);
static BWD: Kernel<SoftmaxParams> = Kernel::new("softmax", SRC, "softmax_bwd", &[Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![FWD.contract(), BWD.contract()]
}

kernel_params! {
    /// `struct P` of softmax.wgsl.
    struct SoftmaxParams {
        rows: u32,
        cols: u32,
        /// 1: row r takes part over its first lens[r] entries.
        has_lens: u32,
    }
}

// ---- CPU references -------------------------------------------------------------------------

/// Forward over `rows` rows of length `s`; `lens[r]` entries of row r take part (all when None).
pub fn softmax_cpu<T: Real>(x: &[T], lens: Option<&[u32]>, rows: usize, s: usize) -> Vec<T> {
    par::rows(par::Zeroed, rows, 4 * s, s, |r, yr| {
        let n = lens.map_or(s, |l| l[r] as usize);
        if n == 0 {
            return;
        }
        let (xr, yr) = (&x[r * s..r * s + n], &mut yr[..n]);
        let mx = xr.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let mut sum = T::zero();
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v - mx).exp();
            sum += *o;
        }
        yr.iter_mut().for_each(|o| *o /= sum);
    })
}

/// Backward: dx = y * (g - sum(g * y)) per row, evaluated as y * ((g - c) - sum(y * (g - c))) with
/// c = g at the row's largest y (the first one on ties): the same value, but without cancellation
/// where y is close to 1.
pub fn softmax_bwd_cpu<T: Real>(y: &[T], g: &[T], rows: usize, s: usize) -> Vec<T> {
    par::rows(par::Stale, rows, 4 * s, s, |r, dxr| {
        let (yr, gr) = (&y[r * s..(r + 1) * s], &g[r * s..(r + 1) * s]);
        let top = (0..s).fold(0, |t, i| if yr[i] > yr[t] { i } else { t });
        let c = gr[top];
        let dot: T = yr.iter().zip(gr).map(|(&yi, &gi)| yi * (gi - c)).sum();
        for ((o, &yi), &gi) in dxr.iter_mut().zip(yr).zip(gr) {
            *o = yi * ((gi - c) - dot);
        }
    })
}

// ---- GPU ------------------------------------------------------------------------------------

/// `lens` None binds x in its place (never read).
fn softmax_gpu(x: &GpuBuf, lens: Option<&GpuBuf>, rows: usize, s: usize) -> Result<GpuBuf> {
    let g = gpu()?;
    let y = g.alloc(4 * (rows * s) as u64)?;
    let prm = SoftmaxParams { rows: rows as u32, cols: s as u32, has_lens: lens.is_some() as u32 };
    g.dispatch(&FWD, &[x, lens.unwrap_or(x), &y], &prm, row_groups(rows))?;
    Ok(y)
}

fn softmax_bwd_gpu(y: &GpuBuf, dy: &GpuBuf, rows: usize, s: usize) -> Result<GpuBuf> {
    let g = gpu()?;
    let dx = g.alloc(4 * (rows * s) as u64)?;
    g.dispatch(&BWD, &[y, dy, &dx], &SoftmaxParams { rows: rows as u32, cols: s as u32, has_lens: 0 }, row_groups(rows))?;
    Ok(dx)
}

// ---- op -------------------------------------------------------------------------------------

/// Softmax of x (rows, s) over each row (its first lens[r] entries with `lens`), or (`backward`)
/// the gradient of x over inputs [y, g].
#[derive(Clone)]
struct Softmax {
    shape: Vec<usize>,
    rows: usize,
    s: usize,
    lens: Option<Indices>,
    backward: bool,
}

impl Op for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![match self.backward {
            false => softmax_cpu(x[0], self.lens.as_ref().map(|l| l.host()), self.rows, self.s),
            true => softmax_bwd_cpu(x[0], x[1], self.rows, self.s),
        }])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Ok(vec![match self.backward {
            false => softmax_gpu(x[0], self.lens.as_ref().map(|l| l.gpu()).transpose()?, self.rows, self.s)?,
            true => softmax_bwd_gpu(x[0], x[1], self.rows, self.s)?,
        }])
    }
}

impl Backward for Softmax {
    /// The output y, and the op in its backward form.
    type Saved = (Tensor, Softmax);
    fn save(self, _: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        (out.remove(0), Softmax { backward: true, lens: None, ..self })
    }
    /// dx = y * (g - sum(g * y))
    fn backward((y, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(run(op, &[y, g])?.remove(0))])
    }
}

/// Softmax over the last axis of x (.., S), over the first lens[r] entries of each row when given.
pub fn softmax(x: &Tensor, lens: Option<&Indices>) -> Result<Tensor> {
    let op = "softmax";
    let s = x.last_dim();
    if x.rank() == 0 || s == 0 {
        return Err(Error::Shape { op, msg: format!("x {:?} needs a non-empty last axis", x.shape()) });
    }
    let rows = x.numel() / s;
    if let Some(l) = lens {
        if l.len() != rows {
            return Err(Error::Shape { op, msg: format!("{} lengths for x {:?}, which has {rows} rows of {s}", l.len(), x.shape()) });
        }
        if let Some((r, &n)) = l.host().iter().enumerate().find(|(_, &n)| n as usize > s) {
            return Err(Error::Index { op, msg: format!("length {n} of row {r} exceeds the row length {s} of x {:?}", x.shape()) });
        }
    }
    apply(Softmax { shape: x.shape().to_vec(), rows, s, lens: lens.cloned(), backward: false }, &[x])
}
