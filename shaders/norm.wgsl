// Row-wise L2 normalisation (torch.nn.functional.normalize): x (R, C) -> y = x / max(||x||, eps).
//   l2norm_fwd: y
//   l2norm_bwd: dx = (g - x * dot(x, g) / ||x||^2) / ||x||   when ||x|| > eps, else g / eps
//               (= (g - y * dot(y, g)) / ||x||; ||x|| and dot(x, g) are recomputed from x)
// One workgroup of 64 invocations per row (row index folded into 2-D workgroup ids); each invocation
// strides over the row, then a fixed-order tree reduction in workgroup memory (deterministic).

const WGN: u32 = 64u;

struct P {
    rows: u32,
    cols: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;

var<workgroup> red: array<vec2<f32>, WGN>;

// Sum of v over the workgroup.
fn reduce2(li: u32, v: vec2<f32>) -> vec2<f32> {
    red[li] = v;
    workgroupBarrier();
    for (var s = WGN / 2u; s > 0u; s = s >> 1u) {
        if (li < s) { red[li] = red[li] + red[li + s]; }
        workgroupBarrier();
    }
    return red[0];
}

@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WGN)
fn l2norm_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let base = r * prm.cols;
    var ss = 0.0;
    for (var c = li; c < prm.cols; c = c + WGN) {
        let v = x[base + c];
        ss = ss + v * v;
    }
    let nrm = max(sqrt(reduce2(li, vec2<f32>(ss, 0.0)).x), prm.eps);
    for (var c = li; c < prm.cols; c = c + WGN) {
        y[base + c] = x[base + c] / nrm;
    }
}

@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

@compute @workgroup_size(WGN)
fn l2norm_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let base = r * prm.cols;
    var acc = vec2<f32>(0.0);
    for (var c = li; c < prm.cols; c = c + WGN) {
        let v = x[base + c];
        acc = acc + vec2<f32>(v * v, v * g[base + c]);
    }
    let s = reduce2(li, acc);
    let nrm = sqrt(s.x);
    if (nrm > prm.eps) {
        let k = s.y / s.x;
        for (var c = li; c < prm.cols; c = c + WGN) {
            dx[base + c] = (g[base + c] - x[base + c] * k) / nrm;
        }
    } else {
        for (var c = li; c < prm.cols; c = c + WGN) {
            dx[base + c] = g[base + c] / prm.eps;
        }
    }
}
