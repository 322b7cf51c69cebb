//! Memory bounds, measured with a counting allocator (this binary holds one test so that nothing
//! else allocates while it measures).
//!
//! The fused full-catalog loss keeps O(B * BLOCK + I * D) extra memory through forward and
//! backward, never the (B, I) score matrix; the materialised cross-entropy, measured the same way,
//! is shown to exceed the bound (so the check can fail).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use msm4sr::engine::ops::catalog::BLOCK;
use msm4sr::engine::ops::{catalog_ce, cross_entropy, matmul, mean};
use msm4sr::engine::{backward, Device, Indices, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Counting;
static CUR: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            PEAK.fetch_max(CUR.fetch_add(l.size(), Relaxed) + l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CUR.fetch_sub(l.size(), Relaxed);
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
    std::env::set_var("RAYON_NUM_THREADS", "1");
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
}
