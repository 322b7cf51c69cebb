//! The element types of the CPU backend: f32 for training, f64 for the finite-difference reference,
//! each with its matrix product (the `gemm` crate's GEMM) and the few vectorized helpers
//! every CPU kernel shares ([`expf`], [`dot`], [`sum_exp`]).

use super::counters::{count_gemm, InGemm};

/// Host scalar types the CPU backend is generic over (f32 for training, f64 for finite differences).
pub trait Real: num_traits::Float + num_traits::NumAssign + Default + std::fmt::Debug + std::iter::Sum + Send + Sync + 'static {
    fn c(x: f64) -> Self;
    /// e^x for the hot loops of the CPU backend: f32 uses [`expf`] (branch-free, so loops over it
    /// vectorize), f64 the exact `exp` (the finite-difference reference).
    fn fexp(self) -> Self;
    /// Whether this type's products go into the GEMM counters (f32: the training step's).
    const COUNTED: bool;
    /// C (m x n) = A (m x k) * B (k x n) + beta * C (beta 0 or 1), with arbitrary row/column
    /// strides, split over rayon's pool (see [`split_gemm`]).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        beta: Self,
        c: &mut [Self],
        rsc: isize,
    ) {
        let t0 = std::time::Instant::now();
        if through_transpose(m, k, n, rsa, csa) {
            // C^T (n x m, row-major) = B^T A^T in a temporary: the crate then runs its register
            // tile along m instead of along C's few columns. Each element is the same chain of
            // multiply-adds over k, blocked the same way (test `split_products_match_...`).
            let mut ct = super::pool::stale::<Self>(n * m);
            if beta != Self::zero() {
                transpose(c, rsc as usize, &mut ct, m, (m, n));
            }
            // B^T: rows csb apart, columns rsb; A^T: rows csa apart, columns rsa.
            split_gemm((n, k, m), (b, csb, rsb), (a, csa, rsa), beta, &mut ct, m as isize);
            transpose(&ct, m, c, rsc as usize, (n, m));
            super::pool::give(ct);
        } else {
            split_gemm((m, k, n), (a, rsa, csa), (b, rsb, csb), beta, c, rsc);
        }
        if Self::COUNTED {
            count_gemm(2 * m * n * k, t0);
        }
    }
}

impl Real for f32 {
    const COUNTED: bool = true;
    fn c(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        expf(self)
    }
}

impl Real for f64 {
    const COUNTED: bool = false;
    fn c(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        self.exp()
    }
}

/// One call of the crate's GEMM on the calling thread: C (m x n, rows `rsc` apart, columns
/// adjacent) = A B + beta C, beta 0 (C is not read) or 1.
///
/// # Safety
/// The pointers and strides must address valid (m, k), (k, n) and (m, n) views.
#[allow(clippy::too_many_arguments)]
unsafe fn one_gemm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
) {
    // gemm's names: dst = alpha dst + beta lhs rhs, strides given column first.
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        rsc,
        beta != T::zero(),
        a,
        csa,
        rsa,
        b,
        csb,
        rsb,
        beta,
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Whether C (m x n, few columns) = A B with A a transposed view (a weight gradient x^T g with a
/// long k) goes through C^T = B^T A^T: the crate's register tile runs along C's columns, which for
/// C of 8 columns leaves it mostly empty (gate gradients (768, 4927) . (4927, 8): 27 GFLOP/s,
/// 73 through the transpose, one core). Only where the crate takes its general path either way
/// (C of more than 256 elements and not a single row or column; k long enough not to be its k <= 2
/// path), so the bits are the same.
fn through_transpose(m: usize, k: usize, n: usize, rsa: isize, csa: isize) -> bool {
    (2..=16).contains(&n) && m >= 4 * n && m * n >= GEMM_MIN_ELEMENTS && k >= 64 && rsa == 1 && csa != 1
}

/// dst (cols x rows, its rows `rsd` apart) = the transpose of src (rows x cols, its rows `rss`
/// apart).
fn transpose<T: Copy>(src: &[T], rss: usize, dst: &mut [T], rsd: usize, (rows, cols): (usize, usize)) {
    for (i, row) in src.chunks(rss).take(rows).enumerate() {
        for (j, &v) in row[..cols].iter().enumerate() {
            dst[j * rsd + i] = v;
        }
    }
}

/// Matrix products below this many multiply-adds run as one call on the calling thread.
const GEMM_MIN_PAR: usize = 1 << 18;
/// Pieces start at multiples of this many rows or columns (whole register tiles of the kernel).
const GEMM_ALIGN: usize = 32;
/// The crate's small-product path (C of at most 64 x 64) blocks k differently from its general
/// path, so a piece of a larger C must stay out of it: it spans more than 64 rows (or columns)
/// whenever C's other side is at most 64.
const GEMM_SMALL: usize = 64;
/// Products with fewer columns (or rows, when split by columns) are not split: the crate has
/// paths of their own for C of one row or column and for C of at most 256 elements.
const GEMM_MIN_OTHER: usize = 4;
const GEMM_MIN_ELEMENTS: usize = 257;

/// The size of each piece (all but the last a multiple of [`GEMM_ALIGN`]) when `len` rows (or
/// columns) of a C whose other side is `other` are split over up to `threads` threads, or none
/// when one call is better. Every piece takes the crate's path for the whole of C: the small path
/// when C is small (at most 64 x 64), else the general one; never its path for C of at most 256
/// elements.
fn gemm_piece(len: usize, other: usize, threads: usize) -> Option<usize> {
    if other < GEMM_MIN_OTHER {
        return None;
    }
    let small = len <= GEMM_SMALL && other <= GEMM_SMALL;
    let min = if small || other > GEMM_SMALL { GEMM_ALIGN } else { GEMM_SMALL + 1 };
    let min = min.max(GEMM_MIN_ELEMENTS.div_ceil(other));
    let mut parts = threads.min(len / min);
    while parts >= 2 {
        let piece = len.div_ceil(parts).div_ceil(GEMM_ALIGN) * GEMM_ALIGN;
        let last = len - (len.div_ceil(piece) - 1) * piece;
        if last >= min {
            return Some(piece);
        }
        parts -= 1;
    }
    None
}

/// Raw pointers handed to the pool's threads (each task writes its own block of C or its own
/// partial products).
struct Raw<T> {
    a: *const T,
    b: *const T,
    c: *mut T,
}
impl<T> Clone for Raw<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Raw<T> {}
// SAFETY: A and B are only read; each task writes memory no other task touches (see `split_gemm`).
unsafe impl<T> Send for Raw<T> {}
unsafe impl<T> Sync for Raw<T> {}

/// Products whose k is split (see [`k_block`]) have C of at most this many elements.
const KSPLIT_MAX_C: usize = 1 << 17;

/// The length of the k blocks the crate's kernel runs its chains of multiply-adds over in one call
/// for C (m x n): C of at most 64 x 64 takes its small path, blocks of 512 then the rest; larger C
/// its general path, ceil(k / 512) blocks of equal length (the last shorter). (gemm-common 0.19
/// takes the larger of 512 and a length from the L1 cache's size and ways, which is 512 or less on
/// x86-64's L1 caches of up to 64 KiB; where it is larger, the products split by k keep these
/// blocks, their own bits for every thread count.)
fn k_block(m: usize, n: usize, k: usize) -> usize {
    if m <= GEMM_SMALL && n <= GEMM_SMALL {
        k.min(512)
    } else {
        k.div_ceil(k.div_ceil(512))
    }
}

/// Whether the crate takes its general path for C (m x n) = A (m x k) B: C of more than 256
/// elements, neither a single row or column nor within 64 x 64, and k > 2.
fn general_path(m: usize, k: usize, n: usize) -> bool {
    m.min(n) >= 2 && m * n >= GEMM_MIN_ELEMENTS && (m > GEMM_SMALL || n > GEMM_SMALL) && k > 2
}

/// Whether C (m x n) and C' (m x n2) = A (m x k) B and B', for the same A, have every element
/// made as the same chain of multiply-adds (so that n's columns give their own product's bits
/// as part of n2's): both in the crate's general path, with the same k blocks.
pub(crate) fn same_chains(m: usize, k: usize, n: usize, n2: usize) -> bool {
    general_path(m, k, n) && general_path(m, k, n2) && k_block(m, n, k) == k_block(m, n2, k)
}

/// Whether C (m x n) += A (m x k) B (beta 1) adds to each element of C its whole chain of
/// multiply-adds over k from zero (one k block in the crate's general path), i.e. the bits of
/// computing A B alone and adding it to C.
pub(crate) fn adds_one_chain(m: usize, k: usize, n: usize) -> bool {
    general_path(m, k, n) && k <= k_block(m, n, k)
}

/// Whether C (m x n) = A B runs as one call per k block (see [`split_gemm`]): C small next to a k
/// of several blocks (a weight gradient x^T g over the tokens, the catalog's item gradient over the
/// batch), where splitting C's rows would have every thread read and pack the whole of B; not where
/// the last block would be one or two long. Decided by the shape alone, never by the thread count.
fn splits_k(m: usize, k: usize, n: usize) -> bool {
    let others = m.min(n) >= GEMM_MIN_OTHER && m * n >= GEMM_MIN_ELEMENTS;
    if !(others && m * n <= KSPLIT_MAX_C && k > 512 && k >= m.max(n)) {
        return false;
    }
    // A last block of one or two would take the crate's path for k <= 2 as a call of its own,
    // which adds its two products otherwise than its kernel's chain does.
    let kb = k_block(m, n, k);
    k - (k.div_ceil(kb) - 1) * kb > 2
}

/// The k block length of the chain a product C (m x n) = A (m x k) B runs as (see
/// [`split_gemm`]), where it runs as one (else the crate blocks k itself).
pub(crate) fn k_blocks(m: usize, k: usize, n: usize) -> Option<usize> {
    splits_k(m, k, n).then(|| k_block(m, n, k))
}

/// C (m x n, rows `rsc` apart) += each of `parts` (dense (m, n) partial products, one after the
/// other) in turn: every element gets its partials added in their order, C's rows in parallel when
/// there is enough of it.
pub(crate) fn add_partials<T: Real>(c: &mut [T], (m, n, rsc): (usize, usize, usize), parts: &[T]) {
    if m * n == 0 || parts.is_empty() {
        return;
    }
    let add = |i: usize, row: &mut [T]| {
        for p in parts.chunks(m * n) {
            row[..n].iter_mut().zip(&p[i * n..(i + 1) * n]).for_each(|(o, &v)| *o += v);
        }
    };
    let rows = &mut c[..(m - 1) * rsc + n];
    use rayon::prelude::*;
    match crate::cpu::par::worth(parts.len()) {
        true => rows.par_chunks_mut(rsc).with_min_len(64).enumerate().for_each(|(i, r)| add(i, r)),
        false => rows.chunks_mut(rsc).enumerate().for_each(|(i, r)| add(i, r)),
    }
}

/// C (m x n, rows `rsc` apart) = A B + beta C, beta 0 or 1, over rayon's pool, with the bits of
/// one call of the crate's GEMM on the whole of C on one thread (test
/// `split_products_match_one_call_bit_for_bit`). `a` and `b` come with the strides to their next
/// row and next column.
///
/// Two ways, chosen by the shape ([`splits_k`]):
/// - by k: C (small) is a chain C = beta C + P_1, C += P_2, ... of the products P_j over the k
///   blocks of [`k_block`], which is what the crate computes within one call (each block a chain
///   of multiply-adds from zero, added to C). The blocks are dealt out in runs of consecutive
///   blocks, one run per thread: the first run chains into C, each later block goes into a partial
///   product of its own, and those are added to C in block order after. (On two threads with an
///   odd number of blocks, the middle block's partial is made in two pieces of C, one per thread.)
/// - by C's rows (C at least as tall as it is wide) or columns, one block per thread: every
///   element of C is computed by one call with the same k blocking as one call over the whole of
///   C (the crate's blocking depends on k and on which of its paths the product takes, which
///   [`gemm_piece`] keeps the same for every piece; a partial register tile gives the same bits as
///   a full one).
fn split_gemm<T: Real>(
    (m, k, n): (usize, usize, usize),
    (a, rsa, csa): (&[T], isize, isize),
    (b, rsb, csb): (&[T], isize, isize),
    beta: T,
    c: &mut [T],
    rsc: isize,
) {
    let raw = Raw { a: a.as_ptr(), b: b.as_ptr(), c: c.as_mut_ptr() };
    // SAFETY (every call below): callers pass slices that cover every strided index of the (m, k),
    // (k, n) and (m, n) views; each task gets its own rows or columns of C, k blocks of A and B
    // (offsets inside those views), or its own partial products.
    let gemm = |(m, k, n): (usize, usize, usize), a: *const T, b: *const T, beta: T, c: *mut T, rsc: isize| {
        let _g = InGemm::enter();
        unsafe { one_gemm(m, k, n, a, rsa, csa, b, rsb, csb, beta, c, rsc) }
    };
    let threads = crate::cpu::par::threads();
    let parallel = m * n * k >= GEMM_MIN_PAR && threads > 1;
    // Pieces of C are rows when C is at least as tall as it is wide, else columns.
    let rows = m >= n;
    let (len, other) = if rows { (m, n) } else { (n, m) };
    // Rows (or columns) [start, start + w) of C, the product over k [k0, k0 + kw), into c (rows
    // `rsc` apart).
    let piece_of = |(start, w): (usize, usize), (k0, kw): (usize, usize), beta: T, c: *mut T, rsc: isize| {
        let raw = &raw;
        let (a, b) = (raw.a.wrapping_offset(k0 as isize * csa), raw.b.wrapping_offset(k0 as isize * rsb));
        match rows {
            true => gemm((w, kw, n), a.wrapping_offset(start as isize * rsa), b, beta, c.wrapping_offset(start as isize * rsc), rsc),
            false => gemm((m, kw, w), a, b.wrapping_offset(start as isize * csb), beta, c.wrapping_add(start), rsc),
        }
    };
    use rayon::prelude::*;
    if splits_k(m, k, n) {
        let kb = k_block(m, n, k);
        let blocks = k.div_ceil(kb);
        // Runs of `per` blocks: the first chains into C, the rest into partial products.
        let per = if parallel { blocks.div_ceil(threads.min(blocks)) } else { blocks };
        let chain = |raw: &Raw<T>, j0: usize, j1: usize, mut beta: T, c: *mut T, rsc: isize, each: usize| {
            for j in j0..j1 {
                let (k0, w) = (j * kb, kb.min(k - j * kb));
                let (a, b) = (raw.a.wrapping_offset(k0 as isize * csa), raw.b.wrapping_offset(k0 as isize * rsb));
                gemm((m, w, n), a, b, beta, c.wrapping_add((j - j0) * each), rsc);
                beta = if each == 0 { T::one() } else { T::zero() };
            }
        };
        if per == blocks {
            return chain(&raw, 0, blocks, beta, raw.c, rsc, 0);
        }
        // Two threads and an odd number of blocks (11 for 5,316 tokens): runs of whole blocks would
        // leave one thread a block longer than the other. Each thread takes the whole blocks on
        // its side of the middle one and half of C in that one, whose product goes into a partial
        // of its own in two pieces (each element the same chain: `gemm_piece`'s rule).
        let halves = if threads == 2 && blocks % 2 == 1 { gemm_piece(len, other, 2) } else { None };
        if let Some(piece) = halves {
            let h = blocks / 2;
            let mut parts = super::pool::stale::<T>((blocks - h) * m * n);
            let praw = Raw { c: parts.as_mut_ptr(), ..raw };
            let middle = (h * kb, kb.min(k - h * kb));
            (0..2).into_par_iter().for_each(|t| {
                let (raw, praw) = (&raw, &praw);
                match t {
                    0 => {
                        chain(raw, 0, h, beta, raw.c, rsc, 0);
                        piece_of((0, piece), middle, T::zero(), praw.c, n as isize);
                    }
                    _ => {
                        piece_of((piece, len - piece), middle, T::zero(), praw.c, n as isize);
                        chain(praw, h + 1, blocks, T::zero(), praw.c.wrapping_add(m * n), n as isize, m * n);
                    }
                }
            });
            add_partials(c, (m, n, rsc as usize), &parts);
            super::pool::give(parts);
            return;
        }
        let mut parts = super::pool::stale::<T>((blocks - per) * m * n);
        let praw = Raw { c: parts.as_mut_ptr(), ..raw };
        (0..blocks.div_ceil(per)).into_par_iter().for_each(|t| {
            let (raw, praw) = (&raw, &praw);
            let (j0, j1) = (t * per, ((t + 1) * per).min(blocks));
            match t {
                0 => chain(raw, j0, j1, beta, raw.c, rsc, 0),
                _ => chain(praw, j0, j1, T::zero(), praw.c.wrapping_add((j0 - per) * m * n), n as isize, m * n),
            }
        });
        add_partials(c, (m, n, rsc as usize), &parts);
        super::pool::give(parts);
        return;
    }
    let piece = if parallel { gemm_piece(len, other, threads) } else { None };
    let Some(piece) = piece else {
        return gemm((m, k, n), raw.a, raw.b, beta, raw.c, rsc);
    };
    (0..len.div_ceil(piece)).into_par_iter().for_each(|i| {
        let (raw, start) = (&raw, i * piece);
        piece_of((start, piece.min(len - start)), (0, k), beta, raw.c, rsc);
    });
}

/// e^x in f32 without branches or calls (Cephes' expf: x = k ln 2 + r with |r| <= ln 2 / 2, a
/// degree-6 polynomial for e^r, 2^k from the exponent bits), within 2 ulp of the exact value for
/// normal results; 0 below -87.33 (where e^x is subnormal), +inf above 88.72, NaN for NaN.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.336_55, 88.722_83);
    // Fused multiply-adds (one rounding each; exact everywhere, fast where the CPU has FMA).
    let kr = xc.mul_add(LOG2E, ROUND);
    let k = kr - ROUND;
    let r = (-k).mul_add(C2, (-k).mul_add(C1, xc));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = p.mul_add(r * r, r) + 1.0;
    // 2^k as two factors, so k = 128 (x just below the overflow bound) does not overflow.
    // k as an integer straight from kr's bits (1.5 * 2^23 + k, |k| <= 128, is exact in f32): no
    // float-to-int conversion, whose saturating form would keep the loop from vectorizing.
    let ki = kr.to_bits() as i32 - ROUND.to_bits() as i32;
    let pow2 = |j: i32| f32::from_bits(((j + 127) as u32) << 23);
    let y = e * pow2(ki >> 1) * pow2(ki - (ki >> 1));
    let y = if x < -87.336_55 { 0.0 } else { y };
    let y = if x > 88.722_83 { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// sum_i a_i b_i with 8 partial sums (combined in a fixed order), so the loop vectorizes; the
/// result depends only on the inputs, never on threads or alignment.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    // Long products keep their 8 sums in one register ([`combine8`]); for a few chunks (an
    // attention head's 32 values) the stores and loads that takes cost more than it saves.
    if a.len().min(b.len()) >= 64 {
        dot_with::<T, true>(a, b)
    } else {
        dot_with::<T, false>(a, b)
    }
}

/// Memory the next loop will read, asked for a cache line at a time ([`Ahead::one`], into the L2
/// cache) while this loop computes on rows already in cache. A loop that streams items (each a few
/// KB read from memory, then worked on in cache) otherwise leaves memory idle during the work and
/// stalls on the next item's first lines: attention pooling over 30 KB items ran at 8.6 GB/s one
/// core, 12-13 GB/s asking ahead (this core streams ~14 GB/s). A hint only: no result changes.
pub struct Ahead<'a, T> {
    rest: &'a [T],
}

impl<'a, T> Ahead<'a, T> {
    /// Ask for `s`, line by line.
    pub fn new(s: &'a [T]) -> Self {
        Ahead { rest: s }
    }
    /// Nothing to ask for.
    pub fn none() -> Self {
        Ahead { rest: &[] }
    }
    /// Ask for the next line (64 bytes) of what is left, if any.
    #[inline(always)]
    pub fn one(&mut self) {
        if let Some(first) = self.rest.first() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a prefetch is a hint: it reads nothing into the program and never faults.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                _mm_prefetch::<_MM_HINT_T1>(first as *const T as *const i8);
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = first;
            let step = (64 / std::mem::size_of::<T>().max(1)).min(self.rest.len());
            self.rest = &self.rest[step..];
        }
    }
}

/// `out[j] = dot(row j of x, w)` for the `out.len()` rows of `d` values of `x`: each the bits of
/// [`dot`], four rows side by side (four independent chains of adds instead of one, so reading the
/// rows is not held up by each add's latency). Meanwhile asks for a line of `ahead` every 8 columns
/// of each 4 rows (a line for every two read; [`Ahead::none`] for nothing).
pub fn dot_rows<T: Real>(x: &[T], d: usize, w: &[T], out: &mut [T], ahead: &mut Ahead<'_, T>) {
    let w = &w[..d];
    let (tail, done) = (d / 8 * 8, out.len() / 4 * 4);
    let mut quads = out.chunks_exact_mut(4);
    for (q, o) in (&mut quads).enumerate() {
        let r = &x[4 * q * d..(4 * q + 4) * d];
        let (r0, r1, r2, r3) = (&r[..d], &r[d..2 * d], &r[2 * d..3 * d], &r[3 * d..]);
        let mut acc = [[T::zero(); 8]; 4];
        for ((((wc, c0), c1), c2), c3) in
            w.chunks_exact(8).zip(r0.chunks_exact(8)).zip(r1.chunks_exact(8)).zip(r2.chunks_exact(8)).zip(r3.chunks_exact(8))
        {
            ahead.one();
            for l in 0..8 {
                acc[0][l] += c0[l] * wc[l];
                acc[1][l] += c1[l] * wc[l];
                acc[2][l] += c2[l] * wc[l];
                acc[3][l] += c3[l] * wc[l];
            }
        }
        let acc = acc.map(opaque8);
        for (k, (o, row)) in o.iter_mut().zip([r0, r1, r2, r3]).enumerate() {
            let mut t = combine8_plain(acc[k]);
            for (&a, &b) in row[tail..].iter().zip(&w[tail..]) {
                t += a * b;
            }
            *o = t;
        }
    }
    for (j, o) in quads.into_remainder().iter_mut().enumerate() {
        *o = dot(&x[(done + j) * d..(done + j + 1) * d], w);
    }
}

/// [`dot`], its partial sums combined by [`combine8`] (`BARRIER`) or [`combine8_plain`]: the same
/// operations either way.
#[inline(always)]
fn dot_with<T: Real, const BARRIER: bool>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    for (ac, bc) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut t = if BARRIER { combine8(acc) } else { combine8_plain(acc) };
    let tail = n / 8 * 8;
    for (&x, &y) in a[tail..].iter().zip(&b[tail..]) {
        t += x * y;
    }
    t
}

/// The 8 partial sums of [`dot`] and [`sum8_of`] combined in their fixed order. The sums pass
/// through [`opaque8`] first: otherwise the compiler, planning this combination ahead, keeps the
/// 8 lanes in the loop as shuffled pairs of 4-lane registers (the same adds, in the same order, but
/// 2.5x slower) instead of one 8-lane register.
#[inline(always)]
fn combine8<T: Real>(acc: [T; 8]) -> T {
    combine8_plain(opaque8(acc))
}

/// `acc` unchanged, but opaque to the optimizer (which so cannot plan the loop that made it around
/// what follows). In vector registers where the build has AVX: `std::hint::black_box` would store
/// the lanes to the stack and the combination load them back one or two at a time, each load
/// waiting for the store (a LayerNorm row's sums spent much of their time there).
#[inline(always)]
fn opaque8<T: Real>(acc: [T; 8]) -> [T; 8] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    {
        use std::arch::x86_64::{__m256, __m256d};
        use std::mem::{size_of, transmute_copy};
        // SAFETY: [T; 8] of f32 is the 32 bytes of one __m256, of f64 the 64 of two __m256d (both
        // plain values, any bits valid); the empty asm changes no register or memory.
        unsafe {
            if size_of::<T>() == 4 {
                let mut v: __m256 = transmute_copy(&acc);
                std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags));
                return transmute_copy(&v);
            }
            if size_of::<T>() == 8 {
                let [mut lo, mut hi]: [__m256d; 2] = transmute_copy(&acc);
                std::arch::asm!("/* {0} {1} */", inout(ymm_reg) lo, inout(ymm_reg) hi, options(pure, nomem, nostack, preserves_flags));
                return transmute_copy(&[lo, hi]);
            }
        }
    }
    std::hint::black_box(acc)
}

/// [`combine8`] without the barrier.
#[inline(always)]
fn combine8_plain<T: Real>(acc: [T; 8]) -> T {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `f()` compiled for AVX-512 (and run so) when the CPU has it (x86-64 with AVX-512 F/VL/BW/DQ),
/// else as built: for the elementwise loops (exp, the normal CDF) whose bodies
/// are inlined into `f`, twice the vector registers and 16 lanes. The same operations either way
/// (no fused multiply-add that the source does not ask for), so the same bits. Pass the closure
/// as `wide(#[inline(always)] || ..)`: `f` is called on both paths, and a closure the compiler
/// leaves out of line runs as built on the AVX-512 path too (the catalog's sum of exponentials
/// did: 1 ms of a SASRec step).
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        // (std caches the detection: these are loads of a cached word.)
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
            unsafe fn v4<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has every feature `v4` is compiled for.
            return unsafe { v4(f) };
        }
    }
    f()
}

/// sum_i f(x_i) in 8 partial sums (lane l sums i = l mod 8, in order from zero) combined in
/// `dot`'s fixed order, then the last x.len() % 8 terms in order: a loop that vectorizes, with a
/// result that depends only on the values, never on threads. (Written over chunks of 8 of a
/// slice: the same sums over an index closure compiled to scalar code.)
#[inline(always)]
pub fn sum8_of<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    let mut t = combine8(acc);
    for &v in rest {
        t += f(v);
    }
    t
}

/// Four sums at once over four rows of one length, each row given as two slices (a, b):
/// `[sum_j f(0, a0[j], b0[j]), .., sum_j f(3, a3[j], b3[j])]`, each with the bits of [`sum8_of2`]
/// (or [`sum8_of`]) over its row: 8 partial sums by j mod 8, combined by [`combine8`], then the
/// tail in order. Four independent chains of adds where one row's sum is a chain of len / 8 of
/// them: for short rows (LayerNorm's 64 values), whose sums otherwise mostly wait on the adds. A
/// sum over one slice passes it twice.
#[inline(always)]
pub fn sum8_rows4<T: Real>(a: [&[T]; 4], b: [&[T]; 4], f: impl Fn(usize, T, T) -> T) -> [T; 4] {
    let len = a[0].len();
    let mut acc = [[T::zero(); 8]; 4];
    let [a0, a1, a2, a3] = a.map(|r| r[..len].chunks_exact(8));
    let [b0, b1, b2, b3] = b.map(|r| r[..len].chunks_exact(8));
    for (((((((x0, y0), x1), y1), x2), y2), x3), y3) in a0.zip(b0).zip(a1).zip(b1).zip(a2).zip(b2).zip(a3).zip(b3) {
        for l in 0..8 {
            acc[0][l] += f(0, x0[l], y0[l]);
            acc[1][l] += f(1, x1[l], y1[l]);
            acc[2][l] += f(2, x2[l], y2[l]);
            acc[3][l] += f(3, x3[l], y3[l]);
        }
    }
    let acc = acc.map(opaque8);
    std::array::from_fn(|i| {
        let mut t = combine8_plain(acc[i]);
        for (&x, &y) in a[i][len / 8 * 8..len].iter().zip(&b[i][len / 8 * 8..len]) {
            t += f(i, x, y);
        }
        t
    })
}

/// sum_i f(a_i, b_i) over two slices of one length, as [`sum8_of`].
#[inline(always)]
pub fn sum8_of2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let b = &b[..a.len()];
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    let mut t = combine8(acc);
    for (&x, &y) in ra.iter().zip(rb) {
        t += f(x, y);
    }
    t
}

/// sum_i f(a_i, b_i, c_i) over three slices of one length, as [`sum8_of`].
#[inline(always)]
pub fn sum8_of3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let (b, c) = (&b[..a.len()], &c[..a.len()]);
    let mut acc = [T::zero(); 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l], z[l]);
        }
    }
    let mut t = combine8(acc);
    for ((&x, &y), &z) in ra.iter().zip(rb).zip(rc) {
        t += f(x, y, z);
    }
    t
}

/// sum_i e^(x_i - m): the exponentials computed in blocks of 256 (vectorized), each block summed
/// in [`sum8_of`]'s 8 partial sums, the blocks in order. (Inlined, so that inside [`wide`] it is
/// compiled for AVX-512 too.)
#[inline(always)]
pub fn sum_exp<T: Real>(x: &[T], m: T) -> T {
    let mut buf = [T::zero(); 256];
    let mut s = T::zero();
    for chunk in x.chunks(256) {
        let b = &mut buf[..chunk.len()];
        for (o, &v) in b.iter_mut().zip(chunk) {
            *o = (v - m).fexp();
        }
        s += sum8_of(b, |v| v);
    }
    s
}

/// The largest x_i (NaN ignored, as `f32::max` does; -inf for none) in 8 lanes, so it vectorizes.
pub fn max8<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().chain(rest).fold(T::neg_infinity(), |m, &v| m.max(v))
}

#[cfg(test)]
mod exp_tests {
    use super::{dot, dot_rows, expf, sum8_of, sum8_of2, sum8_rows4, wide};

    /// `dot_rows` gives each row the bits of `dot`, for row lengths with and without a tail of
    /// fewer than 8 and row counts that are and are not multiples of four.
    #[test]
    fn dot_rows_gives_the_bits_of_dot() {
        for (rows, d) in [(0, 8), (1, 768), (3, 13), (4, 32), (7, 770), (10, 768), (9, 5)] {
            let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919) % 1013) as f32 * 0.37e-2 - 1.7).collect();
            let w: Vec<f32> = (0..d).map(|i| ((i * 104_729) % 997) as f32 * -0.51e-2 + 2.3).collect();
            let mut out = vec![0f32; rows];
            dot_rows(&x, d, &w, &mut out, &mut super::Ahead::none());
            for (j, o) in out.iter().enumerate() {
                assert_eq!(o.to_bits(), dot(&x[j * d..(j + 1) * d], &w).to_bits(), "{rows} rows of {d}, row {j}");
            }
        }
    }

    /// `sum8_rows4` gives each row the bits of `sum8_of` (one slice) and `sum8_of2` (two), for
    /// row lengths with and without a tail of fewer than 8 (and shorter than one chunk).
    #[test]
    fn sum8_rows4_gives_the_bits_of_sum8_of() {
        for d in [5, 8, 13, 64, 768, 770] {
            let x: Vec<f32> = (0..4 * d).map(|i| ((i * 7919) % 1013) as f32 * 0.37e-2 - 1.7).collect();
            let y: Vec<f32> = (0..4 * d).map(|i| ((i * 104_729) % 997) as f32 * -0.51e-2 + 2.3).collect();
            let xs: [&[f32]; 4] = std::array::from_fn(|i| &x[i * d..(i + 1) * d]);
            let ys: [&[f32]; 4] = std::array::from_fn(|i| &y[i * d..(i + 1) * d]);
            let off = [0.25f32, -1.5, 3.0, 0.0];
            let one = sum8_rows4(xs, xs, |i, v, _| (v - off[i]) * (v - off[i]));
            let two = sum8_rows4(xs, ys, |i, a, b| a * b - off[i]);
            for i in 0..4 {
                let want1 = sum8_of(xs[i], |v| (v - off[i]) * (v - off[i]));
                let want2 = sum8_of2(xs[i], ys[i], |a, b| a * b - off[i]);
                assert_eq!((one[i].to_bits(), two[i].to_bits()), (want1.to_bits(), want2.to_bits()), "rows of {d}, row {i}");
            }
        }
    }

    /// The AVX-512 build of a loop (where the CPU has it) gives the bits of the loop as built: exp
    /// and the normal CDF's GELU slope over ordinary values, both tails, the overflow edge and NaN.
    #[test]
    fn wide_loops_give_the_bits_of_plain_ones() {
        let mut x: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 0.0047).collect();
        x.extend([-104.0, -87.4, -87.3, 88.7, 88.8, 1e-30, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        let slope = |v: f32| {
            let p = crate::ops::elementwise::norm_cdf(v);
            (v * p, p + v * 0.398_942_3 * expf(-(v * v) * 0.5))
        };
        let plain: Vec<(u32, u32, u32)> = x.iter().map(|&v| (expf(v).to_bits(), slope(v).0.to_bits(), slope(v).1.to_bits())).collect();
        let mut out = vec![(0u32, 0u32, 0u32); x.len()];
        wide(
            #[inline(always)]
            || {
                for (o, &v) in out.iter_mut().zip(&x) {
                    let (y, s) = slope(v);
                    *o = (expf(v).to_bits(), y.to_bits(), s.to_bits());
                }
            },
        );
        assert_eq!(out, plain);
    }

    #[test]
    fn expf_is_within_two_ulp_and_handles_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let (got, want) = (expf(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.4e-7, "max relative error {worst:e}");
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(-100.0), 0.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(100.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }
}

#[cfg(test)]
mod gemm_tests {
    use super::Real;

    /// Deterministic values in [-10, 10.5).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        crate::tests::values(n, seed, 977.0, 10.0)
    }

    /// Products split over a pool of three threads, and of two, give the bits of one call of the
    /// crate's GEMM on the whole of C: tall and wide C, transposed views, beta 0 and 1, sizes off the alignment.
    #[test]
    fn split_products_match_one_call_bit_for_bit() {
        // Three threads, and two (an odd number of k blocks splits its middle block by C's rows).
        let pools: Vec<_> = [3, 2].map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap()).into();
        // The last five are the model's: a token-by-weight product, weight gradients (k = tokens),
        // the catalog's scores (wide C, split by columns), the MoE gate's weight gradient (k =
        // items; transposed A, so through C^T like (300, 1000, 4), (3000, 500, 3), (60, 3000, 8)).
        // (200, 64, 64) and (300, 1000, 4) would leave a short last piece at three pieces; (64, 5316,
        // 64) is small as a whole, (60, 3000, 8) near the crate's path for at most 256 elements.
        // The long-k ones are split by k (`splits_k`): the catalog's item gradient (512, 1024, 64),
        // the pre-training's weight gradients (k = 10,632), a small C whose last k block is short,
        // a larger one with k not a multiple of its block, the weight gradients of a batch of 2,048
        // sequences (k = tokens), the catalog's item gradient at that batch; small C whose last k
        // block would be 1, 2 (not split by k) or 3 long.
        for &(m, k, n) in &[
            (1000, 64, 64),
            (67, 300, 2011),
            (517, 129, 515),
            (4096, 64, 97),
            (33, 768, 4000),
            (200, 64, 64),
            (300, 1000, 4),
            (3000, 500, 3),
            (60, 3000, 8),
            (5316, 64, 64),
            (64, 5316, 256),
            (64, 5316, 64),
            (1024, 64, 4926),
            (768, 4927, 8),
            (512, 1024, 64),
            (318, 1024, 64),
            (256, 10632, 64),
            (64, 1100, 64),
            (100, 1537, 70),
            (64, 13000, 64),
            (256, 13001, 64),
            (64, 12345, 256),
            (1024, 2048, 64),
            (512, 2048, 64),
            (64, 1025, 64),
            (64, 1026, 64),
            (64, 1027, 64),
            (64, 1538, 32),
            (64, 1500, 64),
            (256, 5316, 64),
            (64, 1537, 96),
            (300, 1537, 40),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let c0 = values(m * n, 3);
            for (transposed, beta) in [(false, 0.0f32), (true, 1.0), (false, 1.0)] {
                // A as (m, k) row-major or as the transpose of a (k, m) buffer; B likewise.
                let (rsa, csa) = if transposed { (1, m as isize) } else { (k as isize, 1) };
                let (rsb, csb) = if transposed { (1, k as isize) } else { (n as isize, 1) };
                let mut want = c0.clone();
                // SAFETY: the buffers cover the (m, k), (k, n) and (m, n) views.
                unsafe { super::one_gemm(m, k, n, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, want.as_mut_ptr(), n as isize) }
                for pool in &pools {
                    let mut got = c0.clone();
                    pool.install(|| f32::gemm(m, k, n, &a, rsa, csa, &b, rsb, csb, beta, &mut got, n as isize));
                    let same = want.iter().zip(&got).all(|(x, y)| x.to_bits() == y.to_bits());
                    let threads = pool.current_num_threads();
                    assert!(same, "({m}, {k}) . ({k}, {n}), transposed {transposed}, beta {beta}, {threads} threads");
                }
            }
        }
    }
}
