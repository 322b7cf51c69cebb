//! The optimizer is not a differentiable op, so it gets its own checks: the f64 CPU update against an
//! independent scalar transcription of torch.optim.Adam + clip_grad_norm_ ("ref"), and the GPU
//! update against the f32 CPU one ("gpu"), over 3 steps, with clipping active and inactive.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{add, mul, sum};
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{backward, Device, Tensor};
use crate::harness::gradcheck::{compare, gauss, CheckResult};
use crate::Result;

const SHAPES: [&[usize]; 3] = [&[5, 7], &[13], &[1]];
const STEPS: usize = 3;

struct Setup {
    init: Vec<Vec<f64>>,
    /// grads[step][param]
    grads: Vec<Vec<Vec<f64>>>,
}

fn setup(grad_scale: f64) -> Setup {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let init = SHAPES.iter().map(|s| (0..s.iter().product()).map(|_| gauss(&mut rng)).collect()).collect();
    let grads = (0..STEPS)
        .map(|_| SHAPES.iter().map(|s| (0..s.iter().product()).map(|_| grad_scale * gauss(&mut rng)).collect()).collect())
        .collect();
    Setup { init, grads }
}

/// Run the engine's Adam on `dev`; gradients come from backward of sum(p * g_step).
fn run_engine(s: &Setup, cfg: AdamConfig, dev: Device) -> Result<Vec<Vec<f64>>> {
    let params: Vec<Tensor> =
        s.init.iter().zip(SHAPES).map(|(d, sh)| Ok(Tensor::from_f64(d.clone(), sh, dev)?.param())).collect::<Result<_>>()?;
    let mut opt = Adam::new(params.clone(), cfg)?;
    for step in &s.grads {
        let mut loss: Option<Tensor> = None;
        for ((p, g), sh) in params.iter().zip(step).zip(SHAPES) {
            let term = sum(&mul(p, &Tensor::from_f64(g.clone(), sh, dev)?)?)?;
            loss = Some(match loss {
                Some(l) => add(&l, &term)?,
                None => term,
            });
        }
        let grads = backward(&loss.unwrap())?;
        opt.step(&grads)?;
    }
    params.iter().map(|p| p.to_vec_f64()).collect()
}

/// Independent scalar transcription of torch's clip_grad_norm_ followed by Adam.step().
fn run_reference(s: &Setup, c: AdamConfig) -> Vec<Vec<f64>> {
    let mut p = s.init.clone();
    let mut m: Vec<Vec<f64>> = p.iter().map(|x| vec![0.0; x.len()]).collect();
    let mut v = m.clone();
    for (t, step) in s.grads.iter().enumerate() {
        let norm: f64 = step.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
        let coef = if c.max_grad_norm > 0.0 { (c.max_grad_norm as f64 / (norm + 1e-6)).min(1.0) } else { 1.0 };
        let t = (t + 1) as i32;
        let (b1, b2) = (c.beta1 as f64, c.beta2 as f64);
        for k in 0..p.len() {
            for i in 0..p[k].len() {
                let g = step[k][i] * coef + c.weight_decay as f64 * p[k][i];
                m[k][i] = b1 * m[k][i] + (1.0 - b1) * g;
                v[k][i] = b2 * v[k][i] + (1.0 - b2) * g * g;
                let denom = (v[k][i].sqrt() / (1.0 - b2.powi(t)).sqrt()) + c.eps as f64;
                p[k][i] -= c.lr as f64 / (1.0 - b1.powi(t)) * m[k][i] / denom;
            }
        }
    }
    p
}

pub fn checks(gpu: bool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for (name, scale) in [("3 params, clipped", 10.0), ("3 params, unclipped", 0.05)] {
        let s = setup(scale);
        let cfg = AdamConfig { lr: 1e-2, weight_decay: 1e-3, ..AdamConfig::default() };
        let res = |check: &str, r: Result<(f64, f64, bool)>| match r {
            Ok((a, rel, pass)) => CheckResult {
                op: "adam".into(),
                shape: name.into(),
                check: check.into(),
                max_abs_err: a,
                max_rel_err: rel,
                pass,
                error: None,
            },
            Err(e) => CheckResult {
                op: "adam".into(),
                shape: name.into(),
                check: check.into(),
                max_abs_err: f64::NAN,
                max_rel_err: f64::NAN,
                pass: false,
                error: Some(e.to_string()),
            },
        };
        out.push(res(
            "ref",
            (|| {
                let got = run_engine(&s, cfg, Device::Cpu64)?;
                let want = run_reference(&s, cfg);
                let (mut a, mut r) = (0.0f64, 0.0f64);
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    a = a.max((g - w).abs());
                    r = r.max((g - w).abs() / w.abs().max(1e-3));
                }
                Ok((a, r, r < 1e-10))
            })(),
        ));
        if gpu {
            out.push(res(
                "gpu",
                (|| {
                    let want: Vec<f32> = run_engine(&s, cfg, Device::Cpu)?.into_iter().flatten().map(|x| x as f32).collect();
                    let got: Vec<f32> = run_engine(&s, cfg, Device::Gpu)?.into_iter().flatten().map(|x| x as f32).collect();
                    Ok(compare(&got, &want))
                })(),
            ));
        }
    }
    out
}
