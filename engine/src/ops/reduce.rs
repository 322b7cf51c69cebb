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
use crate::op::{apply, Backward, Op};
use crate::tensor::{numel, Tensor};

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
    par::col_sums(rows, cols, |r| (T::one(), &x[r * cols..(r + 1) * cols]))
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

/// x (rows, cols) summed over its rows.
struct SumRows {
    rows: usize,
    cols: usize,
}

impl Op for SumRows {
    fn name(&self) -> &'static str {
        "sum_rows"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![vec![self.cols]]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![sum_rows_cpu(x[0], self.rows, self.cols)])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Ok(vec![sum_rows_gpu(x[0], self.rows, self.cols)?])
    }
}

impl Backward for SumRows {
    /// x's shape.
    type Saved = Vec<usize>;
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Vec<usize> {
        x[0].shape().to_vec()
    }
    /// dx = g on every row
    fn backward(xshape: &Vec<usize>, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(broadcast_to(g, xshape)?)])
    }
}

/// Sum over all leading axes: x (.., C) -> (C).
pub fn sum_rows(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 0 {
        return Err(Error::Shape { op: "sum_rows", msg: "needs at least one axis".into() });
    }
    let cols = x.last_dim();
    apply(SumRows { rows: x.numel() / cols.max(1), cols }, &[x])
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
    par::chunks(par::Stale, n, par::bcast_chunk(nb), par::worth(n), |start, piece| {
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
    apply(Broadcast { shape: shape.to_vec(), nb }, &[b])
}

/// b (nb) repeated to `shape`.
struct Broadcast {
    shape: Vec<usize>,
    nb: usize,
}

impl Op for Broadcast {
    fn name(&self) -> &'static str {
        "broadcast_to"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![broadcast_cpu(x[0], numel(&self.shape))])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let (g, n) = (gpu()?, numel(&self.shape));
        let out = g.alloc(4 * n as u64)?;
        g.dispatch(&BROADCAST, &[x[0], &out], &ReduceParams { rows: (n / self.nb) as u32, cols: self.nb as u32 }, groups_1d(n))?;
        Ok(vec![out])
    }
}

impl Backward for Broadcast {
    /// b's shape.
    type Saved = Vec<usize>;
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Vec<usize> {
        x[0].shape().to_vec()
    }
    /// db = g summed over the repeats
    fn backward(bshape: &Vec<usize>, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let nb = numel(bshape);
        Ok(vec![Some(sum_rows(&g.reshape(&[g.numel() / nb, nb])?)?.reshape(bshape)?)])
    }
}
