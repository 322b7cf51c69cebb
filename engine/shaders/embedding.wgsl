// Row gathers by integer index and their scatter backward (deterministic, no atomics).
//   embedding_fwd:   w (V, D), ids (n) -> out (n, D) = w[ids[i]]
//   embedding_bwd:   g (n, D), inverse index (offsets (V + 1) then positions (n)) -> dw (V, D);
//                    dw[v, d] = sum of g[i, d] over the positions i reading row v, in increasing i
// One invocation per output element.

struct P {
    total: u32, // elements of out
    d: u32,     // row width D
    m: u32,     // V for embedding_bwd
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn embedding_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.total) { return; }
    out[i] = src[idx[i / prm.d] * prm.d + i % prm.d];
}

@compute @workgroup_size(WG)
fn embedding_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.total) { return; }
    let v = i / prm.d;
    let d = i % prm.d;
    var s = 0.0;
    for (var p = idx[v]; p < idx[v + 1u]; p = p + 1u) {
        s = s + src[idx[prm.m + 1u + p] * prm.d + d];
    }
    out[i] = s;
}
