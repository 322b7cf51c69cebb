//! L2 normalisation of rows (torch.nn.functional.normalize over the last axis).
//!
//! - `l2norm(x, eps)`: x (.., C) -> y (.., C) = x / max(||x||_2, eps) per row;
//!   dx = (g - y * dot(y, g)) / ||x|| where ||x|| > eps, else g / eps

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::Tensor;

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
    par::rows(par::Stale, x.len() / cols, 2 * cols, cols, |r, yr| {
        let row = &x[r * cols..(r + 1) * cols];
        let nrm = row.iter().map(|&v| v * v).sum::<T>().sqrt().max(eps);
        for (o, &v) in yr.iter_mut().zip(row) {
            *o = v / nrm;
        }
    })
}

pub fn l2norm_bwd_cpu<T: Real>(x: &[T], g: &[T], cols: usize, eps: T) -> Vec<T> {
    par::rows(par::Stale, x.len() / cols, 3 * cols, cols, |r, dxr| {
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
fn l2norm_gpu(k: &Kernel<NormParams>, bufs: &[&GpuBuf], rows: usize, cols: usize, eps: f32) -> Result<GpuBuf> {
    let g = gpu()?;
    let out = g.alloc(4 * (rows * cols) as u64)?;
    let mut all = bufs.to_vec();
    all.push(&out);
    g.dispatch(k, &all, &NormParams { rows: rows as u32, cols: cols as u32, eps }, row_groups(rows))?;
    Ok(out)
}

// ---- op -------------------------------------------------------------------------------------

/// x (rows, cols) over its rows' norms, or (`backward`) the gradient of x over inputs [x, g].
#[derive(Clone)]
struct L2Norm {
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    eps: f32,
    backward: bool,
}

impl Op for L2Norm {
    fn name(&self) -> &'static str {
        "l2norm"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let eps = T::c(self.eps as f64);
        Ok(vec![match self.backward {
            false => l2norm_cpu(x[0], self.cols, eps),
            true => l2norm_bwd_cpu(x[0], x[1], self.cols, eps),
        }])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let k = if self.backward { &L2NORM_BWD } else { &L2NORM_FWD };
        Ok(vec![l2norm_gpu(k, x, self.rows, self.cols, self.eps)?])
    }
}

impl Backward for L2Norm {
    /// x, and the op in its backward form.
    type Saved = (Tensor, L2Norm);
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        (x[0].detach(), L2Norm { backward: true, ..self })
    }
    fn backward((x, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(run(op, &[x, g])?.remove(0))])
    }
}

/// x / max(||x||_2, eps) over the last axis (the model uses eps = 1e-12).
pub fn l2norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    if x.rank() == 0 || x.last_dim() == 0 {
        return shape_err("l2norm", format!("needs a non-empty last axis, got {:?}", x.shape()));
    }
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(Error::Invalid(format!("l2norm: eps must be positive and finite, got {eps}")));
    }
    let cols = x.last_dim();
    apply(L2Norm { shape: x.shape().to_vec(), rows: x.numel() / cols, cols, eps, backward: false }, &[x])
}
