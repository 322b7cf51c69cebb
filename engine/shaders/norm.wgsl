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
    let nrm = max(sqrt(reduce_sum_f32(li, ss, WGN)), prm.eps);
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
    let s = reduce_sum_vec2(li, acc, WGN);
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
