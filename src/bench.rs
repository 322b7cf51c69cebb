//! Kernel benchmarks at the model's shapes, shared by `msm4sr bench` and `cargo bench`.
//!
//! Each entry is timed after one warm-up run, repeating until `min_secs` have passed (at least once);
//! GPU timings include queueing and one submit + wait per repetition, as a training step would pay.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::engine::gpu::gpu;
use crate::engine::ops::{attention, layernorm, matmul, softmax};
use crate::engine::{no_grad, Device, Indices, Tensor};
use crate::Result;

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub name: String,
    pub shape: String,
    pub device: String,
    /// Mean seconds per call.
    pub seconds: f64,
    /// For matmuls: 2*M*N*K / seconds / 1e9.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    pub iters: usize,
}

/// Device name as reported in results.
pub fn device_name(dev: Device) -> String {
    match dev {
        Device::Gpu => gpu().map(|g| format!("{} ({})", g.adapter.name, g.adapter.backend)).unwrap_or_else(|_| "gpu".into()),
        Device::Cpu | Device::Cpu64 => format!("cpu ({} threads)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    }
}

fn sync(dev: Device) -> Result<()> {
    if dev == Device::Gpu {
        gpu()?.sync()?;
    }
    Ok(())
}

fn time(dev: Device, min_secs: f64, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, usize)> {
    drop(f()?);
    sync(dev)?;
    let start = Instant::now();
    let mut iters = 0;
    while iters == 0 || start.elapsed().as_secs_f64() < min_secs {
        drop(f()?);
        sync(dev)?;
        iters += 1;
    }
    Ok((start.elapsed().as_secs_f64() / iters as f64, iters))
}

/// The matmul shapes (M, K, N) of the model: transformer projections, the FFN, full-ranking scores
/// and the item encoders' first layer at paper size.
pub const MATMUL_SHAPES: [(usize, usize, usize); 4] = [(51200, 64, 64), (51200, 64, 256), (1024, 64, 7671), (7670, 768, 512)];

/// Run every benchmark on `dev`. `quick` shrinks the matmul shapes by 8x along M (for slow devices).
pub fn run(dev: Device, min_secs: f64, quick: bool) -> Result<Vec<BenchResult>> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let name = device_name(dev);
    let mut out = Vec::new();
    no_grad(|| -> Result<()> {
        for (m, k, n) in MATMUL_SHAPES {
            let m = if quick { m.div_ceil(8) } else { m };
            let a = Tensor::randn(&[m, k], 1.0, &mut rng, dev)?;
            let b = Tensor::randn(&[k, n], 1.0, &mut rng, dev)?;
            let (s, iters) = time(dev, min_secs, || matmul(&a, &b, false, false))?;
            out.push(BenchResult {
                name: "matmul".into(),
                shape: format!("({m}x{k}).({k}x{n})"),
                device: name.clone(),
                seconds: s,
                gflops: Some(2.0 * (m * n * k) as f64 / s / 1e9),
                iters,
            });
        }
        let (b, l, c) = if quick { (128, 50, 64) } else { (1024, 50, 64) };
        let x = Tensor::randn(&[b, l, c], 1.0, &mut rng, dev)?;
        let gamma = Tensor::full(&[c], 1.0, dev)?;
        let beta = Tensor::zeros(&[c], dev)?;
        let (s, iters) = time(dev, min_secs, || layernorm(&x, &gamma, &beta, 1e-12))?;
        out.push(BenchResult {
            name: "layernorm".into(),
            shape: format!("({b},{l},{c})"),
            device: name.clone(),
            seconds: s,
            gflops: None,
            iters,
        });
        let (s, iters) = time(dev, min_secs, || softmax(&x, None))?;
        out.push(BenchResult {
            name: "softmax".into(),
            shape: format!("({b},{l},{c})"),
            device: name.clone(),
            seconds: s,
            gflops: None,
            iters,
        });
        let lens = Indices::new((0..b).map(|i| (1 + i % l) as u32).collect());
        let (q, kk, v) = (x.clone(), Tensor::randn(&[b, l, c], 1.0, &mut rng, dev)?, Tensor::randn(&[b, l, c], 1.0, &mut rng, dev)?);
        let (s, iters) = time(dev, min_secs, || attention(&q, &kk, &v, &lens, 2, 0.0, 0))?;
        out.push(BenchResult {
            name: "attention".into(),
            shape: format!("({b},{l},{c}) 2 heads"),
            device: name.clone(),
            seconds: s,
            gflops: None,
            iters,
        });
        Ok(())
    })?;
    Ok(out)
}
