//! Adam with coupled L2 weight decay (torch.optim.Adam) after global gradient-norm clipping
//! (torch.nn.utils.clip_grad_norm_), on every device. On the GPU the whole update is queued without a
//! readback, in one of two forms:
//!
//! - the flat arena (the usual case): the parameters and their two moments live in three flat
//!   buffers, each parameter at the same aligned offset in each, the tensors being views into them;
//!   a step copies each gradient into a fourth flat buffer (buffer copies, no kernels), then runs
//!   ONE `sumsq_arena` dispatch (partial sums of squares) and ONE `adam_arena` dispatch over all
//!   parameters. The arena is built on the first step (and rebuilt when a parameter's or moment's
//!   storage was replaced since, e.g. by loading a checkpoint).
//!   A parameter without a gradient this step must be left alone (as torch does); the arena step
//!   gives it a zero gradient instead, which leaves it exactly unchanged as long as its moments are
//!   still zero (it never had a gradient) and there is no weight decay, as for the attention
//!   pooling's biases, whose gradient is structurally absent (see `nn::AttentionPool`).
//! - per parameter (when a parameter without a gradient has non-zero moments or there is weight
//!   decay, or the parameters do not fit one storage binding): one `sumsq` dispatch per parameter writes its
//!   squared gradient norm into a small buffer, then one `adam` dispatch per parameter reads all of
//!   them to form the clip coefficient.
//!
//! For each parameter p with gradient g (t = step count, from 1):
//!   c  = min(1, max_norm / (sqrt(sum over params of |g|^2) + 1e-6))   (c = 1 without clipping)
//!   g' = c g + wd p;  m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2
//!   p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

use std::sync::Arc;

use rayon::prelude::*;

use super::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use super::ops::wgsl;
use crate::autograd::Grads;
use crate::cpu::{par, Real};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};

const SRC: &str = wgsl!("optim.wgsl");
static SUMSQ: Kernel<OptimParams> = Kernel::new("optim", SRC, "sumsq", &[Read, ReadWrite]);
static ADAM: Kernel<OptimParams> = Kernel::new("optim", SRC, "adam", &[ReadWrite, ReadWrite, ReadWrite, Read, Read]);
static SUMSQ_ARENA: Kernel<OptimParams> = Kernel::new("optim", SRC, "sumsq_arena", &[Read, ReadWrite]);
static ADAM_ARENA: Kernel<OptimParams> = Kernel::new("optim", SRC, "adam_arena", &[ReadWrite, ReadWrite, ReadWrite, Read, Read]);
/// Workgroups of `sumsq_arena` (partial sums; `NPART` of optim.wgsl).
const NPART: u32 = super::gpu::WG;

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<super::gpu::Contract> {
    vec![SUMSQ.contract(), ADAM.contract(), SUMSQ_ARENA.contract(), ADAM_ARENA.contract()]
}

kernel_params! {
    /// `struct P` of optim.wgsl (both kernels).
    struct OptimParams {
        n: u32,
        /// sumsq: where to write.
        slot: u32,
        /// adam: entries in norms.
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
    arena: Option<Arena>,
    /// Per parameter: its moments are exactly zero (it has never had a gradient).
    fresh: Vec<bool>,
}

/// The GPU's flat optimizer state: parameter i's values, moments and gradient at byte `offsets[i]`
/// of `p`, `m`, `v` and `g` (offsets aligned for views; the padding between parameters is zero in
/// all four and stays zero: a zero gradient on a zero weight leaves it zero).
struct Arena {
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
    /// Elements per arena, padding included.
    n: usize,
}

impl Arena {
    /// Lay the parameters and moments out in flat buffers and make the tensors views into them;
    /// `None` when they would not fit one storage binding or a parameter is listed twice.
    fn build(params: &[Tensor], moments: &[(Tensor, Tensor)]) -> Result<Option<Arena>> {
        let g = gpu()?;
        let align = g.view_align();
        let mut offsets = Vec::with_capacity(params.len());
        let mut end = 0u64;
        for p in params {
            offsets.push(end);
            end = (end + 4 * p.numel().max(1) as u64).next_multiple_of(align);
        }
        let mut seen = std::collections::HashSet::new();
        if end > g.max_binding() || end / 4 > u32::MAX as u64 || !params.iter().all(|p| seen.insert(p.id())) {
            return Ok(None);
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
        Ok(Some(Arena { p: pa, m: ma, v: va, g: ga, zeros, offsets, ids, n: (end / 4) as usize }))
    }

    /// Whether every parameter and moment is still a view into this arena.
    fn aliases(&self, params: &[Tensor], moments: &[(Tensor, Tensor)]) -> Result<bool> {
        for ((p, (m, v)), ids) in params.iter().zip(moments).zip(&self.ids) {
            if [p.gbuf()?.id, m.gbuf()?.id, v.gbuf()?.id] != *ids {
                return Ok(false);
            }
        }
        Ok(true)
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

/// Sum of squares of `g` in f64, in order.
fn sumsq<T: Real>(g: &[T]) -> f64 {
    g.iter().map(|x| x.to_f64().unwrap().powi(2)).sum::<f64>()
}

impl Adam {
    pub fn new(params: Vec<Tensor>, cfg: AdamConfig) -> Result<Adam> {
        let moments = params
            .iter()
            .map(|p| Ok((Tensor::zeros(p.shape(), p.device())?, Tensor::zeros(p.shape(), p.device())?)))
            .collect::<Result<Vec<_>>>()?;
        let fresh = vec![true; params.len()];
        Ok(Adam { cfg, t: 0, params, moments, arena: None, fresh })
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
        // The arena step is exact when every parameter without a gradient stays put under a zero one.
        let zero_ok = live.len() == self.params.len()
            || (self.cfg.weight_decay == 0.0 && (0..self.params.len()).all(|i| live.contains(&i) || self.fresh[i]));
        for &i in &live {
            self.fresh[i] = false;
        }
        match dev {
            Device::Cpu => self.step_cpu::<f32>(grads, &live, bc1, bc2),
            Device::Cpu64 => self.step_cpu::<f64>(grads, &live, bc1, bc2),
            Device::Gpu if zero_ok && self.arena_ready()? => self.step_arena(grads, bc1 as f32, bc2 as f32),
            Device::Gpu => self.step_gpu(grads, &live, bc1 as f32, bc2 as f32),
        }
    }

    fn step_cpu<T: Real>(&self, grads: &Grads, live: &[usize], bc1: f64, bc2: f64) -> Result<()> {
        let mut c = T::one();
        if self.cfg.max_grad_norm > 0.0 {
            // Each parameter's sum of squares in order (parameters in parallel), then the total
            // in parameter order.
            let hosts = live.iter().map(|&i| grads.get(&self.params[i]).unwrap().host::<T>()).collect::<Result<Vec<_>>>()?;
            let slices: Vec<&[T]> = hosts.iter().map(|h| &**h).collect();
            let total: usize = slices.iter().map(|s| s.len()).sum();
            let sums: Vec<f64> =
                if par::worth(total) { slices.par_iter().map(|g| sumsq(g)).collect() } else { slices.iter().map(|g| sumsq(g)).collect() };
            let tot: f64 = sums.iter().sum();
            c = T::c((self.cfg.max_grad_norm as f64 / (tot.sqrt() + 1e-6)).min(1.0));
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

    /// Build (or rebuild) the arena if needed; false when the parameters cannot have one.
    fn arena_ready(&mut self) -> Result<bool> {
        if let Some(a) = &self.arena {
            if a.aliases(&self.params, &self.moments)? {
                return Ok(true);
            }
        }
        self.arena = Arena::build(&self.params, &self.moments)?;
        Ok(self.arena.is_some())
    }

    /// The update over the flat arena: one copy per gradient (zeros for a parameter without one),
    /// two dispatches.
    fn step_arena(&self, grads: &Grads, bc1: f32, bc2: f32) -> Result<()> {
        let g = gpu()?;
        let a = self.arena.as_ref().expect("arena built");
        for (p, &off) in self.params.iter().zip(&a.offsets) {
            match grads.get(p) {
                Some(gr) => g.copy(&*gr.gbuf()?, &a.g, off)?,
                None => g.copy(&GpuBuf::view(&a.zeros, 0, 4 * p.numel().max(1) as u64)?, &a.g, off)?,
            }
        }
        let clip = self.cfg.max_grad_norm > 0.0;
        let norms = g.alloc(4 * NPART as u64)?;
        if clip {
            g.dispatch(&SUMSQ_ARENA, &[&a.g, &norms], &OptimParams { n: a.n as u32, ..Default::default() }, [NPART, 1, 1])?;
        }
        let c = &self.cfg;
        let params = OptimParams {
            n: a.n as u32,
            slot: 0,
            nparams: if clip { NPART } else { 0 },
            lr: c.lr,
            b1: c.beta1,
            b2: c.beta2,
            eps: c.eps,
            wd: c.weight_decay,
            bc1,
            bc2,
            max_norm: c.max_grad_norm,
        };
        g.dispatch(&ADAM_ARENA, &[&a.p, &a.m, &a.v, &a.g, &norms], &params, groups_1d(a.n))
    }

    fn step_gpu(&self, grads: &Grads, live: &[usize], bc1: f32, bc2: f32) -> Result<()> {
        let g = gpu()?;
        let norms = g.alloc(4 * live.len() as u64)?;
        let clip = self.cfg.max_grad_norm > 0.0;
        if clip {
            for (slot, &i) in live.iter().enumerate() {
                let gr = grads.get(&self.params[i]).unwrap();
                let prm = OptimParams { n: gr.numel() as u32, slot: slot as u32, ..Default::default() };
                g.dispatch(&SUMSQ, &[&*gr.gbuf()?, &norms], &prm, [1, 1, 1])?;
            }
        }
        let c = &self.cfg;
        for &i in live {
            let p = &self.params[i];
            let gr = grads.get(p).unwrap();
            let (m, v) = &self.moments[i];
            let n = p.numel();
            let params = OptimParams {
                n: n as u32,
                slot: 0,
                nparams: if clip { live.len() as u32 } else { 0 },
                lr: c.lr,
                b1: c.beta1,
                b2: c.beta2,
                eps: c.eps,
                wd: c.weight_decay,
                bc1,
                bc2,
                max_norm: c.max_grad_norm,
            };
            g.dispatch(&ADAM, &[&*p.gbuf()?, &*m.gbuf()?, &*v.gbuf()?, &*gr.gbuf()?, &norms], &params, groups_1d(n))?;
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
        self.arena = None;
        Ok(())
    }
}
