//! The CPU forms of the catalog ops (see the module docs): blocks of scores made on the host, kept
//! from the forward for the backward or recomputed there.
//!
//! The loss runs as one task per thread, each with a run of the batch's rows (`row_runs`), which
//! it takes 512 rows or so (one k block of the item gradient's product) at a time through every
//! item block: the scores, the running statistics, dz, those rows of dh and their part of each
//! block's de (a sum over the rows, k block by k block, added up in row order after). Each block
//! of scores and dz stays in the cache of the core that made it, and the whole forward or backward
//! is one parallel region instead of several per block. Otherwise (a batch of one k block, shapes
//! the runs would change the bits of) block after block over the whole batch, each kernel split
//! over the threads on its own.

use super::blocks;
use crate::cpu::par::Shared;
use crate::cpu::{par, pool, Real};

/// Runs of rows (one per task: first, end) and the k block length they are made of.
type Runs = (Vec<(usize, usize)>, usize);

/// A catalog op's score terms on the host: z (B, I) = scale * sum_k h_k e_k^T with h_k (B, D_k),
/// e_k (I, D_k), and the targets (B), each < I.
pub struct HostTerms<'a, T> {
    pub hs: Vec<&'a [T]>,
    pub es: Vec<&'a [T]>,
    pub dims: &'a [usize],
    pub targets: &'a [u32],
    pub n_items: usize,
    pub scale: T,
}

impl<T: Real> HostTerms<'_, T> {
    /// B, the rows.
    fn b(&self) -> usize {
        self.targets.len()
    }

    /// z block (B, w) = scale * sum_k h_k e_k[j0 .. j0 + w]^T, written to `z`.
    fn block_into(&self, z: &mut [T], j0: usize, w: usize) {
        self.rows_into(z, (0, self.b()), j0, w)
    }

    /// Rows r0 .. r1 of the z block (B, w) at item j0, written to `z` ((r1 - r0, w)).
    fn rows_into(&self, z: &mut [T], (r0, r1): (usize, usize), j0: usize, w: usize) {
        for (k, (&h, &e)) in self.hs.iter().zip(&self.es).enumerate() {
            let d = self.dims[k];
            let beta = if k == 0 { T::zero() } else { T::one() };
            // (r, d) . (w, d)^T: B's strides read e's rows as columns.
            T::gemm(r1 - r0, d, w, &h[r0 * d..], d as isize, 1, &e[j0 * d..], 1, d as isize, beta, z, w as isize);
        }
        if self.scale != T::one() {
            par::chunks_apply(z, |v| *v *= self.scale);
        }
    }

    /// The runs of rows for one task per thread (see the file's notes), and the k block of each
    /// de product, dz^T h over the rows: runs of whole k blocks, so that each block's part is a
    /// piece of the chain over k blocks one product on one thread computes (a task takes its rows
    /// one k block at a time). None for a batch of one k block, where a block's product would not
    /// be that chain (`crate::cpu::k_blocks` tells), or where its scores' product would not be
    /// split by rows with the same bits (a block narrower than 4 items).
    fn row_runs(&self) -> Option<Runs> {
        let (b, threads) = (self.b(), par::threads());
        let kb = b.div_ceil(b.div_ceil(512));
        let chunks = b.div_ceil(kb);
        // (k_blocks is None for a block narrower than 4 items, as for C of at most 256 elements.)
        let same = blocks(self.n_items).all(|(_, w)| self.dims.iter().all(|&d| crate::cpu::k_blocks(w, b, d) == Some(kb)));
        if chunks < 2 || !same {
            return None;
        }
        let per = chunks.div_ceil(threads.min(chunks));
        Some(((0..chunks).step_by(per).map(|c| (c * kb, ((c + per) * kb).min(b))).collect(), kb))
    }

    /// z block (B, w) in a pooled vector.
    fn block(&self, j0: usize, w: usize) -> Vec<T> {
        // The first product overwrites it (beta 0).
        let mut z = pool::stale(self.b() * w);
        self.block_into(&mut z, j0, w);
        z
    }
}

/// Row r's running statistics (max, sum of exp(z - max), target score) after the block of its
/// scores `row` at item j0.
fn row_stats<T: Real>(row: &[T], j0: usize, target: usize, (mx, sm, zt): (T, T, T)) -> (T, T, T) {
    let bm = crate::cpu::max8(row);
    let m = mx.max(bm);
    let rescale = if sm == T::zero() { T::zero() } else { sm * (mx - m).fexp() };
    let s = rescale
        + crate::cpu::wide(
            #[inline(always)]
            || crate::cpu::sum_exp(row, m),
        );
    let t = if (j0..j0 + row.len()).contains(&target) { row[target - j0] } else { zt };
    (m, s, t)
}

/// Forward: (loss (B), lse (B), kept scores: with `keep` every block of z, block after block
/// (block (j0, w) at j0 * B, (B, w) row-major: B * I values), else empty).
pub fn catalog_ce_cpu<T: Real>(terms: &HostTerms<T>, keep: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
    forward(terms, keep, terms.row_runs())
}

/// [`catalog_ce_cpu`] by the given runs of rows, or block by block.
fn forward<T: Real>(terms: &HostTerms<T>, keep: bool, runs: Option<Runs>) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (b, n_items, targets) = (terms.b(), terms.n_items, terms.targets);
    // Every block of it is overwritten by its first product (beta 0).
    let mut kept = if keep { pool::stale(b * n_items) } else { Vec::new() };
    let (mut lse, mut loss) = (pool::stale(b), pool::stale(b));
    if let Some((runs, kb)) = runs {
        let (kz, lz, oz) = (Shared::of(&mut kept), Shared::of(&mut lse), Shared::of(&mut loss));
        par::tasks(runs.len(), |t| {
            let (r0, r1) = runs[t];
            let mut own = if keep { Vec::new() } else { pool::stale(kb * super::BLOCK) };
            let mut st = vec![(T::neg_infinity(), T::zero(), T::zero()); r1 - r0];
            // One k block of rows at a time through every item block (its z stays in cache).
            for s0 in (r0..r1).step_by(kb) {
                let s1 = (s0 + kb).min(r1);
                for (j0, w) in blocks(n_items) {
                    // SAFETY: rows s0 .. s1 of block j0 belong to this task alone.
                    let z = if keep { unsafe { kz.piece(j0 * b + s0 * w, (s1 - s0) * w) } } else { &mut own[..(s1 - s0) * w] };
                    terms.rows_into(z, (s0, s1), j0, w);
                    for (i, row) in z.chunks(w).enumerate() {
                        let r = s0 - r0 + i;
                        st[r] = row_stats(row, j0, targets[s0 + i] as usize, st[r]);
                    }
                }
            }
            // SAFETY: as above, rows r0 .. r1 of lse and loss.
            let (l, o) = unsafe { (lz.piece(r0, r1 - r0), oz.piece(r0, r1 - r0)) };
            for (i, &(m, s, zt)) in st.iter().enumerate() {
                l[i] = m + s.ln();
                o[i] = l[i] - zt;
            }
            pool::give(own);
        });
        return (loss, lse, kept);
    }
    let mut st = vec![(T::neg_infinity(), T::zero(), T::zero()); b];
    for (j0, w) in blocks(n_items) {
        let mut own = Vec::new();
        let z: &[T] = if keep {
            let z = &mut kept[j0 * b..(j0 + w) * b];
            terms.block_into(z, j0, w);
            z
        } else {
            own = terms.block(j0, w);
            &own
        };
        let stats = par::rows(par::Stale, b, 3 * w, 3, |r, o: &mut [T]| {
            let (m, s, t) = row_stats(&z[r * w..(r + 1) * w], j0, targets[r] as usize, st[r]);
            o.copy_from_slice(&[m, s, t]);
        });
        for (r, v) in stats.chunks(3).enumerate() {
            st[r] = (v[0], v[1], v[2]);
        }
        pool::give(stats);
        pool::give(own);
    }
    for (r, &(m, s, zt)) in st.iter().enumerate() {
        lse[r] = m + s.ln();
        loss[r] = lse[r] - zt;
    }
    (loss, lse, kept)
}

/// Backward: (dh_k (B, D_k), de_k (I, D_k)) for each term, from lse, the per-row gradient g and
/// the forward's kept scores (or, when `kept` is empty, each block of z recomputed).
pub fn catalog_ce_bwd_cpu<T: Real>(terms: &HostTerms<T>, lse: &[T], g: &[T], kept: &[T]) -> Vec<(Vec<T>, Vec<T>)> {
    backward(terms, lse, g, kept, terms.row_runs())
}

/// [`catalog_ce_bwd_cpu`] by the given runs of rows, or block by block.
fn backward<T: Real>(terms: &HostTerms<T>, lse: &[T], g: &[T], kept: &[T], runs: Option<Runs>) -> Vec<(Vec<T>, Vec<T>)> {
    let (b, n_items, targets, scale) = (terms.b(), terms.n_items, terms.targets, terms.scale);
    // dz = scale * (exp(z - lse) - onehot) * g, as cross_entropy then scale would give it: row r
    // of dz (the block at item j0) from row r of z.
    let dz_row = |r: usize, j0: usize, z: &[T], dz: &mut [T]| {
        let (l, gr) = (lse[r], g[r]);
        crate::cpu::wide(
            #[inline(always)]
            || {
                for (o, &v) in dz.iter_mut().zip(z) {
                    *o = scale * ((v - l).fexp() * gr);
                }
            },
        );
        let tr = targets[r] as usize;
        if (j0..j0 + z.len()).contains(&tr) {
            dz[tr - j0] = scale * (((z[tr - j0] - l).fexp() - T::one()) * gr);
        }
    };
    // dh and the first run's de are written by the products (beta 0 for de, dh added to).
    let mut out: Vec<(Vec<T>, Vec<T>)> = terms.dims.iter().map(|&d| (pool::zeros(b * d), pool::stale(n_items * d))).collect();
    if let Some((runs, kb)) = runs {
        // de of the k blocks past the first run, each a (I, D_k) partial per term, added in order.
        let first = runs[0].1.div_ceil(kb);
        let later = b.div_ceil(kb) - first;
        let mut parts: Vec<Vec<T>> = terms.dims.iter().map(|&d| pool::stale(later * n_items * d)).collect();
        let outs: Vec<_> = out.iter_mut().map(|(dh, de)| (Shared::of(dh), Shared::of(de))).collect();
        let shared_parts: Vec<_> = parts.iter_mut().map(|p| Shared::of(p)).collect();
        par::tasks(runs.len(), |t| {
            let (r0, r1) = runs[t];
            let mut dz = pool::stale(kb * super::BLOCK);
            let mut zr = if kept.is_empty() { pool::stale(kb * super::BLOCK) } else { Vec::new() };
            // One k block of rows at a time through every item block (its z and dz stay in cache).
            for s0 in (r0..r1).step_by(kb) {
                let (s1, first_of_task) = ((s0 + kb).min(r1), s0 == r0);
                let r = s1 - s0;
                for (j0, w) in blocks(n_items) {
                    let z = match kept {
                        [] => {
                            terms.rows_into(&mut zr[..r * w], (s0, s1), j0, w);
                            &zr[..r * w]
                        }
                        _ => &kept[j0 * b + s0 * w..j0 * b + s1 * w],
                    };
                    let dz = &mut dz[..r * w];
                    for (i, (zi, di)) in z.chunks(w).zip(dz.chunks_mut(w)).enumerate() {
                        dz_row(s0 + i, j0, zi, di);
                    }
                    for (k, (dh, de)) in outs.iter().enumerate() {
                        let d = terms.dims[k];
                        // SAFETY: these rows of dh are this task's; so is this k block's de (the
                        // first run's chained in de, the others' each in a partial of its own).
                        let dh = unsafe { dh.piece(s0 * d, r * d) };
                        T::gemm(r, w, d, dz, w as isize, 1, &terms.es[k][j0 * d..], d as isize, 1, T::one(), dh, d as isize);
                        let (dst, beta) = match (t, first_of_task) {
                            (0, true) => (unsafe { de.piece(j0 * d, w * d) }, T::zero()),
                            (0, false) => (unsafe { de.piece(j0 * d, w * d) }, T::one()),
                            _ => (unsafe { shared_parts[k].piece(((s0 / kb - first) * n_items + j0) * d, w * d) }, T::zero()),
                        };
                        T::gemm(w, r, d, dz, 1, w as isize, &terms.hs[k][s0 * d..], d as isize, 1, beta, dst, d as isize);
                    }
                }
            }
            pool::give(dz);
            pool::give(zr);
        });
        for (k, (_, de)) in out.iter_mut().enumerate() {
            let d = terms.dims[k];
            crate::cpu::add_partials(de, (n_items, d, d), &parts[k]);
        }
        for p in parts {
            pool::give(p);
        }
        return out;
    }
    for (j0, w) in blocks(n_items) {
        let mut recomputed = Vec::new();
        let z = match kept {
            [] => {
                recomputed = terms.block(j0, w);
                &recomputed[..]
            }
            _ => &kept[j0 * b..(j0 + w) * b],
        };
        // Every row of dz is written whole.
        let mut dz = pool::stale(b * w);
        par::rows_apply(&mut dz, w, |r, row| dz_row(r, j0, &z[r * w..(r + 1) * w], row));
        pool::give(recomputed);
        for (k, (dh, de)) in out.iter_mut().enumerate() {
            let d = terms.dims[k];
            // dh_k += dz . e_k,blk: (B, w) . (w, d).
            T::gemm(b, w, d, &dz, w as isize, 1, &terms.es[k][j0 * d..], d as isize, 1, T::one(), dh, d as isize);
            // de_k,blk = dz^T . h_k: (w, B) . (B, d).
            T::gemm(w, b, d, &dz, 1, w as isize, terms.hs[k], d as isize, 1, T::zero(), &mut de[j0 * d..(j0 + w) * d], d as isize);
        }
        pool::give(dz);
    }
    out
}

/// Ranks (B); `mask` is offsets (B + 1) then the masked columns of each row (see the module docs).
pub fn catalog_rank_cpu<T: Real>(terms: &HostTerms<T>, mask: &[u32]) -> Vec<u32> {
    let (b, n_items, targets) = (terms.b(), terms.n_items, terms.targets);
    let mut st: Vec<T> = pool::zeros(b);
    for (j0, w) in blocks(n_items) {
        if !targets.iter().any(|&t| (j0..j0 + w).contains(&(t as usize))) {
            continue;
        }
        let z = terms.block(j0, w);
        for (r, &t) in targets.iter().enumerate() {
            if (j0..j0 + w).contains(&(t as usize)) {
                st[r] = z[r * w + t as usize - j0];
            }
        }
        pool::give(z);
    }
    let mut ranks = vec![0u32; b];
    for (j0, w) in blocks(n_items) {
        let z = terms.block(j0, w);
        let counts: Vec<u32> = par::rows(par::Zeroed, b, w, 1, |r, o: &mut [u32]| {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::tests::values(n, seed, 20_011.0, 0.5)
    }

    /// The loss and its gradients by runs of rows (where `row_runs` allows it) on one, two and
    /// three threads are the bits of the block-by-block path on one thread: kept and recomputed
    /// scores, one and two terms, batches of two and three k blocks, a last item block narrow
    /// enough for the product's small path (same k blocks as the batch's at 1024 rows, other ones
    /// at 1300: then block by block), a term narrow enough to go through C^T.
    #[test]
    fn row_runs_give_the_bits_of_block_by_block() {
        let pools: Vec<_> = [1, 2, 3].map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).into();
        for (b, n, dims, runs) in [
            (1024, 2 * 512 + 318, vec![64], true),
            (1024, 2 * 512 + 10, vec![64, 32], true),
            (1300, 2 * 512 + 6, vec![64], false),
            (700, 600, vec![16], true),
            (1300, 600, vec![64, 8], true),
            (2048, 2420, vec![64], true),
        ] {
            let hs: Vec<Vec<f32>> = dims.iter().enumerate().map(|(k, &d)| values(b * d, 2 * k as u32 + 1)).collect();
            let es: Vec<Vec<f32>> = dims.iter().enumerate().map(|(k, &d)| values(n * d, 2 * k as u32 + 2)).collect();
            let targets: Vec<u32> = (0..b as u32).map(|r| r * 37 % n as u32).collect();
            let g = values(b, 99);
            let terms = HostTerms {
                hs: hs.iter().map(|v| &v[..]).collect(),
                es: es.iter().map(|v| &v[..]).collect(),
                dims: &dims,
                targets: &targets,
                n_items: n,
                scale: 3.0,
            };
            for keep in [true, false] {
                let run = |by_runs: bool| {
                    let runs = || if by_runs { terms.row_runs() } else { None };
                    let (loss, lse, kept) = forward(&terms, keep, runs());
                    let grads = backward(&terms, &lse, &g, &kept, runs());
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                    (bits(&loss), bits(&lse), grads.iter().map(|(dh, de)| (bits(dh), bits(de))).collect::<Vec<_>>())
                };
                let want = pools[0].install(|| run(false));
                for pool in &pools {
                    assert_eq!(pool.install(|| terms.row_runs().is_some()), runs, "({b}, {n}, {dims:?})");
                    assert!(
                        pool.install(|| run(true)) == want,
                        "({b}, {n}, {dims:?}), keep {keep}, {} threads",
                        pool.current_num_threads()
                    );
                }
            }
        }
    }
}
