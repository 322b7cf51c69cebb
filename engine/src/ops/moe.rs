//! The mixture-of-experts adaptor of MSM4SR's item encoders (paper eq. 4-5) as one op.
//!
//! - `moe_adaptor(e, weights, eps, drop)`: e (N, d); weights w (d, O * D0), b (O * D0), gate
//!   (d, O), gamma and beta (O, D0) -> z (N, D0):
//!   h = e w + b viewed as (N, O, D0), y = dropout(h) (p and seed from `drop`; none outside
//!   training), E_k = LayerNorm(y_k) with expert k's gamma[k], beta[k] (eps), g = softmax(e gate),
//!   z = sum_k g_k E_k. It is `linear`, `dropout`, `layernorm` (O groups), `matmul` and `moe` one
//!   after the other, and on the GPU it runs as them; on the host (f32 and f64) as one op with the
//!   same bits (each value made by the same expression, each sum in the same order).
//!   Backward, from dz: dg_k = g_k (dz . E_k - sum_j g_j dz . E_j) (the softmax pooling's), dE_k =
//!   g_k dz, dy = LayerNorm's backward of dE, dh = dropout's mask applied to dy; then
//!   dw = e^T dh, db = sum_rows(dh), dgate = e^T dg, de = dh w^T + dg gate^T, and dgamma, dbeta
//!   LayerNorm's sums over the items in order.
//!
//! The host form keeps one work matrix C (N, O * D0 + 3 O), row n = [h (O * D0) | gate logits (O)
//! | per expert its LayerNorm statistics (mean - y[0], rstd)]. The forward writes [b | 0] into each
//! row, adds e [w | gate] as one product (the gate's own product would read e again for O
//! columns, at a fraction of the GEMM's speed), then passes over the rows once: each row's dropout
//! in place (C keeps y), the LayerNorm of its experts (statistics into C, E into a scratch row),
//! the gate's softmax in place (C keeps g) and z. The backward recomputes E from y and the
//! statistics in one pass over the rows that writes dC = [dh | dg] (N, O * D0 + O); the
//! parameters' sums (dgamma, dbeta, db: chains over the items in order) are added row by row in
//! that pass on one thread; on more, the calling thread does so for the first rows while the others
//! write dC for the rest, and the chains then go on over the rest by a column pass, blocks of
//! columns in parallel (the same chains: every thread count gives their bits); then [dw | dgate] = e^T dC is one
//! product and de = dh w^T, with dg gate^T added into it by a second product (beta 1: the bits of
//! adding the two products, as the tape sums the gradients meeting at e). The experts' and the
//! gate's columns share a product only where the crate runs each element as the same chain of
//! multiply-adds as the gate's product alone would ([`crate::cpu::same_chains`]); otherwise the
//! gate keeps its own products, into C's columns and out of dC's.

use super::elementwise::{keep_mul_in_place, pcg};
use super::layernorm::{ln_dx_rows, ln_rows};
use super::pool::{pool_bwd_row, softmax_sum};
use super::{dropout, layernorm, linear, matmul, moe};
use crate::cpu::{par, pool, Ahead, Real};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gpu::GpuBuf;
use crate::op::{apply, run, Backward, Op};
use crate::tensor::Tensor;

/// The adaptor's parameters (shapes in the module docs).
pub struct MoeWeights<'a> {
    pub w: &'a Tensor,
    pub b: &'a Tensor,
    pub gate: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
}

/// z (N, D0) from e (N, d); `drop`: the dropout's (p, seed), or none (see the module docs).
pub fn moe_adaptor(e: &Tensor, wt: &MoeWeights, eps: f32, drop: Option<(f32, u32)>) -> Result<Tensor> {
    let op = "moe_adaptor";
    let [n, d] = *e.shape() else {
        return Err(Error::Shape { op, msg: format!("e {:?} must be (N, d)", e.shape()) });
    };
    let [o, d0] = *wt.gamma.shape() else {
        return Err(Error::Shape { op, msg: format!("gamma {:?} must be (experts, D0)", wt.gamma.shape()) });
    };
    let want = [(wt.w, vec![d, o * d0], "w"), (wt.b, vec![o * d0], "b"), (wt.gate, vec![d, o], "gate"), (wt.beta, vec![o, d0], "beta")];
    for (t, shape, name) in want {
        if t.shape() != shape {
            return Err(Error::Shape {
                op,
                msg: format!("{name} {:?} must be {shape:?} for e {:?} and gamma {:?}", t.shape(), e.shape(), wt.gamma.shape()),
            });
        }
    }
    if o == 0 || d0 == 0 {
        return Err(Error::Shape { op, msg: format!("gamma {:?}: no experts", wt.gamma.shape()) });
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::Invalid(format!("{op}: eps must be >= 0, got {eps}")));
    }
    if let Some((p, _)) = drop {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::Invalid(format!("dropout probability must be in [0, 1), got {p}")));
        }
    }
    let drop = drop.filter(|&(p, _)| p > 0.0);
    let inputs = [e, wt.w, wt.b, wt.gate, wt.gamma, wt.beta];
    if e.device() == Device::Gpu {
        return composed(e, wt, eps, drop);
    }
    apply(MoeAdaptor { n, d, o, d0, eps, drop, backward: false }, &inputs)
}

/// The ops the adaptor is made of, each on the tape (its GPU form; the host form's reference).
fn composed(e: &Tensor, wt: &MoeWeights, eps: f32, drop: Option<(f32, u32)>) -> Result<Tensor> {
    let (n, [o, d0]) = (e.shape()[0], [wt.gamma.shape()[0], wt.gamma.shape()[1]]);
    let h = linear(e, wt.w, Some(wt.b))?;
    let y = match drop {
        Some((p, seed)) => dropout(&h, p, seed)?,
        None => h,
    };
    let ex = layernorm(&y.reshape(&[n, o, d0])?, wt.gamma, wt.beta, eps)?;
    moe(&matmul(e, wt.gate, false, false)?, &ex)
}

/// The host form (see the module docs): inputs [e, w, b, gate, gamma, beta] -> [z, C]; in the
/// backward form [C, e, w, gate, gamma, beta, dz] -> [de, dw, db, dgate, dgamma, dbeta].
#[derive(Clone, Copy)]
struct MoeAdaptor {
    n: usize,
    d: usize,
    o: usize,
    d0: usize,
    eps: f32,
    drop: Option<(f32, u32)>,
    backward: bool,
}

impl MoeAdaptor {
    /// The experts' columns O * D0, the product's columns F = O * D0 + O, C's row length.
    fn widths(&self) -> (usize, usize, usize) {
        let od = self.o * self.d0;
        (od, od + self.o, od + 3 * self.o)
    }

    /// The dropout's (hashed seed, scale, p) where it applies.
    fn mask<T: Real>(&self) -> Option<(u32, T, f32)> {
        self.drop.map(|(p, seed)| (pcg(seed), T::c(1.0 / (1.0 - p as f64)), p))
    }

    fn forward<T: Real>(&self, e: &[T], w: &[T], b: &[T], gate: &[T], gamma: &[T], beta: &[T]) -> (Vec<T>, Vec<T>) {
        let (n, d, o, d0) = (self.n, self.d, self.o, self.d0);
        let (od, f, wc) = self.widths();
        let joint = crate::cpu::same_chains(n, d, o, f);
        // C's rows start as [b | 0] (the gate's zeros only where its product is added to them).
        let mut c = pool::stale(n * wc);
        par::rows_apply(&mut c, wc, |_, row| {
            row[..od].copy_from_slice(b);
            if joint {
                row[od..f].fill(T::zero());
            }
        });
        if n > 0 && joint {
            // [w | gate] (d, F).
            let mut wg = pool::stale(d * f);
            par::rows_apply(&mut wg, f, |r, row| {
                row[..od].copy_from_slice(&w[r * od..(r + 1) * od]);
                row[od..].copy_from_slice(&gate[r * o..(r + 1) * o]);
            });
            T::gemm(n, d, f, e, d as isize, 1, &wg, f as isize, 1, T::one(), &mut c, wc as isize);
            pool::give(wg);
        } else if n > 0 {
            T::gemm(n, d, od, e, d as isize, 1, w, od as isize, 1, T::one(), &mut c, wc as isize);
            T::gemm(n, d, o, e, d as isize, 1, gate, o as isize, 1, T::zero(), &mut c[od..], wc as isize);
        }
        let (mask, eps) = (self.mask::<T>(), T::c(self.eps as f64));
        let mut z: Vec<T> = pool::zeros(n * d0);
        let zs = par::Shared::of(&mut z);
        // GROUP rows at a time, each group with its scratch row for E.
        par::rows_apply(&mut c, GROUP * wc, |gi, rows| {
            let mut ex = pool::stale(od);
            for (i, row) in rows.chunks_exact_mut(wc).enumerate() {
                let r = gi * GROUP + i;
                let (y, rest) = row.split_at_mut(od);
                let (al, st) = rest.split_at_mut(o);
                if let Some((hs, s, p)) = mask {
                    keep_mul_in_place(y, hs, (r * od) as u32, p, s);
                }
                for k0 in (0..o).step_by(4) {
                    let k1 = (k0 + 4).min(o);
                    ln_rows(&y[k0 * d0..k1 * d0], (gamma, beta), (k0, d0, o), eps, &mut ex[k0 * d0..k1 * d0], &mut st[2 * k0..2 * k1]);
                }
                // SAFETY: row r of z is this row's alone.
                let zr = unsafe { zs.piece(r * d0, d0) };
                softmax_sum(al, &ex, zr, d0, &mut Ahead::none());
            }
            pool::give(ex);
        });
        (z, c)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(&self, c: &[T], e: &[T], w: &[T], gate: &[T], gamma: &[T], beta: &[T], dz: &[T]) -> [Vec<T>; 6] {
        let (n, d, o, d0) = (self.n, self.d, self.o, self.d0);
        let (od, f, wc) = self.widths();
        let mask = self.mask::<T>();
        // Row r: y, g and the statistics, and E recomputed from them as the forward made it.
        let parts = |r: usize| {
            let row = &c[r * wc..(r + 1) * wc];
            (&row[..od], &row[od..od + o], &row[od + o..])
        };
        // Rows r0.. (as many as `dc` holds): each row's dC written into `dc`, and with `sums` its
        // terms of the parameters' sums (dgamma, dbeta, db) added row by row in order while the row
        // is in cache.
        let pass = |r0: usize, dc: &mut [T], mut sums: Option<&mut [Vec<T>; 3]>| {
            let mut scratch = [pool::stale(od), pool::stale(od), pool::stale(od)];
            for (i, dcr) in dc.chunks_exact_mut(f).enumerate() {
                let r = r0 + i;
                let (y, al, st) = parts(r);
                back_row((y, al, st, &dz[r * d0..(r + 1) * d0]), (gamma, beta), (r, d0, mask), dcr, &mut scratch);
                let Some([dgm, dbt, db]) = sums.as_deref_mut() else { continue };
                let [_, de, xh] = &scratch;
                for (((((ag, ab), ad), &gv), &xh), &dh) in
                    dgm.iter_mut().zip(dbt.iter_mut()).zip(db.iter_mut()).zip(de.iter()).zip(xh.iter()).zip(&dcr[..od])
                {
                    *ag += gv * xh;
                    *ab += gv;
                    *ad += dh;
                }
            }
            scratch.into_iter().for_each(pool::give);
        };
        let mut dc = pool::stale(n * f);
        let mut sums = [pool::zeros(od), pool::zeros(od), pool::zeros(od)];
        if par::threads() == 1 || !par::worth(n * wc) {
            // The rows in order, each row's terms added to the sums (the chains over the items).
            pass(0, &mut dc, Some(&mut sums));
        } else {
            // The same chains, in two stretches: this thread takes rows [0, h) as above while the
            // others write dC for rows [h, n) (this thread joining them when done: h is a little
            // less than its share, as its rows cost more); then each column's chain goes on over
            // rows [h, n) from where it stopped, blocks of columns in parallel, from C, dz and dC
            // (dgamma's and dbeta's terms remade from y and the statistics as the rows made them).
            use rayon::prelude::*;
            let h = n * 10 / (13 * par::threads());
            let (head, tail) = dc.split_at_mut(h * f);
            rayon::join(
                || pass(0, head, Some(&mut sums)),
                || {
                    tail.par_chunks_mut(GROUP * f).enumerate().for_each(|(g, dcg)| pass(h + g * GROUP, dcg, None));
                },
            );
            // One block of columns (on this thread) where the work is small.
            let block = par::col_block((n - h) * o, od);
            let dc = &dc;
            let [dgm, dbt, db] = &mut sums;
            let blocks = dgm.par_chunks_mut(block).zip(dbt.par_chunks_mut(block)).zip(db.par_chunks_mut(block));
            blocks.enumerate().for_each(|(q, ((dgm, dbt), db))| {
                let (j0, j1) = (q * block, q * block + dgm.len());
                for r in h..n {
                    let (y, al, st) = parts(r);
                    for k in j0 / d0..j1.div_ceil(d0) {
                        let (lo, hi) = (j0.max(k * d0), j1.min((k + 1) * d0));
                        let (mean, rstd, x0, a) = (st[2 * k], st[2 * k + 1], y[k * d0], al[k]);
                        let dzr = &dz[r * d0 + lo - k * d0..r * d0 + hi - k * d0];
                        let dhr = &dc[r * f + lo..r * f + hi];
                        for ((((ag, ab), ad), (&xv, &g)), &dh) in dgm[lo - j0..hi - j0]
                            .iter_mut()
                            .zip(&mut dbt[lo - j0..hi - j0])
                            .zip(&mut db[lo - j0..hi - j0])
                            .zip(y[lo..hi].iter().zip(dzr))
                            .zip(dhr)
                        {
                            let gv = a * g;
                            let xh = (xv - x0 - mean) * rstd;
                            *ag += gv * xh;
                            *ab += gv;
                            *ad += dh;
                        }
                    }
                }
            });
        }
        let [dgamma, dbeta, db] = sums;
        // [dw | dgate] = e^T dC, and de = dh w^T + dg gate^T.
        // Every element is written by a product (beta 0) or a copy; with no items, zeros.
        let out = |len: usize| if n > 0 { pool::stale(len) } else { pool::zeros(len) };
        let (mut dw, mut dgate, mut dx) = (out(d * od), out(d * o), out(n * d));
        if n > 0 {
            if crate::cpu::same_chains(d, n, o, f) {
                let mut dwg = pool::stale(d * f);
                T::gemm(d, n, f, e, 1, d as isize, &dc, f as isize, 1, T::zero(), &mut dwg, f as isize);
                par::rows_apply(&mut dw, od, |r, row| row.copy_from_slice(&dwg[r * f..r * f + od]));
                for (r, row) in dgate.chunks_exact_mut(o).enumerate() {
                    row.copy_from_slice(&dwg[r * f + od..(r + 1) * f]);
                }
                pool::give(dwg);
            } else {
                T::gemm(d, n, od, e, 1, d as isize, &dc, f as isize, 1, T::zero(), &mut dw, od as isize);
                T::gemm(d, n, o, e, 1, d as isize, &dc[od..], f as isize, 1, T::zero(), &mut dgate, o as isize);
            }
            T::gemm(n, od, d, &dc, f as isize, 1, w, 1, od as isize, T::zero(), &mut dx, d as isize);
            if crate::cpu::adds_one_chain(n, o, d) {
                // Its chain over k from zero, then added to de: the bits of the sum.
                T::gemm(n, o, d, &dc[od..], f as isize, 1, gate, 1, o as isize, T::one(), &mut dx, d as isize);
            } else {
                // (Added into de, such a product would not give the bits of the sum.)
                let mut dxg = pool::stale(n * d);
                T::gemm(n, o, d, &dc[od..], f as isize, 1, gate, 1, o as isize, T::zero(), &mut dxg, d as isize);
                par::zip_apply(&mut dx, &dxg, |x, y| x.iter_mut().zip(y).for_each(|(a, &b)| *a += b));
                pool::give(dxg);
            }
        }
        pool::give(dc);
        [dx, dw, db, dgate, dgamma, dbeta]
    }
}

/// One row of the backward (see the module docs): from its y, g, statistics and dz, its dC row
/// [dh | dg], with E, dE and xhat (LayerNorm's normalized y) left in the scratch rows.
#[inline(always)]
#[allow(clippy::type_complexity)]
fn back_row<T: Real>(
    (y, al, st, dzr): (&[T], &[T], &[T], &[T]),
    (gamma, beta): (&[T], &[T]),
    (r, d0, mask): (usize, usize, Option<(u32, T, f32)>),
    dc: &mut [T],
    [ex, de, xh]: &mut [Vec<T>; 3],
) {
    let (o, od) = (al.len(), y.len());
    // E as the forward made it (LayerNorm's last step).
    for k in 0..o {
        let (yk, (mean, rstd)) = (&y[k * d0..(k + 1) * d0], (st[2 * k], st[2 * k + 1]));
        let x0 = yk[0];
        let (gm, bt) = (&gamma[k * d0..(k + 1) * d0], &beta[k * d0..(k + 1) * d0]);
        for ((((o, h), &v), &gm), &bt) in ex[k * d0..(k + 1) * d0].iter_mut().zip(&mut xh[k * d0..(k + 1) * d0]).zip(yk).zip(gm).zip(bt) {
            *h = (v - x0 - mean) * rstd;
            *o = *h * gm + bt;
        }
    }
    // dg into dC's gate columns, dE into `de`, then dy into dC's experts' columns, masked.
    let (dh, dg) = dc.split_at_mut(od);
    pool_bwd_row(al, ex, dzr, dg, Some(&mut de[..]));
    for k0 in (0..o).step_by(4) {
        let k1 = (k0 + 4).min(o);
        let span = k0 * d0..k1 * d0;
        ln_dx_rows(&y[span.clone()], gamma, &st[2 * k0..], &de[span.clone()], (k0, d0, o), &mut dh[span]);
    }
    if let Some((hs, s, p)) = mask {
        keep_mul_in_place(dh, hs, (r * od) as u32, p, s);
    }
}

/// Rows per task of the passes over the rows (each task takes its scratch rows once).
const GROUP: usize = 16;

impl Op for MoeAdaptor {
    fn name(&self) -> &'static str {
        "moe_adaptor"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        let (n, d, o, d0) = (self.n, self.d, self.o, self.d0);
        match self.backward {
            false => vec![vec![n, d0], vec![n, self.widths().2]],
            true => vec![vec![n, d], vec![d, o * d0], vec![o * d0], vec![d, o], vec![o, d0], vec![o, d0]],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        if self.backward {
            return Ok(self.backward(x[0], x[1], x[2], x[3], x[4], x[5], x[6]).into());
        }
        let (z, c) = self.forward(x[0], x[1], x[2], x[3], x[4], x[5]);
        Ok(vec![z, c])
    }
    fn gpu(&self, _: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        Err(Error::Invalid("moe_adaptor's fused form runs on the host; on the GPU moe_adaptor runs the ops it is made of".into()))
    }
}

/// What the backward reads: C, the inputs, the op in its backward form.
struct MoeSaved {
    c: Tensor,
    inputs: Vec<Tensor>,
    tracked: Vec<bool>,
    op: MoeAdaptor,
}

impl Backward for MoeAdaptor {
    type Saved = MoeSaved;
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, tracked: &[bool]) -> MoeSaved {
        // e, w, gate, gamma, beta (b is not read).
        let inputs = [0, 1, 3, 4, 5].iter().map(|&i| x[i].detach()).collect();
        MoeSaved { c: out.remove(1), inputs, tracked: tracked.to_vec(), op: MoeAdaptor { backward: true, ..self } }
    }
    fn backward(s: &MoeSaved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let i = &s.inputs;
        let grads = run(&s.op, &[&s.c, &i[0], &i[1], &i[2], &i[3], &i[4], g])?;
        Ok(grads.into_iter().zip(&s.tracked).map(|(g, &t)| t.then_some(g)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{mul, sum};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The host form gives the bits of the ops it is made of, value and every gradient, on one
    /// thread and on up to two and three (as many as the pool has), in f32 and f64: with and without dropout, with the gate's products
    /// joined to the experts' (forward, backward, both, neither: `same_chains`), two experts (the
    /// gate's part of de by its own product, then added).
    #[test]
    fn fused_form_gives_the_bits_of_its_ops() {
        for (n, d, o, d0, joint) in [
            (300, 40, 8, 16, (true, false)),
            (100, 600, 4, 20, (true, true)),
            (40, 600, 3, 8, (false, true)),
            (700, 70, 2, 8, (true, false)),
            (1030, 80, 8, 64, (true, true)),
        ] {
            assert_eq!(
                (crate::cpu::same_chains(n, d, o, o * d0 + o), crate::cpu::same_chains(d, n, o, o * d0 + o)),
                joint,
                "{n} {d} {o} {d0}"
            );
            for dev in [Device::Cpu, Device::Cpu64] {
                let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
                let mut t = |shape: &[usize], s: f32| Tensor::randn(shape, s, &mut rng, dev).unwrap().param();
                let (e, w, b, gate) = (t(&[n, d], 1.0), t(&[d, o * d0], 0.2), t(&[o * d0], 0.5), t(&[d, o], 0.3));
                let (gamma, beta, r) = (t(&[o, d0], 1.0), t(&[o, d0], 0.5), t(&[n, d0], 1.0));
                let wt = MoeWeights { w: &w, b: &b, gate: &gate, gamma: &gamma, beta: &beta };
                for drop in [None, Some((0.2, 17))] {
                    let bits = |t: &Tensor| t.to_vec_f64().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u64>>();
                    let run = |fused: bool| {
                        let z = if fused { moe_adaptor(&e, &wt, 1e-12, drop).unwrap() } else { composed(&e, &wt, 1e-12, drop).unwrap() };
                        let grads = crate::backward(&sum(&mul(&z, &r).unwrap()).unwrap()).unwrap();
                        let mut out = vec![bits(&z)];
                        out.extend([&e, &w, &b, &gate, &gamma, &beta].map(|p| bits(grads.get(p).unwrap())));
                        out
                    };
                    let want = crate::cpu::with_threads(1, || run(false));
                    for threads in [1, 2, 3] {
                        let got = crate::cpu::with_threads(threads, || run(true));
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(g == w, "({n}, {d}, {o}, {d0}) {dev:?} {drop:?} {threads} threads: output {i} differs");
                        }
                    }
                }
            }
        }
    }
}
