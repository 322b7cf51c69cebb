// Adam with coupled (L2) weight decay and global gradient-norm clipping, as torch.optim.Adam after
// torch.nn.utils.clip_grad_norm_, over the flat arena: every parameter, moment and gradient of a
// step in four buffers, each parameter at the same offset in each (padding between them is zero
// and stays zero). The update, with c = min(1, max_norm / (norm + 1e-6)) (c = 1 when max_norm = 0):
//   g' = c * g + wd * p;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2;
//   p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

struct P {
    n: u32,          // sumsq_arena: elements of g; adam_arena: end of the updated range
    slot: u32,       // sumsq_arena: where its NPART partial sums go in norms
    nparams: u32,    // adam_arena: partial sums in norms
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    wd: f32,
    bc1: f32,        // 1 - b1^t
    bc2: f32,        // 1 - b2^t
    max_norm: f32,
    start: u32,      // adam_arena: start of the updated range
}

@group(0) @binding(0) var<uniform> prm: P;

@group(0) @binding(1) var<storage, read> sq_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> sq_norms: array<f32>;

@group(0) @binding(1) var<storage, read_write> ad_p: array<f32>;
@group(0) @binding(2) var<storage, read_write> ad_m: array<f32>;
@group(0) @binding(3) var<storage, read_write> ad_v: array<f32>;
@group(0) @binding(4) var<storage, read> ad_g: array<f32>;
@group(0) @binding(5) var<storage, read> ad_norms: array<f32>;

// sumsq_arena: NPART workgroups; workgroup w writes norms[slot + w] = the sum of g^2 over the
//              elements i = (j * NPART + w) * WG + lane (fixed order).
// adam_arena:  every workgroup first reduces the nparams partial sums (lane l sums entries l,
//              l + WG, .. in order, then the lanes' tree) to the global norm and the clip
//              coefficient, then updates the elements start .. n.
const NPART: u32 = WG;

@compute @workgroup_size(WG)
fn sumsq_arena(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var s = 0.0;
    for (var i = wid.x * WG + lid.x; i < prm.n; i = i + NPART * WG) {
        let x = sq_g[i];
        s = s + x * x;
    }
    let tot = reduce_sum_f32(lid.x, s, WG);
    if (lid.x == 0u) {
        sq_norms[prm.slot + wid.x] = tot;
    }
}

@compute @workgroup_size(WG)
fn adam_arena(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    var c = 1.0;
    if (prm.max_norm > 0.0) {
        var part = 0.0;
        for (var k = lid.x; k < prm.nparams; k = k + WG) { part = part + ad_norms[k]; }
        let tot = reduce_sum_f32(lid.x, part, WG);
        c = min(1.0, prm.max_norm / (sqrt(tot) + 1e-6));
    }
    let i = prm.start + lin(gid, nwg);
    if (i >= prm.n) { return; }
    let p = ad_p[i];
    let g = c * ad_g[i] + prm.wd * p;
    let m = prm.b1 * ad_m[i] + (1.0 - prm.b1) * g;
    let v = prm.b2 * ad_v[i] + (1.0 - prm.b2) * g * g;
    ad_m[i] = m;
    ad_v[i] = v;
    ad_p[i] = p - prm.lr / prm.bc1 * m / (sqrt(v) / sqrt(prm.bc2) + prm.eps);
}
