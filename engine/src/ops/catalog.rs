//! Cross-entropy over the whole item catalog without the (B, I) score matrix.
//!
//! - `catalog_ce(terms, targets, scale)`: terms = [(h_k (B, D_k), e_k (I, D_k))], 1 <= K <= 4,
//!   targets (B) each < I -> per-row losses (B), z = scale * sum_k h_k e_k^T (B, I),
//!   loss_b = logsumexp_j(z_b) - z_{b, t_b}. The forward runs over blocks of `BLOCK` items, keeping
//!   a running (max, sum of exp) per row, and saves only lse (B). The backward recomputes each block
//!   of z and uses it at once: dz = (exp(z - lse) - onehot(t)) * g_b, dh_k += scale * dz e_k,blk,
//!   de_k,blk = scale * dz^T h_k. Extra memory: O(B * BLOCK) for one block, plus the gradients.
//!
//! - `catalog_rank(terms, targets, scale, mask)`: the same scores z, never materialised ->
//!   ranks (B) with rank_b = #{j != t_b : !(z_bj < z_bt)} - #{j in mask_b : !(z_bj < z_bt)} (ties
//!   and NaN count against the target, as `metrics::rank_of_target_masked`); mask_b, the columns
//!   taken out of row b's ranking (e.g. its history), is deduplicated without t_b first. Two
//!   passes over the blocks: the target's score is read from its block (the same arithmetic as
//!   every other score), then each block adds its count. Extra memory O(B * BLOCK). No gradient.
//!
//! With MSM4SR's cosine scorer the terms are the L2-normalised sequence and item vectors of each
//! modality and scale = 1 / tau (z is the sum of the two cosine terms); SASRec has one term and
//! scale 1. The result equals `cross_entropy(scale * sum_k matmul(h_k, e_k^T), t)` up to rounding
//! (the running log-sum-exp and the order of the sums), which the tests check.
//!
//! GPU: per block, the item rows are copied out, `matmul` gives the block of scores, and one
//! kernel per row (`catalog.wgsl`) updates the running statistics (forward) or writes dz
//! (backward); dh accumulates over blocks with `add`, de is written block by block.

use super::concat::copy_gpu;
use super::elementwise::add;
use super::{matmul, wgsl};
use crate::cpu::{par, pool, Real};
use crate::error::{shape_err, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::op::{apply, query, run, Backward, Op, Query};
use crate::tensor::{Indices, Storage, Tensor};

/// Items per block of recomputed scores.
pub const BLOCK: usize = 512;
/// Most score terms.
pub const MAX_TERMS: usize = 4;

const SRC: &str = wgsl!("catalog.wgsl");
static FWD: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_fwd", &[Read, Read, ReadWrite]);
static FIN: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_finish", &[Read, ReadWrite, ReadWrite]);
static BWD: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_bwd", &[Read, Read, Read, ReadWrite]);
static RANK_T: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_rank_target", &[Read, Read, ReadWrite]);
static RANK_C: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_rank_count", &[Read, Read, Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![FWD.contract(), FIN.contract(), BWD.contract(), RANK_T.contract(), RANK_C.contract()]
}

kernel_params! {
    /// `struct P` of catalog.wgsl (every kernel).
    struct CatalogParams {
        /// B
        rows: u32,
        /// Items in this block.
        width: u32,
        /// First item of the block.
        start: u32,
        /// 1 for the first block (the running statistics start empty).
        first: u32,
        scale: f32,
    }
}

/// The item blocks (first item, width) of a catalog of `n_items`.
fn blocks(n_items: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n_items).step_by(BLOCK).map(move |j0| (j0, BLOCK.min(n_items - j0)))
}

// ---- CPU reference --------------------------------------------------------------------------

/// z block (B, w) = scale * sum_k h_k e_k[j0 .. j0 + w]^T.
fn block_scores<T: Real>(hs: &[&[T]], es: &[&[T]], dims: &[usize], b: usize, j0: usize, w: usize, scale: T) -> Vec<T> {
    let mut z = pool::zeros(b * w);
    for (k, (&h, &e)) in hs.iter().zip(es).enumerate() {
        let d = dims[k];
        let beta = if k == 0 { T::zero() } else { T::one() };
        // (B, d) . (w, d)^T: B's strides read e's rows as columns.
        T::gemm(b, d, w, h, d as isize, 1, &e[j0 * d..], 1, d as isize, beta, &mut z, w as isize);
    }
    if scale != T::one() {
        par::chunks_apply(&mut z, |v| *v *= scale);
    }
    z
}

/// Forward: (loss (B), lse (B)).
pub fn catalog_ce_cpu<T: Real>(hs: &[&[T]], es: &[&[T]], dims: &[usize], targets: &[u32], n_items: usize, scale: T) -> (Vec<T>, Vec<T>) {
    let b = targets.len();
    let (mut mx, mut sm, mut zt) = (pool::zeros(b), pool::zeros(b), pool::zeros(b));
    mx.fill(T::neg_infinity());
    for (j0, w) in blocks(n_items) {
        let z = block_scores(hs, es, dims, b, j0, w, scale);
        let stats = par::rows(b, 3 * w, 3, |r, o: &mut [T]| {
            let row = &z[r * w..(r + 1) * w];
            let bm = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
            let m = mx[r].max(bm);
            let rescale = if sm[r] == T::zero() { T::zero() } else { sm[r] * (mx[r] - m).fexp() };
            o[0] = m;
            o[1] = rescale + crate::cpu::sum_exp(row, m);
            let t = targets[r] as usize;
            o[2] = if (j0..j0 + w).contains(&t) { row[t - j0] } else { zt[r] };
        });
        for r in 0..b {
            (mx[r], sm[r], zt[r]) = (stats[3 * r], stats[3 * r + 1], stats[3 * r + 2]);
        }
        pool::give(stats);
        pool::give(z);
    }
    let lse: Vec<T> = pool::collect(b, mx.iter().zip(&sm).map(|(&m, &s)| m + s.ln()));
    let loss = pool::collect(b, lse.iter().zip(&zt).map(|(&l, &t)| l - t));
    for v in [mx, sm, zt] {
        pool::give(v);
    }
    (loss, lse)
}

/// Backward: (dh_k (B, D_k), de_k (I, D_k)) for each term, from lse and the per-row gradient g.
#[allow(clippy::too_many_arguments)]
pub fn catalog_ce_bwd_cpu<T: Real>(
    hs: &[&[T]],
    es: &[&[T]],
    dims: &[usize],
    targets: &[u32],
    n_items: usize,
    scale: T,
    lse: &[T],
    g: &[T],
) -> Vec<(Vec<T>, Vec<T>)> {
    let b = targets.len();
    let mut out: Vec<(Vec<T>, Vec<T>)> = dims.iter().map(|&d| (pool::zeros(b * d), pool::zeros(n_items * d))).collect();
    for (j0, w) in blocks(n_items) {
        let mut dz = block_scores(hs, es, dims, b, j0, w, scale);
        // dz = scale * (exp(z - lse) - onehot) * g, as cross_entropy then scale would give it.
        par::rows_apply(&mut dz, w, |r, row| {
            let (l, gr) = (lse[r], g[r]);
            let t = targets[r] as usize;
            let zt = if (j0..j0 + w).contains(&t) { row[t - j0] } else { T::zero() };
            for v in row.iter_mut() {
                *v = scale * ((*v - l).fexp() * gr);
            }
            if (j0..j0 + w).contains(&t) {
                row[t - j0] = scale * (((zt - l).fexp() - T::one()) * gr);
            }
        });
        for (k, (dh, de)) in out.iter_mut().enumerate() {
            let d = dims[k];
            // dh_k += dz . e_k,blk: (B, w) . (w, d).
            T::gemm(b, w, d, &dz, w as isize, 1, &es[k][j0 * d..], d as isize, 1, T::one(), dh, d as isize);
            // de_k,blk = dz^T . h_k: (w, B) . (B, d).
            T::gemm(w, b, d, &dz, 1, w as isize, hs[k], d as isize, 1, T::zero(), &mut de[j0 * d..(j0 + w) * d], d as isize);
        }
        pool::give(dz);
    }
    out
}

/// Ranks (B); `mask` is offsets (B + 1) then the masked columns of each row (see the module docs).
pub fn catalog_rank_cpu<T: Real>(
    hs: &[&[T]],
    es: &[&[T]],
    dims: &[usize],
    targets: &[u32],
    n_items: usize,
    scale: T,
    mask: &[u32],
) -> Vec<u32> {
    let b = targets.len();
    let mut st: Vec<T> = pool::zeros(b);
    for (j0, w) in blocks(n_items) {
        if !targets.iter().any(|&t| (j0..j0 + w).contains(&(t as usize))) {
            continue;
        }
        let z = block_scores(hs, es, dims, b, j0, w, scale);
        for (r, &t) in targets.iter().enumerate() {
            if (j0..j0 + w).contains(&(t as usize)) {
                st[r] = z[r * w + t as usize - j0];
            }
        }
        pool::give(z);
    }
    let mut ranks = vec![0u32; b];
    for (j0, w) in blocks(n_items) {
        let z = block_scores(hs, es, dims, b, j0, w, scale);
        let counts: Vec<u32> = par::rows(b, w, 1, |r, o: &mut [u32]| {
            let (row, s_t, t) = (&z[r * w..(r + 1) * w], st[r], targets[r] as usize);
            // !(s < s_t): ties and NaN count against the target.
            let beats = |s: T| s.partial_cmp(&s_t) != Some(std::cmp::Ordering::Less);
            let mut c = row.iter().enumerate().filter(|&(j, &s)| j0 + j != t && beats(s)).count();
            for &j in &mask[mask[r] as usize + b + 1..mask[r + 1] as usize + b + 1] {
                let j = j as usize;
                if (j0..j0 + w).contains(&j) && beats(row[j - j0]) {
                    c -= 1;
                }
            }
            o[0] = c as u32;
        });
        ranks.iter_mut().zip(&counts).for_each(|(a, &c)| *a += c);
        pool::give(counts);
        pool::give(z);
    }
    pool::give(st);
    ranks
}

// ---- GPU ------------------------------------------------------------------------------------

/// Rows j0 .. j0 + w of e (I, d), copied out.
fn item_block_gpu(e: &Tensor, j0: usize, w: usize) -> Result<Tensor> {
    let d = e.shape()[1];
    let buf = gpu()?.alloc(4 * (w * d) as u64)?;
    copy_gpu(&*e.gbuf()?, j0 * d, &buf, 0, w * d)?;
    Ok(Tensor::from_storage(Storage::Gpu(buf), vec![w, d]))
}

/// sum_k h_k blk_k^T (B, w) on the GPU for the item blocks `blks` (the row kernels apply the scale).
fn block_scores_gpu(hs: &[Tensor], blks: &[Tensor]) -> Result<Tensor> {
    let mut z: Option<Tensor> = None;
    for (h, blk) in hs.iter().zip(blks) {
        let s = matmul(h, blk, false, true)?;
        z = Some(match z {
            None => s,
            Some(z) => add(&z, &s)?,
        });
    }
    Ok(z.expect("at least one term"))
}

/// Rows j0 .. j0 + w of every term's item table.
fn item_blocks_gpu(es: &[Tensor], j0: usize, w: usize) -> Result<Vec<Tensor>> {
    es.iter().map(|e| item_block_gpu(e, j0, w)).collect()
}

fn catalog_ce_gpu(hs: &[Tensor], es: &[Tensor], targets: &Indices, n_items: usize, scale: f32) -> Result<(GpuBuf, GpuBuf)> {
    let b = targets.len();
    let g = gpu()?;
    // Running (max, sum, target logit) per row, then (loss, lse) per row.
    let stat = g.alloc(4 * (3 * b) as u64)?;
    for (j0, w) in blocks(n_items) {
        let z = block_scores_gpu(hs, &item_blocks_gpu(es, j0, w)?)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: (j0 == 0) as u32, scale };
        g.dispatch(&FWD, &[&*z.gbuf()?, targets.gpu()?, &stat], &prm, row_groups(b))?;
    }
    let (loss, lse) = (g.alloc(4 * b as u64)?, g.alloc(4 * b as u64)?);
    let prm = CatalogParams { rows: b as u32, width: 0, start: 0, first: 0, scale };
    g.dispatch(&FIN, &[&stat, &loss, &lse], &prm, groups_1d(b))?;
    Ok((loss, lse))
}

/// Backward on the GPU: `lg` holds lse (B) then g (B).
fn catalog_ce_bwd_gpu(hs: &[Tensor], es: &[Tensor], targets: &Indices, n_items: usize, scale: f32, lg: &GpuBuf) -> Result<Vec<GpuBuf>> {
    let b = targets.len();
    let gp = gpu()?;
    let mut dh: Vec<Option<Tensor>> = vec![None; hs.len()];
    let de: Vec<GpuBuf> = es.iter().map(|e| gp.alloc(4 * e.numel() as u64)).collect::<Result<_>>()?;
    for (j0, w) in blocks(n_items) {
        let blks = item_blocks_gpu(es, j0, w)?;
        let z = block_scores_gpu(hs, &blks)?;
        let dz = gp.alloc(4 * (b * w) as u64)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: 0, scale };
        gp.dispatch(&BWD, &[&*z.gbuf()?, targets.gpu()?, lg, &dz], &prm, row_groups(b))?;
        let dz = Tensor::from_storage(Storage::Gpu(dz), vec![b, w]);
        for (k, (h, blk)) in hs.iter().zip(&blks).enumerate() {
            let d = blk.shape()[1];
            let part = matmul(&dz, blk, false, false)?; // (B, d)
            dh[k] = Some(match dh[k].take() {
                None => part,
                Some(acc) => add(&acc, &part)?,
            });
            let deb = matmul(&dz, h, true, false)?; // (w, d)
            copy_gpu(&*deb.gbuf()?, 0, &de[k], j0 * d, w * d)?;
        }
    }
    let mut out = Vec::with_capacity(2 * hs.len());
    for (dh, de) in dh.into_iter().zip(de) {
        let dh = dh.expect("at least one block");
        let buf = gp.alloc(4 * dh.numel() as u64)?;
        copy_gpu(&*dh.gbuf()?, 0, &buf, 0, dh.numel())?;
        out.extend([buf, de]);
    }
    Ok(out)
}

fn catalog_rank_gpu(hs: &[Tensor], es: &[Tensor], targets: &Indices, n_items: usize, scale: f32, mask: &Indices) -> Result<Vec<u32>> {
    let b = targets.len();
    let g = gpu()?;
    let (st, counts) = (g.alloc(4 * b as u64)?, g.alloc(4 * b as u64)?);
    let t = targets.host();
    for (j0, w) in blocks(n_items) {
        if !t.iter().any(|&t| (j0..j0 + w).contains(&(t as usize))) {
            continue;
        }
        let z = block_scores_gpu(hs, &item_blocks_gpu(es, j0, w)?)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: 0, scale };
        g.dispatch(&RANK_T, &[&*z.gbuf()?, targets.gpu()?, &st], &prm, groups_1d(b))?;
    }
    for (j0, w) in blocks(n_items) {
        let z = block_scores_gpu(hs, &item_blocks_gpu(es, j0, w)?)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: (j0 == 0) as u32, scale };
        g.dispatch(&RANK_C, &[&*z.gbuf()?, targets.gpu()?, &st, mask.gpu()?, &counts], &prm, row_groups(b))?;
    }
    Ok(bytemuck::pod_collect_to_vec(&g.read(&counts, 4 * b as u64)?))
}

// ---- op -------------------------------------------------------------------------------------

/// Shapes of score terms: (B, I, D_k), checked (see the module docs).
fn check_terms(op: &'static str, terms: &[(&Tensor, &Tensor)], targets: &Indices) -> Result<(usize, usize, Vec<usize>)> {
    if terms.is_empty() || terms.len() > MAX_TERMS {
        return shape_err(op, format!("needs 1 to {MAX_TERMS} score terms, got {}", terms.len()));
    }
    let (b, n_items) = (terms[0].0.shape()[0], terms[0].1.shape()[0]);
    for (k, (h, e)) in terms.iter().enumerate() {
        let (sh, se) = (h.shape(), e.shape());
        if sh.len() != 2 || se.len() != 2 || sh[1] != se[1] || sh[0] != b || se[0] != n_items || b == 0 || n_items == 0 {
            return shape_err(
                op,
                format!("term {k}: h {sh:?} and items {se:?} must be (B, D) and (I, D) with one B = {b} and I = {n_items}"),
            );
        }
    }
    if targets.len() != b {
        return shape_err(op, format!("{} targets for a batch of {b}", targets.len()));
    }
    targets.check_below(n_items, op, "target")?;
    Ok((b, n_items, terms.iter().map(|(h, _)| h.shape()[1]).collect()))
}

/// The mask layout of the rank kernels from per-row column lists: offsets (B + 1), then each row's
/// columns, deduplicated, without its target and without columns >= `n_items`.
fn rank_mask(rows: &[Vec<u32>], targets: &[u32], n_items: usize) -> Indices {
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    let mut items = Vec::new();
    offsets.push(0u32);
    for (r, cols) in rows.iter().enumerate() {
        let mut c: Vec<u32> = cols.iter().copied().filter(|&j| j != targets[r] && (j as usize) < n_items).collect();
        c.sort_unstable();
        c.dedup();
        items.extend(c);
        offsets.push(items.len() as u32);
    }
    offsets.extend(items);
    Indices::new(offsets)
}

/// The terms' tensors h_0, e_0, h_1, e_1, .. cut from the tape.
fn split_terms(x: &[&Tensor]) -> (Vec<Tensor>, Vec<Tensor>) {
    (x.iter().step_by(2).map(|t| t.detach()).collect(), x.iter().skip(1).step_by(2).map(|t| t.detach()).collect())
}

/// The terms' values h_0, e_0, h_1, e_1, ..
fn split_values<'a, T>(x: &[&'a [T]]) -> (Vec<&'a [T]>, Vec<&'a [T]>) {
    (x.iter().step_by(2).copied().collect(), x.iter().skip(1).step_by(2).copied().collect())
}

/// Per-row losses and lse (B) over inputs [h_0, e_0, h_1, e_1, ..]; in the backward form
/// [dh_0, de_0, ..] over [h_0, e_0, .., lse, g].
#[derive(Clone)]
struct CatalogCe {
    targets: Indices,
    n_items: usize,
    dims: Vec<usize>,
    scale: f32,
    backward: bool,
}

impl Op for CatalogCe {
    fn name(&self) -> &'static str {
        "catalog_ce"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let b = self.targets.len();
        match self.backward {
            false => vec![vec![b], vec![b]],
            true => self.dims.iter().flat_map(|&d| [vec![b, d], vec![self.n_items, d]]).collect(),
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (t, scale) = (self.targets.host(), T::c(self.scale as f64));
        let k = self.dims.len();
        let (hs, es) = split_values(&x[..2 * k]);
        if !self.backward {
            let (loss, lse) = catalog_ce_cpu::<T>(&hs, &es, &self.dims, t, self.n_items, scale);
            return Ok(vec![loss, lse]);
        }
        let grads = catalog_ce_bwd_cpu::<T>(&hs, &es, &self.dims, t, self.n_items, scale, x[2 * k], x[2 * k + 1]);
        Ok(grads.into_iter().flat_map(|(dh, de)| [dh, de]).collect())
    }
    fn gpu(&self, _: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        unreachable!("catalog_ce's GPU form is gpu_tensors")
    }
    fn gpu_tensors(&self, x: &[&Tensor]) -> Result<Vec<GpuBuf>> {
        let k = self.dims.len();
        let (hs, es) = split_terms(&x[..2 * k]);
        if !self.backward {
            let (loss, lse) = catalog_ce_gpu(&hs, &es, &self.targets, self.n_items, self.scale)?;
            return Ok(vec![loss, lse]);
        }
        // The backward kernel reads lse (B) then g (B) from one buffer.
        let (gp, b) = (gpu()?, self.targets.len());
        let lg = gp.alloc(4 * (2 * b) as u64)?;
        copy_gpu(&*x[2 * k].gbuf()?, 0, &lg, 0, b)?;
        copy_gpu(&*x[2 * k + 1].gbuf()?, 0, &lg, b, b)?;
        catalog_ce_bwd_gpu(&hs, &es, &self.targets, self.n_items, self.scale, &lg)
    }
}

impl Backward for CatalogCe {
    /// The terms' tensors, lse, and the op in its backward form.
    type Saved = (Vec<Tensor>, Tensor, CatalogCe);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        (x.iter().map(|t| t.detach()).collect(), out.remove(1), CatalogCe { backward: true, ..self })
    }
    /// See the module docs: the blocks of scores are recomputed.
    fn backward((terms, lse, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut x: Vec<&Tensor> = terms.iter().collect();
        x.extend([lse, g]);
        Ok(run(op, &x)?.into_iter().map(Some).collect())
    }
}

/// Ranks of the targets over the whole catalog (see `catalog_rank`).
struct CatalogRank<'a> {
    targets: &'a Indices,
    n_items: usize,
    dims: Vec<usize>,
    scale: f32,
    mask: Indices,
}

impl Query for CatalogRank<'_> {
    type Out = Vec<u32>;
    fn name(&self) -> &'static str {
        "catalog_rank"
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<u32>> {
        let (hs, es) = split_values(x);
        let scale = T::c(self.scale as f64);
        Ok(catalog_rank_cpu::<T>(&hs, &es, &self.dims, self.targets.host(), self.n_items, scale, self.mask.host()))
    }
    fn gpu(&self, x: &[&Tensor]) -> Result<Vec<u32>> {
        let (hs, es) = split_terms(x);
        catalog_rank_gpu(&hs, &es, self.targets, self.n_items, self.scale, &self.mask)
    }
}

/// Full-catalog ranks of the targets (B), scores as `catalog_ce`'s, never materialised; `mask`
/// (one list of columns per row, e.g. its history; repeats, the target and out-of-range columns
/// are harmless) takes columns out of each row's ranking. See the module docs.
pub fn catalog_rank(terms: &[(&Tensor, &Tensor)], targets: &Indices, scale: f32, mask: Option<&[Vec<u32>]>) -> Result<Vec<u32>> {
    let op = "catalog_rank";
    let (b, n_items, dims) = check_terms(op, terms, targets)?;
    let mask = match mask {
        Some(m) if m.len() != b => return shape_err(op, format!("{} mask rows for a batch of {b}", m.len())),
        Some(m) => rank_mask(m, targets.host(), n_items),
        None => Indices::new(vec![0; b + 1]),
    };
    let all: Vec<&Tensor> = terms.iter().flat_map(|(h, e)| [*h, *e]).collect();
    query(&CatalogRank { targets, n_items, dims, scale, mask }, &all)
}

/// Per-row full-catalog cross-entropy (B) of z = scale * sum_k h_k e_k^T; see the module docs.
/// `mean` of it is the training loss.
pub fn catalog_ce(terms: &[(&Tensor, &Tensor)], targets: &Indices, scale: f32) -> Result<Tensor> {
    let (_, n_items, dims) = check_terms("catalog_ce", terms, targets)?;
    let all: Vec<&Tensor> = terms.iter().flat_map(|(h, e)| [*h, *e]).collect();
    apply(CatalogCe { targets: targets.clone(), n_items, dims, scale, backward: false }, &all)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::autograd::backward;
    use crate::device::Device;
    use crate::ops::{cross_entropy, mul, scale, sum};

    /// Over three item blocks and two terms, the fused loss and its gradients equal cross_entropy
    /// of the materialised scores (f64).
    #[test]
    fn equals_cross_entropy_of_the_full_scores() {
        let dev = Device::Cpu64;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (b, n) = (5, 2 * BLOCK + 77);
        let t = || Indices::new(vec![0, 17, (n - 1) as u32, BLOCK as u32, 17]);
        let x: Vec<Tensor> =
            [[b, 4], [n, 4], [b, 3], [n, 3]].iter().map(|s| Tensor::randn(s, 0.5, &mut rng, dev).unwrap().param()).collect();
        let w = Tensor::randn(&[b], 1.0, &mut rng, dev).unwrap();
        let fused = catalog_ce(&[(&x[0], &x[1]), (&x[2], &x[3])], &t(), 3.0).unwrap();
        let z = add(
            &scale(&matmul(&x[0], &x[1], false, true).unwrap(), 3.0).unwrap(),
            &scale(&matmul(&x[2], &x[3], false, true).unwrap(), 3.0).unwrap(),
        )
        .unwrap();
        // cross_entropy is the batch mean; compare per-row values through the weighted sums.
        let direct = cross_entropy(&z, &t()).unwrap();
        let fused_mean = crate::ops::mean(&fused).unwrap();
        assert!((fused_mean.to_vec_f64().unwrap()[0] - direct.to_vec_f64().unwrap()[0]).abs() < 1e-12);
        let gf = backward(&sum(&mul(&fused, &w).unwrap()).unwrap()).unwrap();
        // The same weighted loss through the materialised path: per-row CE via one-row batches.
        let mut total: Option<Tensor> = None;
        for r in 0..b {
            let row = crate::ops::embedding(&z, &Indices::new(vec![r as u32]), &[1]).unwrap();
            let ce = cross_entropy(&row, &Indices::new(vec![t().host()[r]])).unwrap();
            let wr = Tensor::from_f64(vec![w.to_vec_f64().unwrap()[r]], &[], dev).unwrap();
            let term = mul(&ce, &wr).unwrap();
            total = Some(match total {
                None => term,
                Some(a) => add(&a, &term).unwrap(),
            });
        }
        let gd = backward(&total.unwrap()).unwrap();
        for p in &x {
            let (a, b) = (gf.get(p).unwrap().to_vec_f64().unwrap(), gd.get(p).unwrap().to_vec_f64().unwrap());
            let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
            assert!(err < 1e-12, "gradient differs by {err}");
        }
    }
}
