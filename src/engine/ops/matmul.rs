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
//! is decided per shape and adapter by `matmul_tune` (a cached one-time autotune, or
//! `MSM4SR_MATMUL`), variant 1 where nothing was tuned.

use super::reduce::{sum_rows, sum_rows_gpu};
use super::{par, wgsl};
use crate::engine::gpu::{gpu, kernel_params, Access::*, GpuBuf, Kernel};
use crate::engine::tensor::{Real, Storage};
use crate::engine::{same_device, Tensor};
use crate::{on_device, shape_err, Result};

const BINDINGS: &[crate::engine::gpu::Access] = &[Read, Read, Read, ReadWrite, ReadWrite];
static MATMUL: Kernel<MatmulParams> =
    Kernel::new("matmul", wgsl!("matmul_tiles.wgsl", "matmul_scalar.wgsl", "matmul_stage.wgsl"; "matmul.wgsl"), "matmul", BINDINGS);
static MATMUL_8X8: Kernel<MatmulParams> = Kernel::new(
    "matmul_8x8",
    wgsl!("matmul_tiles.wgsl", "matmul_scalar.wgsl", "matmul_stage.wgsl"; "matmul_8x8.wgsl"),
    "matmul_8x8",
    BINDINGS,
);
static MATMUL_VEC4: Kernel<MatmulParams> =
    Kernel::new("matmul_vec4", wgsl!("matmul_tiles.wgsl", "matmul_vec4.wgsl"; "matmul_vec4.wgsl"), "matmul_vec4", BINDINGS);
static MATMUL_DB: Kernel<MatmulParams> =
    Kernel::new("matmul_db", wgsl!("matmul_tiles.wgsl", "matmul_vec4.wgsl"; "matmul_db.wgsl"), "matmul_db", BINDINGS);
static MATMUL_SKINNY: Kernel<MatmulParams> =
    Kernel::new("matmul_skinny", wgsl!("matmul_tiles.wgsl", "matmul_scalar.wgsl"; "matmul_skinny.wgsl"), "matmul_skinny", BINDINGS);
static MATMUL_SUBGROUP: Kernel<MatmulParams> =
    Kernel::new("matmul_subgroup", wgsl!("matmul_tiles.wgsl", "matmul_scalar.wgsl"; "matmul_subgroup.wgsl"), "matmul_subgroup", BINDINGS);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::engine::gpu::Contract> {
    MatmulVariant::ALL.iter().map(|v| v.kernel().contract()).collect()
}

/// The GPU matrix-product kernels, side by side (the same contract and results; `bench
/// --matmul-variants` validates each against the CPU and times it). A variant runs only the
/// products it [supports](MatmulVariant::supports); variant 1 runs every product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatmulVariant {
    /// 1. 64 x 64 tile, 4 x 4 outputs per invocation, BK 16 (matmul.wgsl; the default). Any product.
    Tile64,
    /// 2. 128 x 128 tile, 8 x 8 outputs per invocation, BK 8 (matmul_8x8.wgsl). Any product.
    Tile128,
    /// 3. 128 x 128 tile, 8 x 8 outputs per invocation, BK 8, vec4 global and workgroup-memory loads
    ///    (matmul_vec4.wgsl). Needs the stored contiguous axes (K of A, or M when ta; N of B, or K
    ///    when tb) and the batch strides to be multiples of 4.
    Vec4,
    /// 4. Variant 3 with double-buffered workgroup tiles (the next K-slice's loads in flight while
    ///    the current one is multiplied; one barrier per slice), BK 8 (matmul_db.wgsl). Needs what 3 needs.
    DoubleBuffer,
    /// 5. 64 x 64 tile, 4 x 4 outputs per invocation, all of K staged at once (no K loop)
    ///    (matmul_skinny.wgsl). Needs K <= 64 and 32 KiB of workgroup memory.
    SkinnyK,
    /// 6. One subgroup per output, its lanes splitting K and summing with subgroupAdd, 32 rows per
    ///    workgroup (matmul_subgroup.wgsl). Needs N <= 8 and an adapter with subgroup operations.
    Subgroup,
}

/// Whether a variant can run one product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    Yes,
    /// The product's shape or layout is outside what the variant takes.
    NotEligible(String),
    /// The adapter lacks what the variant needs.
    Skipped(String),
}

impl std::fmt::Display for Support {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Support::Yes => write!(f, "ok"),
            Support::NotEligible(why) => write!(f, "not eligible: {why}"),
            Support::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

impl MatmulVariant {
    pub const ALL: [MatmulVariant; 6] = [
        MatmulVariant::Tile64,
        MatmulVariant::Tile128,
        MatmulVariant::Vec4,
        MatmulVariant::DoubleBuffer,
        MatmulVariant::SkinnyK,
        MatmulVariant::Subgroup,
    ];

    fn kernel(self) -> &'static Kernel<MatmulParams> {
        match self {
            MatmulVariant::Tile64 => &MATMUL,
            MatmulVariant::Tile128 => &MATMUL_8X8,
            MatmulVariant::Vec4 => &MATMUL_VEC4,
            MatmulVariant::DoubleBuffer => &MATMUL_DB,
            MatmulVariant::SkinnyK => &MATMUL_SKINNY,
            MatmulVariant::Subgroup => &MATMUL_SUBGROUP,
        }
    }

    /// The variant's number in the ladder (1..).
    pub fn number(self) -> usize {
        Self::ALL.iter().position(|&v| v == self).unwrap() + 1
    }

    /// The name `MSM4SR_MATMUL`, the tuning cache and the bench use.
    pub fn name(self) -> &'static str {
        match self {
            MatmulVariant::Tile64 => "tile64",
            MatmulVariant::Tile128 => "tile128",
            MatmulVariant::Vec4 => "vec4",
            MatmulVariant::DoubleBuffer => "double_buffer",
            MatmulVariant::SkinnyK => "skinny_k",
            MatmulVariant::Subgroup => "subgroup",
        }
    }

    /// The variant named `s` (its name or its number).
    pub fn parse(s: &str) -> Option<MatmulVariant> {
        let s = s.trim().to_lowercase();
        Self::ALL.into_iter().find(|v| v.name() == s || v.number().to_string() == s)
    }

    /// (rows, columns) of C per workgroup.
    fn tile(self) -> (usize, usize) {
        match self {
            MatmulVariant::Tile64 | MatmulVariant::SkinnyK => (64, 64),
            MatmulVariant::Tile128 | MatmulVariant::Vec4 | MatmulVariant::DoubleBuffer => (128, 128),
            MatmulVariant::Subgroup => (SUBGROUP_ROWS, SUBGROUP_MAX_N),
        }
    }

    #[cfg(test)]
    /// The depth of the kernel's K-slices, which the split-K range must be a multiple of (None: it
    /// has no slices).
    fn slice_depth(self) -> Option<usize> {
        match self {
            MatmulVariant::Tile64 => Some(16),
            MatmulVariant::Tile128 | MatmulVariant::Vec4 | MatmulVariant::DoubleBuffer => Some(8),
            MatmulVariant::SkinnyK | MatmulVariant::Subgroup => None,
        }
    }

    /// Bytes of workgroup memory the kernel declares.
    fn workgroup_bytes(self) -> u32 {
        match self {
            MatmulVariant::Tile64 => 2 * 1040 * 4,
            MatmulVariant::Tile128 => 2 * 1032 * 4,
            MatmulVariant::Vec4 => 2 * 256 * 16,
            MatmulVariant::DoubleBuffer => 2 * 512 * 16,
            MatmulVariant::SkinnyK => 2 * 4096 * 4,
            MatmulVariant::Subgroup => 4,
        }
    }

    /// Whether this variant can compute `p` on the adapter with `limits` and `features`.
    pub fn supports(self, p: &Gemm, limits: &wgpu::Limits, features: wgpu::Features) -> Support {
        let need = self.workgroup_bytes();
        if need > limits.max_compute_workgroup_storage_size {
            return Support::Skipped(format!(
                "needs {need} bytes of workgroup memory, the adapter has {}",
                limits.max_compute_workgroup_storage_size
            ));
        }
        if self == MatmulVariant::Subgroup && !features.contains(wgpu::Features::SUBGROUP) {
            return Support::Skipped("adapter has no SUBGROUP".into());
        }
        let (tm, tn) = self.tile();
        let max = limits.max_compute_workgroups_per_dimension as usize;
        if p.m.div_ceil(tm) > max || p.n.div_ceil(tn) > max {
            return Support::NotEligible(format!(
                "{} x {} tiles exceed {max} workgroups per dimension",
                p.m.div_ceil(tm),
                p.n.div_ceil(tn)
            ));
        }
        match self {
            MatmulVariant::Tile64 | MatmulVariant::Tile128 => Support::Yes,
            MatmulVariant::Vec4 | MatmulVariant::DoubleBuffer => {
                let a_axis = if p.ta { p.m } else { p.k };
                let b_axis = if p.tb { p.k } else { p.n };
                if [a_axis, b_axis, p.a_bs, p.b_bs].iter().all(|x| x % 4 == 0) {
                    Support::Yes
                } else {
                    Support::NotEligible("vec4 loads need the stored rows and batch strides to be multiples of 4".into())
                }
            }
            MatmulVariant::SkinnyK if p.k > SKINNY_MAX_K => Support::NotEligible(format!("needs K <= {SKINNY_MAX_K}")),
            MatmulVariant::SkinnyK => Support::Yes,
            MatmulVariant::Subgroup if p.n > SUBGROUP_MAX_N => Support::NotEligible(format!("needs N <= {SUBGROUP_MAX_N}")),
            MatmulVariant::Subgroup => Support::Yes,
        }
    }
}

/// Variant 5 takes products with K up to this (`KS` of matmul_skinny.wgsl).
const SKINNY_MAX_K: usize = 64;
/// Variant 6 takes products with N up to this, and computes `ROWS` (matmul_subgroup.wgsl) rows per workgroup.
const SUBGROUP_MAX_N: usize = 8;
const SUBGROUP_ROWS: usize = 32;

/// The K-slice depth every variant's split-K range is a multiple of (variant 1's; every other
/// variant's slice depth divides it, and variants without slices take any range).
const BK: usize = 16;
/// Split-K: aim for this many workgroups, with at least `SPLIT_CHUNK` of K per split.
const TARGET_WGS: usize = 256;
const SPLIT_CHUNK: usize = 256;

kernel_params! {
    /// `struct P` of matmul.wgsl.
    struct MatmulParams {
        m: u32,
        n: u32,
        k: u32,
        ta: u32,
        tb: u32,
        /// Batch stride of A in elements (0 = broadcast).
        a_bs: u32,
        b_bs: u32,
        /// Products summed into each output matrix.
        nsum: u32,
        /// K splits (slabs per output matrix).
        nsplit: u32,
        /// K range per split.
        kc: u32,
        /// 1: add bias[col] (first split only).
        bias: u32,
        /// 1: write the value to `pre` and GELU of it to `c` (no split).
        gelu: u32,
    }
}

/// One (batched) product: for z < nout, C[z] (m, n) = sum_{s < nsum} op(A[i]) . op(B[i]) (+ bias),
/// i = z * nsum + s, where matrix i of A starts at i * a_bs (0 broadcasts a 2-D operand), likewise B.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub a_bs: usize,
    pub b_bs: usize,
    pub nout: usize,
    pub nsum: usize,
    /// GPU epilogue: write the product (+ bias) to a second output and GELU of it to the first
    /// (`linear_gelu`; never split over K).
    pub gelu: bool,
}

impl Gemm {
    /// Plan op(a) . op(b) for stored shapes `sa`, `sb`; returns the product and the output shape.
    fn plan(op: &'static str, sa: &[usize], sb: &[usize], ta: bool, tb: bool) -> Result<(Gemm, Vec<usize>)> {
        let what = || format!("a {sa:?} (ta={ta}) . b {sb:?} (tb={tb})");
        if !(2..=3).contains(&sa.len()) || !(2..=3).contains(&sb.len()) {
            return shape_err(op, format!("{}: operands must be 2-D or 3-D", what()));
        }
        let (ra, ca) = (sa[sa.len() - 2], sa[sa.len() - 1]);
        let (rb, cb) = (sb[sb.len() - 2], sb[sb.len() - 1]);
        let (m, k) = if ta { (ca, ra) } else { (ra, ca) };
        let (kb, n) = if tb { (cb, rb) } else { (rb, cb) };
        if k != kb {
            return shape_err(op, format!("{}: inner dimensions differ ({k} vs {kb})", what()));
        }
        let batch = match (sa.len(), sb.len()) {
            (3, 3) if sa[0] != sb[0] => return shape_err(op, format!("{}: batch sizes differ ({} vs {})", what(), sa[0], sb[0])),
            (3, _) => Some(sa[0]),
            (_, 3) => Some(sb[0]),
            _ => None,
        };
        let a_bs = if sa.len() == 3 { m * k } else { 0 };
        let b_bs = if sb.len() == 3 { k * n } else { 0 };
        let shape = match batch {
            Some(bt) => vec![bt, m, n],
            None => vec![m, n],
        };
        Ok((Gemm { m, n, k, ta, tb, a_bs, b_bs, nout: batch.unwrap_or(1), nsum: 1, gelu: false }, shape))
    }

    /// The same products summed over the batch into one (m, n) matrix.
    fn summed(self) -> Gemm {
        Gemm { nout: 1, nsum: self.nout * self.nsum, ..self }
    }
}

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
            crate::engine::tensor::count_gemm(2 * m * k * p.nout * p.nsum, t0);
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
        let add = par::rows(m, 2 * k, 1, |i, o: &mut [T]| o[0] = crate::engine::tensor::dot(&a[i * k..(i + 1) * k], x));
        y.iter_mut().zip(&add).for_each(|(o, &v)| *o += v);
        crate::engine::pool::give(add);
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
        crate::engine::pool::give(add);
    }
}

// ---- GPU ------------------------------------------------------------------------------------

/// K range per split: all of K, unless the output grid is too small to fill the GPU and K is long.
fn k_chunk(p: &Gemm, tile: (usize, usize)) -> usize {
    let wgs = p.m.div_ceil(tile.0) * p.n.div_ceil(tile.1) * p.nout;
    if p.gelu || p.nout > 1 || p.k < 2 * SPLIT_CHUNK || wgs >= TARGET_WGS {
        return p.k;
    }
    let nsplit = (p.k / SPLIT_CHUNK).min(TARGET_WGS / wgs);
    p.k.div_ceil(nsplit).next_multiple_of(BK)
}

fn gemm_gpu(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm) -> Result<GpuBuf> {
    let v = super::matmul_tune::choose(a, b, bias, p)?;
    gemm_gpu_with(a, b, bias, p, v)
}

/// The product with variant `v`, which must support it.
pub(crate) fn gemm_gpu_with(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm, v: MatmulVariant) -> Result<GpuBuf> {
    Ok(gemm_gpu_pre(a, b, bias, p, v)?.0)
}

/// The product with variant `v`, and with `p.gelu` the pre-activation: (GELU of it, it).
fn gemm_gpu_pre(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm, v: MatmulVariant) -> Result<(GpuBuf, Option<GpuBuf>)> {
    let g = gpu()?;
    match v.supports(p, &g.limits, g.features) {
        Support::Yes => {}
        no => return Err(crate::Error::Invalid(format!("matmul variant {} ({}) cannot compute {p:?}: {no}", v.number(), v.name()))),
    }
    let tile = v.tile();
    let kc = k_chunk(p, tile);
    let nsplit = if kc < p.k { p.k.div_ceil(kc) } else { 1 };
    let out = g.alloc(4 * (nsplit * p.nout * p.m * p.n) as u64)?;
    let dummy;
    let bias_buf = match bias {
        Some(b) => b,
        None => {
            dummy = g.alloc(4)?;
            &dummy
        }
    };
    let params = MatmulParams {
        m: p.m as u32,
        n: p.n as u32,
        k: p.k as u32,
        ta: p.ta as u32,
        tb: p.tb as u32,
        a_bs: p.a_bs as u32,
        b_bs: p.b_bs as u32,
        nsum: p.nsum as u32,
        nsplit: nsplit as u32,
        kc: kc as u32,
        bias: bias.is_some() as u32,
        gelu: p.gelu as u32,
    };
    let pre = if p.gelu { g.alloc(4 * (p.nout * p.m * p.n) as u64)? } else { g.alloc(4)? };
    let groups = [p.n.div_ceil(tile.1) as u32, p.m.div_ceil(tile.0) as u32, (p.nout * nsplit) as u32];
    g.dispatch(v.kernel(), &[a, b, bias_buf, &out, &pre], &params, groups)?;
    if nsplit > 1 {
        return Ok((sum_rows_gpu(&out, nsplit, p.m * p.n)?, None));
    }
    Ok((out, p.gelu.then_some(pre)))
}

/// Whether variant `v` can compute op(a) . op(b) for stored shapes `sa`, `sb` on this process's GPU.
pub fn matmul_variant_support(sa: &[usize], sb: &[usize], ta: bool, tb: bool, v: MatmulVariant) -> Result<Support> {
    let (p, _) = Gemm::plan("matmul_variant", sa, sb, ta, tb)?;
    let g = gpu()?;
    Ok(v.supports(&p, &g.limits, g.features))
}

/// op(a) . op(b) (+ bias) on the GPU with one particular kernel variant, without autograd: for
/// validating and timing the variants side by side (`bench --matmul-variants`, the kernel tests).
/// An error if the variant does not support the product ([`matmul_variant_support`]).
pub fn matmul_variant(a: &Tensor, b: &Tensor, ta: bool, tb: bool, bias: Option<&Tensor>, v: MatmulVariant) -> Result<Tensor> {
    let (p, shape) = Gemm::plan("matmul_variant", a.shape(), b.shape(), ta, tb)?;
    let dev = same_device("matmul_variant", &[a, b])?;
    if dev != crate::engine::Device::Gpu {
        return shape_err("matmul_variant", "the kernel variants run on the GPU: give GPU tensors");
    }
    let bias_buf = bias.map(|t| t.gbuf()).transpose()?;
    let out = gemm_gpu_with(&*a.gbuf()?, &*b.gbuf()?, bias_buf.as_deref(), &p, v)?;
    Ok(Tensor::from_storage(Storage::Gpu(out), shape))
}

/// x (M, K) . w (K, N) (+ bias) with the GELU epilogue and variant `v`, without autograd:
/// (GELU of the product, the product), for checking the epilogue of every variant.
pub fn linear_gelu_variant(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, v: MatmulVariant) -> Result<(Tensor, Tensor)> {
    let (p, shape) = Gemm::plan("linear_gelu_variant", x.shape(), w.shape(), false, false)?;
    let bias_buf = bias.map(|t| t.gbuf()).transpose()?;
    let (y, h) = gemm_gpu_pre(&*x.gbuf()?, &*w.gbuf()?, bias_buf.as_deref(), &Gemm { gelu: true, ..p }, v)?;
    let h = h.expect("the GELU epilogue writes the pre-activation");
    Ok((Tensor::from_storage(Storage::Gpu(y), shape.clone()), Tensor::from_storage(Storage::Gpu(h), shape)))
}

/// [`matmul_variant`] of a batched product summed over the batch into one (M, N) matrix (the
/// kernels' `nsum`, as in the gradient of a broadcast operand).
pub fn matmul_variant_summed(a: &Tensor, b: &Tensor, ta: bool, tb: bool, v: MatmulVariant) -> Result<Tensor> {
    let (p, shape) = Gemm::plan("matmul_variant_summed", a.shape(), b.shape(), ta, tb)?;
    let dev = same_device("matmul_variant_summed", &[a, b])?;
    if dev != crate::engine::Device::Gpu || shape.len() != 3 {
        return shape_err("matmul_variant_summed", "give GPU tensors with a batch");
    }
    let out = gemm_gpu_with(&*a.gbuf()?, &*b.gbuf()?, None, &p.summed(), v)?;
    Ok(Tensor::from_storage(Storage::Gpu(out), shape[1..].to_vec()))
}

/// op(a) . op(b) (+ bias) on the GPU with the variant `tuner` picks (tuning the product's key first
/// if the tuner is on and has not seen it), without autograd; returns the product and the variant.
pub fn matmul_tuned(
    a: &Tensor,
    b: &Tensor,
    ta: bool,
    tb: bool,
    bias: Option<&Tensor>,
    tuner: &mut super::matmul_tune::Tuner,
) -> Result<(Tensor, MatmulVariant)> {
    let (p, shape) = Gemm::plan("matmul_tuned", a.shape(), b.shape(), ta, tb)?;
    let dev = same_device("matmul_tuned", &[a, b])?;
    if dev != crate::engine::Device::Gpu {
        return shape_err("matmul_tuned", "the kernel variants run on the GPU: give GPU tensors");
    }
    let bias_buf = bias.map(|t| t.gbuf()).transpose()?;
    let (ga, gb) = (a.gbuf()?, b.gbuf()?);
    let v = tuner.pick(&ga, &gb, bias_buf.as_deref(), &p)?;
    let out = gemm_gpu_with(&ga, &gb, bias_buf.as_deref(), &p, v)?;
    Ok((Tensor::from_storage(Storage::Gpu(out), shape), v))
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
    if x.device() != crate::engine::Device::Gpu || x.rank() == 0 || w.rank() != 2 || x.last_dim() != w.shape()[0] {
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
        let v = super::matmul_tune::choose(&a, &b, bias_buf.as_deref(), &p)?;
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
    use crate::engine::Device;

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

    #[test]
    fn split_k_ranges_suit_every_variant() {
        for v in MatmulVariant::ALL {
            if let Some(d) = v.slice_depth() {
                assert_eq!(BK % d, 0, "{v:?}: slices of {d} do not divide the split-K granule {BK}");
            }
            assert_eq!(MatmulVariant::parse(v.name()), Some(v));
            assert_eq!(MatmulVariant::parse(&v.number().to_string()), Some(v));
        }
        // Variant 5 stages all of K: products it takes are never split.
        let p = Gemm { m: 1, n: 1, k: SKINNY_MAX_K, ta: false, tb: false, a_bs: 0, b_bs: 0, nout: 1, nsum: 1, gelu: false };
        assert_eq!(k_chunk(&p, MatmulVariant::SkinnyK.tile()), p.k);
    }

    /// The workgroup memory the host checks against the adapter's limit is what the shader declares.
    #[test]
    fn workgroup_bytes_match_the_shaders() {
        for v in MatmulVariant::ALL {
            use naga::valid::{Capabilities, ValidationFlags, Validator};
            let module = naga::front::wgsl::parse_str(v.kernel().source).unwrap();
            let info = Validator::new(ValidationFlags::all(), Capabilities::all()).validate(&module).unwrap();
            let ep = module.entry_points.iter().position(|e| e.name == v.kernel().entry).unwrap();
            let uses = info.get_entry_point(ep);
            let mut layouter = naga::proc::Layouter::default();
            layouter.update(module.to_ctx()).unwrap();
            // Only what the entry point uses counts (common.wgsl declares arrays for other kernels).
            let bytes: u32 = module
                .global_variables
                .iter()
                .filter(|&(h, g)| g.space == naga::AddressSpace::WorkGroup && !uses[h].is_empty())
                .map(|(_, g)| layouter[g.ty].size)
                .sum();
            assert_eq!(bytes, v.workgroup_bytes(), "{v:?}");
        }
    }
}
