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
/// (Its time only where [`super::par::counts_time`]: products running side by side in tasks
/// count their wall time once.)
pub(crate) fn count_gemm(flop: usize, t0: std::time::Instant) {
    if super::par::counts_time() {
        GEMM_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    GEMM_FLOP.fetch_add(flop as u64, Ordering::Relaxed);
}

/// Whether the CPU backend times each op (`profile_ops`).
static PROFILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Per op name: (calls, nanoseconds) of its CPU form since profiling was turned on.
static OP_TIMES: std::sync::Mutex<Vec<(&'static str, u64, u64)>> = std::sync::Mutex::new(Vec::new());

/// Turn the per-op timing of the CPU backend on or off (off by default: it costs a clock read and
/// a lock per op); turning it on clears what was counted before.
pub fn profile_ops(on: bool) {
    OP_TIMES.lock().unwrap_or_else(|e| e.into_inner()).clear();
    PROFILE.store(on, Ordering::Relaxed);
}

/// Whether `profile_ops` is on (read by the op dispatch before it takes the time).
pub(crate) fn profiling_ops() -> bool {
    PROFILE.load(Ordering::Relaxed)
}

/// Add one call of op `name` that started at `t0` (the whole CPU form: its products included).
pub(crate) fn count_op(name: &'static str, t0: std::time::Instant) {
    let ns = t0.elapsed().as_nanos() as u64;
    let mut t = OP_TIMES.lock().unwrap_or_else(|e| e.into_inner());
    match t.iter_mut().find(|e| e.0 == name) {
        Some(e) => (e.1, e.2) = (e.1 + 1, e.2 + ns),
        None => t.push((name, 1, ns)),
    }
}

/// (op name, calls, seconds) of every op the CPU backend ran since `profile_ops(true)`, the most
/// time first.
pub fn op_times() -> Vec<(&'static str, u64, f64)> {
    let mut v: Vec<(&'static str, u64, f64)> =
        OP_TIMES.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|&(n, c, ns)| (n, c, ns as f64 * 1e-9)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}
