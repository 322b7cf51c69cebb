//! Softmax along the last axis, optionally over a prefix of each row.
//!
//! - `softmax(x, lens)`: x (.., S), lens (R) or None -> y (.., S), R = rows of the flattened (R, S) view.
//!   Row r takes part over its first lens[r] entries (all S without lens); the rest of the row is
//!   exactly 0, and a row with lens 0 is all zeros. Stable: exp(x - row max).
//!   Backward: dx = y * (g - sum(g * y)) (zero wherever y is), with g shifted by its value at the row's
//!   largest y first (exact in real arithmetic, and accurate in f32 where y is close to 1).
//!
//! The forward keeps a running (max, sum) per lane (online softmax), so a row is read twice.

use std::cell::OnceCell;
use std::rc::Rc;

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::tensor::{Indices, Storage, Tensor};

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
    par::rows(rows, 4 * s, s, |r, yr| {
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
    par::rows(rows, 4 * s, s, |r, dxr| {
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
fn softmax_gpu(x: &GpuBuf, lens: Option<&GpuBuf>, rows: usize, s: usize) -> Result<Storage> {
    let g = gpu()?;
    let y = g.alloc(4 * (rows * s) as u64)?;
    let prm = SoftmaxParams { rows: rows as u32, cols: s as u32, has_lens: lens.is_some() as u32 };
    g.dispatch(&FWD, &[x, lens.unwrap_or(x), &y], &prm, row_groups(rows))?;
    Ok(Storage::Gpu(y))
}

fn softmax_bwd_gpu(y: &GpuBuf, dy: &GpuBuf, rows: usize, s: usize) -> Result<Storage> {
    let g = gpu()?;
    let dx = g.alloc(4 * (rows * s) as u64)?;
    g.dispatch(&BWD, &[y, dy, &dx], &SoftmaxParams { rows: rows as u32, cols: s as u32, has_lens: 0 }, row_groups(rows))?;
    Ok(Storage::Gpu(dx))
}

// ---- op -------------------------------------------------------------------------------------

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
    let st = on_device!(x.device(), T => T::wrap(softmax_cpu::<T>(&x.host::<T>()?, lens.map(|l| l.host()), rows, s)),
        softmax_gpu(&*x.gbuf()?, lens.map(|l| l.gpu()).transpose()?, rows, s)?);
    // The backward needs the output itself: it is filled in once the output exists.
    let saved: Rc<OnceCell<Tensor>> = Rc::new(OnceCell::new());
    let y = saved.clone();
    let out = Tensor::from_op(op, st, x.shape().to_vec(), &[x], move |g| {
        let y = y.get().expect("softmax output saved");
        let dx = on_device!(g.device(), T => T::wrap(softmax_bwd_cpu::<T>(&y.host::<T>()?, &g.host::<T>()?, rows, s)),
            softmax_bwd_gpu(&*y.gbuf()?, &*g.gbuf()?, rows, s)?);
        Ok(vec![Some(Tensor::from_storage(dx, g.shape().to_vec()))])
    });
    if out.requires_grad() {
        let _ = saved.set(out.detach());
    }
    Ok(out)
}
