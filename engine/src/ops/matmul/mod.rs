//! Matrix products. `op(x)` is the stored matrix, or its transpose when the flag is set.
//!
//! - `matmul(a, b, ta, tb)`: op(a) (M, K) or (Bt, M, K), op(b) (K, N) or (Bt, K, N) -> (M, N) or
//!   (Bt, M, N); a is stored (M, K) / (Bt, M, K), or (K, M) / (Bt, K, M) when ta; b is stored (K, N),
//!   or (N, K) when tb. A 2-D operand is broadcast over the batch of a 3-D one.
//!   d op(a) = g . op(b)^T, d op(b) = op(a)^T . g, each written in the operand's stored layout by
//!   the same kernel with other flags; a broadcast operand's gradient is summed over the batch.
//! - `linear(x, w, bias)`: x (.., K), w (K, N), bias (N) -> (.., N) = x . w + bias, the bias fused
//!   into the product;  dx = g . w^T, dw = x^T . g, dbias = sum_rows(g)
//!
//! A weight gradient such as x^T . g over 51200 rows has a tiny output and a long K: the GPU path
//! splits K over more workgroups (split-K) and sums the partial products with `sum_rows`.
//!
//! The GPU has several kernel variants ([`MatmulVariant`], one contract); which one computes a product
//! is decided per shape and adapter by [`tune`] (a cached one-time autotune, or
//! `MSM4SR_MATMUL`), variant 1 where nothing was tuned.
//!
//! Files: this one is the op (shapes, the tape, the CPU reference); [`variants`] the GPU kernels
//! side by side and the one product description [`Gemm`] they share; [`tune`] which variant runs a
//! product.

pub mod tune;
mod variants;

pub use tune::matmul_tuned;
#[cfg(test)]
pub(crate) use variants::kernels;
pub use variants::{linear_gelu_variant, matmul_variant, matmul_variant_summed, matmul_variant_support, Gemm, MatmulVariant, Support};

use super::reduce::sum_rows;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Result};
use crate::gpu::GpuBuf;
use crate::tensor::{same_device, Storage, Tensor};
use variants::{gemm_gpu_pre, gemm_gpu_with};

// ---- CPU reference --------------------------------------------------------------------------

/// The product described by `p` with strided GEMMs (a transpose is just a swap of strides).
pub fn gemm_cpu<T: Real>(a: &[T], b: &[T], bias: Option<&[T]>, p: &Gemm) -> Vec<T> {
    let (m, n, k) = (p.m, p.n, p.k);
    // The output starts as the bias on every row, or zeros; a large one is written by the pool
    // (so its pages are first touched in parallel too).
    let mut c = par::rows(p.nout * m, n, n, |_, row| {
        if let Some(bias) = bias {
            row.copy_from_slice(bias);
        }
    });
    if m * n == 0 {
        return c;
    }
    let (rsa, csa) = if p.ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if p.tb { (1, k as isize) } else { (n as isize, 1) };
    if n == 1 {
        let t0 = std::time::Instant::now();
        // Matrix . vector (e.g. attention-pooling energies over every sentence row): a GEMM would
        // first copy (pack) the whole matrix; read it once instead. b is a contiguous k-vector.
        for (z, cz) in c.chunks_mut(m).enumerate() {
            for s in 0..p.nsum {
                let i = z * p.nsum + s;
                gemv(&a[i * p.a_bs..i * p.a_bs + m * k], &b[i * p.b_bs..i * p.b_bs + k], p.ta, cz);
            }
        }
        if std::mem::size_of::<T>() == 4 {
            crate::stats::count_gemm(2 * m * k * p.nout * p.nsum, t0);
        }
        return c;
    }
    for (z, cz) in c.chunks_mut(m * n).enumerate() {
        for s in 0..p.nsum {
            let i = z * p.nsum + s;
            let beta = if bias.is_some() || s > 0 { T::one() } else { T::zero() };
            T::gemm(m, k, n, &a[i * p.a_bs..], rsa, csa, &b[i * p.b_bs..], rsb, csb, beta, cz, n as isize);
        }
    }
    c
}

/// y += op(a) x for a stored (m, k) (`ta` false: y_i += a_i . x) or (k, m) (`ta` true: y += sum_r
/// x_r a_r), y (m), x (k). Row dot products keep 8 partial sums (combined in a fixed order) so they
/// vectorize; results do not depend on the thread count.
fn gemv<T: Real>(a: &[T], x: &[T], ta: bool, y: &mut [T]) {
    let (m, k) = (y.len(), x.len());
    if !ta {
        let add = par::rows(m, 2 * k, 1, |i, o: &mut [T]| o[0] = crate::cpu::dot(&a[i * k..(i + 1) * k], x));
        y.iter_mut().zip(&add).for_each(|(o, &v)| *o += v);
        crate::cpu::pool::give(add);
    } else {
        // Column blocks of y in parallel, each summing over all k rows in order.
        let block = par::col_block(k, m);
        let add = par::chunks(m, block, par::worth(m * k), |start, piece: &mut [T]| {
            for (r, &xr) in x.iter().enumerate() {
                let row = &a[r * m + start..r * m + start + piece.len()];
                for (o, &v) in piece.iter_mut().zip(row) {
                    *o += xr * v;
                }
            }
        });
        y.iter_mut().zip(&add).for_each(|(o, &v)| *o += v);
        crate::cpu::pool::give(add);
    }
}

fn gemm_gpu(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm) -> Result<GpuBuf> {
    let v = tune::choose(a, b, bias, p)?;
    gemm_gpu_with(a, b, bias, p, v)
}

/// The product on the operands' device.
fn run(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, p: &Gemm) -> Result<Storage> {
    Ok(on_device!(a.device(), T => {
        let bias = bias.map(|t| t.host::<T>()).transpose()?;
        T::wrap(gemm_cpu::<T>(&a.host::<T>()?, &b.host::<T>()?, bias.as_deref(), p))
    }, {
        let bias = bias.map(|t| t.gbuf()).transpose()?;
        Storage::Gpu(gemm_gpu(&*a.gbuf()?, &*b.gbuf()?, bias.as_deref(), p)?)
    }))
}

/// op(x) . op(y) for gradients: `sum` adds up the batch into one matrix (a broadcast operand's
/// gradient). Shapes were checked by the forward pass.
fn grad_product(x: &Tensor, y: &Tensor, tx: bool, ty: bool, sum: bool) -> Result<Tensor> {
    let (p, shape) = Gemm::plan("matmul", x.shape(), y.shape(), tx, ty)?;
    if sum {
        Ok(Tensor::from_storage(run(x, y, None, &p.summed())?, shape[1..].to_vec()))
    } else {
        Ok(Tensor::from_storage(run(x, y, None, &p)?, shape))
    }
}

/// op(a) . op(b) (+ bias on every row), recorded on the tape.
fn product(a: &Tensor, b: &Tensor, ta: bool, tb: bool, bias: Option<&Tensor>) -> Result<Tensor> {
    let (p, shape) = Gemm::plan("matmul", a.shape(), b.shape(), ta, tb)?;
    let mut inputs = vec![a, b];
    inputs.extend(bias);
    same_device("matmul", &inputs)?;
    let st = run(a, b, bias, &p)?;
    record(a, b, ta, tb, bias, st, &p, shape)
}

/// The product's values `st` on the tape.
#[allow(clippy::too_many_arguments)]
fn record(a: &Tensor, b: &Tensor, ta: bool, tb: bool, bias: Option<&Tensor>, st: Storage, p: &Gemm, shape: Vec<usize>) -> Result<Tensor> {
    let mut inputs = vec![a, b];
    inputs.extend(bias);
    let (ac, bc) = (a.detach(), b.detach());
    let (need_a, need_b) = (a.requires_grad(), b.requires_grad());
    // A 2-D operand multiplied with a 3-D one was broadcast: its gradient sums over the batch.
    let (sum_a, sum_b) = (a.rank() == 2 && shape.len() == 3, b.rank() == 2 && shape.len() == 3);
    let (n, need_bias) = (p.n, bias.map(|b| b.requires_grad()));
    Ok(Tensor::from_op("matmul", st, shape, &inputs, move |g| {
        let da = match (need_a, ta) {
            (false, _) => None,
            (true, false) => Some(grad_product(g, &bc, false, !tb, sum_a)?),
            (true, true) => Some(grad_product(&bc, g, tb, true, sum_a)?),
        };
        let db = match (need_b, tb) {
            (false, _) => None,
            (true, false) => Some(grad_product(&ac, g, !ta, false, sum_b)?),
            (true, true) => Some(grad_product(g, &ac, true, ta, sum_b)?),
        };
        let mut grads = vec![da, db];
        match need_bias {
            Some(true) => grads.push(Some(sum_rows(&g.reshape(&[g.numel() / n.max(1), n])?)?)),
            Some(false) => grads.push(None),
            None => {}
        }
        Ok(grads)
    }))
}

// ---- ops ------------------------------------------------------------------------------------

/// op(a) . op(b): see the module docs for shapes and flags.
pub fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    Gemm::plan("matmul", a.shape(), b.shape(), ta, tb)?;
    if a.rank() == 3 && b.rank() == 2 && !ta {
        // (Bt, M, K) . (K, N) is one (Bt * M, K) . (K, N) product (and so is its weight gradient).
        let (bt, m) = (a.shape()[0], a.shape()[1]);
        let y = product(&a.reshape(&[bt * m, a.shape()[2]])?, b, false, tb, None)?;
        let n = y.shape()[1];
        return y.reshape(&[bt, m, n]);
    }
    product(a, b, ta, tb, None)
}

/// x (.., K) . w (K, N) + bias (N) -> (.., N), the bias added inside the product kernel.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let what = || format!("x {:?} . w {:?} + bias {:?}", x.shape(), w.shape(), bias.map(|b| b.shape()));
    if x.rank() == 0 || w.rank() != 2 || x.last_dim() != w.shape()[0] {
        return shape_err("linear", format!("{}: needs x (.., K) and w (K, N)", what()));
    }
    let (k, n) = (w.shape()[0], w.shape()[1]);
    if bias.is_some_and(|b| b.shape() != [n]) {
        return shape_err("linear", format!("{}: bias must have shape [{n}]", what()));
    }
    let rows = x.shape()[..x.rank() - 1].iter().product();
    let y = product(&x.reshape(&[rows, k])?, w, false, false, bias)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    y.reshape(&shape)
}

/// gelu(x . w + bias): on the GPU the GELU is the product kernel's epilogue, which also writes the
/// pre-activation h the GELU's backward needs (one kernel instead of two, and h is not read back
/// in); the tape holds the same two nodes as `gelu(&linear(..)?)`, so the backward is theirs:
/// dh = g * gelu'(h), then the product's. Elsewhere it is that composition.
pub fn linear_gelu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if x.device() != crate::device::Device::Gpu || x.rank() == 0 || w.rank() != 2 || x.last_dim() != w.shape()[0] {
        return super::gelu(&linear(x, w, bias)?);
    }
    let (k, n) = (w.shape()[0], w.shape()[1]);
    if bias.is_some_and(|b| b.shape() != [n]) {
        return super::gelu(&linear(x, w, bias)?);
    }
    let rows = x.shape()[..x.rank() - 1].iter().product();
    let x2 = x.reshape(&[rows, k])?;
    let (p, shape) = Gemm::plan("linear_gelu", x2.shape(), w.shape(), false, false)?;
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    same_device("linear_gelu", &inputs)?;
    let p = Gemm { gelu: true, ..p };
    let (y, h) = {
        let bias_buf = bias.map(|t| t.gbuf()).transpose()?;
        let (a, b) = (x2.gbuf()?, w.gbuf()?);
        let v = tune::choose(&a, &b, bias_buf.as_deref(), &p)?;
        gemm_gpu_pre(&a, &b, bias_buf.as_deref(), &p, v)?
    };
    let h = h.expect("the GELU epilogue writes the pre-activation");
    let h = record(&x2, w, false, false, bias, Storage::Gpu(h), &p, shape)?;
    let y = super::elementwise::gelu_node(&h, Storage::Gpu(y))?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    y.reshape(&shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, Device::Cpu).unwrap()
    }

    #[test]
    fn shape_errors_name_shapes_and_flags() {
        let e = matmul(&t(&[3, 4]), &t(&[5, 2]), false, false).unwrap_err().to_string();
        assert!(e.contains("[3, 4] (ta=false)") && e.contains("[5, 2] (tb=false)") && e.contains("4 vs 5"), "{e}");
        let e = matmul(&t(&[2, 3, 4]), &t(&[3, 4, 2]), false, false).unwrap_err().to_string();
        assert!(e.contains("batch sizes differ (2 vs 3)"), "{e}");
        let e = matmul(&t(&[4]), &t(&[4, 2]), false, false).unwrap_err().to_string();
        assert!(e.contains("2-D or 3-D"), "{e}");
        let e = linear(&t(&[2, 4]), &t(&[4, 3]), Some(&t(&[4]))).unwrap_err().to_string();
        assert!(e.contains("bias must have shape [3]"), "{e}");
        assert_eq!(matmul(&t(&[4, 3]), &t(&[2, 5, 4]), true, true).unwrap().shape(), [2, 3, 5]);
    }
}
