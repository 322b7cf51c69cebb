//! Data parallelism for the CPU backend (rayon's global pool, one thread per core by default;
//! `RAYON_NUM_THREADS` overrides it). The program's main thread is one of its workers
//! (`engine::startup`), so a region it starts costs no sleep and wake-up of its own.
//!
//! Work is only ever split along independent outputs: rows, element ranges or column blocks. Each
//! output value is computed by one thread, with the same operations in the same order as a plain
//! sequential loop, so results are bit-identical for any number of threads. Small problems stay on
//! the calling thread, where starting a parallel region would cost more than it saves.
//!
//! The helpers take their outputs from the storage pool (`engine::pool`) and hand each task its own
//! rows, zeroed by that task just before use: no serial pass over a large buffer precedes the
//! parallel work, and the zeroing happens while the rows are about to be written anyway (in cache).
//! With `Start::Stale` they skip the zeroing, for work that writes every element of its rows: the
//! rows hold stale values of the pool's earlier vectors (`pool::stale`), never read.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::cpu::pool;

/// Elements of work below which an op runs on the calling thread.
pub(crate) const MIN_PAR: usize = 1 << 15;
/// Elements of work per parallel task, at least.
const GRAIN: usize = 1 << 13;
/// Elements per task for cheap elementwise maps.
const ELEM_CHUNK: usize = 1 << 14;

/// At most this many threads for the CPU kernels' parallel work (0: no limit); [`with_threads`].
static LIMIT: AtomicUsize = AtomicUsize::new(0);

/// Threads the CPU kernels split their work over: the pool's (one per core it may run on), or
/// fewer inside [`with_threads`].
pub fn threads() -> usize {
    if TASK.with(|t| t.get().is_some()) {
        return 1;
    }
    match LIMIT.load(Ordering::Relaxed) {
        0 => rayon::current_num_threads(),
        n => n.min(rayon::current_num_threads()),
    }
}

thread_local!(static TASK: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) });

/// `f(t)` for each t < n, one task per thread of the pool (task 0 on the calling thread), for work
/// the caller splits itself (each task a run of rows that it carries through several kernels,
/// which stay in its core's cache). The kernels a task calls run on its thread alone ([`threads`]
/// is 1 there).
pub(crate) fn tasks(n: usize, f: impl Fn(usize) + Sync + Send) {
    let run = |t: usize| {
        let outer = TASK.with(|c| c.replace(Some(t)));
        f(t);
        TASK.with(|c| c.set(outer));
    };
    match n {
        0 | 1 => (0..n).for_each(run),
        _ => (0..n).into_par_iter().with_max_len(1).for_each(run),
    }
}

/// Whether this thread's kernels count their time: not on tasks of [`tasks`] other than the
/// first, which run at the same time as it (a product's FLOPs always count).
pub(crate) fn counts_time() -> bool {
    TASK.with(|t| t.get().is_none_or(|t| t == 0))
}

/// `f()` with the CPU kernels' work split over at most `n` threads (1: all of it on the calling
/// thread, the pool's other threads idle), e.g. to time one core against all of them in one
/// process, moments apart. The results are the same bits for any `n` (see the module's notes).
/// Process-wide: for the thread that runs the kernels (the program's main thread).
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    /// Puts the earlier limit back when `f` returns or unwinds.
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.store(self.0, Ordering::Relaxed);
        }
    }
    let _restore = Restore(LIMIT.swap(n.max(1), Ordering::Relaxed));
    f()
}

/// While the returned guard lives, the pool's other threads stay awake between parallel regions:
/// each runs a loop that takes the pool's pending work the moment it appears (rayon's
/// `yield_now`) instead of going to sleep when it finds none. A sleeping thread is woken by the
/// next region, and on a virtual machine that wake-up has measured 50-90 µs: a region of two 50 µs
/// tasks took 90-120 µs after the main thread had worked alone for 20 µs or more (the second task
/// ran after the first, on the main thread, before the woken thread got to it), 54 µs with the
/// threads kept awake. A training step starts hundreds of regions of tens to hundreds of µs. The
/// cost: the other cores spin while the guard lives (as OpenMP's threads spin between regions by
/// default). No effect with one thread, inside another guard, or with `MSM4SR_SPIN=0`; inside
/// [`with_threads`]`(1, ..)` the loops nap instead of spinning. Call from the program's main thread,
/// outside parallel work. Results are the same bits with or without it (it only changes which
/// thread runs a task and when).
pub fn keep_awake() -> Awake {
    let others = rayon::current_num_threads().saturating_sub(1);
    let off = std::env::var("MSM4SR_SPIN").is_ok_and(|v| v == "0");
    if others == 0 || off || AWAKE.swap(true, Ordering::SeqCst) {
        return Awake { state: None };
    }
    let state = std::sync::Arc::new(Loops::default());
    for _ in 0..others {
        let st = state.clone();
        rayon::spawn(move || {
            let Loops { stop, started, ended } = &*st;
            started.fetch_add(1, Ordering::SeqCst);
            // Every loop on a thread of its own before any takes work (a loop that took another's
            // job would run it nested, and leave a thread asleep).
            while started.load(Ordering::SeqCst) < others && !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            while !stop.load(Ordering::Relaxed) {
                if LIMIT.load(Ordering::Relaxed) == 1 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                } else if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
            ended.fetch_add(1, Ordering::SeqCst);
        });
    }
    // The loops' jobs sit in this thread's queue until the other threads take them: wait without
    // taking work (this thread must never run one of them).
    while state.started.load(Ordering::SeqCst) < others {
        std::hint::spin_loop();
    }
    Awake { state: Some(state) }
}

/// Whether a [`keep_awake`] guard is live.
static AWAKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a [`keep_awake`] guard shares with its loops.
#[derive(Default)]
struct Loops {
    stop: std::sync::atomic::AtomicBool,
    started: AtomicUsize,
    ended: AtomicUsize,
}

/// The guard of [`keep_awake`]: dropping it stops the loops and waits until they have ended.
pub struct Awake {
    /// None for a guard that started nothing.
    state: Option<std::sync::Arc<Loops>>,
}

impl Drop for Awake {
    fn drop(&mut self) {
        if let Some(st) = self.state.take() {
            st.stop.store(true, Ordering::SeqCst);
            while st.ended.load(Ordering::SeqCst) < st.started.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            AWAKE.store(false, Ordering::SeqCst);
        }
    }
}

/// Whether `work` elements of work are worth spreading over the pool.
pub(crate) fn worth(work: usize) -> bool {
    work >= MIN_PAR && threads() > 1
}

/// Rows per task for rows costing `work_per_row` elements each.
fn min_rows(work_per_row: usize) -> usize {
    (GRAIN / work_per_row.max(1)).max(1)
}

/// A chunk length for elementwise work over rows of `unit` elements: a multiple of `unit` near
/// `ELEM_CHUNK`.
pub(crate) fn elem_chunk(unit: usize) -> usize {
    let unit = unit.max(1);
    (ELEM_CHUNK / unit).max(1) * unit
}

/// How a builder's output starts: `Zeroed`, each task zeroing its rows just before it fills them
/// (for work that adds into them), or `Stale`, pooled vectors' earlier values handed out as they
/// are (`pool::stale`; no pass over the memory first), for work that writes every element.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Start {
    Zeroed,
    Stale,
}
pub(crate) use Start::{Stale, Zeroed};

/// An output vector under construction: tasks take disjoint ranges of its storage (not yet
/// initialized for `Zeroed`, which zeroes each range as it hands it out; stale values for
/// `Stale`); `finish` then gives the vector its full length.
struct Fresh<'a, T> {
    ptr: *mut T,
    len: usize,
    start: Start,
    _buf: PhantomData<&'a mut Vec<T>>,
}

// SAFETY: tasks only ever touch disjoint ranges (see `range`), so sharing the pointer between
// threads is sound for element types that may be sent between threads.
unsafe impl<T: Send> Send for Fresh<'_, T> {}
unsafe impl<T: Send> Sync for Fresh<'_, T> {}

/// The storage of a `len`-element output starting as `start` says.
fn storage<T: Copy + Default + 'static>(len: usize, start: Start) -> Vec<T> {
    match start {
        Zeroed => pool::take(len),
        Stale => pool::stale(len),
    }
}

impl<'a, T> Fresh<'a, T> {
    /// Over `buf` from [`storage`]`(len, start)`.
    fn new(buf: &'a mut Vec<T>, len: usize, start: Start) -> Self {
        match start {
            // A no-op for vectors from `pool::take(len)`.
            Zeroed => buf.reserve_exact(len),
            Stale => assert_eq!(buf.len(), len),
        }
        Fresh { ptr: buf.as_mut_ptr(), len, start, _buf: PhantomData }
    }
}

impl<T: Copy + Default> Fresh<'_, T> {
    /// Elements [start, start + n), set to zero (`T::default()`) for `Zeroed`.
    ///
    /// SAFETY: the range must lie within `len`, and no two calls may take overlapping ranges.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, n: usize) -> &mut [T] {
        debug_assert!(start + n <= self.len);
        let p = self.ptr.add(start);
        if self.start == Zeroed {
            for i in 0..n {
                p.add(i).write(T::default());
            }
        }
        std::slice::from_raw_parts_mut(p, n)
    }
}

/// Give `buf` its length once every element has been written (no change for `Stale`).
///
/// SAFETY: every element of [0, len) must have been initialized through `Fresh::range`.
unsafe fn finish<T>(buf: &mut Vec<T>, len: usize) {
    buf.set_len(len);
}

/// `f(i)` for i < n, on the pool when `par` (at least `min_len` consecutive i per task).
fn drive(n: usize, par: bool, min_len: usize, f: impl Fn(usize) + Sync + Send) {
    if par && n > 1 {
        (0..n).into_par_iter().with_min_len(min_len).for_each(f);
    } else {
        (0..n).for_each(f);
    }
}

/// A vector of `len` elements built by `f(start, piece)` over consecutive pieces of `chunk`
/// elements (the last may be shorter), each starting as `start` says (with `Stale`, `f` writes
/// every element); pieces in parallel when `par`.
pub(crate) fn chunks<T: Copy + Default + Send + 'static>(
    start: Start,
    len: usize,
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    chunks2_with::<T, u8>(start, len, chunk, par, |s, a, _| f(s, a), false).0
}

/// As [`chunks`], building two vectors of the same length piece by piece together.
pub(crate) fn chunks2<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static>(
    start: Start,
    len: usize,
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) -> (Vec<A>, Vec<B>) {
    chunks2_with(start, len, chunk, par, f, true)
}

/// [`chunks2`], or with `two` false [`chunks`] (the second vector empty).
fn chunks2_with<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static>(
    start: Start,
    len: usize,
    chunk: usize,
    par: bool,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
    two: bool,
) -> (Vec<A>, Vec<B>) {
    let (chunk, lb) = (chunk.max(1), if two { len } else { 0 });
    let (mut a, mut b) = (storage(len, start), storage(lb, start));
    {
        let (oa, ob) = (Fresh::new(&mut a, len, start), Fresh::new(&mut b, lb, start));
        drive(len.div_ceil(chunk), par, 1, |i| {
            let (s, n) = (i * chunk, chunk.min(len - i * chunk));
            let (sb, nb) = if two { (s, n) } else { (0, 0) };
            // SAFETY: piece i is [i * chunk, min(len, (i + 1) * chunk)), disjoint from the others.
            f(s, unsafe { oa.range(s, n) }, unsafe { ob.range(sb, nb) })
        });
    }
    // SAFETY: the pieces cover [0, len) of both.
    unsafe {
        finish(&mut a, len);
        finish(&mut b, lb);
    }
    (a, b)
}

/// An (n, la) matrix built row by row: `f(r, row_r)`, each row starting as `start` says (with
/// `Stale`, `f` writes every element). Each row costs about `work` elements of work; rows go to the
/// pool when there is enough of it.
pub(crate) fn rows<A: Copy + Default + Send + 'static>(
    start: Start,
    n: usize,
    work: usize,
    la: usize,
    f: impl Fn(usize, &mut [A]) + Sync + Send,
) -> Vec<A> {
    rows3::<A, u8, u8>(start, n, work, (la, 0, 0), |r, a, _, _| f(r, a)).0
}

/// As [`rows`] with two outputs of rows `la` and `lb` long, row r of each handed to `f` together.
pub(crate) fn rows2<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static>(
    start: Start,
    n: usize,
    work: usize,
    la: usize,
    lb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) -> (Vec<A>, Vec<B>) {
    let (a, b, _) = rows3::<A, B, u8>(start, n, work, (la, lb, 0), |r, a, b, _| f(r, a, b));
    (a, b)
}

/// An (n, la), (n, lb) and (n, lc) matrix built row by row: `f(r, row_r of each)`, each row
/// starting as `start` says (a zero length gives an empty output at no cost). Each row costs about
/// `work` elements of work; rows go to the pool when there is enough of it.
#[allow(clippy::type_complexity)]
pub(crate) fn rows3<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static, C: Copy + Default + Send + 'static>(
    start: Start,
    n: usize,
    work: usize,
    lens: (usize, usize, usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync + Send,
) -> (Vec<A>, Vec<B>, Vec<C>) {
    row_groups3(start, n, 1, work, lens, f)
}

/// As [`rows2`], the rows handed out `g` at a time: `f(r0, rows r0.. of A, the same rows of B)`
/// for r0 = 0, g, 2g, ... (the last group may be shorter), for kernels that work on several rows
/// side by side.
pub(crate) fn row_groups2<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static>(
    start: Start,
    n: usize,
    g: usize,
    work: usize,
    (la, lb): (usize, usize),
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync + Send,
) -> (Vec<A>, Vec<B>) {
    let ((a, b, _), _) = groups3_beside::<A, B, u8, ()>(start, n, g, work, (la, lb, 0), |r, a, b, _| f(r, a, b), None::<fn()>);
    (a, b)
}

/// As [`rows3`], the rows handed out `g` at a time (see [`row_groups2`]).
#[allow(clippy::type_complexity)]
pub(crate) fn row_groups3<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static, C: Copy + Default + Send + 'static>(
    start: Start,
    n: usize,
    g: usize,
    work: usize,
    lens: (usize, usize, usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync + Send,
) -> (Vec<A>, Vec<B>, Vec<C>) {
    groups3_beside(start, n, g, work, lens, f, None::<fn()>).0
}

/// As [`row_groups2`] with one output, with `side()` run beside the rows: on this thread while the
/// pool's other threads take the rows (this thread joining them when it is done), or before them
/// when the rows stay on this thread. For a serial piece of work (e.g. a narrow column reduction)
/// that the rows of an independent output can fill the other threads around. The output is taken
/// from this thread's storage pool before either starts (as is whatever `side` takes: it runs on
/// this thread).
pub(crate) fn row_groups_beside<A: Copy + Default + Send + 'static, R: Send>(
    start: Start,
    n: usize,
    g: usize,
    work: usize,
    la: usize,
    f: impl Fn(usize, &mut [A]) + Sync + Send,
    side: impl FnOnce() -> R + Send,
) -> (Vec<A>, R) {
    let ((a, _, _), r) = groups3_beside::<A, u8, u8, R>(start, n, g, work, (la, 0, 0), |r, a, _, _| f(r, a), Some(side));
    (a, r.expect("the side task ran"))
}

/// The row builders' one body: three outputs, their rows handed out `g` at a time (`f(r0, rows
/// r0 .. r0 + g of each)`), with `side` (when given) as in [`row_groups_beside`]; without one, no
/// join.
#[allow(clippy::type_complexity)]
fn groups3_beside<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static, C: Copy + Default + Send + 'static, R: Send>(
    start: Start,
    n: usize,
    g: usize,
    work: usize,
    (la, lb, lc): (usize, usize, usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync + Send,
    side: Option<impl FnOnce() -> R + Send>,
) -> ((Vec<A>, Vec<B>, Vec<C>), Option<R>) {
    let (mut a, mut b, mut c) = (storage(n * la, start), storage(n * lb, start), storage(n * lc, start));
    let side_out;
    {
        let (oa, ob, oc) = (Fresh::new(&mut a, n * la, start), Fresh::new(&mut b, n * lb, start), Fresh::new(&mut c, n * lc, start));
        let par = worth(n * work);
        let g = g.max(1);
        let fill = || {
            drive(n.div_ceil(g), par, min_rows(work * g), |q| {
                let (r, nr) = (q * g, g.min(n - q * g));
                // SAFETY: rows [r, r + nr) of each output are [r * l, (r + nr) * l); groups are disjoint.
                f(r, unsafe { oa.range(r * la, nr * la) }, unsafe { ob.range(r * lb, nr * lb) }, unsafe { oc.range(r * lc, nr * lc) })
            })
        };
        side_out = match side {
            // rayon::join runs its first closure on this thread; the second waits to be taken.
            Some(side) if par => Some(rayon::join(side, fill).0),
            Some(side) => Some((side(), fill()).0),
            None => {
                fill();
                None
            }
        };
    }
    // SAFETY: the rows cover all three outputs.
    unsafe {
        finish(&mut a, n * la);
        finish(&mut b, n * lb);
        finish(&mut c, n * lc);
    }
    ((a, b, c), side_out)
}

/// As [`rows3`] for rows of different lengths: row r of output A is `oa[r] .. oa[r + 1]` (and so for
/// B and C), `oa`, `ob`, `oc` being n + 1 ascending offsets (an empty slice gives an empty output).
/// Each row costs about `work` elements of work on average.
#[allow(clippy::type_complexity)]
pub(crate) fn segs3<A: Copy + Default + Send + 'static, B: Copy + Default + Send + 'static, C: Copy + Default + Send + 'static>(
    n: usize,
    work: usize,
    (oa, ob, oc): (&[usize], &[usize], &[usize]),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync + Send,
) -> (Vec<A>, Vec<B>, Vec<C>) {
    let end = |o: &[usize]| o.last().copied().unwrap_or(0);
    let seg = |o: &[usize], r: usize| if o.is_empty() { (0, 0) } else { (o[r], o[r + 1] - o[r]) };
    let (la, lb, lc) = (end(oa), end(ob), end(oc));
    let (mut a, mut b, mut c) = (storage(la, Zeroed), storage(lb, Zeroed), storage(lc, Zeroed));
    {
        let (fa, fb, fc) = (Fresh::new(&mut a, la, Zeroed), Fresh::new(&mut b, lb, Zeroed), Fresh::new(&mut c, lc, Zeroed));
        drive(n, worth(n * work), min_rows(work), |r| {
            let ((sa, na), (sb, nb), (sc, nc)) = (seg(oa, r), seg(ob, r), seg(oc, r));
            // SAFETY: the offsets ascend, so the rows' ranges are disjoint.
            f(r, unsafe { fa.range(sa, na) }, unsafe { fb.range(sb, nb) }, unsafe { fc.range(sc, nc) })
        });
    }
    // SAFETY: the rows cover [0, end) of each output.
    unsafe {
        finish(&mut a, la);
        finish(&mut b, lb);
        finish(&mut c, lc);
    }
    (a, b, c)
}

/// The values of `pieces` one after the other, in a pooled vector (copied in parallel pieces when
/// long: one core's copy does not reach the memory's bandwidth).
pub(crate) fn concat<T: Copy + Default + Send + Sync + 'static>(pieces: &[&[T]]) -> Vec<T> {
    let len = pieces.iter().map(|p| p.len()).sum();
    chunks(Stale, len, ELEM_CHUNK, worth(len), |start, out| {
        // The pieces' parts that fall in [start, start + out.len()), in order.
        let (mut at, mut done) = (0, 0);
        for p in pieces {
            let (lo, hi) = ((start + done).max(at), (start + out.len()).min(at + p.len()));
            if lo < hi {
                out[done..done + hi - lo].copy_from_slice(&p[lo - at..hi - at]);
                done += hi - lo;
            }
            at += p.len();
        }
    })
}

/// `f` on every element of `x` in place, in parallel pieces when long.
pub(crate) fn chunks_apply<T: Send>(x: &mut [T], f: impl Fn(&mut T) + Sync + Send) {
    if worth(x.len()) {
        x.par_chunks_mut(ELEM_CHUNK).for_each(|c| c.iter_mut().for_each(&f));
    } else {
        x.iter_mut().for_each(f);
    }
}

/// `f(piece of x, piece of y)` over consecutive pieces of two slices of the same length, x in
/// place, in parallel when long (each piece a plain loop over slices, so it vectorizes).
pub(crate) fn zip_apply<T: Send, U: Sync>(x: &mut [T], y: &[U], f: impl Fn(&mut [T], &[U]) + Sync + Send) {
    let y = &y[..x.len()];
    if worth(x.len()) {
        x.par_chunks_mut(ELEM_CHUNK).zip(y.par_chunks(ELEM_CHUNK)).for_each(|(x, y)| f(x, y));
    } else {
        f(x, y);
    }
}

/// `f(piece of x, piece of y)` over consecutive pieces of two slices of the same length, both in
/// place, in parallel when long; every piece starts at a multiple of `unit` (a row's length).
pub(crate) fn zip_apply_mut<T: Send, U: Send>(x: &mut [T], y: &mut [U], unit: usize, f: impl Fn(&mut [T], &mut [U]) + Sync + Send) {
    let y = &mut y[..x.len()];
    if worth(x.len()) {
        let chunk = elem_chunk(unit);
        x.par_chunks_mut(chunk).zip(y.par_chunks_mut(chunk)).for_each(|(x, y)| f(x, y));
    } else {
        f(x, y);
    }
}

/// One output written in disjoint pieces by parallel tasks (each task its own rows or blocks).
pub(crate) struct Shared<T>(*mut T);
// SAFETY: each task only touches the pieces it owns (the callers' contract for `piece`).
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}
impl<T> Shared<T> {
    pub(crate) fn of(v: &mut [T]) -> Self {
        Shared(v.as_mut_ptr())
    }
    /// Elements [start, start + n).
    ///
    /// SAFETY: within the vector `of` was given, and no two live pieces may overlap.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn piece(&self, start: usize, n: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), n)
    }
}

/// `f(r, row_r)` on each row of `w` elements of `x` in place, rows in parallel when long.
pub(crate) fn rows_apply<T: Send>(x: &mut [T], w: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let w = w.max(1);
    if worth(x.len()) {
        x.par_chunks_mut(w).with_min_len(min_rows(w)).enumerate().for_each(|(r, row)| f(r, row));
    } else {
        x.chunks_mut(w).enumerate().for_each(|(r, row)| f(r, row));
    }
}

/// `f(pos, piece, bo)` over the segments of `piece` (which starts at `start` of an output repeating
/// a row of `nb` elements) that stay within one row: `pos` is the segment's offset in the output,
/// `bo` its offset within the row.
pub(crate) fn segments<T>(start: usize, piece: &mut [T], nb: usize, mut f: impl FnMut(usize, &mut [T], usize)) {
    let mut off = 0;
    while off < piece.len() {
        let bo = (start + off) % nb;
        let len = (nb - bo).min(piece.len() - off);
        f(start + off, &mut piece[off..off + len], bo);
        off += len;
    }
}

/// Piece length for elementwise work over rows of `nb` elements: whole rows when rows are short.
pub(crate) fn bcast_chunk(nb: usize) -> usize {
    if nb <= elem_chunk(1) {
        elem_chunk(nb)
    } else {
        elem_chunk(1)
    }
}

/// Column sums of a weighted (rows, cols) matrix: sum over r of w_r * row_r, where `row(r)` gives
/// (w_r, row r: `cols` values). Blocks of columns go to the pool; within a block, [`WIDE`] columns
/// at a time (then two cache lines, then one) with their sums in registers (a task never writes an output line
/// another task's columns share while it runs), rows in increasing order from zero, so the bits do
/// not depend on the thread count. (w_r = 1 gives the plain sums' bits: acc + 1 * v = acc + v.)
pub(crate) fn col_sums<'a, T: crate::cpu::Real>(rows: usize, cols: usize, row: impl Fn(usize) -> (T, &'a [T]) + Sync + Send) -> Vec<T> {
    let block = col_block(rows, cols);
    chunks(Zeroed, cols, block, block < cols, |c0, o| {
        let mut c = 0;
        while c + WIDE <= o.len() {
            o[c..c + WIDE].copy_from_slice(&sum_cols::<T, WIDE>(rows, c0 + c, &row));
            c += WIDE;
        }
        while c + 2 * LINE <= o.len() {
            o[c..c + 2 * LINE].copy_from_slice(&sum_cols::<T, { 2 * LINE }>(rows, c0 + c, &row));
            c += 2 * LINE;
        }
        while c + LINE <= o.len() {
            o[c..c + LINE].copy_from_slice(&sum_cols::<T, LINE>(rows, c0 + c, &row));
            c += LINE;
        }
        for (j, o) in o[c..].iter_mut().enumerate() {
            *o = sum_cols::<T, 1>(rows, c0 + c + j, &row)[0];
        }
    })
}

/// The weighted sums of columns [c, c + N) over all rows (see [`col_sums`]), in N registers.
#[inline(always)]
fn sum_cols<'a, T: crate::cpu::Real, const N: usize>(rows: usize, c: usize, row: &impl Fn(usize) -> (T, &'a [T])) -> [T; N] {
    let mut acc = [T::zero(); N];
    for r in 0..rows {
        let (w, x) = row(r);
        let x: &[T; N] = x[c..c + N].try_into().unwrap();
        for j in 0..N {
            acc[j] += w * x[j];
        }
    }
    acc
}

/// Columns summed together in registers by [`col_sums`].
const WIDE: usize = 64;

/// Columns of f32 in a 64-byte cache line: the unit of the column reductions' blocks.
pub(crate) const LINE: usize = 16;

/// A column-block width for reducing `rows` rows of `cols` columns in parallel: each block is
/// summed over all rows by one task. `cols` when the work is small (one block, on this thread).
pub(crate) fn col_block(rows: usize, cols: usize) -> usize {
    let threads = threads();
    if !worth(rows * cols) || cols < 2 * WIDE {
        return cols.max(1);
    }
    // One block per thread, a whole number of `WIDE` column groups each: a narrower block sums
    // fewer columns side by side, and its chains of dependent adds (one per column, rows in
    // order) leave the core waiting (16 columns per task on two threads were slower than 64 on
    // one). Fewer than 2 WIDE groups: one block, on this thread.
    cols.div_ceil(threads).div_ceil(WIDE) * WIDE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `with_threads` limits the kernels' threads inside and puts the limit back after, also when
    /// `f` panics; a limit above the pool's size is the pool's size.
    #[test]
    fn with_threads_limits_and_restores() {
        let all = threads();
        with_threads(1, || {
            assert_eq!(threads(), 1);
            assert!(!worth(1 << 30));
            assert_eq!(col_block(1 << 20, 64), 64);
            with_threads(1000, || assert_eq!(threads(), rayon::current_num_threads()));
            assert_eq!(threads(), 1);
        });
        assert_eq!(threads(), all);
        assert!(std::panic::catch_unwind(|| with_threads(1, || panic!("inside"))).is_err());
        assert_eq!(threads(), all);
    }

    #[test]
    fn helpers_fill_every_element_in_order() {
        for n in [0, 1, 7, 100_000] {
            let v: Vec<u64> = chunks(Zeroed, n, 1000, true, |s, p| p.iter_mut().enumerate().for_each(|(i, x)| *x += (s + i) as u64));
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
            let (a, b): (Vec<u32>, Vec<u8>) = rows2(Zeroed, n, 1 << 20, 3, 0, |r, a, b| {
                assert!(a.iter().all(|&x| x == 0) && b.is_empty());
                a.iter_mut().for_each(|x| *x = r as u32);
            });
            assert_eq!(a.len(), 3 * n);
            assert!(a.chunks(3).enumerate().all(|(r, row)| row.iter().all(|&x| x == r as u32)));
            assert!(b.is_empty());
            // `Stale` hands out stale pooled elements: a vector of 7s given back first.
            pool::give(vec![7u32; n + 5]);
            let m: Vec<u32> = chunks(Stale, n, 1000, true, |s, p| p.iter_mut().enumerate().for_each(|(i, x)| *x = 3 * (s + i) as u32));
            assert!(m.len() == n && m.iter().enumerate().all(|(i, &x)| x == 3 * i as u32));
            let (f, g): (Vec<f32>, Vec<u32>) = chunks2(Stale, n, 999, true, |s, f, g| {
                f.iter_mut().zip(g.iter_mut()).enumerate().for_each(|(i, (f, g))| (*f, *g) = ((s + i) as f32, (s + i) as u32))
            });
            assert!(f.len() == n && f.iter().zip(&g).enumerate().all(|(i, (&f, &g))| f == i as f32 && g == i as u32));
            // `row_groups_beside`: the rows filled (groups of g rows, the last one short), the
            // side's result returned, the side run once.
            for g in [1, 4] {
                let runs = AtomicUsize::new(0);
                let fill = |r0: usize, rows: &mut [u32]| {
                    assert!(r0 % g == 0 && rows.len() == 2 * g.min(n - r0));
                    rows.chunks_mut(2).enumerate().for_each(|(i, row)| row.fill((r0 + i) as u32))
                };
                let (r, side): (Vec<u32>, usize) =
                    row_groups_beside(Stale, n, g, 1 << 20, 2, fill, || runs.fetch_add(1, Ordering::Relaxed) + 40);
                assert!(r.len() == 2 * n && r.chunks(2).enumerate().all(|(i, row)| row == [i as u32; 2]));
                assert_eq!((side, runs.load(Ordering::Relaxed)), (40, 1));
                // `row_groups2`, `row_groups3`: every row of every output, once.
                let (a, b): (Vec<u32>, Vec<u8>) = row_groups2(Zeroed, n, g, 1 << 20, (3, 1), |r0, a, b| {
                    assert!(a.iter().all(|&x| x == 0) && a.len() == 3 * b.len());
                    a.chunks_mut(3).enumerate().for_each(|(i, row)| row.fill((r0 + i) as u32));
                    b.fill(1);
                });
                assert!(a.len() == 3 * n && a.chunks(3).enumerate().all(|(i, row)| row == [i as u32; 3]));
                assert!(b.len() == n && b.iter().all(|&x| x == 1));
                let (_, _, c): (Vec<u8>, Vec<u8>, Vec<u32>) = row_groups3(Stale, n, g, 1 << 20, (0, 0, 1), |r0, _, _, c| {
                    c.iter_mut().enumerate().for_each(|(i, x)| *x = (r0 + i) as u32)
                });
                assert!(c.len() == n && c.iter().enumerate().all(|(i, &x)| x == i as u32));
            }
        }
    }

    /// Under `keep_awake` (and a second, inert guard inside it) the helpers give the same values,
    /// also inside `with_threads(1, ..)`, and dropping the guard ends the loops it started.
    #[test]
    fn keep_awake_changes_no_result_and_ends() {
        let build = || {
            chunks(Zeroed, 300_000, 1000, true, |s, p: &mut [u64]| p.iter_mut().enumerate().for_each(|(i, x)| *x = ((s + i) * 7) as u64))
        };
        let want = build();
        for _ in 0..3 {
            let guard = keep_awake();
            let inner = keep_awake();
            assert!(inner.state.is_none(), "a guard inside a guard starts nothing");
            assert_eq!(build(), want);
            assert_eq!(with_threads(1, build), want);
            drop(inner);
            if let Some(st) = &guard.state {
                assert_eq!(st.started.load(Ordering::SeqCst), rayon::current_num_threads() - 1);
            }
            drop(guard);
            assert!(!AWAKE.load(Ordering::SeqCst));
        }
    }

    /// `concat` gives the pieces one after the other whatever their lengths and wherever the
    /// parallel copy's pieces cut them (empty pieces, pieces shorter and longer than one task's).
    #[test]
    fn concat_is_the_pieces_in_order() {
        let data: Vec<u32> = (0..200_000).collect();
        for lens in [&[][..], &[0], &[5], &[0, 3, 0, 7], &[ELEM_CHUNK - 1, 2, 3 * ELEM_CHUNK + 5, 0, 40_000], &[150_000, 50_000]] {
            let mut at = 0;
            let pieces: Vec<&[u32]> = lens
                .iter()
                .map(|&l| {
                    at += l;
                    &data[at - l..at]
                })
                .collect();
            let want: Vec<u32> = pieces.concat();
            for t in [1, 2] {
                assert_eq!(with_threads(t, || concat(&pieces)), want, "pieces {lens:?}, {t} threads");
            }
        }
    }
}
