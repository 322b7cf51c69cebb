// Multi-head attention with key padding and attention dropout, causal (RecBole SASRec) or
// bidirectional (BERT). q, k, v, out: (B, L, C), C = heads * dh; P: (B, heads, L, L). Query row i
// of sequence b attends over keys j < n = min(i + 1, lens[b]) when causal, j < n = lens[b] when
// not, or over all L keys when n = 0 (see attention.rs).
//   attn_fwd:      one workgroup per (b, h, i): s = q.k * scale, P = softmax(s) (saved),
//                  P' = P * keep / (1 - p) in workgroup memory, out = P' V.
//   attn_bwd_rows: one workgroup per (b, h, i): dP = keep * dO V^T / (1 - p),
//                  dS = P * (dP - sum(dP * P)) (saved), dq = scale * dS K.
//   attn_bwd_cols: one workgroup per (b, h, j): dk = scale * dS^T Q, dv = P'^T dO.

const LANES: u32 = 64u;
const MAX_L: u32 = 1024u;

struct P {
    batch: u32,
    len: u32,
    heads: u32,
    dh: u32,
    scale: f32,     // 1 / sqrt(dh)
    p: f32,         // dropout probability
    inv_keep: f32,  // 1 / (1 - p)
    seed: u32,
    causal: u32,    // 1: key j <= query i only
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> lens: array<u32>;         // fwd, rows
@group(0) @binding(1) var<storage, read> q_in: array<f32>;         // cols
@group(0) @binding(2) var<storage, read> q: array<f32>;            // fwd
@group(0) @binding(2) var<storage, read> probs: array<f32>;        // rows, cols
@group(0) @binding(3) var<storage, read> k: array<f32>;            // fwd, rows
@group(0) @binding(3) var<storage, read_write> dk: array<f32>;     // cols
@group(0) @binding(4) var<storage, read> v: array<f32>;            // fwd, rows
@group(0) @binding(4) var<storage, read_write> dv: array<f32>;     // cols
@group(0) @binding(5) var<storage, read_write> out: array<f32>;    // fwd
@group(0) @binding(5) var<storage, read> dout: array<f32>;         // rows, cols
@group(0) @binding(6) var<storage, read_write> probs_w: array<f32>; // fwd
@group(0) @binding(6) var<storage, read_write> ds_w: array<f32>;   // rows
@group(0) @binding(6) var<storage, read> ds: array<f32>;           // cols
@group(0) @binding(7) var<storage, read_write> dq: array<f32>;     // rows

var<workgroup> row: array<f32, MAX_L>;
var<workgroup> row2: array<f32, MAX_L>;

// Keys query i of sequence b attends to.
fn n_valid(b: u32, i: u32) -> u32 {
    let n = select(lens[b], min(i + 1u, lens[b]), prm.causal != 0u);
    return select(n, prm.len, n == 0u);
}

// Dropout factor of flat (B, heads, L, L) element idx: 0 or 1 / (1 - p), as the dropout kernel.
fn keep(idx: u32) -> f32 {
    if (prm.p == 0.0) {
        return 1.0;
    }
    return select(0.0, prm.inv_keep, rand01(prm.seed, idx) >= prm.p);
}

@compute @workgroup_size(LANES)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    let L = prm.len;
    if (r >= prm.batch * prm.heads * L) { return; }
    let i = r % L;
    let h = (r / L) % prm.heads;
    let b = r / (L * prm.heads);
    let c = prm.heads * prm.dh;
    let qo = (b * L + i) * c + h * prm.dh;
    let n = n_valid(b, i);
    var m = -3.0e38;
    for (var j = lid; j < n; j = j + LANES) {
        let ko = (b * L + j) * c + h * prm.dh;
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
    for (var j = lid; j < n; j = j + LANES) {
        let ex = exp(row[j] - m);
        row[j] = ex;
        sum = sum + ex;
    }
    sum = reduce_sum_f32(lid, sum, LANES);
    let base = r * L;
    for (var j = lid; j < L; j = j + LANES) {
        var pj = 0.0;
        if (j < n) {
            pj = row[j] / sum;
        }
        probs_w[base + j] = pj;
        row[j] = pj * keep(base + j);
    }
    workgroupBarrier();
    for (var e = lid; e < prm.dh; e = e + LANES) {
        var o = 0.0;
        for (var j = 0u; j < n; j = j + 1u) {
            o = o + row[j] * v[(b * L + j) * c + h * prm.dh + e];
        }
        out[qo + e] = o;
    }
}

@compute @workgroup_size(LANES)
fn attn_bwd_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    let L = prm.len;
    if (r >= prm.batch * prm.heads * L) { return; }
    let i = r % L;
    let h = (r / L) % prm.heads;
    let b = r / (L * prm.heads);
    let c = prm.heads * prm.dh;
    let qo = (b * L + i) * c + h * prm.dh;
    let n = n_valid(b, i);
    let base = r * L;
    var t = 0.0;
    for (var j = lid; j < n; j = j + LANES) {
        let vo = (b * L + j) * c + h * prm.dh;
        var dp = 0.0;
        for (var e = 0u; e < prm.dh; e = e + 1u) {
            dp = dp + dout[qo + e] * v[vo + e];
        }
        dp = dp * keep(base + j);
        row[j] = dp;
        t = t + dp * probs[base + j];
    }
    t = reduce_sum_f32(lid, t, LANES);
    for (var j = lid; j < L; j = j + LANES) {
        var s = 0.0;
        if (j < n) {
            s = probs[base + j] * (row[j] - t);
        }
        ds_w[base + j] = s;
        row[j] = s;
    }
    workgroupBarrier();
    for (var e = lid; e < prm.dh; e = e + LANES) {
        var acc = 0.0;
        for (var j = 0u; j < n; j = j + 1u) {
            acc = acc + row[j] * k[(b * L + j) * c + h * prm.dh + e];
        }
        dq[qo + e] = acc * prm.scale;
    }
}

@compute @workgroup_size(LANES)
fn attn_bwd_cols(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    let L = prm.len;
    if (r >= prm.batch * prm.heads * L) { return; }
    let j = r % L;
    let bh = r / L;
    let h = bh % prm.heads;
    let b = bh / prm.heads;
    let c = prm.heads * prm.dh;
    // Column j of P' and dS.
    for (var i = lid; i < L; i = i + LANES) {
        let idx = (bh * L + i) * L + j;
        row[i] = probs[idx] * keep(idx);
        row2[i] = ds[idx];
    }
    workgroupBarrier();
    let ko = (b * L + j) * c + h * prm.dh;
    for (var e = lid; e < prm.dh; e = e + LANES) {
        var accv = 0.0;
        var acck = 0.0;
        for (var i = 0u; i < L; i = i + 1u) {
            let o = (b * L + i) * c + h * prm.dh + e;
            accv = accv + row[i] * dout[o];
            acck = acck + row2[i] * q_in[o];
        }
        dk[ko + e] = acck * prm.scale;
        dv[ko + e] = accv;
    }
}
