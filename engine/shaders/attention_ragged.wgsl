// Multi-head attention over a ragged (packed) batch, causal (SASRec) or bidirectional (BERT).
// q, k, v, out: (N, C), C = heads * dh, sequence b owning rows off[b] .. off[b + 1] (n_b rows).
// lay = off (B + 1) | pblock (B) | seq (N): pblock[b] = sum of n_b'^2 over b' < b, seq[t] = the
// sequence of row t. P: sequence b's block (heads, n_b, n_b) starts at heads * pblock[b]. Query i of
// sequence b attends over keys j < i + 1 (causal) or j < n_b. Dropout of (b, h, i, j) keys on the
// flat (B, heads, key_len, key_len) index, as the padded kernel does (see ragged.rs).
//   attn_ragged_fwd:      one workgroup per (row t, head h): P row (saved when `save`), out = P' V.
//   attn_ragged_bwd_rows: one workgroup per (t, h): dS row (saved), dq = scale * dS K.
//   attn_ragged_bwd_cols: one workgroup per (key row t, h): dk = scale * dS^T Q, dv = P'^T dO.

const LANES: u32 = 64u;
const MAX_L: u32 = 1024u;

struct P {
    batch: u32,
    rows: u32,
    heads: u32,
    dh: u32,
    scale: f32,     // 1 / sqrt(dh)
    p: f32,         // dropout probability
    inv_keep: f32,  // 1 / (1 - p)
    seed: u32,
    causal: u32,    // 1: key j <= query i only
    key_len: u32,   // padded width of the dropout keys
    save: u32,      // forward: 1 to write P
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> lay: array<u32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;            // fwd, cols
@group(0) @binding(2) var<storage, read> probs: array<f32>;        // rows
@group(0) @binding(3) var<storage, read> k: array<f32>;            // fwd, rows
@group(0) @binding(3) var<storage, read> probs_c: array<f32>;      // cols
@group(0) @binding(4) var<storage, read> v: array<f32>;            // fwd, rows
@group(0) @binding(4) var<storage, read> ds: array<f32>;           // cols
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // fwd
@group(0) @binding(5) var<storage, read> dout: array<f32>;         // rows, cols
@group(0) @binding(6) var<storage, read_write> probs_w: array<f32>; // fwd
@group(0) @binding(6) var<storage, read_write> ds_w: array<f32>;   // rows
@group(0) @binding(6) var<storage, read_write> dk: array<f32>;     // cols
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;     // rows
@group(0) @binding(7) var<storage, read_write> dv: array<f32>;     // cols

var<workgroup> row: array<f32, MAX_L>;
var<workgroup> row2: array<f32, MAX_L>;

// Where row t sits: (sequence b, first row o, length n, position i, P block start).
struct Loc {
    b: u32,
    o: u32,
    n: u32,
    i: u32,
    pb: u32,
}

fn locate(t: u32) -> Loc {
    let b = lay[2u * prm.batch + 1u + t];
    let o = lay[b];
    return Loc(b, o, lay[b + 1u] - o, t - o, prm.heads * lay[prm.batch + 1u + b]);
}

fn keep(b: u32, h: u32, i: u32, j: u32) -> f32 {
    if (prm.p == 0.0) {
        return 1.0;
    }
    let idx = ((b * prm.heads + h) * prm.key_len + i) * prm.key_len + j;
    return select(0.0, prm.inv_keep, rand01(prm.seed, idx) >= prm.p);
}

@compute @workgroup_size(LANES)
fn attn_ragged_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows * prm.heads) { return; }
    let t = r / prm.heads;
    let h = r % prm.heads;
    let at = locate(t);
    let c = prm.heads * prm.dh;
    let qo = t * c + h * prm.dh;
    let nk = select(at.n, at.i + 1u, prm.causal != 0u);
    var m = -3.0e38;
    for (var j = lid; j < nk; j = j + LANES) {
        let ko = (at.o + j) * c + h * prm.dh;
        var s = 0.0;
        for (var e = 0u; e < prm.dh; e = e + 1u) {
            s = s + q[qo + e] * k[ko + e];
        }
        s = s * prm.scale;
        row[j] = s;
        m = max(m, s);
    }
    m = reduce_max_f32(lid, m, LANES);
    var sum = 0.0;
    for (var j = lid; j < nk; j = j + LANES) {
        let ex = exp(row[j] - m);
        row[j] = ex;
        sum = sum + ex;
    }
    sum = reduce_sum_f32(lid, sum, LANES);
    let base = at.pb + (h * at.n + at.i) * at.n;
    for (var j = lid; j < at.n; j = j + LANES) {
        var pj = 0.0;
        if (j < nk) {
            pj = row[j] / sum;
        }
        if (prm.save != 0u) {
            probs_w[base + j] = pj;
        }
        row[j] = pj * keep(at.b, h, at.i, j);
    }
    workgroupBarrier();
    for (var e = lid; e < prm.dh; e = e + LANES) {
        var o = 0.0;
        for (var j = 0u; j < nk; j = j + 1u) {
            o = o + row[j] * v[(at.o + j) * c + h * prm.dh + e];
        }
        out[qo + e] = o;
    }
}

@compute @workgroup_size(LANES)
fn attn_ragged_bwd_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows * prm.heads) { return; }
    let t = r / prm.heads;
    let h = r % prm.heads;
    let at = locate(t);
    let c = prm.heads * prm.dh;
    let qo = t * c + h * prm.dh;
    let nk = select(at.n, at.i + 1u, prm.causal != 0u);
    let base = at.pb + (h * at.n + at.i) * at.n;
    var tt = 0.0;
    for (var j = lid; j < nk; j = j + LANES) {
        let vo = (at.o + j) * c + h * prm.dh;
        var dp = 0.0;
        for (var e = 0u; e < prm.dh; e = e + 1u) {
            dp = dp + dout[qo + e] * v[vo + e];
        }
        dp = dp * keep(at.b, h, at.i, j);
        row[j] = dp;
        tt = tt + dp * probs[base + j];
    }
    tt = reduce_sum_f32(lid, tt, LANES);
    for (var j = lid; j < at.n; j = j + LANES) {
        var s = 0.0;
        if (j < nk) {
            s = probs[base + j] * (row[j] - tt);
        }
        ds_w[base + j] = s;
        row[j] = s;
    }
    workgroupBarrier();
    for (var e = lid; e < prm.dh; e = e + LANES) {
        var acc = 0.0;
        for (var j = 0u; j < nk; j = j + 1u) {
            acc = acc + row[j] * k[(at.o + j) * c + h * prm.dh + e];
        }
        dq[qo + e] = acc * prm.scale;
    }
}

@compute @workgroup_size(LANES)
fn attn_ragged_bwd_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows * prm.heads) { return; }
    let t = r / prm.heads;
    let h = r % prm.heads;
    let at = locate(t);
    let j = at.i;
    let c = prm.heads * prm.dh;
    // Column j of P' and dS over the queries that see key j.
    let i0 = select(0u, j, prm.causal != 0u);
    for (var i = lid; i < at.n; i = i + LANES) {
        let idx = at.pb + (h * at.n + i) * at.n + j;
        var pv = 0.0;
        var sv = 0.0;
        if (i >= i0) {
            pv = probs_c[idx] * keep(at.b, h, i, j);
            sv = ds[idx];
        }
        row[i] = pv;
        row2[i] = sv;
    }
    workgroupBarrier();
    let ko = t * c + h * prm.dh;
    for (var e = lid; e < prm.dh; e = e + LANES) {
        var accv = 0.0;
        var acck = 0.0;
        for (var i = i0; i < at.n; i = i + 1u) {
            let o = (at.o + i) * c + h * prm.dh + e;
            accv = accv + row[i] * dout[o];
            acck = acck + row2[i] * q[o];
        }
        dk[ko + e] = acck * prm.scale;
        dv[ko + e] = accv;
    }
}
