//! The CPU forms of the catalog ops (see the module docs): blocks of scores made on the host, kept
//! from the forward for the backward or recomputed there.

use super::blocks;
use crate::cpu::{par, pool, Real};

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
        let b = self.b();
        for (k, (&h, &e)) in self.hs.iter().zip(&self.es).enumerate() {
            let d = self.dims[k];
            let beta = if k == 0 { T::zero() } else { T::one() };
            // (B, d) . (w, d)^T: B's strides read e's rows as columns.
            T::gemm(b, d, w, h, d as isize, 1, &e[j0 * d..], 1, d as isize, beta, z, w as isize);
        }
        if self.scale != T::one() {
            par::chunks_apply(z, |v| *v *= self.scale);
        }
    }

    /// z block (B, w) in a pooled vector.
    fn block(&self, j0: usize, w: usize) -> Vec<T> {
        // The first product overwrites it (beta 0).
        let mut z = pool::stale(self.b() * w);
        self.block_into(&mut z, j0, w);
        z
    }
}

/// Forward: (loss (B), lse (B), kept scores: with `keep` every block of z, block after block
/// (block (j0, w) at j0 * B, (B, w) row-major: B * I values), else empty).
pub fn catalog_ce_cpu<T: Real>(terms: &HostTerms<T>, keep: bool) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (b, n_items, targets) = (terms.b(), terms.n_items, terms.targets);
    let (mut mx, mut sm, mut zt) = (pool::zeros(b), pool::zeros(b), pool::zeros(b));
    mx.fill(T::neg_infinity());
    // Every block of it is overwritten by its first product (beta 0).
    let mut kept = if keep { pool::stale(b * n_items) } else { Vec::new() };
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
            let row = &z[r * w..(r + 1) * w];
            let bm = crate::cpu::max8(row);
            let m = mx[r].max(bm);
            let rescale = if sm[r] == T::zero() { T::zero() } else { sm[r] * (mx[r] - m).fexp() };
            o[0] = m;
            o[1] = rescale + crate::cpu::wide(|| crate::cpu::sum_exp(row, m));
            let tr = targets[r] as usize;
            o[2] = if (j0..j0 + w).contains(&tr) { row[tr - j0] } else { zt[r] };
        });
        for r in 0..b {
            (mx[r], sm[r], zt[r]) = (stats[3 * r], stats[3 * r + 1], stats[3 * r + 2]);
        }
        pool::give(stats);
        if !keep {
            pool::give(own);
        }
    }
    let lse: Vec<T> = pool::collect(b, mx.iter().zip(&sm).map(|(&m, &s)| m + s.ln()));
    let loss = pool::collect(b, lse.iter().zip(&zt).map(|(&l, &t)| l - t));
    for v in [mx, sm, zt] {
        pool::give(v);
    }
    (loss, lse, kept)
}

/// Backward: (dh_k (B, D_k), de_k (I, D_k)) for each term, from lse, the per-row gradient g and
/// the forward's kept scores (or, when `kept` is empty, each block of z recomputed).
pub fn catalog_ce_bwd_cpu<T: Real>(terms: &HostTerms<T>, lse: &[T], g: &[T], kept: &[T]) -> Vec<(Vec<T>, Vec<T>)> {
    let (b, n_items, targets, scale) = (terms.b(), terms.n_items, terms.targets, terms.scale);
    let mut out: Vec<(Vec<T>, Vec<T>)> = terms.dims.iter().map(|&d| (pool::zeros(b * d), pool::zeros(n_items * d))).collect();
    for (j0, w) in blocks(n_items) {
        // dz = scale * (exp(z - lse) - onehot) * g, as cross_entropy then scale would give it:
        // row r of dz from row r of z.
        let dz_row = |r: usize, z: &[T], dz: &mut [T]| {
            let (l, gr) = (lse[r], g[r]);
            crate::cpu::wide(|| {
                for (o, &v) in dz.iter_mut().zip(z) {
                    *o = scale * ((v - l).fexp() * gr);
                }
            });
            let tr = targets[r] as usize;
            if (j0..j0 + w).contains(&tr) {
                dz[tr - j0] = scale * (((z[tr - j0] - l).fexp() - T::one()) * gr);
            }
        };
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
        par::rows_apply(&mut dz, w, |r, row| dz_row(r, &z[r * w..(r + 1) * w], row));
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
