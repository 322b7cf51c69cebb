//! Memory bounds, measured with a counting allocator (the tests of this binary take one lock, so
//! that nothing else allocates while one measures).
//!
//! - The fused full-catalog loss keeps O(B * BLOCK + I * D) extra memory through forward and
//!   backward, never the (B, I) score matrix; the materialised cross-entropy, measured the same
//!   way, is shown to exceed the bound (so the check can fail); ranking with `catalog_rank` (history
//!   masks included) stays within the same bound.
//! - A steady-state training step on the CPU backend (shapes seen before) allocates no tensor
//!   storage: every take from the storage pool is a hit and no allocation of 16 KiB or more reaches
//!   the allocator (but the GEMM crate's packing buffers, one per product), for SASRec, MSM4SR fine-tuning and MSM4SR pre-training; with the pool off the
//!   same steps are shown to allocate (so the check can fail).
//! - Storage handed out without zeroing (`pool::stale`) is never read before it is written: the
//!   same steps give the same bits with it poisoned.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use msm4sr::config::ModelKind;
use msm4sr::config::RunConfig;
use msm4sr::data::synth::{self, SynthConfig};
use msm4sr::data::{make_batch, Batch, Dataset, LoadOptions, Sample};
use msm4sr::engine::cpu::pool;
use msm4sr::engine::ops::catalog::BLOCK;
use msm4sr::engine::ops::{catalog_ce, catalog_rank, cross_entropy, matmul, mean};
use msm4sr::engine::optim::{Adam, AdamConfig};
use msm4sr::engine::stats::in_gemm;
use msm4sr::engine::{backward, no_grad, Device, Indices, Tensor};
use msm4sr::model::msm4sr::Model;
use msm4sr::model::nn::Seeds;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Allocations (and growing reallocations) of at least `LARGE` bytes, outside the GEMM crate's
/// own packing buffers (one per matrix product; see `engine::stats::in_gemm`).
static LARGE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Larger than the per-step batch bookkeeping (item-id lists and maps, a few KiB at these shapes),
/// smaller than any activation (26 KiB and up), so tensor storage that bypassed the pool would show.
const LARGE: usize = 16 << 10;
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
/// With `MSM4SR_TRACE_ALLOC` set, large allocations inside a measured step print a backtrace.
static TRACING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
thread_local!(static IN_TRACE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

fn trace(size: usize) {
    if TRACING.load(Relaxed) && !IN_TRACE.with(|t| t.replace(true)) {
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        let frames: Vec<&str> = bt
            .lines()
            .filter_map(|l| l.trim().split_once(": ").map(|(_, f)| f))
            .filter(|f| f.starts_with("msm4sr::") || f.starts_with("gemm"))
            .collect();
        eprintln!("allocation of {size} bytes: {}", frames.join(" < "));
        IN_TRACE.with(|t| t.set(false));
    }
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            PEAK.fetch_max(CUR.fetch_add(l.size(), Relaxed) + l.size(), Relaxed);
            if l.size() >= LARGE && !in_gemm() {
                LARGE_COUNT.fetch_add(1, Relaxed);
                trace(l.size());
            }
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CUR.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                PEAK.fetch_max(CUR.fetch_add(new - l.size(), Relaxed) + new - l.size(), Relaxed);
            } else {
                CUR.fetch_sub(l.size() - new, Relaxed);
            }
            if new >= LARGE && new > l.size() && !in_gemm() {
                LARGE_COUNT.fetch_add(1, Relaxed);
                trace(new);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated beyond what was live when `f` started.
fn peak_extra(f: impl FnOnce()) -> usize {
    let base = CUR.load(Relaxed);
    PEAK.store(base, Relaxed);
    f();
    PEAK.load(Relaxed) - base
}

#[test]
fn catalog_loss_holds_blocks_not_the_score_matrix() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("RAYON_NUM_THREADS", "1");
    // Measure what each loss allocates, not what an earlier one left in the pool.
    let was = pool::set_enabled(false);
    let (b, n, d) = (512usize, 40_000usize, 16usize);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let h = Tensor::randn(&[b, d], 0.3, &mut rng, Device::Cpu).unwrap().param();
    let e = Tensor::randn(&[n, d], 0.3, &mut rng, Device::Cpu).unwrap().param();
    let t = Indices::new((0..b as u32).map(|i| i * 71 % n as u32).collect());
    let scores = 4 * b * n;
    let bound = 4 * (4 * b * BLOCK + 3 * n * d) + (1 << 20);
    assert!(bound < scores / 4, "the test's shapes do not separate the two cases");
    let fused = peak_extra(|| {
        let loss = mean(&catalog_ce(&[(&h, &e)], &t, 2.0).unwrap()).unwrap();
        let g = backward(&loss).unwrap();
        assert!(g.get(&h).is_some() && g.get(&e).is_some());
    });
    let full = peak_extra(|| {
        let loss = cross_entropy(&matmul(&h, &e, false, true).unwrap(), &t).unwrap();
        backward(&loss).unwrap();
    });
    eprintln!("peak extra bytes: fused {fused}, materialised {full}, bound {bound}, one score matrix {scores}");
    assert!(fused <= bound, "fused catalog loss used {fused} bytes, more than {bound}");
    assert!(full > bound, "the materialised loss stayed within the bound ({full} bytes): the check cannot tell them apart");
    // Ranking the targets the same way (two passes over the blocks) stays within the bound too.
    let ranked = peak_extra(|| {
        let mask: Vec<Vec<u32>> = (0..b as u32).map(|r| (0..50).map(|k| (r * 13 + k * 101) % n as u32).collect()).collect();
        let r = no_grad(|| catalog_rank(&[(&h, &e)], &t, 2.0, Some(&mask))).unwrap();
        assert_eq!(r.len(), b);
    });
    eprintln!("peak extra bytes of the fused ranking: {ranked}");
    assert!(ranked <= bound, "fused ranking used {ranked} bytes, more than {bound}");
    pool::set_enabled(was);
}

/// What one training step reached the allocator for: (pool misses, allocations >= LARGE bytes).
fn step_allocations(step: &mut dyn FnMut(), trace: bool) -> (u64, usize) {
    pool::reset_stats();
    let large = LARGE_COUNT.load(Relaxed);
    TRACING.store(trace && std::env::var_os("MSM4SR_TRACE_ALLOC").is_some(), Relaxed);
    step();
    TRACING.store(false, Relaxed);
    (pool::stats().misses, LARGE_COUNT.load(Relaxed) - large)
}

/// A small synthetic dataset (written under a temporary directory named by `tag`).
fn small_dataset(tag: &str) -> Dataset {
    let dir = std::env::temp_dir().join(format!("msm4sr-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let scfg = SynthConfig { users: 120, items: 300, topics: 6, min_len: 5, max_len: 12, seed: 3, ..SynthConfig::default() };
    synth::write(&dir, &scfg).unwrap();
    Dataset::load(&dir, &LoadOptions::default()).unwrap()
}

/// A small model of `kind` (seed 1), its Adam, and two training batches of different lengths (a
/// steady state alternates them: not one repeated shape).
fn small_training(ds: &Dataset, kind: ModelKind) -> (Model, Adam, Vec<Batch>) {
    let mut cfg = RunConfig::default();
    cfg.model.model = kind;
    cfg.model.hidden = 32;
    cfg.model.inner = 64;
    cfg.model.experts = 3;
    cfg.model.max_len = 12;
    let split = ds.split(cfg.model.max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, Device::Cpu).unwrap();
    let params: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t).collect();
    let opt = Adam::new(params, AdamConfig { weight_decay: 0.01, ..AdamConfig::default() }).unwrap();
    let batches: Vec<Batch> = (0..2)
        .map(|k| {
            let samples: Vec<&Sample> = split.train[k * 64..(k + 1) * 64].iter().collect();
            make_batch(&samples)
        })
        .collect();
    (model, opt, batches)
}

/// The training loss of one batch: pre-training's (mixup 0.4) or fine-tuning's.
fn stage_loss(model: &Model, batch: &Batch, pretrain: bool, rng: &mut ChaCha8Rng, seeds: &mut Seeds) -> Tensor {
    if pretrain {
        model.pretrain_loss(batch, 0.4, rng, seeds).unwrap()
    } else {
        model.finetune_loss(batch, seeds).unwrap()
    }
}

const STAGES: [(ModelKind, bool); 3] = [(ModelKind::Sasrec, false), (ModelKind::Msm4sr, false), (ModelKind::Msm4sr, true)];

#[test]
fn steady_state_steps_allocate_no_tensor_storage() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ds = small_dataset("steady");
    for (kind, pretrain) in STAGES {
        let (model, mut opt, batches) = small_training(&ds, kind);
        let (mut rng, mut seeds) = (ChaCha8Rng::seed_from_u64(1), Seeds::new(5));
        let mut k = 0;
        let mut step = || {
            let batch = &batches[k % 2];
            k += 1;
            let loss = stage_loss(&model, batch, pretrain, &mut rng, &mut seeds);
            opt.step(&backward(&loss).unwrap()).unwrap();
            assert!(loss.item().unwrap().is_finite());
        };
        let name = format!("{kind:?}{}", if pretrain { " pre-training" } else { "" });
        let first = step_allocations(&mut step, false);
        for _ in 0..3 {
            step();
        }
        let steady: Vec<(u64, usize)> = (0..4).map(|_| step_allocations(&mut step, true)).collect();
        let was = pool::set_enabled(false);
        let unpooled = step_allocations(&mut step, false);
        pool::set_enabled(was);
        eprintln!("{name}: (pool misses, allocations >= {LARGE} B) first step {first:?}, steady {steady:?}, pool off {unpooled:?}");
        assert!(first.0 > 0, "{name}: the first step took nothing new from the allocator: the count cannot fail");
        assert!(unpooled.1 > 0, "{name}: with the pool off no large allocation was seen: the count cannot fail");
        for (i, &(misses, large)) in steady.iter().enumerate() {
            assert_eq!(misses, 0, "{name}: steady-state step {i} missed the storage pool {misses} times");
            assert_eq!(large, 0, "{name}: steady-state step {i} made {large} allocations of {LARGE} bytes or more");
        }
    }
}

/// No CPU op reads an element of an output it did not write: storage from `pool::stale` (outputs
/// written whole, handed out without zeroing) poisoned with NaN bits gives the same losses and
/// gradients, bit for bit, over four steps of SASRec, MSM4SR fine-tuning and pre-training
/// (alternating batch shapes, so pooled vectors of other tensors are reused). A read of a stale
/// element would give other bits (NaN, or a value that depends on the pool's history).
#[test]
fn poisoned_stale_storage_changes_no_training_step() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ds = small_dataset("poison");
    let bits = |t: &Tensor| t.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    for (kind, pretrain) in STAGES {
        let run = |poison: bool| {
            let was = pool::set_poison(poison);
            let (model, mut opt, batches) = small_training(&ds, kind);
            let (mut rng, mut seeds) = (ChaCha8Rng::seed_from_u64(1), Seeds::new(5));
            let params: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t).collect();
            let mut out = Vec::new();
            for k in 0..4 {
                let batch = &batches[k % 2];
                let loss = stage_loss(&model, batch, pretrain, &mut rng, &mut seeds);
                let grads = backward(&loss).unwrap();
                out.push(bits(&loss));
                out.extend(params.iter().filter_map(|p| grads.get(p)).map(bits));
                opt.step(&grads).unwrap();
            }
            pool::set_poison(was);
            out
        };
        let (plain, poisoned) = (run(false), run(true));
        assert!(plain.len() > 4, "{kind:?}: no gradients compared");
        assert!(plain == poisoned, "{kind:?} (pre-training {pretrain}): poisoned stale storage changed a loss or gradient");
    }
}
