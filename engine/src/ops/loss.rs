//! Training losses. Each is a per-row kernel (one workgroup per row, workgroup reductions over the
//! row) recorded as one tape node, followed by the deterministic `mean` over rows.
//!
//! - `cross_entropy(logits, targets)`: logits (B, N), targets (B) each < N -> () scalar
//!   mean_b [logsumexp(logits[b]) - logits[b, t_b]]. The per-row logsumexp is saved for backward:
//!   dlogits = (softmax(logits) - onehot(t)) * g / B.
//! - `info_nce(logits, targets, numerator, exclude_diag, scale)`: logits [L_0, .., L_{K-1}], K <= 4
//!   similarity matrices (B, B), e.g. cosines (logits[k, j, j'] below is L_k[j, j']; each entry is
//!   taken times `scale`, e.g. 1 / temperature, as it is read, exactly as a separate `scale` op would
//!   round it), targets (B) -> () scalar
//!   mean_j (log den_j - log num_j),
//!   with num_j = sum over k with numerator[k] of exp(logits[k, j, j]), and den_j = sum over k, j' of
//!   exp(logits[k, j, j']) over the included entries: j' == j when !exclude_diag[k]; j' != j when
//!   targets[j'] != targets[j] (rows with the same target item are not negatives of each other).
//!   Both sums are computed max-shifted. Every numerator entry must also be in the denominator
//!   (numerator[k] implies !exclude_diag[k]), so den_j >= num_j > 0.
//!   Backward: dlogits[k, j, j'] = (g / B * ([den] exp(l) / den_j - [num] exp(l) / num_j)) * scale.
//!   On the host the K matrices are read where they are and each gets its own gradient (no (K, B,
//!   B) copy of them, nor of their gradients); the GPU's kernels take them as one (K, B, B) buffer.
//!
//! The two MSM4SR pre-training losses are both `info_nce`:
//! - NIP, next-item prediction (paper eq. 7): K = 2, logits[0][j, j'] = cos(m_hat_j, z_j'),
//!   logits[1][j, j'] = cos(m_tilde_j, z_j'), scale = 1 / tau, numerator = [true, true],
//!   exclude_diag = [false, false].
//! - CMCL, one direction l(a, b) of the cross-modality contrastive loss (eq. 9): K = 2,
//!   logits[0][j, j'] = cos(a_j, b_j'), logits[1][j, j'] = cos(a_j, a_j'), scale = 1 / tau,
//!   numerator = [true, false], exclude_diag = [false, true].

use super::elementwise::mean;
use super::wgsl;
use crate::cpu::{max8, par, sum8_of, sum_exp, Real};
use crate::error::{shape_err, Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::{Indices, Tensor};

const SRC: &str = wgsl!("loss.wgsl");
static CE_FWD: Kernel<LossParams> = Kernel::new("loss", SRC, "ce_fwd", &[Read, Read, ReadWrite, ReadWrite]);
static CE_BWD: Kernel<LossParams> = Kernel::new("loss", SRC, "ce_bwd", &[Read, Read, ReadWrite, Read, Read]);
static NCE_FWD: Kernel<LossParams> = Kernel::new("loss", SRC, "nce_fwd", &[Read, Read, ReadWrite, ReadWrite]);
static NCE_BWD: Kernel<LossParams> = Kernel::new("loss", SRC, "nce_bwd", &[Read, Read, ReadWrite, Read, Read]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![CE_FWD.contract(), CE_BWD.contract(), NCE_FWD.contract(), NCE_BWD.contract()]
}

/// Most similarity matrices `info_nce` takes.
pub const MAX_K: usize = 4;

kernel_params! {
    /// `struct P` of loss.wgsl (every kernel).
    struct LossParams {
        /// B
        rows: u32,
        /// N for cross-entropy, B for InfoNCE.
        cols: u32,
        /// InfoNCE matrices.
        k: u32,
        num_mask: u32,
        excl_mask: u32,
        /// InfoNCE: the factor every logit is taken times (1 for cross-entropy).
        scale: f32,
    }
}

/// Per-row forward: (loss (rows), saved statistics (stat_len)).
fn fwd_gpu(
    k: &Kernel<LossParams>,
    logits: &GpuBuf,
    targets: &GpuBuf,
    rows: usize,
    stat_len: usize,
    prm: &LossParams,
) -> Result<(GpuBuf, GpuBuf)> {
    let g = gpu()?;
    let loss = g.alloc(4 * rows as u64)?;
    let stat = g.alloc(4 * stat_len as u64)?;
    g.dispatch(k, &[logits, targets, &loss, &stat], prm, row_groups(rows))?;
    Ok((loss, stat))
}

/// Backward: dlogits (n elements) from the saved statistics and the per-row gradient g.
fn bwd_gpu(
    k: &Kernel<LossParams>,
    logits: &GpuBuf,
    targets: &GpuBuf,
    stat: &GpuBuf,
    g: &GpuBuf,
    n: usize,
    prm: &LossParams,
) -> Result<GpuBuf> {
    let gp = gpu()?;
    let out = gp.alloc(4 * n as u64)?;
    gp.dispatch(k, &[logits, targets, &out, stat, g], prm, groups_1d(n))?;
    Ok(out)
}

fn bit(mask: u32, k: usize) -> bool {
    (mask >> k) & 1 == 1
}

// ---- CPU references -------------------------------------------------------------------------

/// Per-row cross-entropy: logits (B, N) -> (loss (B), lse (B)).
pub fn cross_entropy_cpu<T: Real>(logits: &[T], targets: &[u32], n: usize) -> (Vec<T>, Vec<T>) {
    let b = targets.len().min(logits.len() / n.max(1));
    par::rows2(par::Zeroed, b, 2 * n, 1, 1, |r, lo, ls| {
        let (row, t) = (&logits[r * n..(r + 1) * n], targets[r]);
        let m = max8(row);
        let s = sum_exp(row, m).ln();
        ls[0] = m + s;
        lo[0] = (m - row[t as usize]) + s;
    })
}

/// dlogits (B, N) = (softmax - onehot) * g[b].
pub fn cross_entropy_bwd_cpu<T: Real>(logits: &[T], targets: &[u32], lse: &[T], g: &[T], n: usize) -> Vec<T> {
    par::rows(par::Zeroed, logits.len() / n, 2 * n, n, |b, row| {
        let (t, l, gb) = (targets[b] as usize, lse[b], g[b]);
        for (o, &v) in row.iter_mut().zip(&logits[b * n..(b + 1) * n]) {
            *o = (v - l).fexp() * gb;
        }
        row[t] = ((logits[b * n + t] - l).fexp() - T::one()) * gb;
    })
}

/// The largest s l[c] over the columns whose target differs from `tj` (-inf for none), in 8 lanes.
fn max_other<T: Real>(l: &[T], s: T, targets: &[u32], tj: u32) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let (lc, tc) = (l.chunks_exact(8), targets.chunks_exact(8));
    let (lr, tr) = (lc.remainder(), tc.remainder());
    for (lv, tv) in lc.zip(tc) {
        for i in 0..8 {
            let v = if tv[i] != tj { s * lv[i] } else { T::neg_infinity() };
            acc[i] = if v > acc[i] { v } else { acc[i] };
        }
    }
    let mut m = acc.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    for (&v, &t) in lr.iter().zip(tr) {
        if t != tj {
            m = m.max(s * v);
        }
    }
    m
}

/// max(v) + ln(sum(exp(v - max))) over the values `v()` yields, in order.
fn lse_of<T: Real, I: Iterator<Item = T>>(v: impl Fn() -> I) -> T {
    let m = v().fold(T::neg_infinity(), |m, x| m.max(x));
    m + v().map(|x| (x - m).fexp()).sum::<T>().ln()
}

/// sum of e^(s l[c] - m) over the columns whose target differs from `tj`: the exponentials in
/// blocks of 256 (vectorized), each block in [`sum8_of`]'s partial sums, the blocks in order.
/// (Inlined, so that inside `wide` it is compiled for AVX-512 too.)
#[inline(always)]
fn sum_exp_other<T: Real>(l: &[T], s: T, m: T, targets: &[u32], tj: u32) -> T {
    let mut buf = [T::zero(); 256];
    let mut acc = T::zero();
    for (lc, tc) in l.chunks(256).zip(targets.chunks(256)) {
        let b = &mut buf[..lc.len()];
        for ((o, &v), &t) in b.iter_mut().zip(lc).zip(tc) {
            let e = (s * v - m).fexp();
            *o = if t != tj { e } else { T::zero() };
        }
        acc += sum8_of(b, |v| v);
    }
    acc
}

/// Per-row InfoNCE of `s` times the K logit matrices `mats` (each (B, B)) -> (loss (B), stat (2B)
/// = lse_den then lse_num).
pub fn info_nce_cpu<T: Real>(mats: &[&[T]], targets: &[u32], (num, excl): (u32, u32), s: T) -> (Vec<T>, Vec<T>) {
    let (b, k) = (targets.len(), mats.len());
    let (loss, den, nums) = par::rows3(par::Zeroed, b, 2 * k * b, (1, 1, 1), |j, lo, de, nu| {
        // The denominator: off the diagonal the columns whose target differs from row j's
        // (branch-free selects, so both passes vectorize), then each diagonal entry it includes.
        let tj = targets[j];
        let row = |kk: usize| &mats[kk][j * b..(j + 1) * b];
        let diag = |kk: usize| (!bit(excl, kk)).then(|| s * row(kk)[j]);
        let mut m = T::neg_infinity();
        for kk in 0..k {
            m = m.max(max_other(row(kk), s, targets, tj));
            if let Some(d) = diag(kk) {
                m = m.max(d);
            }
        }
        let mut sum = T::zero();
        for kk in 0..k {
            sum += crate::cpu::wide(
                #[inline(always)]
                || sum_exp_other(row(kk), s, m, targets, tj),
            );
            if let Some(d) = diag(kk) {
                sum += (d - m).fexp();
            }
        }
        de[0] = m + sum.ln();
        nu[0] = lse_of(|| (0..k).filter(move |&kk| bit(num, kk)).map(move |kk| s * mats[kk][j * b + j]));
        lo[0] = de[0] - nu[0];
    });
    let mut stat = crate::cpu::pool::take(2 * b);
    stat.extend_from_slice(&den);
    stat.extend_from_slice(&nums);
    crate::cpu::pool::give(den);
    crate::cpu::pool::give(nums);
    (loss, stat)
}

/// The gradient of each of the K logit matrices `mats` (each (B, B)) from the saved (lse_den,
/// lse_num) and the per-row gradient g (B), for the loss of `s` times the logits.
pub fn info_nce_bwd_cpu<T: Real>(mats: &[&[T]], targets: &[u32], stat: &[T], g: &[T], (num, excl): (u32, u32), s: T) -> Vec<Vec<T>> {
    let b = targets.len();
    let grad = |kk: usize, logits: &[T]| {
        par::rows(par::Zeroed, b, 2 * b, b, |j, dr| {
            // Off the diagonal: the denominator's term where the column's target differs
            // (branch-free, so the loop vectorizes); then the diagonal entry exactly as its
            // definition reads.
            let (lr, tj, sd, gj) = (&logits[j * b..(j + 1) * b], targets[j], stat[j], g[j]);
            crate::cpu::wide(
                #[inline(always)]
                || {
                    for ((o, &l), &tc) in dr.iter_mut().zip(lr).zip(targets) {
                        let e = (s * l - sd).fexp();
                        *o = (gj * if tc != tj { e } else { T::zero() }) * s;
                    }
                },
            );
            let mut v = T::zero();
            if !bit(excl, kk) {
                v += (s * lr[j] - sd).fexp();
            }
            if bit(num, kk) {
                v -= (s * lr[j] - stat[b + j]).fexp();
            }
            dr[j] = (gj * v) * s;
        })
    };
    mats.iter().enumerate().map(|(kk, m)| grad(kk, m)).collect()
}

// ---- ops ------------------------------------------------------------------------------------

/// The per-row loss (B) of logits (B, N) (cross-entropy) or (K, B, B) (InfoNCE), with the row
/// statistics its backward reuses as the second output: the log-sum-exp (B), or (`nce`) the
/// numerator's and denominator's (2B). In the backward form, the gradient of the logits over
/// inputs [logits, statistics, g].
#[derive(Clone)]
struct RowLoss {
    nce: bool,
    targets: Indices,
    prm: LossParams,
    /// The logits' shape ((K, B, B) for InfoNCE).
    shape: Vec<usize>,
    /// InfoNCE's K matrices as K inputs (the host form), not one (K, B, B) input (the GPU's).
    parts: bool,
    backward: bool,
}

impl RowLoss {
    /// The logit inputs: InfoNCE's K matrices in the host form, else one.
    fn inputs(&self) -> usize {
        if self.parts {
            self.prm.k as usize
        } else {
            1
        }
    }
    fn rows(&self) -> usize {
        self.prm.rows as usize
    }
    fn stat_len(&self) -> usize {
        if self.nce {
            2 * self.rows()
        } else {
            self.rows()
        }
    }
}

impl Op for RowLoss {
    fn name(&self) -> &'static str {
        "loss"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        match (self.backward, self.parts) {
            (false, _) => vec![vec![self.rows()], vec![self.stat_len()]],
            (true, false) => vec![self.shape.clone()],
            (true, true) => vec![self.shape[1..].to_vec(); self.inputs()],
        }
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        let (t, p) = (self.targets.host(), &self.prm);
        let (n, masks, scale) = (p.cols as usize, (p.num_mask, p.excl_mask), T::c(p.scale as f64));
        // InfoNCE's K matrices: the first inputs, or the pieces of the one (K, B, B) input.
        let k = self.inputs();
        let mats = || -> Vec<&[T]> {
            match self.parts {
                true => x[..k].to_vec(),
                false => x[0].chunks_exact(n * n).collect(),
            }
        };
        Ok(match (self.nce, self.backward) {
            (false, false) => {
                let (loss, lse) = cross_entropy_cpu(x[0], t, n);
                vec![loss, lse]
            }
            (true, false) => {
                let (loss, stat) = info_nce_cpu(&mats(), t, masks, scale);
                vec![loss, stat]
            }
            (false, true) => vec![cross_entropy_bwd_cpu(x[0], t, x[1], x[2], n)],
            (true, true) => {
                let grads = info_nce_bwd_cpu(&mats(), t, x[k], x[k + 1], masks, scale);
                match self.parts {
                    true => grads,
                    false => vec![grads.concat()],
                }
            }
        })
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let t = self.targets.gpu()?;
        let (fwd, bwd) = if self.nce { (&NCE_FWD, &NCE_BWD) } else { (&CE_FWD, &CE_BWD) };
        Ok(match self.backward {
            false => {
                let (loss, stat) = fwd_gpu(fwd, x[0], t, self.rows(), self.stat_len(), &self.prm)?;
                vec![loss, stat]
            }
            true => vec![bwd_gpu(bwd, x[0], t, x[1], x[2], self.shape.iter().product(), &self.prm)?],
        })
    }
}

impl Backward for RowLoss {
    /// The logits (each input), the row statistics, and the op in its backward form.
    type Saved = (Vec<Tensor>, Tensor, RowLoss);
    fn save(self, x: &[&Tensor], mut out: Vec<Tensor>, _: &[bool]) -> Self::Saved {
        (x.iter().map(|t| t.detach()).collect(), out.remove(1), RowLoss { backward: true, ..self })
    }
    fn backward((logits, stat, op): &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut inputs: Vec<&Tensor> = logits.iter().collect();
        inputs.extend([stat, g]);
        Ok(run(op, &inputs)?.into_iter().map(Some).collect())
    }
}

/// Mean cross-entropy: logits (B, N), targets (B) each < N -> () scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Indices) -> Result<Tensor> {
    let s = logits.shape();
    if s.len() != 2 || s[0] == 0 || s[1] == 0 {
        return shape_err("cross_entropy", format!("logits must be (B, N) with B, N >= 1, got {s:?}"));
    }
    let (b, n) = (s[0], s[1]);
    if targets.len() != b {
        return shape_err("cross_entropy", format!("{} targets for logits {s:?}", targets.len()));
    }
    targets.check_below(n, "cross_entropy", "target")?;
    let prm = LossParams { rows: b as u32, cols: n as u32, k: 0, num_mask: 0, excl_mask: 0, scale: 1.0 };
    let op = RowLoss { nce: false, targets: targets.clone(), prm, shape: vec![b, n], parts: false, backward: false };
    mean(&apply(op, &[logits])?)
}

/// Multi-matrix InfoNCE with same-target exclusion of `scale` times the logits [L_0, .., L_{K-1}]
/// (each (B, B)), targets (B) -> () scalar. See the module doc for the definition and how NIP and
/// CMCL map onto it.
pub fn info_nce(logits: &[&Tensor], targets: &Indices, numerator: &[bool], exclude_diag: &[bool], scale: f32) -> Result<Tensor> {
    let shapes: Vec<&[usize]> = logits.iter().map(|l| l.shape()).collect();
    let s = shapes.first().copied().unwrap_or(&[]);
    if logits.is_empty() || logits.len() > MAX_K || s.len() != 2 || s[0] != s[1] || s[0] == 0 || shapes.iter().any(|&t| t != s) {
        return shape_err("info_nce", format!("logits must be 1 to {MAX_K} matrices (B, B) of one B >= 1, got {shapes:?}"));
    }
    let (k, b) = (logits.len(), s[0]);
    if targets.len() != b || numerator.len() != k || exclude_diag.len() != k {
        return shape_err(
            "info_nce",
            format!(
                "{k} logit matrices {s:?} need {b} targets and {k} numerator / exclude_diag flags, got {}, {}, {}",
                targets.len(),
                numerator.len(),
                exclude_diag.len()
            ),
        );
    }
    if !numerator.contains(&true) {
        return Err(Error::Invalid("info_nce: at least one matrix must contribute to the numerator".into()));
    }
    if let Some(kk) = (0..k).find(|&kk| numerator[kk] && exclude_diag[kk]) {
        return Err(Error::Invalid(format!("info_nce: matrix {kk} is in the numerator but its diagonal is excluded from the denominator")));
    }
    let mask = |f: &[bool]| f.iter().enumerate().fold(0u32, |m, (i, &x)| m | ((x as u32) << i));
    let (num, excl) = (mask(numerator), mask(exclude_diag));
    let prm = LossParams { rows: b as u32, cols: b as u32, k: k as u32, num_mask: num, excl_mask: excl, scale };
    // The GPU's kernels read one (K, B, B) buffer; the host reads the matrices where they are.
    let parts = logits[0].device() != crate::device::Device::Gpu;
    let op = RowLoss { nce: true, targets: targets.clone(), prm, shape: vec![k, b, b], parts, backward: false };
    if parts {
        return mean(&apply(op, logits)?);
    }
    let all = if k == 1 { logits[0].clone() } else { super::concat(logits)? };
    mean(&apply(op, &[&all.reshape(&[k, b, b])?])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    #[test]
    fn rejects_bad_inputs() {
        let l = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
        assert!(matches!(cross_entropy(&l, &Indices::new(vec![0, 3])), Err(Error::Index { .. })));
        assert!(matches!(cross_entropy(&l, &Indices::new(vec![0])), Err(Error::Shape { .. })));
        let s = Tensor::zeros(&[3, 3], Device::Cpu).unwrap();
        let s = [&s, &s];
        let t = Indices::new(vec![0, 1, 0]);
        assert!(matches!(info_nce(&s, &t, &[false, false], &[false, false], 1.0), Err(Error::Invalid(_))));
        assert!(matches!(info_nce(&s, &t, &[true, true], &[false, true], 1.0), Err(Error::Invalid(_))));
        assert!(matches!(info_nce(&s, &t, &[true], &[false], 1.0), Err(Error::Shape { .. })));
        let wide = Tensor::zeros(&[3, 4], Device::Cpu).unwrap();
        assert!(matches!(info_nce(&[&wide], &t, &[true], &[false], 1.0), Err(Error::Shape { .. })));
        assert!(matches!(info_nce(&[], &t, &[], &[], 1.0), Err(Error::Shape { .. })));
        assert!(info_nce(&s, &t, &[true, false], &[false, true], 1.0).is_ok());
    }

    #[test]
    fn uniform_logits_give_log_of_candidate_count() {
        // All logits equal: CE = ln N; NIP with targets [0, 1, 0]: row 0 has den {k} x {0, 1} = 4
        // entries (row 2 shares its target), num 2 -> ln 2; row 1 has 6 entries -> ln 3.
        let l = Tensor::zeros(&[2, 5], Device::Cpu64).unwrap();
        let ce = cross_entropy(&l, &Indices::new(vec![1, 4])).unwrap().item().unwrap();
        assert!((ce - 5f32.ln()).abs() < 1e-6);
        let s = Tensor::zeros(&[3, 3], Device::Cpu64).unwrap();
        let v = info_nce(&[&s, &s], &Indices::new(vec![0, 1, 0]), &[true, true], &[false, false], 1.0).unwrap().item().unwrap();
        assert!((v - (2.0 * 2f32.ln() + 3f32.ln()) / 3.0).abs() < 1e-6, "{v}");
    }
}
