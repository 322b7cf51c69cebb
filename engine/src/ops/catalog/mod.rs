//! Cross-entropy over the whole item catalog without the (B, I) score matrix.
//!
//! - `catalog_ce(terms, targets, scale)`: terms = [(h_k (B, D_k), e_k (I, D_k))], 1 <= K <= 4,
//!   targets (B) each < I -> per-row losses (B), z = scale * sum_k h_k e_k^T (B, I),
//!   loss_b = logsumexp_j(z_b) - z_{b, t_b}. The forward runs over blocks of `BLOCK` items, keeping
//!   a running (max, sum of exp) per row, and saves lse (B). The backward takes each block of z
//!   and uses it at once: dz = (exp(z - lse) - onehot(t)) * g_b, dh_k += scale * dz e_k,blk,
//!   de_k,blk = scale * dz^T h_k. The block is recomputed (extra memory: O(B * BLOCK) for one
//!   block, plus the gradients), except on the CPU when z has at most `KEEP_SCORES` values: then
//!   the forward keeps its blocks (B * I values) and the backward reads them, one product per term
//!   and block fewer, the same bits.
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
//!
//! Files: this one is the ops (shapes, the op contract, the public functions); [`cpu`] and [`gpu`]
//! their two forms.

mod cpu;
mod gpu;

use crate::cpu::Real;
use crate::device::Device;
use crate::error::{shape_err, Result};
use crate::gpu::GpuBuf;
use crate::op::{apply, query, run, Backward, Op, Query};
use crate::tensor::{Indices, Tensor};
pub use cpu::{catalog_ce_bwd_cpu, catalog_ce_cpu, catalog_rank_cpu, HostTerms};
#[cfg(test)]
pub(crate) use gpu::kernels;
use gpu::{catalog_ce_bwd_gpu, catalog_ce_gpu, catalog_rank_gpu};

/// Items per block of recomputed scores.
pub const BLOCK: usize = 512;
/// Largest score matrix (B * I values) the CPU form keeps from the forward for the backward (32 MiB
/// of f32): a larger one is recomputed block by block, so the extra memory stays O(B * BLOCK).
pub const KEEP_SCORES: usize = 1 << 23;
/// Most score terms.
pub const MAX_TERMS: usize = 4;
/// The item blocks (first item, width) of a catalog of `n_items`.
fn blocks(n_items: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n_items).step_by(BLOCK).map(move |j0| (j0, BLOCK.min(n_items - j0)))
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

/// The terms' values from h_0, e_0, h_1, e_1, ..
fn host_terms<'a, T: Real>(x: &[&'a [T]], dims: &'a [usize], targets: &'a [u32], n_items: usize, scale: f32) -> HostTerms<'a, T> {
    let (hs, es) = (x.iter().step_by(2).copied().collect(), x.iter().skip(1).step_by(2).copied().collect());
    HostTerms { hs, es, dims, targets, n_items, scale: T::c(scale as f64) }
}

/// Per-row losses, lse (B) and the kept scores (B * I, or none) over inputs [h_0, e_0, h_1, e_1,
/// ..]; in the backward form [dh_0, de_0, ..] over [h_0, e_0, .., lse, g, kept].
#[derive(Clone)]
struct CatalogCe {
    targets: Indices,
    n_items: usize,
    dims: Vec<usize>,
    scale: f32,
    /// Whether the forward keeps its blocks of scores for the backward (see [`KEEP_SCORES`]).
    keep: bool,
    backward: bool,
}

impl Op for CatalogCe {
    fn name(&self) -> &'static str {
        "catalog_ce"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let b = self.targets.len();
        match self.backward {
            false => vec![vec![b], vec![b], vec![if self.keep { b * self.n_items } else { 0 }]],
            true => self.dims.iter().flat_map(|&d| [vec![b, d], vec![self.n_items, d]]).collect(),
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let k = self.dims.len();
        let terms = host_terms(&x[..2 * k], &self.dims, self.targets.host(), self.n_items, self.scale);
        if !self.backward {
            let (loss, lse, kept) = catalog_ce_cpu(&terms, self.keep);
            return Ok(vec![loss, lse, kept]);
        }
        let grads = catalog_ce_bwd_cpu(&terms, x[2 * k], x[2 * k + 1], x[2 * k + 2]);
        Ok(grads.into_iter().flat_map(|(dh, de)| [dh, de]).collect())
    }
    fn gpu(&self, _: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        unreachable!("catalog_ce's GPU form is gpu_tensors")
    }
    fn gpu_tensors(&self, x: &[&Tensor]) -> Result<Vec<GpuBuf>> {
        let k = self.dims.len();
        let (hs, es) = split_terms(&x[..2 * k]);
        if !self.backward {
            // The GPU recomputes its blocks (`keep` is off there): an empty third output.
            let (loss, lse) = catalog_ce_gpu(&hs, &es, &self.targets, self.n_items, self.scale)?;
            return Ok(vec![loss, lse, crate::gpu::gpu()?.alloc(0)?]);
        }
        let (lse, g) = (x[2 * k].gbuf()?, x[2 * k + 1].gbuf()?);
        catalog_ce_bwd_gpu(&hs, &es, &self.targets, self.n_items, self.scale, (&lse, &g))
    }
}

impl Backward for CatalogCe {
    /// The terms' tensors, lse, the kept scores, and the op in its backward form.
    type Saved = (Vec<Tensor>, Tensor, Tensor, CatalogCe);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        let kept = out.remove(2);
        (x.iter().map(|t| t.detach()).collect(), out.remove(1), kept, CatalogCe { backward: true, ..self })
    }
    /// See the module docs: the blocks of scores are kept or recomputed.
    fn backward((terms, lse, kept, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut x: Vec<&Tensor> = terms.iter().collect();
        x.extend([lse, g, kept]);
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
        let terms = host_terms(x, &self.dims, self.targets.host(), self.n_items, self.scale);
        Ok(catalog_rank_cpu(&terms, self.mask.host()))
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
    catalog_ce_keeping(terms, targets, scale, true)
}

/// [`catalog_ce`] with the choice of keeping the forward's scores made by the caller (`keep`:
/// kept when the score matrix has at most [`KEEP_SCORES`] values and a gradient will be taken;
/// never on the GPU): the results
/// are the same bits either way (the kept blocks are the ones a recomputation would make).
pub fn catalog_ce_keeping(terms: &[(&Tensor, &Tensor)], targets: &Indices, scale: f32, keep: bool) -> Result<Tensor> {
    let (b, n_items, dims) = check_terms("catalog_ce", terms, targets)?;
    let all: Vec<&Tensor> = terms.iter().flat_map(|(h, e)| [*h, *e]).collect();
    // Kept only for a backward that will run (not under `no_grad`).
    let keep = keep && b * n_items <= KEEP_SCORES && all[0].device() != Device::Gpu && crate::op::records(&all);
    apply(CatalogCe { targets: targets.clone(), n_items, dims, scale, keep, backward: false }, &all)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::autograd::backward;
    use crate::device::Device;
    use crate::ops::{add, matmul};
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

    /// Keeping the forward's scores and recomputing them in the backward give the same bits (f32,
    /// three item blocks, two terms, the pool's threads), and the two really are different paths.
    #[test]
    fn kept_scores_give_the_bits_of_recomputed_ones() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (b, n) = (33, 2 * BLOCK + 77);
        let t = Indices::new((0..b as u32).map(|r| r * 37 % n as u32).collect());
        let x: Vec<Tensor> =
            [[b, 8], [n, 8], [b, 5], [n, 5]].iter().map(|s| Tensor::randn(s, 0.5, &mut rng, dev).unwrap().param()).collect();
        let w = Tensor::randn(&[b], 1.0, &mut rng, dev).unwrap();
        let run = |keep: bool| {
            let loss = catalog_ce_keeping(&[(&x[0], &x[1]), (&x[2], &x[3])], &t, 3.0, keep).unwrap();
            let g = backward(&sum(&mul(&loss, &w).unwrap()).unwrap()).unwrap();
            let bits = |t: &Tensor| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            (bits(&loss), x.iter().map(|p| bits(g.get(p).unwrap())).collect::<Vec<_>>())
        };
        assert_eq!(run(true), run(false));
        let op = |keep| CatalogCe { targets: t.clone(), n_items: n, dims: vec![8, 5], scale: 3.0, keep, backward: false };
        assert_eq!(op(true).shapes()[2], vec![b * n]);
        assert_eq!(op(false).shapes()[2], vec![0]);
    }
}
