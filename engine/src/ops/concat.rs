//! Concatenation along the first axis.
//!
//! - `concat([x_0, .., x_{p-1}])`: x_i (n_i, ..) with equal trailing axes -> (sum n_i, ..);
//!   dx_i = the rows of g that x_i filled

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::{numel, Tensor};

static COPY: Kernel<ConcatParams> = Kernel::new("concat", wgsl!("concat.wgsl"), "copy", &[Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![COPY.contract()]
}

kernel_params! {
    /// `struct P` of concat.wgsl.
    struct ConcatParams {
        n: u32,
        src_off: u32,
        dst_off: u32,
    }
}

/// dst[dst_off..dst_off + n] = src[src_off..src_off + n] on the GPU.
pub(crate) fn copy_gpu(src: &GpuBuf, src_off: usize, dst: &GpuBuf, dst_off: usize, n: usize) -> Result<()> {
    let prm = ConcatParams { n: n as u32, src_off: src_off as u32, dst_off: dst_off as u32 };
    gpu()?.dispatch(&COPY, &[src, dst], &prm, groups_1d(n))
}

/// A buffer of its own holding `t`'s values (for an op whose GPU form is made of other ops and
/// returns one of their results as its output).
pub(crate) fn owned_gpu(t: &Tensor) -> Result<GpuBuf> {
    let buf = gpu()?.alloc(4 * t.numel() as u64)?;
    copy_gpu(&*t.gbuf()?, 0, &buf, 0, t.numel())?;
    Ok(buf)
}

/// Stack the pieces' rows: all axes but the first must match.
pub fn concat(xs: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = xs.first() else {
        return shape_err("concat", "needs at least one tensor");
    };
    let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape()).collect();
    if xs.iter().any(|x| x.rank() == 0 || x.shape()[1..] != first.shape()[1..]) {
        return shape_err("concat", format!("all shapes must agree after the first axis, got {shapes:?}"));
    }
    let mut shape = first.shape().to_vec();
    shape[0] = xs.iter().map(|x| x.shape()[0]).sum();
    apply(Concat { shape, sizes: xs.iter().map(|x| x.numel()).collect() }, xs)
}

/// The inputs' values one after the other.
struct Concat {
    shape: Vec<usize>,
    /// Each input's element count.
    sizes: Vec<usize>,
}

impl Op for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![par::concat(x)])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let out = gpu()?.alloc(4 * numel(&self.shape) as u64)?;
        let mut off = 0;
        for (piece, &n) in x.iter().zip(&self.sizes) {
            copy_gpu(piece, 0, &out, off, n)?;
            off += n;
        }
        Ok(vec![out])
    }
}

/// Elements off..off + numel(shape) of the input.
struct Slice {
    off: usize,
    shape: Vec<usize>,
}

impl Op for Slice {
    fn name(&self) -> &'static str {
        "slice"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![par::concat(&[&x[0][self.off..self.off + numel(&self.shape)]])])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let n = numel(&self.shape);
        let out = gpu()?.alloc(4 * n as u64)?;
        copy_gpu(x[0], self.off, &out, 0, n)?;
        Ok(vec![out])
    }
}

impl Backward for Concat {
    /// Each piece's shape, and whether it is tracked.
    type Saved = Vec<(Vec<usize>, bool)>;
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, tracked: &[bool]) -> Self::Saved {
        x.iter().zip(tracked).map(|(x, &t)| (x.shape().to_vec(), t)).collect()
    }
    /// Each tracked piece's gradient is its part of g.
    fn backward(pieces: &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut grads = Vec::with_capacity(pieces.len());
        let mut off = 0;
        for (shape, tracked) in pieces {
            grads.push(tracked.then(|| run(&Slice { off, shape: shape.clone() }, &[g])).transpose()?.map(|mut v| v.remove(0)));
            off += numel(shape);
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    #[test]
    fn mismatched_shapes_are_named() {
        let (a, b) = (Tensor::zeros(&[2, 3], Device::Cpu).unwrap(), Tensor::zeros(&[2, 4], Device::Cpu).unwrap());
        let e = concat(&[&a, &b]).unwrap_err().to_string();
        assert!(e.contains("[[2, 3], [2, 4]]"), "{e}");
        assert!(concat(&[]).is_err());
    }
}
