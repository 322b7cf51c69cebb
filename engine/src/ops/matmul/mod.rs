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

use super::elementwise::{gelu_slope_cpu, mul_into, Act};
use super::reduce::sum_rows;
use crate::cpu::{par, Real};
use crate::device::Device;
use crate::error::{shape_err, Result};
use crate::gpu::GpuBuf;
use crate::op::{apply, run, Backward, Op};
use crate::tensor::Tensor;
use variants::{gemm_gpu_pre, gemm_gpu_with};

// ---- CPU reference --------------------------------------------------------------------------

/// The product described by `p` with strided GEMMs (a transpose is just a swap of strides).
pub fn gemm_cpu<T: Real>(a: &[T], b: &[T], bias: Option<&[T]>, p: &Gemm) -> Vec<T> {
    let (m, n, k) = (p.m, p.n, p.k);
    // The output starts as the bias on every row; without one the GEMM writes it whole (beta 0),
    // so its earlier contents do not matter, except for the matrix . vector path, which adds.
    let len = p.nout * m * n;
    let mut c = if bias.is_none() && n == 1 { crate::cpu::pool::zeros(len) } else { crate::cpu::pool::stale(len) };
    if let Some(bias) = bias {
        par::rows_apply(&mut c, n, |_, row| row.copy_from_slice(bias));
    }
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
            crate::cpu::count_gemm(2 * m * k * p.nout * p.nsum, t0);
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
        let add = par::rows(par::Zeroed, m, 2 * k, 1, |i, o: &mut [T]| o[0] = crate::cpu::dot(&a[i * k..(i + 1) * k], x));
        y.iter_mut().zip(&add).for_each(|(o, &v)| *o += v);
        crate::cpu::pool::give(add);
    } else {
        // Column blocks of y in parallel, each summing over all k rows in order.
        let add = par::col_sums(k, m, |r| (x[r], &a[r * m..(r + 1) * m]));
        y.iter_mut().zip(&add).for_each(|(o, &v)| *o += v);
        crate::cpu::pool::give(add);
    }
}

/// op(a) . op(b) (+ bias on every row): inputs [a, b] or [a, b, bias]; with `gelu`, the GELU of
/// it, and as the second output what the GELU's backward needs: on the GPU the product itself (the
/// GELU is the product kernel's epilogue, which writes it), on the CPU the GELU's slope at it
/// (made with the GELU in the pass that follows the product, so the backward is one product).
struct Product {
    p: Gemm,
    shape: Vec<usize>,
}

impl Op for Product {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        match self.p.gelu {
            false => vec![self.shape.clone()],
            true => vec![self.shape.clone(), self.shape.clone()],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let p = Gemm { gelu: false, ..self.p };
        if !self.p.gelu {
            return Ok(vec![gemm_cpu::<T>(x[0], x[1], x.get(2).copied(), &p)]);
        }
        // The bias is added in the GELU's pass where that gives the product's bits (its output
        // would start as the bias and get one chain added): one pass over the output fewer.
        let late = x.get(2).copied().filter(|_| p.nout == 1 && p.nsum == 1 && p.n > 1 && crate::cpu::adds_one_chain(p.m, p.k, p.n));
        let h = gemm_cpu::<T>(x[0], x[1], if late.is_some() { None } else { x.get(2).copied() }, &p);
        let (y, slope) = gelu_slope_cpu(h, late);
        Ok(vec![y, slope])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let v = tune::choose(x[0], x[1], x.get(2).copied(), &self.p)?;
        if !self.p.gelu {
            return Ok(vec![gemm_gpu_with(x[0], x[1], x.get(2).copied(), &self.p, v)?]);
        }
        let (y, h) = gemm_gpu_pre(x[0], x[1], x.get(2).copied(), &self.p, v)?;
        Ok(vec![y, h.expect("the GELU epilogue writes the pre-activation")])
    }
}

/// What the gradients need: the other operand of each tracked one, the flags, and the
/// pre-activation of a fused GELU.
struct ProductSaved {
    /// a, kept for b's gradient.
    a: Option<Tensor>,
    /// b, kept for a's gradient.
    b: Option<Tensor>,
    ta: bool,
    tb: bool,
    /// A 2-D operand multiplied with a 3-D one was broadcast: its gradient sums over the batch.
    sum_a: bool,
    sum_b: bool,
    n: usize,
    /// Whether there is a bias, and whether it is tracked.
    bias: Option<bool>,
    /// With a GELU: the product before it (GPU) or the GELU's slope there (CPU).
    pre: Option<Tensor>,
}

impl Backward for Product {
    type Saved = ProductSaved;
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, tracked: &[bool]) -> ProductSaved {
        let three = self.shape.len() == 3;
        ProductSaved {
            a: tracked[1].then(|| x[0].detach()),
            b: tracked[0].then(|| x[1].detach()),
            ta: self.p.ta,
            tb: self.p.tb,
            sum_a: x[0].rank() == 2 && three,
            sum_b: x[1].rank() == 2 && three,
            n: self.p.n,
            bias: tracked.get(2).copied(),
            pre: self.p.gelu.then(|| out.remove(1)),
        }
    }
    /// With a GELU: dh = g * gelu'(h) first. Then d op(a) = dh . op(b)^T, d op(b) = op(a)^T . dh,
    /// dbias = sum_rows(dh).
    fn backward(s: &ProductSaved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Self::backward_owned(s, g.clone())
    }
    /// (The CPU's dh = g * slope is made in g's storage when g is its sole owner.)
    fn backward_owned(s: &ProductSaved, g: Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = match &s.pre {
            None => g,
            Some(h) if h.device() == Device::Gpu => {
                run(&Act { quick: false, backward: true, shape: h.shape().to_vec() }, &[h, &g])?.remove(0)
            }
            Some(slope) => mul_into(g, slope)?,
        };
        let g = &g;
        let (ta, tb) = (s.ta, s.tb);
        let da = match (&s.b, ta) {
            (None, _) => None,
            (Some(b), false) => Some(grad_product(g, b, false, !tb, s.sum_a)?),
            (Some(b), true) => Some(grad_product(b, g, tb, true, s.sum_a)?),
        };
        let db = match (&s.a, tb) {
            (None, _) => None,
            (Some(a), false) => Some(grad_product(a, g, !ta, false, s.sum_b)?),
            (Some(a), true) => Some(grad_product(g, a, true, ta, s.sum_b)?),
        };
        let mut grads = vec![da, db];
        match s.bias {
            Some(true) => grads.push(Some(sum_rows(&g.reshape(&[g.numel() / s.n.max(1), s.n])?)?)),
            Some(false) => grads.push(None),
            None => {}
        }
        Ok(grads)
    }
}

/// op(x) . op(y) for gradients: `sum` adds up the batch into one matrix (a broadcast operand's
/// gradient). Shapes were checked by the forward pass.
fn grad_product(x: &Tensor, y: &Tensor, tx: bool, ty: bool, sum: bool) -> Result<Tensor> {
    let (p, shape) = Gemm::plan("matmul", x.shape(), y.shape(), tx, ty)?;
    let (p, shape) = if sum { (p.summed(), shape[1..].to_vec()) } else { (p, shape) };
    Ok(run(&Product { p, shape }, &[x, y])?.remove(0))
}

/// op(a) . op(b) (+ bias), or the GELU of it, recorded on the tape.
fn product(a: &Tensor, b: &Tensor, ta: bool, tb: bool, bias: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    let (p, shape) = Gemm::plan("matmul", a.shape(), b.shape(), ta, tb)?;
    let mut inputs = vec![a, b];
    inputs.extend(bias);
    apply(Product { p: Gemm { gelu, ..p }, shape }, &inputs)
}

// ---- ops ------------------------------------------------------------------------------------

/// op(a) . op(b): see the module docs for shapes and flags.
pub fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> Result<Tensor> {
    Gemm::plan("matmul", a.shape(), b.shape(), ta, tb)?;
    if a.rank() == 3 && b.rank() == 2 && !ta {
        // (Bt, M, K) . (K, N) is one (Bt * M, K) . (K, N) product (and so is its weight gradient).
        let (bt, m) = (a.shape()[0], a.shape()[1]);
        let y = product(&a.reshape(&[bt * m, a.shape()[2]])?, b, false, tb, None, false)?;
        let n = y.shape()[1];
        return y.reshape(&[bt, m, n]);
    }
    product(a, b, ta, tb, None, false)
}

/// x (.., K) . w (K, N) + bias (N) -> (.., N), the bias added inside the product kernel.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_act("linear", x, w, bias, false)
}

/// gelu(x . w + bias) as one op: on the GPU the GELU is the product kernel's epilogue, which also
/// writes the pre-activation h the GELU's backward needs (one kernel instead of two, and h is not
/// read back in). The backward is the composition's: dh = g * gelu'(h), then the product's.
pub fn linear_gelu(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_act("linear_gelu", x, w, bias, true)
}

fn linear_act(op: &'static str, x: &Tensor, w: &Tensor, bias: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    let what = || format!("x {:?} . w {:?} + bias {:?}", x.shape(), w.shape(), bias.map(|b| b.shape()));
    if x.rank() == 0 || w.rank() != 2 || x.last_dim() != w.shape()[0] {
        return shape_err(op, format!("{}: needs x (.., K) and w (K, N)", what()));
    }
    let (k, n) = (w.shape()[0], w.shape()[1]);
    if bias.is_some_and(|b| b.shape() != [n]) {
        return shape_err(op, format!("{}: bias must have shape [{n}]", what()));
    }
    let rows = x.shape()[..x.rank() - 1].iter().product();
    let y = product(&x.reshape(&[rows, k])?, w, false, false, bias, gelu)?;
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

    /// linear_gelu's CPU form (its bias added in the GELU's pass where the product's output is one
    /// chain per element, else first) gives the bits of linear then gelu, on one thread and on the
    /// pool's: k of one block in the crate's general path (late bias), k of two blocks and C
    /// within 64 x 64 (the bias first).
    #[test]
    fn linear_gelu_gives_the_bits_of_linear_then_gelu() {
        let v = |n: usize, seed: u32| Tensor::from_vec(crate::tests::values(n, seed, 20_011.0, 0.5), &[n], Device::Cpu).unwrap();
        for (m, k, n) in [(300, 64, 256), (1200, 64, 256), (33, 100, 70), (70, 600, 96), (50, 64, 60)] {
            let late = crate::cpu::adds_one_chain(m, k, n);
            let x = v(m * k, 1).reshape(&[m, k]).unwrap();
            let w = v(k * n, 2).reshape(&[k, n]).unwrap();
            let b = v(n, 3);
            for threads in [1, 2] {
                crate::cpu::with_threads(threads, || {
                    let fused = linear_gelu(&x, &w, Some(&b)).unwrap().to_vec().unwrap();
                    let composed = crate::ops::gelu(&linear(&x, &w, Some(&b)).unwrap()).unwrap().to_vec().unwrap();
                    let same = fused.iter().zip(&composed).all(|(a, c)| a.to_bits() == c.to_bits());
                    assert!(same, "({m}, {k}, {n}), late bias {late}, {threads} threads");
                });
            }
        }
    }
}
