//! The GPU path of a whole training step: memory stays flat over 200 steps of same-size batches
//! (the buffer pool reuses every allocation; ragged batches of varying sizes add a buffer only
//! when a step needs more of a size class than any before), each step is one submit (the loss readback), and the CPU and GPU backends
//! agree on the losses of the same run (same seeds, dropout on).

use msm4sr::engine::gpu::gpu;
use msm4sr::engine::Device;
use msm4sr::model::demo::{Tiny, TinyConfig};

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
            submits20 = g.counters().submits;
        }
    }
    let (at20, now) = (at20.unwrap(), g.pool_stats());
    eprintln!("pool after 20 steps: {at20:?}; after 200: {now:?}");
    assert_eq!(at20.allocated_bytes, now.allocated_bytes, "GPU pool grew between step 20 and step 200");
    // Other tests share the device and may submit too, so this is a bound, not an equality.
    let per_step = (g.counters().submits - submits20) as f64 / 180.0;
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

/// Adam on the GPU over its flat arena: a step is one copy per gradient and two dispatches; a step
/// in which a parameter has no gradient (with weight decay) leaves that parameter alone by updating
/// the others only; a parameter whose storage was replaced (as loading a checkpoint does) makes the
/// arena be rebuilt; parameters laid out over several arenas (as a model larger than one storage
/// binding is) are updated alike. Every step's result equals the CPU update's.
#[test]
fn adam_over_the_flat_arena() {
    use msm4sr::engine::ops::{mul, sum};
    use msm4sr::engine::optim::{Adam, AdamConfig};
    use msm4sr::engine::{backward, Tensor};
    let _one = alone();
    let shapes: [&[usize]; 3] = [&[5, 7], &[13], &[1]];
    let vals =
        |n: usize, seed: usize| (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0 - 1.0) * 3.0).collect::<Vec<f32>>();
    // (step, which parameters get a gradient); before step 4, parameter 2 is assigned new values.
    let plan: [&[usize]; 5] = [&[0, 1, 2], &[0, 1, 2], &[0, 1], &[0, 1, 2], &[0, 1, 2]];
    let run = |dev: Device, arena_limit: Option<u64>| {
        let params: Vec<Tensor> =
            shapes.iter().enumerate().map(|(i, s)| Tensor::from_vec(vals(s.iter().product(), i), s, dev).unwrap().param()).collect();
        let mut opt = Adam::new(params.clone(), AdamConfig { lr: 0.05, weight_decay: 1e-2, ..AdamConfig::default() }).unwrap();
        if let Some(bytes) = arena_limit {
            opt.set_arena_limit(bytes);
        }
        let mut per_step = Vec::new();
        for (step, live) in plan.iter().enumerate() {
            if step == 3 {
                params[2].assign(&Tensor::from_vec(vec![0.25], &[1], dev).unwrap()).unwrap();
            }
            let terms: Vec<Tensor> = live
                .iter()
                .map(|&i| {
                    sum(&mul(&params[i], &Tensor::from_vec(vals(params[i].numel(), 10 + step), shapes[i], dev).unwrap()).unwrap()).unwrap()
                })
                .collect();
            let loss = terms.iter().skip(1).fold(terms[0].clone(), |a, t| msm4sr::engine::ops::add(&a, t).unwrap());
            let grads = backward(&loss).unwrap();
            let c0 = (dev == Device::Gpu).then(|| gpu().unwrap().counters());
            opt.step(&grads).unwrap();
            if let Some(c0) = c0 {
                let c1 = gpu().unwrap().counters();
                per_step.push((c1.dispatches - c0.dispatches, c1.copies - c0.copies));
            }
        }
        (params.iter().map(|p| p.to_vec().unwrap()).collect::<Vec<_>>(), per_step)
    };
    let (want, _) = run(Device::Cpu, None);
    // One arena, then each parameter in an arena of its own (a limit below two parameters' size).
    let (got, counts) = run(Device::Gpu, None);
    let (got_split, counts_split) = run(Device::Gpu, Some(1));
    for (got, what) in [(&got, "one arena"), (&got_split, "three arenas")] {
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{what}: parameter {i}: gpu {a} vs cpu {b}");
            }
        }
    }
    eprintln!("(dispatches, copies) per optimizer step: {counts:?}; over three arenas: {counts_split:?}");
    // Step 2 runs on the arena built in step 1: 3 gradient copies, sumsq_arena + adam_arena.
    assert_eq!(counts[1], (2, 3), "arena step");
    // Step 3: parameter 2 has no gradient: its slot gets zeros, the update runs over 0 and 1 only.
    assert_eq!(counts[2], (2, 3), "step without parameter 2");
    // Step 4: parameter 2 was reassigned: the arena is rebuilt (9 copies) and the step copies 3.
    assert_eq!(counts[3], (2, 12), "rebuilt arena");
    assert_eq!(counts[4], (2, 3), "arena step after the rebuild");
    // Over three arenas: a sumsq_arena and an adam_arena each (step 3: no adam_arena for the third).
    assert_eq!(counts_split[1], (6, 3), "three arenas");
    assert_eq!(counts_split[2], (5, 3), "three arenas, parameter 2 left alone");

    // Without weight decay, a parameter that never has a gradient rides along with a zero one
    // (the attention pooling's biases): still the arena step, and the parameter stays exactly put.
    let p: Vec<Tensor> = [vec![1.0f32, -2.0, 3.0], vec![0.5]]
        .into_iter()
        .map(|v| {
            let n = v.len();
            Tensor::from_vec(v, &[n], Device::Gpu).unwrap().param()
        })
        .collect();
    let mut opt = Adam::new(p.clone(), AdamConfig { lr: 0.1, ..AdamConfig::default() }).unwrap();
    for step in 0..3 {
        let grads = backward(&sum(&mul(&p[0], &p[0]).unwrap()).unwrap()).unwrap();
        let c0 = gpu().unwrap().counters();
        opt.step(&grads).unwrap();
        let c1 = gpu().unwrap().counters();
        if step > 0 {
            assert_eq!((c1.dispatches - c0.dispatches, c1.copies - c0.copies), (2, 2), "arena step with a zero gradient");
        }
    }
    assert_eq!(p[1].to_vec().unwrap(), [0.5], "a parameter without a gradient moved");
    assert!(p[0].to_vec().unwrap()[0] < 1.0);
}
