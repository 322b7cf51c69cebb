//! L2 normalisation of rows (torch.nn.functional.normalize over the last axis).
//!
//! - `l2norm(x, eps)`: x (.., C) -> y (.., C) = x / max(||x||_2, eps) per row;
//!   dx = (g - y * dot(y, g)) / ||x|| where ||x|| > eps, else g / eps

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::tensor::{Storage, Tensor};

const SRC: &str = wgsl!("norm.wgsl");
static L2NORM_FWD: Kernel<NormParams> = Kernel::new("norm", SRC, "l2norm_fwd", &[Read, ReadWrite]);
static L2NORM_BWD: Kernel<NormParams> = Kernel::new("norm", SRC, "l2norm_bwd", &[Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![L2NORM_FWD.contract(), L2NORM_BWD.contract()]
}

kernel_params! {
    /// `struct P` of norm.wgsl.
    struct NormParams {
        rows: u32,
        cols: u32,
        eps: f32,
    }
}

// ---- CPU references -------------------------------------------------------------------------

pub fn l2norm_cpu<T: Real>(x: &[T], cols: usize, eps: T) -> Vec<T> {
    par::rows(x.len() / cols, 2 * cols, cols, |r, yr| {
        let row = &x[r * cols..(r + 1) * cols];
        let nrm = row.iter().map(|&v| v * v).sum::<T>().sqrt().max(eps);
        for (o, &v) in yr.iter_mut().zip(row) {
            *o = v / nrm;
        }
    })
}

pub fn l2norm_bwd_cpu<T: Real>(x: &[T], g: &[T], cols: usize, eps: T) -> Vec<T> {
    par::rows(x.len() / cols, 3 * cols, cols, |r, dxr| {
        let (xr, gr) = (&x[r * cols..(r + 1) * cols], &g[r * cols..(r + 1) * cols]);
        let ss = xr.iter().map(|&v| v * v).sum::<T>();
        let nrm = ss.sqrt();
        if nrm > eps {
            // y * dot(y, g) = x * dot(x, g) / ||x||^2
            let k = xr.iter().zip(gr).map(|(&v, &gi)| v * gi).sum::<T>() / ss;
            for ((o, &v), &gi) in dxr.iter_mut().zip(xr).zip(gr) {
                *o = (gi - v * k) / nrm;
            }
        } else {
            for (o, &gi) in dxr.iter_mut().zip(gr) {
                *o = gi / eps;
            }
        }
    })
}

// ---- GPU ------------------------------------------------------------------------------------

/// One 64-invocation workgroup per row.
fn l2norm_gpu(k: &Kernel<NormParams>, bufs: &[&GpuBuf], rows: usize, cols: usize, eps: f32) -> Result<Storage> {
    let g = gpu()?;
    let out = g.alloc(4 * (rows * cols) as u64)?;
    let mut all = bufs.to_vec();
    all.push(&out);
    g.dispatch(k, &all, &NormParams { rows: rows as u32, cols: cols as u32, eps }, row_groups(rows))?;
    Ok(Storage::Gpu(out))
}

// ---- op -------------------------------------------------------------------------------------

/// x / max(||x||_2, eps) over the last axis (the model uses eps = 1e-12).
pub fn l2norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    if x.rank() == 0 || x.last_dim() == 0 {
        return shape_err("l2norm", format!("needs a non-empty last axis, got {:?}", x.shape()));
    }
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::Invalid(format!("l2norm: eps must be positive and finite, got {eps}")));
    }
    let cols = x.last_dim();
    let rows = x.numel() / cols;
    let st = on_device!(x.device(), T => T::wrap(l2norm_cpu::<T>(&x.host::<T>()?, cols, T::c(eps as f64))),
        l2norm_gpu(&L2NORM_FWD, &[&*x.gbuf()?], rows, cols, eps)?);
    let xc = x.detach();
    Ok(Tensor::from_op("l2norm", st, x.shape().to_vec(), &[x], move |g| {
        let st = on_device!(g.device(), T => T::wrap(l2norm_bwd_cpu::<T>(&xc.host::<T>()?, &g.host::<T>()?, cols, T::c(eps as f64))),
            l2norm_gpu(&L2NORM_BWD, &[&*xc.gbuf()?, &*g.gbuf()?], rows, cols, eps)?);
        Ok(vec![Some(Tensor::from_storage(st, g.shape().to_vec()))])
    }))
}
