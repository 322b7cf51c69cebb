//! The CPU backend's storage pool: host vectors of freed tensors are kept and handed to the next
//! op that needs one of their size, so a training step whose shapes were seen before allocates no
//! tensor storage at all (no page faults, no zeroing by the OS; the GPU has its own buffer pool).
//!
//! Vectors are grouped in size classes: a request for n elements is served from the class of the
//! smallest capacity c >= n among 16, then each power of two split in 8 steps (c - n < n / 8 + 16:
//! at most 12.5% of a buffer is slack). A freed vector goes to the largest class its capacity
//! covers. The pool is per thread (tensors never leave the thread that made them; the CPU ops'
//! worker threads write into buffers their caller took) and holds at most [`DEFAULT_LIMIT`] bytes (see [`set_limit`]); a
//! vector freed beyond that is returned to the allocator.
//!
//! Reuse changes no result: every op writes each element of its output (the helpers in `par`
//! zero what they hand out), exactly as with a fresh allocation.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

/// Default bound on the bytes the pool keeps (per thread).
pub const DEFAULT_LIMIT: usize = 4 << 30;
/// Vectors smaller than this many elements share one class.
const MIN_CLASS: usize = 16;

/// Counts since the last [`reset_stats`]: `misses` are takes the allocator had to serve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub takes: u64,
    pub misses: u64,
    /// Bytes held by the pool now.
    pub held_bytes: usize,
}

struct Free<T> {
    classes: HashMap<usize, Vec<Vec<T>>>,
}

impl<T> Free<T> {
    fn new() -> Self {
        Free { classes: HashMap::new() }
    }
}

struct Pool {
    f32: Free<f32>,
    f64: Free<f64>,
    u32: Free<u32>,
    stats: Stats,
    limit: usize,
    enabled: bool,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool {
        f32: Free::new(),
        f64: Free::new(),
        u32: Free::new(),
        stats: Stats::default(),
        limit: DEFAULT_LIMIT,
        enabled: true,
    });
}

/// The capacity of the class serving a request for `n` elements (>= n).
pub fn class_of(n: usize) -> usize {
    if n <= MIN_CLASS {
        return MIN_CLASS;
    }
    let e = usize::BITS - 1 - (n - 1).leading_zeros();
    let step = 1usize << (e - 3);
    n.div_ceil(step) * step
}

/// The largest class capacity <= `cap` (None below the smallest class).
fn class_below(cap: usize) -> Option<usize> {
    if cap < MIN_CLASS {
        return None;
    }
    let e = usize::BITS - 1 - cap.leading_zeros();
    let step = 1usize << (e.max(3) - 3);
    Some(cap / step * step)
}

/// The element types the pool keeps.
#[derive(Clone, Copy)]
enum Kind {
    F32,
    F64,
    U32,
}

/// Which pooled element type `T` is, if any (each one a type whose every bit pattern is a value).
fn kind<T: 'static>() -> Option<Kind> {
    let id = std::any::TypeId::of::<T>();
    [(std::any::TypeId::of::<f32>(), Kind::F32), (std::any::TypeId::of::<f64>(), Kind::F64), (std::any::TypeId::of::<u32>(), Kind::U32)]
        .into_iter()
        .find_map(|(t, k)| (t == id).then_some(k))
}

/// The free lists of element type `T`, when the pool keeps that type.
fn free_of<T: 'static>(p: &mut Pool) -> Option<&mut dyn Any> {
    Some(match kind::<T>()? {
        Kind::F32 => &mut p.f32,
        Kind::F64 => &mut p.f64,
        Kind::U32 => &mut p.u32,
    })
}

/// A vector with capacity for at least `n` elements: a pooled one, still holding the length and
/// elements it was given back with, or a new empty one.
fn get<T: 'static>(n: usize) -> Vec<T> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if !p.enabled || n == 0 {
            return Vec::with_capacity(n);
        }
        p.stats.takes += 1;
        let class = class_of(n);
        let got = free_of::<T>(&mut p)
            .and_then(|f| f.downcast_mut::<Free<T>>())
            .and_then(|f| f.classes.get_mut(&class))
            .and_then(|list| list.pop());
        match got {
            Some(v) => {
                p.stats.held_bytes -= v.capacity() * std::mem::size_of::<T>();
                v
            }
            None => {
                p.stats.misses += 1;
                Vec::with_capacity(class)
            }
        }
    })
}

/// An empty vector with capacity for at least `n` elements, from the pool when it has one.
pub fn take<T: 'static>(n: usize) -> Vec<T> {
    let mut v = get(n);
    v.clear();
    v
}

/// `n` elements of unspecified value (a pooled vector's earlier elements, zeros past them), for
/// outputs whose every element is written before it is read (a product's with beta 0): no pass
/// over the memory first. The pool keeps each vector's length, so these are initialized values.
///
/// Poisoned (`MSM4SR_POISON_STALE=1` in the environment, or [`set_poison`]) every element is set to
/// all-ones bits first (NaN for f32 and f64, u32::MAX): an op that reads an element it did not
/// write then shows up as NaN, or as other bits, in its results (test
/// `poisoned_stale_storage_changes_no_training_step`, and the whole suite run so).
pub fn stale<T: Copy + Default + 'static>(n: usize) -> Vec<T> {
    let mut v = get(n);
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, T::default());
    }
    if poison() && kind::<T>().is_some() {
        // SAFETY: T is a pooled type (f32, f64 or u32), for which every bit pattern is a value.
        unsafe { std::ptr::write_bytes(v.as_mut_ptr(), 0xff, n) };
    }
    v
}

static POISON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`stale`] poisons what it hands out: `MSM4SR_POISON_STALE=1` (read once) or [`set_poison`].
fn poison() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    POISON.load(std::sync::atomic::Ordering::Relaxed) || *ENV.get_or_init(|| std::env::var("MSM4SR_POISON_STALE").is_ok_and(|v| v == "1"))
}

/// Poison [`stale`]'s vectors (all threads) from now on, or stop; returns the previous setting.
/// For tests: a computation must give the same bits either way.
pub fn set_poison(on: bool) -> bool {
    POISON.swap(on, std::sync::atomic::Ordering::Relaxed)
}

/// `n` zeros of a pooled vector.
pub fn zeros<T: Copy + Default + 'static>(n: usize) -> Vec<T> {
    let mut v = take(n);
    v.resize(n, T::default());
    v
}

/// The items of `it` (`n` of them, or about) in a pooled vector.
pub fn collect<T: 'static>(n: usize, it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v = take(n);
    v.extend(it);
    v
}

/// Return `v`'s storage to the pool (or to the allocator past the limit, or for an unpooled type).
pub fn give<T: 'static>(mut v: Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    let Some(class) = class_below(v.capacity()) else { return };
    // During thread teardown the pool may already be gone: then the vector is simply freed.
    let _ = POOL.try_with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else { return };
        if !p.enabled || p.stats.held_bytes + bytes > p.limit {
            return;
        }
        let Some(free) = free_of::<T>(&mut p).and_then(|f| f.downcast_mut::<Free<T>>()) else { return };
        // The length is kept (its elements stay initialized values for `stale`); `take` clears it.
        free.classes.entry(class).or_default().push(std::mem::take(&mut v));
        p.stats.held_bytes += bytes;
    });
}

/// Counts since the last reset, and the bytes held now (this thread's pool).
pub fn stats() -> Stats {
    POOL.with(|p| p.borrow().stats)
}

/// Start counting takes and misses afresh.
pub fn reset_stats() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.stats.takes = 0;
        p.stats.misses = 0;
    })
}

/// Free everything the pool holds.
pub fn clear() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.f32.classes.clear();
        p.f64.classes.clear();
        p.u32.classes.clear();
        p.stats.held_bytes = 0;
    })
}

/// Bound the bytes the pool keeps (0 keeps nothing); returns the previous bound.
pub fn set_limit(bytes: usize) -> usize {
    POOL.with(|p| std::mem::replace(&mut p.borrow_mut().limit, bytes))
}

/// Turn pooling on or off for this thread (off: every take allocates, every give frees; the
/// pool is cleared). Returns the previous setting.
pub fn set_enabled(on: bool) -> bool {
    let was = POOL.with(|p| std::mem::replace(&mut p.borrow_mut().enabled, on));
    if !on {
        clear();
    }
    was
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_requests_with_little_slack() {
        for n in 1..5000usize {
            let c = class_of(n);
            assert!(c >= n && c - n <= n / 8 + MIN_CLASS, "{n} -> {c}");
            assert_eq!(class_below(c), Some(c), "{c} is a class");
            assert_eq!(class_of(c), c);
        }
        for cap in 16..5000usize {
            let c = class_below(cap).unwrap();
            assert!(c <= cap && class_of(c) == c, "{cap} -> {c}");
            assert!(class_of(cap) == cap || class_below(cap).unwrap() < cap);
        }
        assert_eq!(class_below(15), None);
    }

    #[test]
    fn freed_vectors_are_reused_and_counted() {
        clear();
        reset_stats();
        let v: Vec<f32> = zeros(1000);
        let ptr = v.as_ptr();
        give(v);
        let held = stats().held_bytes;
        assert!(held >= 4000);
        let w: Vec<f32> = take(990);
        assert_eq!(w.as_ptr(), ptr, "same class: the freed buffer comes back");
        assert!(w.is_empty() && w.capacity() >= 990);
        let s = stats();
        assert_eq!((s.takes, s.misses, s.held_bytes), (2, 1, held - w.capacity() * 4));
        // Another element type never gets it.
        give(w);
        let x: Vec<f64> = take(990);
        assert_eq!(stats().misses, 2);
        drop(x);
        let prev = set_limit(0);
        give(vec![0.0f32; 100]);
        assert_eq!(stats().held_bytes, held);
        set_limit(prev);
        clear();
        assert_eq!(stats().held_bytes, 0);
    }

    #[test]
    fn stale_vectors_keep_earlier_values_and_zero_past_them() {
        if poison() {
            // Poisoned: every element all-ones bits instead.
            let v: Vec<f32> = stale(1000);
            assert!(v.iter().all(|x| x.to_bits() == u32::MAX));
            return;
        }
        clear();
        give(collect(1000, (0..1000).map(|i| i as f32)));
        let v: Vec<f32> = stale(990);
        assert!(v.len() == 990 && v.iter().enumerate().all(|(i, &x)| x == i as f32));
        give(v);
        // Longer than what was given back: the rest is zeros; a fresh vector is all zeros.
        let w: Vec<f32> = stale(1000);
        assert!(w[..990].iter().enumerate().all(|(i, &x)| x == i as f32) && w[990..].iter().all(|&x| x == 0.0));
        let z: Vec<f32> = stale(3000);
        assert!(z.len() == 3000 && z.iter().all(|&x| x == 0.0));
        clear();
    }
}
