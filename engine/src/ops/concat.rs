//! Concatenation along the first axis.
//!
//! - `concat([x_0, .., x_{p-1}])`: x_i (n_i, ..) with equal trailing axes -> (sum n_i, ..);
//!   dx_i = the rows of g that x_i filled

use super::wgsl;
use crate::cpu::Real;
use crate::error::{shape_err, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use crate::tensor::{same_device, Storage, Tensor};

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

/// Stack the pieces' rows: all axes but the first must match.
pub fn concat(xs: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = xs.first() else {
        return shape_err("concat", "needs at least one tensor");
    };
    let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape()).collect();
    if xs.iter().any(|x| x.rank() == 0 || x.shape()[1..] != first.shape()[1..]) {
        return shape_err("concat", format!("all shapes must agree after the first axis, got {shapes:?}"));
    }
    let dev = same_device("concat", xs)?;
    let sizes: Vec<usize> = xs.iter().map(|x| x.numel()).collect();
    let total: usize = sizes.iter().sum();
    let st = on_device!(dev, T => {
        let mut v = crate::cpu::pool::take(total);
        for x in xs {
            v.extend_from_slice(&x.host::<T>()?);
        }
        T::wrap(v)
    }, {
        let out = gpu()?.alloc(4 * total as u64)?;
        let mut off = 0;
        for (x, &n) in xs.iter().zip(&sizes) {
            copy_gpu(&*x.gbuf()?, 0, &out, off, n)?;
            off += n;
        }
        Storage::Gpu(out)
    });
    let mut shape = first.shape().to_vec();
    shape[0] = xs.iter().map(|x| x.shape()[0]).sum();
    let pieces: Vec<(Vec<usize>, bool)> = xs.iter().map(|x| (x.shape().to_vec(), x.requires_grad())).collect();
    Ok(Tensor::from_op("concat", st, shape, xs, move |g| {
        let mut grads = Vec::with_capacity(pieces.len());
        let mut off = 0;
        for (shape, need) in &pieces {
            let n: usize = shape.iter().product();
            if *need {
                let st = on_device!(g.device(), T => T::wrap(crate::cpu::pool::copy_of(&g.host::<T>()?[off..off + n])), {
                    let out = gpu()?.alloc(4 * n as u64)?;
                    copy_gpu(&*g.gbuf()?, off, &out, 0, n)?;
                    Storage::Gpu(out)
                });
                grads.push(Some(Tensor::from_storage(st, shape.clone())));
            } else {
                grads.push(None);
            }
            off += n;
        }
        Ok(grads)
    }))
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
