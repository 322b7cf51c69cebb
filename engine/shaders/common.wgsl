// Shared helpers, prepended to every kernel file.

// Invocations per workgroup of the 1-D and most per-row kernels (gpu::WG on the host).
const WG: u32 = 256u;

// Linear invocation index for 1-D kernels dispatched with groups_1d() (WG lanes, folded into 2-D).
fn lin(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// Row index for kernels dispatched with row_groups(), one workgroup per row (folded into 2-D).
fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Counter-based RNG (PCG hash): the same (seed, index) gives the same bits on every device.
fn pcg(x: u32) -> u32 {
    let s = x * 747796405u + 2891336453u;
    let w = ((s >> ((s >> 28u) + 4u)) ^ s) * 277803737u;
    return (w >> 22u) ^ w;
}

// Uniform in [0, 1) from (seed, index).
fn rand01(seed: u32, i: u32) -> f32 {
    return f32(pcg(i + pcg(seed)) >> 8u) / 16777216.0;
}

// erfc(z) for z >= 0 with relative error < 1.2e-7 (Numerical Recipes' Chebyshev fit), with the
// fused multiply-adds of the CPU form (`norm_cdf` in ops/elementwise.rs).
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / fma(0.5, z, 1.0);
    var p = 0.17087277;
    p = fma(p, t, -0.82215223);
    p = fma(p, t, 1.48851587);
    p = fma(p, t, -1.13520398);
    p = fma(p, t, 0.27886807);
    p = fma(p, t, -0.18628806);
    p = fma(p, t, 0.09678418);
    p = fma(p, t, 0.37409196);
    p = fma(p, t, 1.00002368);
    let poly = fma(-z, z, -1.26551223) + t * p;
    return t * exp(poly);
}

// Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, accurate in the tails.
fn norm_cdf(x: f32) -> f32 {
    let z = abs(x) * 0.70710678118654752;
    let h = 0.5 * erfc_pos(z);
    return select(1.0 - h, h, x < 0.0);
}

// Lowest finite f32, the identity of max.
const NEG: f32 = -3.402823e38;

// ---- Workgroup tree reductions ----------------------------------------------------------------
// Each combines one value per lane over the aligned segment of n lanes that holds lane t (n a power
// of two <= WG; the whole workgroup when n is its size) in a fixed order, so results are
// deterministic: at steps o = n/2, n/4, .., 1, lane t + o is folded into lane t. Every lane of the
// segment gets the result. Call them in uniform control flow from every lane of the workgroup; each
// begins with a barrier, so one call's result may be read until the next call.

var<workgroup> ws: array<f32, WG>;
var<workgroup> wm: array<f32, WG>;
var<workgroup> wu: array<u32, WG>;
var<workgroup> wv: array<vec2<f32>, WG>;

// Sum of v.
fn reduce_sum_f32(t: u32, v: f32, n: u32) -> f32 {
    let lane = t & (n - 1u);
    workgroupBarrier();
    ws[t] = v;
    for (var o = n >> 1u; o > 0u; o = o >> 1u) {
        workgroupBarrier();
        if (lane < o) {
            ws[t] = ws[t] + ws[t + o];
        }
    }
    workgroupBarrier();
    return ws[t - lane];
}

// Two sums at once.
fn reduce_sum_vec2(t: u32, v: vec2<f32>, n: u32) -> vec2<f32> {
    let lane = t & (n - 1u);
    workgroupBarrier();
    wv[t] = v;
    for (var o = n >> 1u; o > 0u; o = o >> 1u) {
        workgroupBarrier();
        if (lane < o) {
            wv[t] = wv[t] + wv[t + o];
        }
    }
    workgroupBarrier();
    return wv[t - lane];
}

// Sum of counts.
fn reduce_sum_u32(t: u32, v: u32, n: u32) -> u32 {
    let lane = t & (n - 1u);
    workgroupBarrier();
    wu[t] = v;
    for (var o = n >> 1u; o > 0u; o = o >> 1u) {
        workgroupBarrier();
        if (lane < o) {
            wu[t] = wu[t] + wu[t + o];
        }
    }
    workgroupBarrier();
    return wu[t - lane];
}

// Largest v.
fn reduce_max_f32(t: u32, v: f32, n: u32) -> f32 {
    let lane = t & (n - 1u);
    workgroupBarrier();
    wm[t] = v;
    for (var o = n >> 1u; o > 0u; o = o >> 1u) {
        workgroupBarrier();
        if (lane < o) {
            wm[t] = max(wm[t], wm[t + o]);
        }
    }
    workgroupBarrier();
    return wm[t - lane];
}

// Row-wise log-sum-exp pieces (online softmax): per-lane (max m, sum s of exp(v - m)) pairs merged
// into the (max, sum) of the whole segment.
fn reduce_max_sum(t: u32, m: f32, s: f32, n: u32) -> vec2<f32> {
    let lane = t & (n - 1u);
    workgroupBarrier();
    wm[t] = m;
    ws[t] = s;
    for (var o = n >> 1u; o > 0u; o = o >> 1u) {
        workgroupBarrier();
        if (lane < o) {
            let mm = max(wm[t], wm[t + o]);
            ws[t] = ws[t] * exp(wm[t] - mm) + ws[t + o] * exp(wm[t + o] - mm);
            wm[t] = mm;
        }
    }
    workgroupBarrier();
    return vec2<f32>(wm[t - lane], ws[t - lane]);
}
