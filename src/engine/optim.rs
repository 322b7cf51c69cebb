//! Adam with coupled L2 weight decay (torch.optim.Adam) after global gradient-norm clipping
//! (torch.nn.utils.clip_grad_norm_), on every device. On the GPU the whole update is queued without a
//! readback: one `sumsq` dispatch per parameter writes its squared gradient norm into a small buffer,
//! then one `adam` dispatch per parameter reads all of them to form the clip coefficient.
//!
//! For each parameter p with gradient g (t = step count, from 1):
//!   c  = min(1, max_norm / (sqrt(sum over params of |g|^2) + 1e-6))   (c = 1 without clipping)
//!   g' = c g + wd p;  m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2
//!   p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

use super::gpu::{gpu, groups_1d, kernel_params, Access::*, Kernel};
use rayon::prelude::*;

use super::ops::{par, wgsl};
use super::tensor::Real;
use super::{Device, Grads, Tensor};
use crate::{Error, Result};

const SRC: &str = wgsl!("optim.wgsl");
static SUMSQ: Kernel<OptimParams> = Kernel::new("optim", SRC, "sumsq", &[Read, ReadWrite]);
static ADAM: Kernel<OptimParams> = Kernel::new("optim", SRC, "adam", &[ReadWrite, ReadWrite, ReadWrite, Read, Read]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<super::gpu::Contract> {
    vec![SUMSQ.contract(), ADAM.contract()]
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
        Ok(Adam { cfg, t: 0, params, moments })
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
        match dev {
            Device::Cpu => self.step_cpu::<f32>(grads, &live, bc1, bc2),
            Device::Cpu64 => self.step_cpu::<f64>(grads, &live, bc1, bc2),
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
        self.t = t;
        self.moments = moments;
        Ok(())
    }
}
