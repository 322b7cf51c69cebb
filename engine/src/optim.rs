//! Adam with coupled L2 weight decay (torch.optim.Adam) after global gradient-norm clipping
//! (torch.nn.utils.clip_grad_norm_), on every device. On the GPU the whole update is queued without a
//! readback, over the flat arena: the parameters and their two moments live in flat buffers, each
//! parameter at the same aligned offset in each, the tensors being views into them (several such
//! arenas when the parameters do not fit one storage binding). A step copies each gradient into a
//! fourth flat buffer (buffer copies, no kernels; zeros for a parameter without one), then runs ONE
//! `sumsq_arena` dispatch per arena (partial sums of squares) and ONE `adam_arena` dispatch per run
//! of consecutive parameters to update (every parameter, in the usual case: one dispatch). The
//! arenas are built on the first step (and rebuilt when a parameter's or moment's storage was
//! replaced since, e.g. by loading a checkpoint).
//!
//! A parameter without a gradient this step is left alone (as torch does): it is outside the
//! updated runs, unless it rides along with its zero gradient, which leaves it exactly unchanged
//! while its moments are still zero (it never had a gradient) and there is no weight decay, as for
//! the attention pooling's biases, whose gradient is structurally absent (see `nn::AttentionPool`).
//!
//! For each parameter p with gradient g (t = step count, from 1):
//!   c  = min(1, max_norm / (sqrt(sum over params of |g|^2) + 1e-6))   (c = 1 without clipping)
//!   g' = c g + wd p;  m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2
//!   p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

use std::sync::Arc;

use rayon::prelude::*;

use super::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use super::ops::wgsl;
use crate::cpu::{par, Real};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{Element, Grads, Storage, Tensor};

const SRC: &str = wgsl!("optim.wgsl");
static SUMSQ_ARENA: Kernel<OptimParams> = Kernel::new("optim", SRC, "sumsq_arena", &[Read, ReadWrite]);
static ADAM_ARENA: Kernel<OptimParams> = Kernel::new("optim", SRC, "adam_arena", &[ReadWrite, ReadWrite, ReadWrite, Read, Read]);
/// Workgroups of `sumsq_arena` (partial sums; `NPART` of optim.wgsl).
const NPART: u32 = super::gpu::WG;

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<super::gpu::Contract> {
    vec![SUMSQ_ARENA.contract(), ADAM_ARENA.contract()]
}

kernel_params! {
    /// `struct P` of optim.wgsl (both kernels).
    struct OptimParams {
        /// sumsq_arena: elements of g; adam_arena: end of the updated range.
        n: u32,
        /// sumsq_arena: where its NPART partial sums go.
        slot: u32,
        /// adam_arena: partial sums in norms.
        nparams: u32,
        lr: f32,
        b1: f32,
        b2: f32,
        eps: f32,
        wd: f32,
        /// 1 - b1^t
        bc1: f32,
        /// 1 - b2^t
        bc2: f32,
        max_norm: f32,
        /// adam_arena: start of the updated range.
        start: u32,
    }
}

/// Optimizer settings (defaults: torch's, plus the SPEC's clip norm of 5).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clip; 0 disables clipping.
    pub max_grad_norm: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: 5.0 }
    }
}

pub struct Adam {
    pub cfg: AdamConfig,
    /// Steps taken.
    pub t: u32,
    params: Vec<Tensor>,
    /// First and second moments, one pair per parameter.
    moments: Vec<(Tensor, Tensor)>,
    /// GPU: the flat buffers the parameters and moments are views into (built on the first step).
    arenas: Vec<Arena>,
    /// The most bytes one arena buffer holds (the adapter's storage-binding limit unless set).
    arena_limit: Option<u64>,
    /// Per parameter: its moments are exactly zero (it has never had a gradient).
    fresh: Vec<bool>,
}

/// Part of the GPU's flat optimizer state: parameters `first ..` (as many as `offsets`), parameter
/// `first + k`'s values, moments and gradient at byte `offsets[k]` of `p`, `m`, `v` and `g`
/// (offsets aligned for views; the padding between parameters is zero in all four and stays zero:
/// a zero gradient on a zero weight leaves it zero).
struct Arena {
    first: usize,
    p: Arc<GpuBuf>,
    m: Arc<GpuBuf>,
    v: Arc<GpuBuf>,
    g: GpuBuf,
    /// Zeros, as long as the largest parameter: the gradient of a parameter that has none.
    zeros: Arc<GpuBuf>,
    offsets: Vec<u64>,
    /// Buffer ids of each parameter's (p, m, v) views: a tensor whose storage has been replaced
    /// since no longer aliases the arena, which must then be rebuilt.
    ids: Vec<[u64; 3]>,
    /// Elements per buffer, padding included.
    n: usize,
}

impl Arena {
    /// Lay the parameters out over arenas of at most `limit` bytes each (consecutive parameters
    /// while they fit) and make the tensors views into them.
    fn build_all(params: &[Tensor], moments: &[(Tensor, Tensor)], limit: Option<u64>) -> Result<Vec<Arena>> {
        let g = gpu()?;
        let (align, limit) = (g.view_align(), limit.unwrap_or(g.max_binding()).min(4 * u32::MAX as u64));
        let mut arenas = Vec::new();
        let (mut first, mut bytes) = (0, 0u64);
        for (i, p) in params.iter().enumerate() {
            let size = (4 * p.numel().max(1) as u64).next_multiple_of(align);
            if i > first && bytes + size > limit {
                arenas.push(Arena::build(first, &params[first..i], &moments[first..i])?);
                (first, bytes) = (i, 0);
            }
            bytes += size;
        }
        if first < params.len() {
            arenas.push(Arena::build(first, &params[first..], &moments[first..])?);
        }
        Ok(arenas)
    }

    fn build(first: usize, params: &[Tensor], moments: &[(Tensor, Tensor)]) -> Result<Arena> {
        let g = gpu()?;
        let align = g.view_align();
        let mut offsets = Vec::with_capacity(params.len());
        let mut end = 0u64;
        for p in params {
            offsets.push(end);
            end = (end + 4 * p.numel().max(1) as u64).next_multiple_of(align);
        }
        let zeros = vec![0u8; end as usize];
        let (pa, ma, va, ga) = (Arc::new(g.upload(&zeros)?), Arc::new(g.upload(&zeros)?), Arc::new(g.upload(&zeros)?), g.upload(&zeros)?);
        let largest = params.iter().map(|p| 4 * p.numel().max(1)).max().unwrap_or(4);
        let zeros = Arc::new(g.upload(&zeros[..largest])?);
        let mut ids = Vec::with_capacity(params.len());
        for (i, (p, (m, v))) in params.iter().zip(moments).enumerate() {
            let mut slot = [0u64; 3];
            for (k, (t, arena)) in [(p, &pa), (m, &ma), (v, &va)].into_iter().enumerate() {
                let view = GpuBuf::view(arena, offsets[i], 4 * t.numel().max(1) as u64)?;
                g.copy(&*t.gbuf()?, arena, offsets[i])?;
                slot[k] = view.id;
                *t.0.storage.borrow_mut() = Storage::Gpu(view);
            }
            ids.push(slot);
        }
        Ok(Arena { first, p: pa, m: ma, v: va, g: ga, zeros, offsets, ids, n: (end / 4) as usize })
    }

    /// The parameters (and moments) of this arena.
    fn range(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.offsets.len()
    }

    /// Whether every parameter and moment is still a view into this arena.
    fn aliases(&self, params: &[Tensor], moments: &[(Tensor, Tensor)]) -> Result<bool> {
        for ((p, (m, v)), ids) in params[self.range()].iter().zip(&moments[self.range()]).zip(&self.ids) {
            if [p.gbuf()?.id, m.gbuf()?.id, v.gbuf()?.id] != *ids {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The element ranges to update: one per run of consecutive parameters with `update` set (the
    /// whole buffer when every parameter is updated).
    fn runs(&self, params: &[Tensor], update: &[bool]) -> Vec<(usize, usize)> {
        if self.range().all(|i| update[i]) {
            return vec![(0, self.n)];
        }
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (k, i) in self.range().enumerate() {
            if !update[i] {
                continue;
            }
            let (start, end) = ((self.offsets[k] / 4) as usize, (self.offsets[k] / 4) as usize + params[i].numel());
            match runs.last_mut() {
                Some(r) if k > 0 && update[i - 1] => r.1 = end,
                _ => runs.push((start, end)),
            }
        }
        runs
    }
}

/// One parameter's update on the CPU (reference), given the clip coefficient. Elements are
/// independent: large parameters are updated in parallel pieces.
#[allow(clippy::too_many_arguments)]
pub fn adam_cpu<T: Real>(p: &mut [T], m: &mut [T], v: &mut [T], g: &[T], c: T, cfg: &AdamConfig, bc1: T, bc2: T) {
    let (b1, b2, lr, eps, wd) =
        (T::c(cfg.beta1 as f64), T::c(cfg.beta2 as f64), T::c(cfg.lr as f64), T::c(cfg.eps as f64), T::c(cfg.weight_decay as f64));
    let n = p.len();
    let update = |p: &mut [T], m: &mut [T], v: &mut [T], g: &[T]| {
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let gi = c * g + wd * *p;
            *m = b1 * *m + (T::one() - b1) * gi;
            *v = b2 * *v + (T::one() - b2) * gi * gi;
            *p -= lr / bc1 * *m / (v.sqrt() / bc2.sqrt() + eps);
        }
    };
    if par::worth(4 * n) {
        let chunk = par::elem_chunk(1);
        p.par_chunks_mut(chunk)
            .zip(m.par_chunks_mut(chunk))
            .zip(v.par_chunks_mut(chunk))
            .zip(g.par_chunks(chunk))
            .for_each(|(((p, m), v), g)| update(p, m, v, g));
    } else {
        update(p, m, v, &g[..n]);
    }
}

/// x^2 in f64: the norm's terms.
fn sq<T: Real>(x: T) -> f64 {
    x.to_f64().unwrap().powi(2)
}

/// Sum of squares of `g` in f64, in order.
fn sumsq<T: Real>(g: &[T]) -> f64 {
    g.iter().map(|&x| sq(x)).sum::<f64>()
}

/// Sum of squares of `g` in f64, the same terms as [`sumsq`] in 8 partial sums (not in order: a
/// loop that vectorizes, for [`clearly_unclipped`] only).
fn sumsq_any<T: Real>(g: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = g.chunks_exact(8);
    let rest = chunks.remainder().iter().map(|&x| sq(x)).sum::<f64>();
    for c in chunks {
        for l in 0..8 {
            acc[l] += sq(c[l]);
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// Whether the clip coefficient is exactly 1 whatever the order of the sum of squares: `any`, a
/// sum of the `n` same non-negative terms in some order, and the ordered sum are each within a
/// relative (n - 1) u of the exact sum (u = 2^-53), so `any` (1 + 4 n eps) bounds the ordered one;
/// when that bound's norm is below 0.999 max_norm, max_norm / (norm + 1e-6) > 1 for the ordered
/// sum too. Not for a sum that is NaN or infinite.
fn clearly_unclipped(any: f64, n: usize, max_norm: f64) -> bool {
    let bound = any * (1.0 + 4.0 * n as f64 * f64::EPSILON);
    bound.is_finite() && bound.sqrt() + 1e-6 < 0.999 * max_norm
}

impl Adam {
    pub fn new(params: Vec<Tensor>, cfg: AdamConfig) -> Result<Adam> {
        let moments = params
            .iter()
            .map(|p| Ok((Tensor::zeros(p.shape(), p.device())?, Tensor::zeros(p.shape(), p.device())?)))
            .collect::<Result<Vec<_>>>()?;
        let mut seen = std::collections::HashSet::new();
        if let Some(p) = params.iter().find(|p| !seen.insert(p.id())) {
            return Err(Error::Invalid(format!("adam: parameter {:?} is listed twice", p.shape())));
        }
        let fresh = vec![true; params.len()];
        Ok(Adam { cfg, t: 0, params, moments, arenas: Vec::new(), arena_limit: None, fresh })
    }

    /// Lay the GPU state out over flat buffers of at most `bytes` each (default: the adapter's
    /// storage-binding limit), as a model too large for one buffer is; the arenas are rebuilt on
    /// the next step.
    pub fn set_arena_limit(&mut self, bytes: u64) {
        self.arena_limit = Some(bytes);
        self.arenas.clear();
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// (m, v) per parameter, for checkpoints.
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// Apply one update from `grads`. Parameters without a gradient are left alone (as torch does).
    pub fn step(&mut self, grads: &Grads) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - (self.cfg.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.cfg.beta2 as f64).powi(t);
        let live: Vec<usize> = (0..self.params.len()).filter(|&i| grads.get(&self.params[i]).is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let dev = self.params[live[0]].device();
        // Updated on the GPU: the parameters with a gradient, and those that ride along with a zero
        // one, which leaves them exactly in place (see the module docs).
        let update: Vec<bool> = (0..self.params.len())
            .map(|i| grads.get(&self.params[i]).is_some() || (self.cfg.weight_decay == 0.0 && self.fresh[i]))
            .collect();
        for &i in &live {
            self.fresh[i] = false;
        }
        match dev {
            Device::Cpu => self.step_cpu::<f32>(grads, &live, bc1, bc2),
            Device::Cpu64 => self.step_cpu::<f64>(grads, &live, bc1, bc2),
            Device::Gpu => self.step_gpu(grads, &update, bc1 as f32, bc2 as f32),
        }
    }

    fn step_cpu<T: Element>(&self, grads: &Grads, live: &[usize], bc1: f64, bc2: f64) -> Result<()> {
        let mut c = T::one();
        if self.cfg.max_grad_norm > 0.0 {
            // Each parameter's sum of squares in order (parameters in parallel), then the total
            // in parameter order.
            let hosts = live.iter().map(|&i| grads.get(&self.params[i]).unwrap().host::<T>()).collect::<Result<Vec<_>>>()?;
            let slices: Vec<&[T]> = hosts.iter().map(|h| &**h).collect();
            let total: usize = slices.iter().map(|s| s.len()).sum();
            let sum = |f: fn(&[T]) -> f64| -> f64 {
                let sums: Vec<f64> =
                    if par::worth(total) { slices.par_iter().map(|g| f(g)).collect() } else { slices.iter().map(|g| f(g)).collect() };
                sums.iter().sum()
            };
            // The ordered sum is a chain of dependent adds (latency-bound, and as long as the
            // largest parameter on any number of threads): skipped where it cannot change c.
            // Where clipping acts, the 8-lane pass is extra work (fine-tuning's Adam, one core,
            // 4.1-4.3 ms before and 3.9-4.4 after: not told apart), so no guess from the last
            // step's norm is kept.
            if !clearly_unclipped(sum(sumsq_any), total, self.cfg.max_grad_norm as f64) {
                let tot = sum(sumsq);
                c = T::c((self.cfg.max_grad_norm as f64 / (tot.sqrt() + 1e-6)).min(1.0));
            }
        }
        for &i in live {
            let g = grads.get(&self.params[i]).unwrap();
            let (m, v) = &self.moments[i];
            adam_cpu::<T>(
                &mut self.params[i].host_mut::<T>()?,
                &mut m.host_mut::<T>()?,
                &mut v.host_mut::<T>()?,
                &g.host::<T>()?,
                c,
                &self.cfg,
                T::c(bc1),
                T::c(bc2),
            );
        }
        Ok(())
    }

    /// The update over the flat arenas: one copy per gradient (zeros for a parameter without one),
    /// one `sumsq_arena` per arena, one `adam_arena` per run of updated parameters.
    fn step_gpu(&mut self, grads: &Grads, update: &[bool], bc1: f32, bc2: f32) -> Result<()> {
        let mut fresh = self.arenas.is_empty();
        for a in &self.arenas {
            fresh |= !a.aliases(&self.params, &self.moments)?;
        }
        if fresh {
            self.arenas = Arena::build_all(&self.params, &self.moments, self.arena_limit)?;
        }
        let g = gpu()?;
        for a in &self.arenas {
            for (p, &off) in self.params[a.range()].iter().zip(&a.offsets) {
                match grads.get(p) {
                    Some(gr) => g.copy(&*gr.gbuf()?, &a.g, off)?,
                    None => g.copy(&GpuBuf::view(&a.zeros, 0, 4 * p.numel().max(1) as u64)?, &a.g, off)?,
                }
            }
        }
        let clip = self.cfg.max_grad_norm > 0.0;
        let parts = NPART * self.arenas.len() as u32;
        let norms = g.alloc(4 * parts as u64)?;
        if clip {
            for (k, a) in self.arenas.iter().enumerate() {
                let prm = OptimParams { n: a.n as u32, slot: k as u32 * NPART, ..Default::default() };
                g.dispatch(&SUMSQ_ARENA, &[&a.g, &norms], &prm, [NPART, 1, 1])?;
            }
        }
        let c = &self.cfg;
        for a in &self.arenas {
            for (start, end) in a.runs(&self.params, update) {
                let prm = OptimParams {
                    n: end as u32,
                    slot: 0,
                    nparams: if clip { parts } else { 0 },
                    lr: c.lr,
                    b1: c.beta1,
                    b2: c.beta2,
                    eps: c.eps,
                    wd: c.weight_decay,
                    bc1,
                    bc2,
                    max_norm: c.max_grad_norm,
                    start: start as u32,
                };
                g.dispatch(&ADAM_ARENA, &[&a.p, &a.m, &a.v, &a.g, &norms], &prm, groups_1d(end - start))?;
            }
        }
        Ok(())
    }

    /// Replace the moments and step count (checkpoint resume).
    pub fn load_state(&mut self, t: u32, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.params.len() {
            return Err(Error::Invalid(format!(
                "optimizer state has {} entries, model has {} parameters",
                moments.len(),
                self.params.len()
            )));
        }
        for ((m, v), p) in moments.iter().zip(&self.params) {
            if m.shape() != p.shape() || v.shape() != p.shape() {
                return Err(Error::Shape { op: "adam", msg: format!("moment {:?} for parameter {:?}", m.shape(), p.shape()) });
            }
        }
        // A parameter that has never had a gradient has zero moments; the loaded ones may not be.
        self.fresh = moments.iter().map(|(m, v)| Ok(m.to_vec()?.iter().chain(&v.to_vec()?).all(|&x| x == 0.0))).collect::<Result<_>>()?;
        self.t = t;
        self.moments = moments;
        self.arenas.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{clearly_unclipped, sumsq, sumsq_any};

    /// Where the order-free sum says "not clipped", the ordered sum gives the clip coefficient 1
    /// exactly: gradients scaled to norms on both sides of max_norm and just inside the 0.1%
    /// margin, in f32 and f64, several lengths (one with a tail of fewer than 8); NaN and
    /// infinity never take the shortcut.
    #[test]
    fn shortcut_only_where_the_ordered_sum_gives_one() {
        let max_norm = 5.0f64;
        let mut taken = [0, 0];
        for len in [1usize, 7, 1000, 100_003] {
            let base: Vec<f64> = (0..len).map(|i| ((i * 7919 % 1013) as f64 - 506.0) * 1e-3 * (1.0 + (i % 7) as f64)).collect();
            let norm = base.iter().map(|v| v * v).sum::<f64>().sqrt();
            for target in [0.5, 0.99, 0.9985, 0.999, 0.9995, 1.0, 1.0001, 2.0] {
                let s = target * max_norm / norm;
                let g32: Vec<f32> = base.iter().map(|v| (v * s) as f32).collect();
                let g64: Vec<f64> = base.iter().map(|v| v * s).collect();
                for (any, ordered) in [(sumsq_any(&g32), sumsq(&g32)), (sumsq_any(&g64), sumsq(&g64))] {
                    let c = (max_norm / (ordered.sqrt() + 1e-6)).min(1.0);
                    let short = clearly_unclipped(any, len, max_norm);
                    assert!(!short || c == 1.0, "len {len}, norm {target} x max: shortcut taken, ordered c = {c}");
                    taken[short as usize] += 1;
                    // Well inside or well outside the margin, the shortcut decides as expected.
                    if target <= 0.99 {
                        assert!(short, "len {len}, norm {target} x max: shortcut not taken");
                    }
                    if target >= 1.0 {
                        assert!(!short && (target == 1.0 || c < 1.0), "len {len}, norm {target} x max");
                    }
                }
            }
        }
        assert!(taken[0] > 0 && taken[1] > 0);
        for bad in [f64::NAN, f64::INFINITY] {
            assert!(!clearly_unclipped(bad, 10, max_norm));
        }
    }
}
