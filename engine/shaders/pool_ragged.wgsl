// Mean of each sequence's rows in a ragged (packed) batch.
// x: (N, C), sequence b owning rows off[b] .. off[b + 1] (n_b >= 1 rows); lay = off (B + 1) |
// pblock (B) | seq (N), the layout of ragged.rs (seq[t] = the sequence of row t).
//   mean_ragged_fwd: one invocation per output element (b, c):
//                    e[b, c] = (sum_{t = off[b]}^{off[b + 1] - 1} x[t, c]) / n_b, rows in order
//   mean_ragged_bwd: one invocation per element (t, c) of dx: dx[t, c] = de[seq[t], c] / n_seq[t]

struct P {
    batch: u32,
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> lay: array<u32>;
// mean_ragged_fwd: src = x, dst = e; mean_ragged_bwd: src = de, dst = dx.
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn mean_ragged_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.batch * prm.cols) { return; }
    let b = i / prm.cols;
    let c = i % prm.cols;
    let start = lay[b];
    let end = lay[b + 1u];
    var acc = 0.0;
    for (var t = start; t < end; t = t + 1u) {
        acc = acc + src[t * prm.cols + c];
    }
    dst[i] = acc / f32(end - start);
}

@compute @workgroup_size(WG)
fn mean_ragged_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.rows * prm.cols) { return; }
    let t = i / prm.cols;
    let b = lay[2u * prm.batch + 1u + t];
    dst[i] = src[b * prm.cols + i % prm.cols] / f32(lay[b + 1u] - lay[b]);
}
