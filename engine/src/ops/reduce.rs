//! Reductions, deterministic (fixed summation order, no atomics).
//!
//! - `sum_rows(x)`: x (R, C) -> (C), column sums;  dx = broadcast of g over rows
//! - `sum(x)`:      x (any) -> () scalar;            dx = g everywhere
//! - `broadcast_to(b, shape)`: b (S) -> (.., S), b repeated over the leading axes;  db = sum_rows(g)
//!
//! `sum_rows` and `broadcast_to` are each other's gradient. (`mean` is `scale(sum(x), 1/n)`, in
//! `elementwise`.)

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use crate::tensor::{numel, Storage, Tensor};

const SRC: &str = wgsl!("reduce.wgsl");
static SUM_ROWS: Kernel<ReduceParams> = Kernel::new("reduce", SRC, "sum_rows", &[Read, ReadWrite]);
static BROADCAST: Kernel<ReduceParams> = Kernel::new("reduce", SRC, "broadcast", &[Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![SUM_ROWS.contract(), BROADCAST.contract()]
}

/// Rows summed by one invocation of `sum_rows` (must match the shader).
const CHUNK: usize = 256;

kernel_params! {
    /// `struct P` of reduce.wgsl.
    struct ReduceParams {
        rows: u32,
        cols: u32,
    }
}

/// Column sums, each summed over the rows in increasing order (blocks of columns in parallel).
pub fn sum_rows_cpu<T: Real>(x: &[T], rows: usize, cols: usize) -> Vec<T> {
    let block = par::col_block(rows, cols);
    par::chunks(cols, block, block < cols, |c0, o| {
        let w = o.len();
        for r in 0..rows {
            for (o, &v) in o.iter_mut().zip(&x[r * cols + c0..r * cols + c0 + w]) {
                *o += v;
            }
        }
    })
}

/// Column sums on the GPU: repeated chunked passes until one row remains.
pub(crate) fn sum_rows_gpu(x: &GpuBuf, rows: usize, cols: usize) -> Result<GpuBuf> {
    let g = gpu()?;
    let mut rows = rows;
    let mut cur: Option<GpuBuf> = None;
    loop {
        let chunks = rows.div_ceil(CHUNK).max(1);
        let out = g.alloc(4 * (chunks * cols) as u64)?;
        let src = cur.as_ref().unwrap_or(x);
        g.dispatch(&SUM_ROWS, &[src, &out], &ReduceParams { rows: rows as u32, cols: cols as u32 }, groups_1d(chunks * cols))?;
        cur = Some(out);
        if chunks == 1 {
            return Ok(cur.unwrap());
        }
        rows = chunks;
    }
}

/// Sum over all leading axes: x (.., C) -> (C).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::Shape { op: "sum_rows", msg: "needs at least one axis".into() });
    }
    let cols = x.last_dim();
    let rows = x.numel() / cols.max(1);
    let st = on_device!(x.device(), T => T::wrap(sum_rows_cpu::<T>(&x.host::<T>()?, rows, cols)),
        Storage::Gpu(sum_rows_gpu(&*x.gbuf()?, rows, cols)?));
    let xshape = x.shape().to_vec();
    Ok(Tensor::from_op("sum_rows", st, vec![cols], &[x], move |g| Ok(vec![Some(broadcast_to(g, &xshape)?)])))
}

/// Sum of all elements: x -> () .
pub fn sum(x: &Tensor) -> Result<Tensor> {
    let s = sum_rows(&x.reshape(&[x.numel(), 1])?)?;
    s.reshape(&[])
}

/// b (nb) repeated to n elements.
pub fn broadcast_cpu<T: Real>(b: &[T], n: usize) -> Vec<T> {
    let nb = b.len();
    if nb == 0 {
        assert!(n == 0, "broadcast of an empty operand");
        return Vec::new();
    }
    par::chunks(n, par::bcast_chunk(nb), par::worth(n), |start, piece| {
        par::segments(start, piece, nb, |_, seg, bo| seg.copy_from_slice(&b[bo..bo + seg.len()]))
    })
}

/// Repeat b (S) over leading axes up to `shape` (.., S).
pub fn broadcast_to(b: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let n = numel(shape);
    let nb = b.numel();
    if nb == 0 || !n.is_multiple_of(nb) || (b.rank() > 0 && shape[shape.len().saturating_sub(b.rank())..] != *b.shape() && nb != 1) {
        return Err(Error::Shape { op: "broadcast_to", msg: format!("cannot broadcast {:?} to {shape:?}", b.shape()) });
    }
    let st = on_device!(b.device(), T => T::wrap(broadcast_cpu::<T>(&b.host::<T>()?, n)), {
        let g = gpu()?;
        let out = g.alloc(4 * n as u64)?;
        g.dispatch(&BROADCAST, &[&*b.gbuf()?, &out], &ReduceParams { rows: (n / nb) as u32, cols: nb as u32 }, groups_1d(n))?;
        Storage::Gpu(out)
    });
    let bshape = b.shape().to_vec();
    Ok(Tensor::from_op("broadcast_to", st, shape.to_vec(), &[b], move |g| {
        Ok(vec![Some(sum_rows(&g.reshape(&[g.numel() / nb, nb])?)?.reshape(&bshape)?)])
    }))
}
