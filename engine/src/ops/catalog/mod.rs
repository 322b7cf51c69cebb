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
//!
//! Files: this one is the ops (shapes, the op contract, the public functions); [`cpu`] and [`gpu`]
//! their two forms.

mod cpu;
mod gpu;

use crate::cpu::Real;
use crate::error::{shape_err, Result};
use crate::gpu::GpuBuf;
use crate::op::{apply, query, run, Backward, Op, Query};
use crate::tensor::{Indices, Tensor};
pub use cpu::{catalog_ce_bwd_cpu, catalog_ce_cpu, catalog_rank_cpu};
#[cfg(test)]
pub(crate) use gpu::kernels;
use gpu::{catalog_ce_bwd_gpu, catalog_ce_gpu, catalog_rank_gpu};

/// Items per block of recomputed scores.
pub const BLOCK: usize = 512;
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
        let (lse, g) = (x[2 * k].gbuf()?, x[2 * k + 1].gbuf()?);
        catalog_ce_bwd_gpu(&hs, &es, &self.targets, self.n_items, self.scale, (&lse, &g))
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
}
