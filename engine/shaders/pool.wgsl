// Softmax-weighted sums over the rows of x, one workgroup per output row n (attention pooling, MoE).
//   pool_fwd:   a (N, S), x (N, S, D), lens (N) -> e (N, D), alpha (N, S)
//               alpha[n, j] = softmax(a[n, :len])_j for j < len, exactly 0 otherwise
//               e[n] = sum_{j < len} alpha[n, j] x[n, j]
//   pool_bwd_a: dalpha[n, j] = dot(de[n], x[n, j]); da = alpha (dalpha - sum_j alpha dalpha)
//   pool_bwd_x: dx[n, j, :] = alpha[n, j] de[n]            (one invocation per element)

struct P {
    n: u32,
    s: u32,
    d: u32,
}


@group(0) @binding(0) var<uniform> prm: P;
// pool_fwd: a, x, lens -> e, alpha
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read_write> e: array<f32>;
@group(0) @binding(5) var<storage, read_write> alpha: array<f32>;
// pool_bwd_a / pool_bwd_x: alpha_in, x, lens, de -> dout (da or dx)
@group(0) @binding(1) var<storage, read> alpha_in: array<f32>;
@group(0) @binding(4) var<storage, read> de: array<f32>;
@group(0) @binding(5) var<storage, read_write> dout: array<f32>;


@compute @workgroup_size(WG)
fn pool_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) t: u32) {
    let n = row_index(wid, nwg);
    if (n >= prm.n) { return; }
    let len = lens[n];
    let ra = n * prm.s;
    // Online max / sum of exponentials over this thread's entries, then over the workgroup.
    var m = NEG;
    var s = 0.0;
    for (var j = t; j < len; j = j + WG) {
        let v = a[ra + j];
        let mm = max(m, v);
        s = s * exp(m - mm) + exp(v - mm);
        m = mm;
    }
    let r = reduce_max_sum(t, m, s, WG);
    let inv = select(0.0, 1.0 / r.y, len > 0u);
    for (var j = t; j < prm.s; j = j + WG) {
        alpha[ra + j] = select(0.0, exp(a[ra + j] - r.x) * inv, j < len);
    }
    // Threads own output columns (coalesced reads of x); the weights are recomputed from a.
    for (var d = t; d < prm.d; d = d + WG) {
        var acc = 0.0;
        for (var j = 0u; j < len; j = j + 1u) {
            acc = acc + exp(a[ra + j] - r.x) * inv * x[(ra + j) * prm.d + d];
        }
        e[n * prm.d + d] = acc;
    }
}

@compute @workgroup_size(WG)
fn pool_bwd_a(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) t: u32) {
    let n = row_index(wid, nwg);
    if (n >= prm.n) { return; }
    let len = lens[n];
    let ra = n * prm.s;
    let lane = t % 32u;
    let grp = t / 32u;
    // dalpha: 8 rows at a time, 32 lanes per row dot product. Lane 0 stores dalpha in dout and
    // accumulates alpha * dalpha for the softmax correction.
    var acc = 0.0;
    for (var j0 = 0u; j0 < len; j0 = j0 + 8u) {
        let j = j0 + grp;
        var p = 0.0;
        if (j < len) {
            for (var d = lane; d < prm.d; d = d + 32u) {
                p = p + de[n * prm.d + d] * x[(ra + j) * prm.d + d];
            }
        }
        let dal = reduce_sum_f32(t, p, 32u);
        if (lane == 0u && j < len) {
            dout[ra + j] = dal;
            acc = acc + alpha_in[ra + j] * dal;
        }
    }
    let tot = reduce_sum_f32(t, acc, WG);
    storageBarrier();
    for (var j = t; j < prm.s; j = j + WG) {
        var v = 0.0;
        if (j < len) {
            v = alpha_in[ra + j] * (dout[ra + j] - tot);
        }
        dout[ra + j] = v;
    }
}

@compute @workgroup_size(WG)
fn pool_bwd_x(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n * prm.s * prm.d) { return; }
    let r = i / prm.d; // n * S + j
    dout[i] = alpha_in[r] * de[(r / prm.s) * prm.d + i % prm.d];
}
