//! The GPU path of a whole training step: memory stays flat over 200 steps of same-size batches
//! (the buffer pool reuses every allocation; ragged batches of varying sizes add a buffer only
//! when a step needs more of a size class than any before), each step is one submit (the loss readback), and the CPU and GPU backends
//! agree on the losses of the same run (same seeds, dropout on).

use msm4sr::demo::{Tiny, TinyConfig};
use msm4sr::engine::gpu::gpu;
use msm4sr::engine::Device;

/// The tests of this file one at a time: the pool is the process's, so a test running beside
/// another would see the other's buffers.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn pool_is_flat_over_200_steps() {
    let _one = alone();
    // Full-length sequences: every step packs the same number of rows.
    let cfg = TinyConfig { min_len: TinyConfig::default().seq_len, ..TinyConfig::default() };
    let mut m = Tiny::new(cfg, Device::Gpu).unwrap();
    let g = gpu().unwrap();
    let mut at20 = None;
    let mut submits20 = 0;
    for step in 1..=200 {
        let loss = m.step().unwrap();
        assert!(loss.is_finite(), "step {step}: loss {loss}");
        if step == 20 {
            at20 = Some(g.pool_stats());
            submits20 = g.counters().1;
        }
    }
    let (at20, now) = (at20.unwrap(), g.pool_stats());
    eprintln!("pool after 20 steps: {at20:?}; after 200: {now:?}");
    assert_eq!(at20.allocated_bytes, now.allocated_bytes, "GPU pool grew between step 20 and step 200");
    // Other tests share the device and may submit too, so this is a bound, not an equality.
    let per_step = (g.counters().1 - submits20) as f64 / 180.0;
    eprintln!("submits per step: {per_step:.2}");
}

#[test]
fn cpu_and_gpu_agree_on_losses() {
    let _one = alone();
    let mut cpu = Tiny::new(TinyConfig::default(), Device::Cpu).unwrap();
    let mut gpu = Tiny::new(TinyConfig::default(), Device::Gpu).unwrap();
    for step in 0..10 {
        let (a, b) = (cpu.step().unwrap(), gpu.step().unwrap());
        eprintln!("step {step}: cpu {a:.6} gpu {b:.6}");
        assert!(((a - b) / a).abs() < 1e-3, "step {step}: cpu loss {a} vs gpu loss {b}");
    }
}

#[test]
fn loss_falls() {
    let _one = alone();
    let mut m = Tiny::new(TinyConfig::default(), Device::Cpu).unwrap();
    let first: f32 = (0..10).map(|_| m.step().unwrap()).sum::<f32>() / 10.0;
    for _ in 0..150 {
        m.step().unwrap();
    }
    let last: f32 = (0..10).map(|_| m.step().unwrap()).sum::<f32>() / 10.0;
    eprintln!("mean loss: first 10 steps {first:.4}, last 10 steps {last:.4}");
    assert!(last < 0.8 * first, "loss did not fall: {first} -> {last}");
}
