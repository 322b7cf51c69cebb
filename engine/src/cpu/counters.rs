//! Time and floating-point operations of the f32 matrix products (read through `engine::stats`),
//! and whether this thread is inside one.

use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds and floating-point operations spent in the f32 CPU backend's matrix products since the
/// process started (for reporting how GEMM-bound a run is).
pub fn gemm_counters() -> (f64, f64) {
    (GEMM_NS.load(Ordering::Relaxed) as f64 * 1e-9, GEMM_FLOP.load(Ordering::Relaxed) as f64)
}

static GEMM_NS: AtomicU64 = AtomicU64::new(0);
static GEMM_FLOP: AtomicU64 = AtomicU64::new(0);

thread_local!(static IN_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// Whether this thread is inside a CPU matrix product. The GEMM crate allocates its packing
/// buffers itself, once per call: the one allocation a steady-state CPU step still makes, which
/// the allocation test tells apart from tensor storage with this.
pub fn in_gemm() -> bool {
    IN_GEMM.with(|g| g.get())
}

pub(crate) struct InGemm;

impl InGemm {
    pub(crate) fn enter() -> InGemm {
        IN_GEMM.with(|g| g.set(true));
        InGemm
    }
}

impl Drop for InGemm {
    fn drop(&mut self) {
        IN_GEMM.with(|g| g.set(false));
    }
}

/// Add one product of `flop` operations that started at `t0` to the counters.
pub(crate) fn count_gemm(flop: usize, t0: std::time::Instant) {
    GEMM_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    GEMM_FLOP.fetch_add(flop as u64, Ordering::Relaxed);
}
