//! Gradient and kernel verification, shared by `msm4sr gradcheck` and `cargo test`.
//!
//! Every op registers [`Case`]s (small random inputs and a function that applies the op). Two
//! checks run on each case:
//! 1. `fd`: on the f64 CPU backend, the tape's gradient of `loss = sum(out * w)` (w fixed random
//!    weights) against central finite differences. Error per element: |analytic - numeric| /
//!    max(|numeric|, 1e-3); pass when the largest is < 1e-6.
//! 2. `gpu`: outputs and gradients of the wgpu kernels against the f32 CPU backend. Pass when every
//!    element has relative error <= 1e-4 where |ref| > 1e-3, else absolute error <= 1e-5.

pub mod cases;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{mul, sum};
use crate::engine::{backward, no_grad, Device, Tensor};
use crate::Result;

pub use cases::all_cases;

/// One input of a case.
pub struct Input {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
    /// Whether the gradient with respect to this input is checked.
    pub grad: bool,
}

impl Input {
    /// Random N(0, 1) input that is differentiated.
    pub fn randn(shape: &[usize], rng: &mut ChaCha8Rng) -> Input {
        let n = shape.iter().product();
        Input { shape: shape.to_vec(), data: (0..n).map(|_| gauss(rng)).collect(), grad: true }
    }
    /// A fixed (non-differentiated) input.
    pub fn constant(shape: &[usize], data: Vec<f64>) -> Input {
        Input { shape: shape.to_vec(), data, grad: false }
    }
    pub fn scaled(mut self, s: f64) -> Input {
        self.data.iter_mut().for_each(|x| *x *= s);
        self
    }
}

pub fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

type CaseFn = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// An op applied to some inputs.
pub struct Case {
    /// Op name as listed by `msm4sr gradcheck` (matmul, add, ..., adam).
    pub op: &'static str,
    /// Human description of the shapes.
    pub shape: String,
    pub inputs: Vec<Input>,
    pub f: CaseFn,
}

impl Case {
    pub fn new(op: &'static str, shape: impl Into<String>, inputs: Vec<Input>, f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static) -> Case {
        Case { op, shape: shape.into(), inputs, f: Box::new(f) }
    }
}

/// The result of one check of one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckResult {
    pub op: String,
    pub shape: String,
    /// "fd" (f64 finite differences) or "gpu" (wgpu vs CPU).
    pub check: String,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
    pub pass: bool,
    /// Set when the check could not run (an error is a failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn make_inputs(case: &Case, dev: Device) -> Result<Vec<Tensor>> {
    case.inputs
        .iter()
        .map(|i| {
            let t = Tensor::from_f64(i.data.clone(), &i.shape, dev)?;
            Ok(if i.grad { t.param() } else { t })
        })
        .collect()
}

/// Fixed loss weights for an output of `n` elements.
fn loss_weights(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| gauss(&mut rng)).collect()
}

/// Scalar loss sum(out * w); returns (loss, out).
fn weighted_loss(case: &Case, xs: &[Tensor], seed: u64) -> Result<(Tensor, Tensor)> {
    let out = (case.f)(xs)?;
    let w = Tensor::from_f64(loss_weights(out.numel(), seed), out.shape(), out.device())?;
    Ok((sum(&mul(&out, &w)?)?, out))
}

/// Check 1: f64 analytic gradients against central differences.
pub fn check_fd(case: &Case) -> CheckResult {
    let r = (|| -> Result<(f64, f64)> {
        let xs = make_inputs(case, Device::Cpu64)?;
        let (loss, _) = weighted_loss(case, &xs, 7)?;
        if !loss.requires_grad() {
            return Ok((0.0, 0.0));
        }
        let grads = backward(&loss)?;
        let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
        // Step ~ cube root of f64 epsilon: truncation (h^2) and round-off (eps / h) errors both ~1e-11.
        let h = 1e-5;
        for (k, inp) in case.inputs.iter().enumerate() {
            if !inp.grad {
                continue;
            }
            let analytic = match grads.get(&xs[k]) {
                Some(g) => g.to_vec_f64()?,
                None => vec![0.0; inp.data.len()],
            };
            // At most 48 elements per input, spread evenly, so large cases stay fast.
            let n = inp.data.len();
            let stride = n.div_ceil(48).max(1);
            for e in (0..n).step_by(stride) {
                let eval = |delta: f64| -> Result<f64> {
                    no_grad(|| {
                        let mut ys = Vec::with_capacity(xs.len());
                        for (j, i2) in case.inputs.iter().enumerate() {
                            let mut d = i2.data.clone();
                            if j == k {
                                d[e] += delta;
                            }
                            ys.push(Tensor::from_f64(d, &i2.shape, Device::Cpu64)?);
                        }
                        let (l, _) = weighted_loss(case, &ys, 7)?;
                        Ok(l.to_vec_f64()?[0])
                    })
                };
                let numeric = (eval(h)? - eval(-h)?) / (2.0 * h);
                let abs = (analytic[e] - numeric).abs();
                max_abs = max_abs.max(abs);
                max_rel = max_rel.max(abs / numeric.abs().max(1e-3));
            }
        }
        Ok((max_abs, max_rel))
    })();
    finish(case, "fd", r, |_, rel| rel < 1e-6)
}

/// Compare `got` against `want`: (max abs err, max rel err, pass) under the gpu-check tolerance.
pub fn compare(got: &[f32], want: &[f32]) -> (f64, f64, bool) {
    let (mut max_abs, mut max_rel, mut pass) = (0.0f64, 0.0f64, got.len() == want.len());
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        let abs = (g - w).abs();
        if !abs.is_finite() || !g.is_finite() {
            pass = false;
            max_abs = f64::INFINITY;
            continue;
        }
        max_abs = max_abs.max(abs);
        if w.abs() > 1e-3 {
            let rel = abs / w.abs();
            max_rel = max_rel.max(rel);
            pass &= rel <= 1e-4;
        } else {
            pass &= abs <= 1e-5;
        }
    }
    (max_abs, max_rel, pass)
}

/// Check 2: forward output and every input gradient on the GPU against the f32 CPU backend.
pub fn check_gpu(case: &Case) -> CheckResult {
    let mut ok = true;
    let r = (|| -> Result<(f64, f64)> {
        let mut results = Vec::new();
        for dev in [Device::Cpu, Device::Gpu] {
            let xs = make_inputs(case, dev)?;
            let (loss, out) = weighted_loss(case, &xs, 7)?;
            let mut vals = vec![out.to_vec()?];
            if loss.requires_grad() {
                let grads = backward(&loss)?;
                for (k, inp) in case.inputs.iter().enumerate() {
                    if inp.grad {
                        vals.push(match grads.get(&xs[k]) {
                            Some(g) => g.to_vec()?,
                            None => vec![0.0; inp.data.len()],
                        });
                    }
                }
            }
            results.push(vals);
        }
        let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
        for (want, got) in results[0].iter().zip(&results[1]) {
            let (a, r, p) = compare(got, want);
            max_abs = max_abs.max(a);
            max_rel = max_rel.max(r);
            ok &= p;
        }
        Ok((max_abs, max_rel))
    })();
    finish(case, "gpu", r, |_, _| ok)
}

fn finish(case: &Case, check: &str, r: Result<(f64, f64)>, pass: impl Fn(f64, f64) -> bool) -> CheckResult {
    match r {
        Ok((a, rel)) => CheckResult {
            op: case.op.into(),
            shape: case.shape.clone(),
            check: check.into(),
            max_abs_err: a,
            max_rel_err: rel,
            pass: pass(a, rel),
            error: None,
        },
        Err(e) => CheckResult {
            op: case.op.into(),
            shape: case.shape.clone(),
            check: check.into(),
            max_abs_err: f64::NAN,
            max_rel_err: f64::NAN,
            pass: false,
            error: Some(e.to_string()),
        },
    }
}

/// Run both checks (the gpu one only when `gpu` is true) for every case whose op is in `ops`
/// (all when empty).
pub fn run(ops: &[String], gpu: bool) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for case in all_cases() {
        if !ops.is_empty() && !ops.iter().any(|o| o == case.op) {
            continue;
        }
        out.push(check_fd(&case));
        if gpu {
            out.push(check_gpu(&case));
        }
    }
    out.extend(cases::special_checks(ops, gpu));
    out
}
