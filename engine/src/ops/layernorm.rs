//! Layer normalization over the last axis, with optional per-group parameters.
//!
//! - `layernorm(x, gamma, beta, eps)`: x (.., C), gamma/beta (C) or (G, C) -> y (.., C).
//!   Row r of the flattened (R, C) view uses gamma[r % G] and beta[r % G] (an MoE with G experts laid
//!   out as (N, G, C) gives each expert its own LayerNorm); R must be a multiple of G.
//!   y = (x - mean) * rstd * gamma + beta, rstd = 1 / sqrt(var + eps), biased variance (torch semantics).
//!   Backward, with xhat = (x - mean) * rstd and dxhat = g * gamma:
//!   dx = rstd * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat)),
//!   dgamma[k] = sum over rows r with r % G == k of g * xhat, dbeta[k] = the same sum of g.
//!
//! - `add_layernorm(a, x, gamma, beta, eps)` = `layernorm(a + x, ..)`, a and x of one shape (the
//!   post-LN transformer's residual): on the GPU one kernel forms the sum and normalizes it (the same
//!   values, bit for bit, as the add and then the LayerNorm), saving the sum for the backward; the
//!   sum's gradient dx goes to both a and x.
//!
//! The mean is computed on values shifted by the row's first element (x - x[r, 0]), so rows with a
//! large mean lose no precision in f32. The forward saves, per row, that shifted mean and rstd.
//! dgamma/dbeta are deterministic: chunks of rows are summed in a fixed order, then the chunks.

use super::reduce::sum_rows_gpu;
use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::tensor::{same_device, Storage, Tensor};

const SRC: &str = wgsl!("layernorm.wgsl");
static FWD: Kernel<LayernormParams> = Kernel::new("layernorm", SRC, "ln_fwd", &[Read, ReadWrite, ReadWrite, Read, Read]);
static BWD_X: Kernel<LayernormParams> = Kernel::new("layernorm", SRC, "ln_bwd_x", &[Read, Read, Read, Read, ReadWrite]);
static BWD_PARAM: Kernel<LayernormParams> = Kernel::new("layernorm", SRC, "ln_bwd_param", &[Read, Read, Read, ReadWrite, ReadWrite]);
static ADD_FWD: Kernel<LayernormParams> =
    Kernel::new("layernorm", SRC, "ln_add_fwd", &[Read, ReadWrite, ReadWrite, Read, Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![FWD.contract(), BWD_X.contract(), BWD_PARAM.contract(), ADD_FWD.contract()]
}

/// Rows summed by one invocation of `ln_bwd_param` (must match the shader).
const CHUNK: usize = 64;

kernel_params! {
    /// `struct P` of layernorm.wgsl (every kernel).
    struct LayernormParams {
        rows: u32,
        cols: u32,
        groups: u32,
        eps: f32,
    }
}

// ---- CPU references -------------------------------------------------------------------------

/// Forward: (y (R, C), stats (R, 2) = [mean - x[r, 0], rstd] per row).
pub fn layernorm_cpu<T: Real>(x: &[T], gamma: &[T], beta: &[T], rows: usize, c: usize, groups: usize, eps: T) -> (Vec<T>, Vec<T>) {
    let n = T::c(c as f64);
    par::rows2(rows, 4 * c, c, 2, |r, yr, st| {
        let xr = &x[r * c..(r + 1) * c];
        let x0 = xr[0];
        let mean = xr.iter().map(|&v| v - x0).sum::<T>() / n;
        let var = xr.iter().map(|&v| (v - x0 - mean) * (v - x0 - mean)).sum::<T>() / n;
        let rstd = T::one() / (var + eps).sqrt();
        let k = (r % groups) * c;
        for (((o, &v), &gm), &bt) in yr.iter_mut().zip(xr).zip(&gamma[k..k + c]).zip(&beta[k..k + c]) {
            *o = (v - x0 - mean) * rstd * gm + bt;
        }
        st[0] = mean;
        st[1] = rstd;
    })
}

/// Backward: (dx (R, C), dgamma (G, C), dbeta (G, C)). Rows of dx are independent; dgamma and
/// dbeta are summed over the rows in increasing order, blocks of columns in parallel.
pub fn layernorm_bwd_cpu<T: Real>(
    x: &[T],
    gamma: &[T],
    stats: &[T],
    g: &[T],
    rows: usize,
    c: usize,
    groups: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = T::c(c as f64);
    let dx = par::rows(rows, 4 * c, c, |r, dxr| {
        let (xr, gr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        let k = (r % groups) * c;
        let gm = &gamma[k..k + c];
        let x0 = xr[0];
        let (mut m1, mut m2) = (T::zero(), T::zero());
        for i in 0..c {
            let dxhat = gr[i] * gm[i];
            m1 += dxhat;
            m2 += dxhat * ((xr[i] - x0 - mean) * rstd);
        }
        m1 /= n;
        m2 /= n;
        for i in 0..c {
            let xh = (xr[i] - x0 - mean) * rstd;
            dxr[i] = rstd * (gr[i] * gm[i] - m1 - xh * m2);
        }
    });
    // Parameter gradients: column j of the (G, C) parameters sums the rows r with r % G == j / C.
    let cols = groups * c;
    let block = par::col_block(rows, cols);
    let (dgamma, dbeta) = par::chunks2(cols, block, block < cols, |j0, dg, db| {
        let j1 = j0 + dg.len();
        for r in 0..rows {
            let k = (r % groups) * c;
            // This row's parameter columns [k, k + c) within the block [j0, j1).
            let (lo, hi) = (j0.max(k), j1.min(k + c));
            if lo >= hi {
                continue;
            }
            let (xr, gr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
            let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
            let x0 = xr[0];
            for j in lo..hi {
                let i = j - k;
                let xh = (xr[i] - x0 - mean) * rstd;
                dg[j - j0] += gr[i] * xh;
                db[j - j0] += gr[i];
            }
        }
    });
    (dx, dgamma, dbeta)
}

// ---- GPU ------------------------------------------------------------------------------------

fn params(rows: usize, c: usize, groups: usize, eps: f32) -> LayernormParams {
    LayernormParams { rows: rows as u32, cols: c as u32, groups: groups as u32, eps }
}

fn layernorm_gpu(x: &GpuBuf, gamma: &GpuBuf, beta: &GpuBuf, rows: usize, c: usize, groups: usize, eps: f32) -> Result<(Storage, Storage)> {
    let g = gpu()?;
    let y = g.alloc(4 * (rows * c) as u64)?;
    let stats = g.alloc(4 * (rows * 2) as u64)?;
    g.dispatch(&FWD, &[x, &stats, &y, gamma, beta], &params(rows, c, groups, eps), row_groups(rows))?;
    Ok((Storage::Gpu(y), Storage::Gpu(stats)))
}

fn layernorm_bwd_gpu(
    x: &GpuBuf,
    gamma: &GpuBuf,
    stats: &GpuBuf,
    dy: &GpuBuf,
    rows: usize,
    c: usize,
    groups: usize,
) -> Result<(Storage, Storage, Storage)> {
    let g = gpu()?;
    let prm = params(rows, c, groups, 0.0);
    let dx = g.alloc(4 * (rows * c) as u64)?;
    g.dispatch(&BWD_X, &[x, stats, dy, gamma, &dx], &prm, row_groups(rows))?;
    // Partial sums over chunks of each group's rows, (chunks, G * C), then over the chunks.
    let chunks = (rows / groups).div_ceil(CHUNK).max(1);
    let cols = groups * c;
    let pg = g.alloc(4 * (chunks * cols) as u64)?;
    let pb = g.alloc(4 * (chunks * cols) as u64)?;
    g.dispatch(&BWD_PARAM, &[x, stats, dy, &pg, &pb], &prm, groups_1d(chunks * cols))?;
    let (dgamma, dbeta) = if chunks == 1 { (pg, pb) } else { (sum_rows_gpu(&pg, chunks, cols)?, sum_rows_gpu(&pb, chunks, cols)?) };
    Ok((Storage::Gpu(dx), Storage::Gpu(dgamma), Storage::Gpu(dbeta)))
}

// ---- op -------------------------------------------------------------------------------------

/// LayerNorm over the last axis of x (.., C) with gamma, beta (C) or (G, C); see the module docs.
pub fn layernorm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "layernorm";
    let (rows, c, groups) = check(op, x, gamma, beta, eps)?;
    let dev = same_device(op, &[x, gamma, beta])?;
    let (y, stats) = on_device!(dev, T => {
        let (y, s) = layernorm_cpu::<T>(&x.host::<T>()?, &gamma.host::<T>()?, &beta.host::<T>()?, rows, c, groups, T::c(eps as f64));
        (T::wrap(y), T::wrap(s))
    }, layernorm_gpu(&*x.gbuf()?, &*gamma.gbuf()?, &*beta.gbuf()?, rows, c, groups, eps)?);
    record(op, y, stats, x.detach(), x.shape(), &[x, gamma, beta], (rows, c, groups))
}

/// LayerNorm of the residual sum a + x (a and x of one shape); see the module docs.
pub fn add_layernorm(a: &Tensor, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "add_layernorm";
    if a.shape() != x.shape() {
        return Err(Error::Shape { op, msg: format!("a {:?} and x {:?} must have one shape", a.shape(), x.shape()) });
    }
    let (rows, c, groups) = check(op, x, gamma, beta, eps)?;
    if same_device(op, &[a, x, gamma, beta])? != crate::device::Device::Gpu {
        return layernorm(&super::add(a, x)?, gamma, beta, eps);
    }
    let g = gpu()?;
    let (y, stats, sum) = (g.alloc(4 * (rows * c) as u64)?, g.alloc(4 * (rows * 2) as u64)?, g.alloc(4 * (rows * c) as u64)?);
    g.dispatch(
        &ADD_FWD,
        &[&*x.gbuf()?, &stats, &y, &*gamma.gbuf()?, &*beta.gbuf()?, &*a.gbuf()?, &sum],
        &params(rows, c, groups, eps),
        row_groups(rows),
    )?;
    let sum = Tensor::from_storage(Storage::Gpu(sum), x.shape().to_vec());
    record(op, Storage::Gpu(y), Storage::Gpu(stats), sum, x.shape(), &[a, x, gamma, beta], (rows, c, groups))
}

/// Shape checks of both ops: (rows, C, groups).
fn check(op: &'static str, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<(usize, usize, usize)> {
    let c = x.last_dim();
    if x.rank() == 0 || c == 0 {
        return Err(Error::Shape { op, msg: format!("x {:?} needs a non-empty last axis", x.shape()) });
    }
    let groups = match gamma.shape() {
        [gc] if *gc == c => 1,
        [gg, gc] if *gc == c && *gg > 0 => *gg,
        s => return Err(Error::Shape { op, msg: format!("gamma {s:?} must be ({c}) or (G, {c}) for x {:?}", x.shape()) }),
    };
    if beta.shape() != gamma.shape() {
        return Err(Error::Shape { op, msg: format!("beta {:?} must have gamma's shape {:?}", beta.shape(), gamma.shape()) });
    }
    let rows = x.numel() / c;
    if !rows.is_multiple_of(groups) {
        return Err(Error::Shape {
            op,
            msg: format!("x {:?} has {rows} rows, not a multiple of the {groups} parameter groups of gamma {:?}", x.shape(), gamma.shape()),
        });
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::Invalid(format!("{op}: eps must be >= 0, got {eps}")));
    }
    Ok((rows, c, groups))
}

/// The output y on the tape. `xs` is the normalized input (x, or the saved sum); `inputs` end with
/// gamma, beta, and every input before them gets the same gradient dx.
fn record(
    op: &'static str,
    y: Storage,
    stats: Storage,
    xs: Tensor,
    shape: &[usize],
    inputs: &[&Tensor],
    (rows, c, groups): (usize, usize, usize),
) -> Result<Tensor> {
    let stats = Tensor::from_storage(stats, vec![rows, 2]);
    let n = inputs.len();
    let gc = inputs[n - 2].detach();
    let pshape = gc.shape().to_vec();
    Ok(Tensor::from_op(op, y, shape.to_vec(), inputs, move |g| {
        let (dx, dgamma, dbeta) = on_device!(g.device(), T => {
            let (dx, dg, db) =
                layernorm_bwd_cpu::<T>(&xs.host::<T>()?, &gc.host::<T>()?, &stats.host::<T>()?, &g.host::<T>()?, rows, c, groups);
            (T::wrap(dx), T::wrap(dg), T::wrap(db))
        }, layernorm_bwd_gpu(&*xs.gbuf()?, &*gc.gbuf()?, &*stats.gbuf()?, &*g.gbuf()?, rows, c, groups)?);
        let dx = Tensor::from_storage(dx, g.shape().to_vec());
        let mut grads = vec![Some(dx); n - 2];
        grads.push(Some(Tensor::from_storage(dgamma, pshape.clone())));
        grads.push(Some(Tensor::from_storage(dbeta, pshape.clone())));
        Ok(grads)
    }))
}
