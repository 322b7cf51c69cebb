//! Elementwise ops. Broadcasting is trailing: `b`'s shape must equal a suffix of `a`'s shape
//! (e.g. a (B, L, C) + b (L, C) or b (C)), and `b` is read at `i % numel(b)`.
//!
//! - `add_scaled(a, b, alpha)`: a (.., S) , b (S) -> (.., S) = a + alpha * b;  da = g, db = alpha * sum_rows(g)
//! - `mul(a, b)`:                a (.., S) , b (S) -> (.., S) = a * b;          da = g * b, db = sum_rows(g * a)
//! - `scale(a, s)`:              a -> s * a;                                    da = s * g
//! - `gelu(x)`:                  x -> x * Phi(x) (erf form);                    dx = g * (Phi(x) + x * phi(x))
//! - `quick_gelu(x)`:            x -> x * s, s = sigmoid(1.702 x) (CLIP);        dx = g * s * (1 + 1.702 x (1 - s))
//! - `dropout(x, p, seed)`:      x -> x * keep / (1 - p), keep = rand01(seed, i) >= p; dx = dropout(g, p, seed)
//! - `dropout_rows(x, p, seed, keys)`: x (N, C), keys (N) -> as dropout with element (r, c) keyed on
//!   keys[r] * C + c (the flat index it would have in a padded layout; see `Ragged`); dx likewise

use super::reduce::{sum, sum_rows};
use super::wgsl;
use crate::cpu::{par, Real};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::{numel, Element, Indices, Tensor};

const SRC: &str = wgsl!("elementwise.wgsl");
const RRW: &[crate::gpu::Access] = &[Read, Read, ReadWrite];
static AXPBY: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "axpby", RRW);
static MUL: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "mul", RRW);
static SCALE: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "scale", RRW);
static GELU_FWD: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "gelu_fwd", RRW);
static GELU_BWD: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "gelu_bwd", RRW);
static QGELU_FWD: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "quick_gelu_fwd", RRW);
static QGELU_BWD: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "quick_gelu_bwd", RRW);
static DROPOUT: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "dropout", RRW);
static DROPOUT_ROWS: Kernel<ElementwiseParams> = Kernel::new("elementwise", SRC, "dropout_rows", RRW);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![
        AXPBY.contract(),
        MUL.contract(),
        SCALE.contract(),
        GELU_FWD.contract(),
        GELU_BWD.contract(),
        QGELU_FWD.contract(),
        QGELU_BWD.contract(),
        DROPOUT.contract(),
        DROPOUT_ROWS.contract(),
    ]
}

kernel_params! {
    /// `struct P` of elementwise.wgsl (every kernel).
    struct ElementwiseParams {
        /// Elements of out.
        n: u32,
        /// Elements of b.
        nb: u32,
        alpha: f32,
        seed: u32,
        /// Dropout probability.
        p: f32,
    }
}

/// Run one elementwise kernel producing `n` outputs.
#[allow(clippy::too_many_arguments)]
fn launch(k: &Kernel<ElementwiseParams>, n: usize, a: &GpuBuf, b: &GpuBuf, nb: usize, alpha: f32, seed: u32, p: f32) -> Result<GpuBuf> {
    let g = gpu()?;
    let out = g.alloc(4 * n as u64)?;
    let prm = ElementwiseParams { n: n as u32, nb: nb.max(1) as u32, alpha, seed, p };
    g.dispatch(k, &[a, b, &out], &prm, groups_1d(n))?;
    Ok(out)
}

fn check_suffix(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    let (sa, sb) = (a.shape(), b.shape());
    if sb.len() > sa.len() || sa[sa.len() - sb.len()..] != *sb {
        return Err(Error::Shape {
            op,
            msg: format!("cannot broadcast {sb:?} onto {sa:?} (the second shape must be a suffix of the first)"),
        });
    }
    Ok(())
}

// ---- CPU references -------------------------------------------------------------------------

/// out[i] = f(a[i], b[i % nb]), in parallel pieces when large.
fn zip_bcast<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync + Send) -> Vec<T> {
    let (n, nb) = (a.len(), b.len());
    if nb == 0 {
        assert!(n == 0, "broadcast of an empty operand");
        return Vec::new();
    }
    if nb == n {
        return map_slices(a, |o, a, start| {
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(&b[start..start + a.len()]) {
                *o = f(x, y);
            }
        });
    }
    par::chunks(par::Stale, n, par::bcast_chunk(nb), par::worth(n), |start, piece| {
        par::segments(start, piece, nb, |pos, seg, bo| {
            let len = seg.len();
            for ((o, &x), &y) in seg.iter_mut().zip(&a[pos..pos + len]).zip(&b[bo..bo + len]) {
                *o = f(x, y);
            }
        })
    })
}

/// `f(out piece, x piece, start)` over x in parallel pieces, each a plain loop over slices (no
/// bounds checks, so it vectorizes); `f` writes every element of its output piece.
fn map_slices<T: Real>(x: &[T], f: impl Fn(&mut [T], &[T], usize) + Sync + Send) -> Vec<T> {
    par::chunks(par::Stale, x.len(), par::elem_chunk(1), par::worth(x.len()), |start, piece| {
        let n = piece.len();
        f(piece, &x[start..start + n], start)
    })
}

/// out[i] = f(x[i]), in parallel pieces when large.
fn map1<T: Real>(x: &[T], f: impl Fn(T) -> T + Sync + Send) -> Vec<T> {
    map_slices(x, |o, x, _| {
        for (o, &v) in o.iter_mut().zip(x) {
            *o = f(v);
        }
    })
}

pub fn axpby_cpu<T: Real>(a: &[T], b: &[T], alpha: T) -> Vec<T> {
    zip_bcast(a, b, |x, y| x + alpha * y)
}

pub fn mul_cpu<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
    zip_bcast(a, b, |x, y| x * y)
}

pub fn scale_cpu<T: Real>(a: &[T], s: T) -> Vec<T> {
    map1(a, |x| x * s)
}

/// Phi(x), the standard normal CDF, accurate in both tails: libm's erfc in f64, and in f32 the
/// Chebyshev fit of `shaders/common.wgsl` (relative error < 1.2e-7, several times faster). Inlined
/// so that the loops over it vectorize.
#[inline(always)]
pub fn norm_cdf<T: Real>(x: T) -> T {
    if std::mem::size_of::<T>() == 8 {
        let z = x.to_f64().unwrap() * std::f64::consts::FRAC_1_SQRT_2;
        return T::c(if z < 0.0 { 0.5 * libm::erfc(-z) } else { 1.0 - 0.5 * libm::erfc(z) });
    }
    let xf = x.to_f32().unwrap();
    let z = xf.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    // The polynomial in t by Horner's rule with fused multiply-adds, highest power first.
    let mut p = 0.170_872_77f32;
    for c in [-0.822_152_2, 1.488_515_9, -1.135_203_9, 0.278_868_07, -0.186_288_06, 0.096_784_18, 0.374_091_96, 1.000_023_7] {
        p = p.mul_add(t, c);
    }
    let poly = (-z).mul_add(z, -1.265_512_2) + t * p;
    let h = 0.5 * t * crate::cpu::expf(poly);
    let (lo, hi) = (h, 1.0 - h);
    T::c(if xf < 0.0 { lo } else { hi } as f64)
}

pub fn gelu_cpu<T: Real>(x: &[T]) -> Vec<T> {
    map1(x, |v| v * norm_cdf(v))
}

pub fn gelu_bwd_cpu<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let c = T::c(0.3989422804014327);
    let g = &g[..x.len()];
    map_slices(x, |o, x, start| {
        for ((o, &v), &gi) in o.iter_mut().zip(x).zip(&g[start..start + x.len()]) {
            *o = gi * (norm_cdf(v) + v * c * (-(v * v) * T::c(0.5)).fexp());
        }
    })
}

/// GELU and its slope at each v = x (+ bias on every row, when given) in one pass:
/// (v Phi(v), Phi(v) + v phi(v)), the slope exactly as [`gelu_bwd_cpu`] multiplies it by g; x's
/// storage becomes the GELU. (x + bias is one rounded add: the bits of a product whose output
/// started as the bias and got its chain of multiply-adds added, `cpu::adds_one_chain`.)
pub fn gelu_slope_cpu<T: Real>(mut x: Vec<T>, bias: Option<&[T]>) -> (Vec<T>, Vec<T>) {
    #[inline(always)]
    fn gelu<T: Real>(y: &mut T, s: &mut T, v: T) {
        let p = norm_cdf(v);
        *y = v * p;
        *s = p + v * T::c(0.3989422804014327) * (-(v * v) * T::c(0.5)).fexp();
    }
    // GELU(x) written over x (read and written once, no third stream), its slope beside it.
    let mut slope = crate::cpu::pool::stale(x.len());
    let unit = bias.map_or(1, |b| b.len());
    par::zip_apply_mut(&mut x, &mut slope, unit, |y, s| {
        crate::cpu::wide(
            #[inline(always)]
            || match bias {
                None => y.iter_mut().zip(s.iter_mut()).for_each(|(y, s)| gelu(y, s, *y)),
                Some(b) => {
                    for (yr, sr) in y.chunks_mut(b.len()).zip(s.chunks_mut(b.len())) {
                        yr.iter_mut().zip(sr.iter_mut()).zip(b).for_each(|((y, s), &bj)| gelu(y, s, *y + bj));
                    }
                }
            },
        )
    });
    (x, slope)
}

/// sigmoid(1.702 x), QuickGELU's gate.
fn quick_gate<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-(T::c(1.702) * x)).fexp())
}

pub fn quick_gelu_cpu<T: Real>(x: &[T]) -> Vec<T> {
    map1(x, |v| v * quick_gate(v))
}

pub fn quick_gelu_bwd_cpu<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let g = &g[..x.len()];
    map_slices(x, |o, x, start| {
        for ((o, &v), &gi) in o.iter_mut().zip(x).zip(&g[start..start + x.len()]) {
            let s = quick_gate(v);
            *o = gi * s * (T::one() + T::c(1.702) * v * (T::one() - s));
        }
    })
}

/// The counter-based RNG of `shaders/common.wgsl`, bit for bit.
pub fn pcg(x: u32) -> u32 {
    let s = x.wrapping_mul(747796405).wrapping_add(2891336453);
    let w = ((s >> ((s >> 28) + 4)) ^ s).wrapping_mul(277803737);
    (w >> 22) ^ w
}

pub fn rand01(seed: u32, i: u32) -> f32 {
    rand01_hashed(pcg(seed), i)
}

/// `rand01(seed, i)` given `pcg(seed)` (hoisted out of loops over i).
pub fn rand01_hashed(hashed_seed: u32, i: u32) -> f32 {
    (pcg(i.wrapping_add(hashed_seed)) >> 8) as f32 / 16777216.0
}

/// The mask's factor for key i: s where rand01(key i) >= p, else 0 (a select between constants, so
/// loops over it, hash included, vectorize).
#[inline(always)]
fn keep<T: Real>(hashed_seed: u32, i: u32, p: f32, s: T) -> T {
    if rand01_hashed(hashed_seed, i) >= p {
        s
    } else {
        T::zero()
    }
}

/// o[j] = x[j] * keep(base + j) over equal-length slices.
#[inline(always)]
pub(crate) fn keep_mul<T: Real>(o: &mut [T], x: &[T], hashed_seed: u32, base: u32, p: f32, s: T) {
    let n = o.len().min(x.len());
    let (o, x) = (&mut o[..n], &x[..n]);
    for j in 0..n {
        o[j] = x[j] * keep(hashed_seed, base.wrapping_add(j as u32), p, s);
    }
}

/// [`keep_mul`] with x in o's place: o[j] = o[j] * keep(base + j).
#[inline(always)]
pub(crate) fn keep_mul_in_place<T: Real>(o: &mut [T], hashed_seed: u32, base: u32, p: f32, s: T) {
    for (j, o) in o.iter_mut().enumerate() {
        *o *= keep(hashed_seed, base.wrapping_add(j as u32), p, s);
    }
}

pub fn dropout_cpu<T: Real>(x: &[T], p: f32, seed: u32) -> Vec<T> {
    let s = T::c(1.0 / (1.0 - p as f64));
    let ps = pcg(seed);
    map_slices(x, |o, x, start| {
        keep_mul(o, x, ps, start as u32, p, s);
    })
}

/// `dropout_cpu` with element (r, c) of rows of `c` channels keyed on keys[r] * c + c.
pub fn dropout_rows_cpu<T: Real>(x: &[T], p: f32, seed: u32, keys: &[u32], c: usize) -> Vec<T> {
    let s = T::c(1.0 / (1.0 - p as f64));
    let ps = pcg(seed);
    par::chunks(par::Stale, x.len(), par::elem_chunk(c), par::worth(x.len()), |start, piece| {
        let xs = &x[start..start + piece.len()];
        for (rr, (row, xr)) in piece.chunks_mut(c).zip(xs.chunks(c)).enumerate() {
            let base = keys[start / c + rr].wrapping_mul(c as u32);
            keep_mul(row, xr, ps, base, p, s);
        }
    })
}

// ---- ops ------------------------------------------------------------------------------------

/// a + alpha * b, b broadcast over a's leading axes.
struct Axpby {
    shape: Vec<usize>,
    nb: usize,
    alpha: f32,
}

impl Op for Axpby {
    fn name(&self) -> &'static str {
        "add"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![axpby_cpu(x[0], x[1], T::c(self.alpha as f64))])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Ok(vec![launch(&AXPBY, numel(&self.shape), x[0], x[1], self.nb, self.alpha, 0, 0.0)?])
    }
}

impl Backward for Axpby {
    /// b's shape and alpha.
    type Saved = (Vec<usize>, f32);
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        (x[1].shape().to_vec(), self.alpha)
    }
    /// da = g, db = alpha * sum_rows(g)
    fn backward((bshape, alpha): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let nb = numel(bshape);
        let gb = if nb == g.numel() { g.clone() } else { sum_rows(&g.reshape(&[g.numel() / nb, nb])?)? };
        let gb = if *alpha == 1.0 { gb } else { scale(&gb, *alpha)? };
        Ok(vec![Some(g.clone()), Some(gb.reshape(bshape)?)])
    }
}

/// a * b, b broadcast over a's leading axes.
struct Mul {
    shape: Vec<usize>,
    nb: usize,
}

impl Op for Mul {
    fn name(&self) -> &'static str {
        "mul"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![mul_cpu(x[0], x[1])])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Ok(vec![launch(&MUL, numel(&self.shape), x[0], x[1], self.nb, 0.0, 0, 0.0)?])
    }
}

/// The operands each gradient needs: b for a's, a for b's (with b's shape).
struct MulSaved {
    a: Option<Tensor>,
    b: Option<Tensor>,
    bshape: Vec<usize>,
}

impl Backward for Mul {
    type Saved = MulSaved;
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, tracked: &[bool]) -> MulSaved {
        MulSaved { a: tracked[1].then(|| x[0].detach()), b: tracked[0].then(|| x[1].detach()), bshape: x[1].shape().to_vec() }
    }
    /// da = g * b, db = sum_rows(g * a)
    fn backward(s: &MulSaved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let ga = s.b.as_ref().map(|b| mul(g, b)).transpose()?;
        let gb = match &s.a {
            None => None,
            Some(a) => {
                let ga_b = mul(g, a)?;
                let nb = numel(&s.bshape);
                let gb = if nb == g.numel() { ga_b } else { sum_rows(&ga_b.reshape(&[g.numel() / nb, nb])?)? };
                Some(gb.reshape(&s.bshape)?)
            }
        };
        Ok(vec![ga, gb])
    }
}

/// s * a.
struct Scale {
    shape: Vec<usize>,
    s: f32,
}

impl Op for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![scale_cpu(x[0], T::c(self.s as f64))])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Ok(vec![launch(&SCALE, numel(&self.shape), x[0], x[0], 1, self.s, 0, 0.0)?])
    }
}

impl Backward for Scale {
    type Saved = f32;
    fn save(self, _: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> f32 {
        self.s
    }
    /// da = s * g
    fn backward(s: &f32, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(scale(g, *s)?)])
    }
}

/// An activation f applied elementwise (`Gelu`, `QuickGelu`), or its backward g * f'(x) over
/// inputs [x, g] (`backward`).
#[derive(Clone)]
pub(crate) struct Act {
    pub(crate) quick: bool,
    pub(crate) backward: bool,
    pub(crate) shape: Vec<usize>,
}

impl Op for Act {
    fn name(&self) -> &'static str {
        if self.quick {
            "quick_gelu"
        } else {
            "gelu"
        }
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![match (self.quick, self.backward) {
            (false, false) => gelu_cpu(x[0]),
            (false, true) => gelu_bwd_cpu(x[0], x[1]),
            (true, false) => quick_gelu_cpu(x[0]),
            (true, true) => quick_gelu_bwd_cpu(x[0], x[1]),
        }])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let k = match (self.quick, self.backward) {
            (false, false) => &GELU_FWD,
            (false, true) => &GELU_BWD,
            (true, false) => &QGELU_FWD,
            (true, true) => &QGELU_BWD,
        };
        let (b, n) = (if self.backward { x[1] } else { x[0] }, numel(&self.shape));
        Ok(vec![launch(k, n, x[0], b, n, 0.0, 0, 0.0)?])
    }
}

impl Backward for Act {
    /// x, and the activation's form.
    type Saved = (Tensor, Act);
    fn save(self, x: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        (x[0].detach(), self)
    }
    /// dx = g * f'(x)
    fn backward((x, a): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(run(&Act { backward: true, ..a.clone() }, &[x, g])?.remove(0))])
    }
}

/// Inverted dropout, keyed on the flat index (`keys` None) or on keys[r] * C + c for rows of C.
#[derive(Clone)]
struct Dropout {
    shape: Vec<usize>,
    p: f32,
    seed: u32,
    keys: Option<Indices>,
}

impl Op for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        vec![self.shape.clone()]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![match &self.keys {
            None => dropout_cpu(x[0], self.p, self.seed),
            Some(k) => dropout_rows_cpu(x[0], self.p, self.seed, k.host(), *self.shape.last().unwrap()),
        }])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let n = numel(&self.shape);
        Ok(vec![match &self.keys {
            None => launch(&DROPOUT, n, x[0], x[0], 1, 0.0, self.seed, self.p)?,
            Some(k) => launch(&DROPOUT_ROWS, n, x[0], k.gpu()?, *self.shape.last().unwrap(), 0.0, self.seed, self.p)?,
        }])
    }
}

impl Backward for Dropout {
    type Saved = Dropout;
    fn save(self, _: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Dropout {
        self
    }
    /// dx = the same mask applied to g
    fn backward(d: &Dropout, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(run(d, &[g])?.remove(0))])
    }
}

/// a + b (trailing broadcast of b).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_scaled(a, b, 1.0)
}

/// a + b where `a` may be consumed, as `backward` sums the gradients meeting at a tensor: in place
/// when `a` is the sole handle on host storage of b's shape (no clone, view or saved copy shares
/// it), with the same bits as [`add`] (x + 1 * y rounds as x + y) and no new buffer; otherwise
/// `add(&a, b)`.
pub fn add_into(a: Tensor, b: &Tensor) -> Result<Tensor> {
    into(a, b, Assign::Add)
}

/// a * b where `a` may be consumed: in place when `a` is the sole handle on host storage of b's
/// shape (the bits of [`mul`]), otherwise `mul(&a, b)`.
pub fn mul_into(a: Tensor, b: &Tensor) -> Result<Tensor> {
    into(a, b, Assign::Mul)
}

/// The elementwise ops [`into`] can do in place.
#[derive(Clone, Copy)]
enum Assign {
    Add,
    Mul,
}

/// a op= b in a's storage when it is a's alone, else the op out of place (see [`add_into`]).
fn into(a: Tensor, b: &Tensor, op: Assign) -> Result<Tensor> {
    if a.shape() != b.shape() || !a.sole_host_owner() {
        return match op {
            Assign::Add => add(&a, b),
            Assign::Mul => mul(&a, b),
        };
    }
    fn assign<T: Element>(a: &Tensor, b: &Tensor, op: Assign) -> Result<()> {
        let t0 = crate::cpu::profiling_ops().then(std::time::Instant::now);
        let (mut x, y) = (a.host_mut::<T>()?, b.host::<T>()?);
        par::zip_apply(&mut x, &y, |x, y| {
            let pairs = x.iter_mut().zip(y);
            match op {
                Assign::Add => pairs.for_each(|(o, &v)| *o += v),
                Assign::Mul => pairs.for_each(|(o, &v)| *o *= v),
            }
        });
        if let Some(t0) = t0 {
            crate::cpu::count_op(if matches!(op, Assign::Add) { "add" } else { "mul" }, t0);
        }
        Ok(())
    }
    match a.device() {
        Device::Cpu => assign::<f32>(&a, b, op)?,
        Device::Cpu64 => assign::<f64>(&a, b, op)?,
        Device::Gpu => unreachable!("sole_host_owner is false on the GPU"),
    }
    Ok(a)
}

/// a - b (trailing broadcast of b).
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    add_scaled(a, b, -1.0)
}

/// a + alpha * b (trailing broadcast of b).
pub fn add_scaled(a: &Tensor, b: &Tensor, alpha: f32) -> Result<Tensor> {
    check_suffix("add", a, b)?;
    apply(Axpby { shape: a.shape().to_vec(), nb: b.numel(), alpha }, &[a, b])
}

/// a * b elementwise (trailing broadcast of b).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_suffix("mul", a, b)?;
    apply(Mul { shape: a.shape().to_vec(), nb: b.numel() }, &[a, b])
}

/// s * a.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    apply(Scale { shape: a.shape().to_vec(), s }, &[a])
}

/// Mean of all elements: x -> () = sum(x) / numel(x);  dx = g / numel(x) everywhere.
pub fn mean(x: &Tensor) -> Result<Tensor> {
    if x.numel() == 0 {
        return Err(Error::Shape { op: "mean", msg: "mean of an empty tensor".into() });
    }
    scale(&sum(x)?, 1.0 / x.numel() as f32)
}

fn activation(x: &Tensor, quick: bool) -> Result<Tensor> {
    apply(Act { quick, backward: false, shape: x.shape().to_vec() }, &[x])
}

/// erf-GELU: x * Phi(x).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    activation(x, false)
}

/// QuickGELU, x * sigmoid(1.702 x): the activation of OpenAI's CLIP checkpoints.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    activation(x, true)
}

/// Inverted dropout with a counter-based mask: element i is kept when rand01(seed, i) >= p.
/// The backward pass recomputes the same mask from (seed, i). p = 0 is the identity.
pub fn dropout(x: &Tensor, p: f32, seed: u32) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!("dropout probability must be in [0, 1), got {p}")));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    apply(Dropout { shape: x.shape().to_vec(), p, seed, keys: None }, &[x])
}

/// Dropout of rows x (N, C) whose element (r, c) draws its mask from keys[r] * C + c (see the
/// module docs): the masks of a packed batch equal those of its padded form.
pub fn dropout_rows(x: &Tensor, p: f32, seed: u32, keys: &Indices) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!("dropout probability must be in [0, 1), got {p}")));
    }
    let [n, _] = *x.shape() else {
        return Err(Error::Shape { op: "dropout_rows", msg: format!("x {:?} must be (N, C)", x.shape()) });
    };
    if keys.len() != n {
        return Err(Error::Shape { op: "dropout_rows", msg: format!("{} row keys for x {:?}", keys.len(), x.shape()) });
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    apply(Dropout { shape: x.shape().to_vec(), p, seed, keys: Some(keys.clone()) }, &[x])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// `add_into` / `mul_into` write into a sole owner's storage (no new buffer) with the bits of
    /// `add` / `mul`, and leave a shared operand alone (another handle sees no change).
    #[test]
    fn into_forms_work_in_place_only_on_sole_owners() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let dev = Device::Cpu;
        // Large enough for the parallel pieces.
        let (a, b) = (Tensor::randn(&[300, 257], 1.0, &mut rng, dev).unwrap(), Tensor::randn(&[300, 257], 1.0, &mut rng, dev).unwrap());
        for (into, plain) in
            [(add_into as fn(Tensor, &Tensor) -> Result<Tensor>, add as fn(&Tensor, &Tensor) -> Result<Tensor>), (mul_into, mul)]
        {
            let want = bits(&plain(&a, &b).unwrap());
            // Sole owner: the same storage comes back, holding a op b.
            let own = Tensor::from_vec(a.to_vec().unwrap(), a.shape(), dev).unwrap();
            let ptr = own.host::<f32>().unwrap().as_ptr();
            let got = into(own, &b).unwrap();
            assert_eq!(got.host::<f32>().unwrap().as_ptr(), ptr);
            assert_eq!(bits(&got), want);
            // Shared: a new tensor, the other handle unchanged.
            let before = bits(&a);
            let view = a.reshape(&[257, 300]).unwrap();
            let got = into(a.clone(), &b).unwrap();
            assert_eq!((bits(&got), bits(&a), bits(&view)), (want, before.clone(), before));
        }
    }
}
