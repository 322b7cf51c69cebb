//! The GPU matrix-product kernels side by side (one contract, the same results; `bench
//! --matmul-variants` validates each against the CPU and times it), the product description they
//! share ([`Gemm`]) and split-K.

use super::super::reduce::sum_rows_gpu;
use super::super::wgsl;
use crate::error::{shape_err, Result};
use crate::gpu::{gpu, kernel_params, Access::*, GpuBuf, Kernel};
use crate::tensor::{same_device, Storage, Tensor};

const BINDINGS: &[crate::gpu::Access] = &[Read, Read, Read, ReadWrite, ReadWrite];
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
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
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
    pub(super) fn plan(op: &'static str, sa: &[usize], sb: &[usize], ta: bool, tb: bool) -> Result<(Gemm, Vec<usize>)> {
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
    pub(super) fn summed(self) -> Gemm {
        Gemm { nout: 1, nsum: self.nout * self.nsum, ..self }
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

/// The product with variant `v`, which must support it.
pub(crate) fn gemm_gpu_with(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm, v: MatmulVariant) -> Result<GpuBuf> {
    Ok(gemm_gpu_pre(a, b, bias, p, v)?.0)
}

/// The product with variant `v`, and with `p.gelu` the pre-activation: (GELU of it, it).
pub(super) fn gemm_gpu_pre(a: &GpuBuf, b: &GpuBuf, bias: Option<&GpuBuf>, p: &Gemm, v: MatmulVariant) -> Result<(GpuBuf, Option<GpuBuf>)> {
    let g = gpu()?;
    match v.supports(p, &g.limits, g.features) {
        Support::Yes => {}
        no => return Err(crate::error::Error::Invalid(format!("matmul variant {} ({}) cannot compute {p:?}: {no}", v.number(), v.name()))),
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
    if dev != crate::device::Device::Gpu {
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
    if dev != crate::device::Device::Gpu || shape.len() != 3 {
        return shape_err("matmul_variant_summed", "give GPU tensors with a batch");
    }
    let out = gemm_gpu_with(&*a.gbuf()?, &*b.gbuf()?, None, &p.summed(), v)?;
    Ok(Tensor::from_storage(Storage::Gpu(out), shape[1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
