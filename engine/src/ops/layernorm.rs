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
use crate::cpu::{par, sum8_of, sum8_of2, sum8_rows4, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::Tensor;

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

/// One row: y and [mean - x[0], rstd] of the row xr, with the parameters of its group at k.
#[inline(always)]
fn ln_row<T: Real>(xr: &[T], params: (&[T], &[T]), k: usize, eps: T, yr: &mut [T], st: &mut [T]) {
    let n = T::c(xr.len() as f64);
    let x0 = xr[0];
    let mean = sum8_of(xr, |v| v - x0) / n;
    let var = sum8_of(xr, |v| (v - x0 - mean) * (v - x0 - mean)) / n;
    ln_normalize(xr, (x0, mean, var), params, k, eps, yr, st);
}

/// The end of `ln_row` once a row's mean and variance are known: y, and [mean, rstd] in `st`.
#[inline(always)]
fn ln_normalize<T: Real>(xr: &[T], (x0, mean, var): (T, T, T), (gamma, beta): (&[T], &[T]), k: usize, eps: T, yr: &mut [T], st: &mut [T]) {
    let c = xr.len();
    let rstd = T::one() / (var + eps).sqrt();
    for (((o, &v), &gm), &bt) in yr.iter_mut().zip(xr).zip(&gamma[k..k + c]).zip(&beta[k..k + c]) {
        *o = (v - x0 - mean) * rstd * gm + bt;
    }
    st[0] = mean;
    st[1] = rstd;
}

/// Rows r0.. (as many as `y` holds, c values each, given as `xg`): `ln_row` on each, four at a
/// time with their sums side by side ([`sum8_rows4`]: the same bits).
#[inline(always)]
pub(crate) fn ln_rows<T: Real>(xg: &[T], params: (&[T], &[T]), (r0, c, groups): (usize, usize, usize), eps: T, y: &mut [T], st: &mut [T]) {
    if y.len() < 4 * c {
        for (i, ((xr, yr), st)) in xg.chunks_exact(c).zip(y.chunks_exact_mut(c)).zip(st.chunks_exact_mut(2)).enumerate() {
            ln_row(xr, params, ((r0 + i) % groups) * c, eps, yr, st);
        }
        return;
    }
    let n = T::c(c as f64);
    let xs: [&[T]; 4] = std::array::from_fn(|i| &xg[i * c..(i + 1) * c]);
    let x0: [T; 4] = std::array::from_fn(|i| xs[i][0]);
    let mean = sum8_rows4(xs, xs, |i, v, _| v - x0[i]).map(|s| s / n);
    let var = sum8_rows4(xs, xs, |i, v, _| (v - x0[i] - mean[i]) * (v - x0[i] - mean[i])).map(|s| s / n);
    for (i, (yr, st)) in y.chunks_exact_mut(c).zip(st.chunks_exact_mut(2)).enumerate() {
        ln_normalize(xs[i], (x0[i], mean[i], var[i]), params, ((r0 + i) % groups) * c, eps, yr, st);
    }
}

/// Forward: (y (R, C), stats (R, 2) = [mean - x[r, 0], rstd] per row).
pub fn layernorm_cpu<T: Real>(x: &[T], gamma: &[T], beta: &[T], rows: usize, c: usize, groups: usize, eps: T) -> (Vec<T>, Vec<T>) {
    par::row_groups2(par::Stale, rows, 4, 4 * c, (c, 2), |r0, y, st| {
        ln_rows(&x[r0 * c..r0 * c + y.len()], (gamma, beta), (r0, c, groups), eps, y, st)
    })
}

/// Forward of LayerNorm(a + x) in one pass over the rows: (y, stats, the sum a + x), each row's
/// sum made and normalized while it is in cache (the bits of `axpby_cpu` then `layernorm_cpu`).
#[allow(clippy::too_many_arguments)]
pub fn add_layernorm_cpu<T: Real>(
    a: &[T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    (rows, c, groups): (usize, usize, usize),
    eps: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    par::row_groups3(par::Stale, rows, 4, 6 * c, (c, 2, c), |r0, y, st, sg| {
        let span = r0 * c..r0 * c + sg.len();
        for ((o, &u), &v) in sg.iter_mut().zip(&a[span.clone()]).zip(&x[span]) {
            *o = u + T::one() * v;
        }
        ln_rows(sg, (gamma, beta), (r0, c, groups), eps, y, st);
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
    let dx_rows = |r0: usize, dx: &mut [T]| ln_dx_rows(&x[r0 * c..], gamma, &stats[2 * r0..], &g[r0 * c..], (r0, c, groups), dx);
    // Parameter gradients: column j of the (G, C) parameters sums the rows r with r % G == j / C,
    // in increasing order. Each block of columns [j0, j0 + w) reads the rows in order, every row
    // once (its group's columns within the block).
    let cols = groups * c;
    let block = par::col_block(rows, cols);
    // Row r's parameter columns [lo, hi) (within its group's [k, k + c), k = (r % groups) * c)
    // added into (ag, ab).
    let add_row = |r: usize, k: usize, (lo, hi): (usize, usize), ag: &mut [T], ab: &mut [T]| {
        let (xr, gr) = (&x[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
        let (mean, rstd, x0) = (stats[2 * r], stats[2 * r + 1], xr[0]);
        for (((ag, ab), &xv), &gv) in ag.iter_mut().zip(ab).zip(&xr[lo - k..hi - k]).zip(&gr[lo - k..hi - k]) {
            let xh = (xv - x0 - mean) * rstd;
            *ag += gv * xh;
            *ab += gv;
        }
    };
    let params = || {
        par::chunks2(par::Zeroed, cols, block, block < cols, |j0, dg, db| {
            if groups == 1 {
                // Every row meets every column: four cache lines of columns at a time, their sums
                // in registers (a row's adds into memory would wait on the previous row's).
                const SPAN: usize = 4 * par::LINE;
                for s0 in (0..dg.len()).step_by(SPAN) {
                    let (b0, b1) = (j0 + s0, j0 + (s0 + SPAN).min(dg.len()));
                    let (mut ag, mut ab) = ([T::zero(); SPAN], [T::zero(); SPAN]);
                    for r in 0..rows {
                        add_row(r, 0, (b0, b1), &mut ag, &mut ab);
                    }
                    dg[s0..s0 + (b1 - b0)].copy_from_slice(&ag[..b1 - b0]);
                    db[s0..s0 + (b1 - b0)].copy_from_slice(&ab[..b1 - b0]);
                }
                return;
            }
            // Several groups (the MoE's experts): consecutive rows add into different groups'
            // columns, so into memory is no slower, and every row is read once, in order.
            let j1 = j0 + dg.len();
            for r in 0..rows {
                let k = (r % groups) * c;
                // This row's parameter columns [k, k + c) within [j0, j1), if any.
                let (lo, hi) = (j0.max(k), j1.min(k + c));
                if lo < hi {
                    add_row(r, k, (lo, hi), &mut dg[lo - j0..hi - j0], &mut db[lo - j0..hi - j0]);
                }
            }
        })
    };
    // The parameters' column sums beside the rows of dx: at the transformer's width (64 columns)
    // they are one task, which the rows fill the other threads around.
    let (dx, (dgamma, dbeta)) = par::row_groups_beside(par::Stale, rows, 4, 4 * c, c, dx_rows, params);
    (dx, dgamma, dbeta)
}

/// dx of LayerNorm rows r0.. (as many as `dx` holds, at most four: four side by side), given
/// those rows' x, statistics and g (`x`, `stats`, `g` start at row r0).
#[inline(always)]
pub(crate) fn ln_dx_rows<T: Real>(x: &[T], gamma: &[T], stats: &[T], g: &[T], (r0, c, groups): (usize, usize, usize), dx: &mut [T]) {
    let n = T::c(c as f64);
    // Each row's g * gamma goes into its dx row first; the sums m1 = mean(g gamma) and m2 =
    // mean(g gamma xhat) and then dx read it back: dx = rstd (g gamma - m1 - xhat m2).
    for (i, dxr) in dx.chunks_exact_mut(c).enumerate() {
        let gm = &gamma[((r0 + i) % groups) * c..][..c];
        for ((o, &g), &w) in dxr.iter_mut().zip(&g[i * c..(i + 1) * c]).zip(gm) {
            *o = g * w;
        }
    }
    let dx_from = |i: usize, dxr: &mut [T], (m1, m2): (T, T)| {
        let (mean, rstd) = (stats[2 * i], stats[2 * i + 1]);
        let xr = &x[i * c..(i + 1) * c];
        let x0 = xr[0];
        for (o, &x) in dxr.iter_mut().zip(xr) {
            let xh = (x - x0 - mean) * rstd;
            *o = rstd * (*o - m1 - xh * m2);
        }
    };
    if dx.len() < 4 * c {
        for (i, dxr) in dx.chunks_exact_mut(c).enumerate() {
            let (xr, mean, rstd) = (&x[i * c..(i + 1) * c], stats[2 * i], stats[2 * i + 1]);
            let x0 = xr[0];
            let m1 = sum8_of(dxr, |v| v) / n;
            let m2 = sum8_of2(dxr, xr, |v, x| v * ((x - x0 - mean) * rstd)) / n;
            dx_from(i, dxr, (m1, m2));
        }
        return;
    }
    // Four rows at a time, their sums side by side (`sum8_rows4`: the bits of one row's
    // `sum8_of` / `sum8_of2`).
    let xs: [&[T]; 4] = std::array::from_fn(|i| &x[i * c..(i + 1) * c]);
    let (mean, rstd): ([T; 4], [T; 4]) = (std::array::from_fn(|i| stats[2 * i]), std::array::from_fn(|i| stats[2 * i + 1]));
    let x0: [T; 4] = std::array::from_fn(|i| xs[i][0]);
    let gw: [&[T]; 4] = std::array::from_fn(|i| &dx[i * c..(i + 1) * c]);
    let m1 = sum8_rows4(gw, gw, |_, v, _| v).map(|s| s / n);
    let m2 = sum8_rows4(gw, xs, |i, v, x| v * ((x - x0[i] - mean[i]) * rstd[i])).map(|s| s / n);
    for (i, dxr) in dx.chunks_exact_mut(c).enumerate() {
        dx_from(i, dxr, (m1[i], m2[i]));
    }
}

// ---- GPU ------------------------------------------------------------------------------------

fn params(rows: usize, c: usize, groups: usize, eps: f32) -> LayernormParams {
    LayernormParams { rows: rows as u32, cols: c as u32, groups: groups as u32, eps }
}

fn layernorm_gpu(x: &GpuBuf, gamma: &GpuBuf, beta: &GpuBuf, rows: usize, c: usize, groups: usize, eps: f32) -> Result<(GpuBuf, GpuBuf)> {
    let g = gpu()?;
    let y = g.alloc(4 * (rows * c) as u64)?;
    let stats = g.alloc(4 * (rows * 2) as u64)?;
    g.dispatch(&FWD, &[x, &stats, &y, gamma, beta], &params(rows, c, groups, eps), row_groups(rows))?;
    Ok((y, stats))
}

fn layernorm_bwd_gpu(
    x: &GpuBuf,
    gamma: &GpuBuf,
    stats: &GpuBuf,
    dy: &GpuBuf,
    rows: usize,
    c: usize,
    groups: usize,
) -> Result<(GpuBuf, GpuBuf, GpuBuf)> {
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
    Ok((dx, dgamma, dbeta))
}

// ---- op -------------------------------------------------------------------------------------

/// LayerNorm of x over inputs [x, gamma, beta], or (`add`) of a + x over [a, x, gamma, beta]:
/// outputs y, the per-row statistics (rows, 2) and, with `add`, the sum. In the backward form,
/// (dx, dgamma, dbeta) over [x or the sum, gamma, statistics, g].
#[derive(Clone)]
struct LayerNorm {
    shape: Vec<usize>,
    rows: usize,
    c: usize,
    groups: usize,
    eps: f32,
    add: bool,
    backward: bool,
}

impl Op for LayerNorm {
    fn name(&self) -> &'static str {
        if self.add {
            "add_layernorm"
        } else {
            "layernorm"
        }
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let (x, stats, params) = (self.shape.clone(), vec![self.rows, 2], vec![self.groups, self.c]);
        match (self.backward, self.add) {
            (true, _) => vec![x, params.clone(), params],
            (false, false) => vec![x, stats],
            (false, true) => vec![x.clone(), stats, x],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (rows, c, groups) = (self.rows, self.c, self.groups);
        if self.backward {
            let (dx, dg, db) = layernorm_bwd_cpu(x[0], x[1], x[2], x[3], rows, c, groups);
            return Ok(vec![dx, dg, db]);
        }
        let eps = T::c(self.eps as f64);
        if self.add {
            let (y, stats, sum) = add_layernorm_cpu(x[0], x[1], x[2], x[3], (rows, c, groups), eps);
            return Ok(vec![y, stats, sum]);
        }
        let (y, stats) = layernorm_cpu(x[0], x[1], x[2], rows, c, groups, eps);
        Ok(vec![y, stats])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let (rows, c, groups) = (self.rows, self.c, self.groups);
        if self.backward {
            let (dx, dg, db) = layernorm_bwd_gpu(x[0], x[1], x[2], x[3], rows, c, groups)?;
            return Ok(vec![dx, dg, db]);
        }
        if !self.add {
            let (y, stats) = layernorm_gpu(x[0], x[1], x[2], rows, c, groups, self.eps)?;
            return Ok(vec![y, stats]);
        }
        let g = gpu()?;
        let (y, stats, sum) = (g.alloc(4 * (rows * c) as u64)?, g.alloc(4 * (rows * 2) as u64)?, g.alloc(4 * (rows * c) as u64)?);
        let (a, xx, gamma, beta) = (x[0], x[1], x[2], x[3]);
        g.dispatch(&ADD_FWD, &[xx, &stats, &y, gamma, beta, a, &sum], &params(rows, c, groups, self.eps), row_groups(rows))?;
        Ok(vec![y, stats, sum])
    }
}

/// What the backward reads: the normalized input (x, or the saved sum), gamma, the statistics,
/// how many inputs share dx, and the op in its backward form.
struct LayerNormSaved {
    xs: Tensor,
    gamma: Tensor,
    stats: Tensor,
    summands: usize,
    op: LayerNorm,
}

impl Backward for LayerNorm {
    type Saved = LayerNormSaved;
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> LayerNormSaved {
        let n = x.len();
        let xs = if self.add { out.remove(2) } else { x[0].detach() };
        LayerNormSaved { xs, gamma: x[n - 2].detach(), stats: out.remove(1), summands: n - 2, op: LayerNorm { backward: true, ..self } }
    }
    /// dx (to every summand), dgamma, dbeta: see the module docs.
    fn backward(s: &LayerNormSaved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut d = run(&s.op, &[&s.xs, &s.gamma, &s.stats, g])?.into_iter();
        let (dx, dgamma, dbeta) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
        let mut grads = vec![Some(dx); s.summands];
        grads.push(Some(dgamma.reshape(s.gamma.shape())?));
        grads.push(Some(dbeta.reshape(s.gamma.shape())?));
        Ok(grads)
    }
}

/// LayerNorm over the last axis of x (.., C) with gamma, beta (C) or (G, C); see the module docs.
pub fn layernorm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let (rows, c, groups) = check("layernorm", x, gamma, beta, eps)?;
    let op = LayerNorm { shape: x.shape().to_vec(), rows, c, groups, eps, add: false, backward: false };
    apply(op, &[x, gamma, beta])
}

/// LayerNorm of the residual sum a + x (a and x of one shape); see the module docs.
pub fn add_layernorm(a: &Tensor, x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let op = "add_layernorm";
    if a.shape() != x.shape() {
        return Err(Error::Shape { op, msg: format!("a {:?} and x {:?} must have one shape", a.shape(), x.shape()) });
    }
    let (rows, c, groups) = check(op, x, gamma, beta, eps)?;
    let op = LayerNorm { shape: x.shape().to_vec(), rows, c, groups, eps, add: true, backward: false };
    apply(op, &[a, x, gamma, beta])
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
