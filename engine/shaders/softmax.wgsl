// Row softmax over x (R, S), one workgroup per row.
//   softmax_fwd: the first n = lens[r] entries (S without lens) take part, the rest get 0. Each lane
//                keeps a running (max, sum of exp) over its strided entries; the pairs are merged by a
//                workgroup reduction, then a second pass writes exp(x - max) / sum.
//   softmax_bwd: dx = y * (g' - sum(g' * y)) with g' = g - g[argmax y] (the same value, without
//                cancellation where y is close to 1); argmax takes the first index on ties.

const NEG_BIG: f32 = -3.0e38;

struct P {
    rows: u32,
    cols: u32,
    has_lens: u32,
}

@group(0) @binding(0) var<uniform> prm: P;
// softmax_fwd
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> lens: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
// softmax_bwd
@group(0) @binding(1) var<storage, read> y_in: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

var<workgroup> red_i: array<u32, WG>;

// Index (into y_in) of the largest y over the lanes' candidates, the smallest index on ties. (Its
// comparison reads y_in, so it is not one of the shared reductions of common.wgsl.)
// `top` is each lane's candidate; lanes past the row end pass an index >= o + cols, which loses.
fn wg_argmax(top: u32, o: u32, lid: u32) -> u32 {
    red_i[lid] = top;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k = k >> 1u) {
        if (lid < k) {
            let a = red_i[lid];
            let b = red_i[lid + k];
            if (better(b, a, o)) {
                red_i[lid] = b;
            }
        }
        workgroupBarrier();
    }
    let r = red_i[0];
    workgroupBarrier();
    return r;
}

// Whether candidate b beats a: inside the row, and a larger y or an equal y at a smaller index.
fn better(b: u32, a: u32, o: u32) -> bool {
    let end = o + prm.cols;
    if (b >= end) { return false; }
    if (a >= end) { return true; }
    return y_in[b] > y_in[a] || (y_in[b] == y_in[a] && b < a);
}

@compute @workgroup_size(WG)
fn softmax_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let o = r * prm.cols;
    var n = prm.cols;
    if (prm.has_lens != 0u) {
        n = lens[r];
    }
    var m = NEG_BIG;
    var s = 0.0;
    for (var i = lid; i < n; i = i + WG) {
        let v = x[o + i];
        let mm = max(m, v);
        s = s * exp(m - mm) + exp(v - mm);
        m = mm;
    }
    let ms = reduce_max_sum(lid, m, s, WG);
    for (var i = lid; i < prm.cols; i = i + WG) {
        var v = 0.0;
        if (i < n) {
            v = exp(x[o + i] - ms.x) / ms.y;
        }
        y[o + i] = v;
    }
}

@compute @workgroup_size(WG)
fn softmax_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let o = r * prm.cols;
    var top = o + lid;
    for (var i = lid; i < prm.cols; i = i + WG) {
        if (y_in[o + i] > y_in[top]) {
            top = o + i;
        }
    }
    let c = dy[wg_argmax(top, o, lid)];
    var d = 0.0;
    for (var i = lid; i < prm.cols; i = i + WG) {
        d = d + y_in[o + i] * (dy[o + i] - c);
    }
    let dot = reduce_sum_f32(lid, d, WG);
    for (var i = lid; i < prm.cols; i = i + WG) {
        dx[o + i] = y_in[o + i] * ((dy[o + i] - c) - dot);
    }
}
