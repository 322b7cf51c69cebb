// Elementwise ops with trailing broadcast: b's shape is a suffix of a's, so b[i % nb].
//   axpby:   out = a + alpha * b          (add, sub)
//   mul:     out = a * b
//   scale:   out = alpha * a
//   gelu_fwd/gelu_bwd: erf-GELU and its derivative
//   quick_gelu_fwd/quick_gelu_bwd: x * sigmoid(1.702 x) (CLIP) and its derivative
//   dropout: out = a * keep(seed, i) / (1 - p); the mask is recomputed from (seed, i) in backward
//   dropout_rows: as dropout on rows of nb channels, element (r, c) keyed on keys[r] * nb + c

struct P {
    n: u32,      // elements of out
    nb: u32,     // elements of b
    alpha: f32,  // scalar
    seed: u32,
    p: f32,      // dropout probability
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> keys: array<u32>;  // dropout_rows
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn axpby(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    out[i] = a[i] + prm.alpha * b[i % prm.nb];
}

@compute @workgroup_size(WG)
fn mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    out[i] = a[i] * b[i % prm.nb];
}

// Single-input kernels: a at binding 1, out at binding 3 (binding 2 unused).
@compute @workgroup_size(WG)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    out[i] = prm.alpha * a[i];
}

@compute @workgroup_size(WG)
fn gelu_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    let x = a[i];
    out[i] = x * norm_cdf(x);
}

// b = upstream gradient, a = forward input x.
@compute @workgroup_size(WG)
fn gelu_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    let x = a[i];
    let pdf = 0.3989422804014327 * exp(-0.5 * x * x);
    out[i] = b[i] * (norm_cdf(x) + x * pdf);
}

@compute @workgroup_size(WG)
fn quick_gelu_fwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    let x = a[i];
    out[i] = x / (1.0 + exp(-1.702 * x));
}

// b = upstream gradient, a = forward input x.
@compute @workgroup_size(WG)
fn quick_gelu_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    let x = a[i];
    let s = 1.0 / (1.0 + exp(-1.702 * x));
    out[i] = b[i] * s * (1.0 + 1.702 * x * (1.0 - s));
}

@compute @workgroup_size(WG)
fn dropout(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    let keep = rand01(prm.seed, i) >= prm.p;
    out[i] = select(0.0, a[i] / (1.0 - prm.p), keep);
}

@compute @workgroup_size(256)
fn dropout_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.n) { return; }
    let keep = rand01(prm.seed, keys[i / prm.nb] * prm.nb + i % prm.nb) >= prm.p;
    out[i] = select(0.0, a[i] / (1.0 - prm.p), keep);
}
