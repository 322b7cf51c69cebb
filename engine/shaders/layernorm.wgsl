// LayerNorm over rows of x (R, C); row r uses gamma/beta row r % G (G = 1 for plain (C) parameters).
//   ln_fwd:       one workgroup per row: y = ((x - x0) - mean) * rstd * gamma + beta, with x0 = x[r, 0]
//                 (the shift keeps large-mean rows exact); saves stats[r] = (mean, rstd).
//   ln_bwd_x:     one workgroup per row: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
//   ln_bwd_param: one invocation per (chunk, g, c): partial dgamma/dbeta over CHUNK rows of group g,
//                 summed in a fixed order (the host then sums the chunks): no atomics, deterministic.

const CHUNK: u32 = 64u;

struct P {
    rows: u32,
    cols: u32,
    groups: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// ln_fwd
@group(0) @binding(2) var<storage, read_write> stats_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> gamma: array<f32>;
@group(0) @binding(5) var<storage, read> beta: array<f32>;
// ln_bwd_x and ln_bwd_param (gamma at binding 4 as above)
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(4) var<storage, read_write> pgamma: array<f32>;
@group(0) @binding(5) var<storage, read_write> pbeta: array<f32>;

@compute @workgroup_size(WG)
fn ln_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let c = prm.cols;
    let o = r * c;
    let k = (r % prm.groups) * c;
    let x0 = x[o];
    let n = f32(c);
    var s = 0.0;
    for (var i = lid; i < c; i = i + WG) {
        s = s + (x[o + i] - x0);
    }
    let mean = reduce_sum_f32(lid, s, WG) / n;
    var v = 0.0;
    for (var i = lid; i < c; i = i + WG) {
        let d = x[o + i] - x0 - mean;
        v = v + d * d;
    }
    let rstd = 1.0 / sqrt(reduce_sum_f32(lid, v, WG) / n + prm.eps);
    for (var i = lid; i < c; i = i + WG) {
        y[o + i] = (x[o + i] - x0 - mean) * rstd * gamma[k + i] + beta[k + i];
    }
    if (lid == 0u) {
        stats_out[2u * r] = mean;
        stats_out[2u * r + 1u] = rstd;
    }
}

@compute @workgroup_size(WG)
fn ln_bwd_x(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let c = prm.cols;
    let o = r * c;
    let k = (r % prm.groups) * c;
    let x0 = x[o];
    let mean = stats[2u * r];
    let rstd = stats[2u * r + 1u];
    var m = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < c; i = i + WG) {
        let dxhat = dy[o + i] * gamma[k + i];
        m = m + vec2<f32>(dxhat, dxhat * (x[o + i] - x0 - mean) * rstd);
    }
    m = reduce_sum_vec2(lid, m, WG) / f32(c);
    for (var i = lid; i < c; i = i + WG) {
        let xhat = (x[o + i] - x0 - mean) * rstd;
        dx[o + i] = rstd * (dy[o + i] * gamma[k + i] - m.x - xhat * m.y);
    }
}

@compute @workgroup_size(WG)
fn ln_bwd_param(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    let c = prm.cols;
    let cols = prm.groups * c;
    let per_group = prm.rows / prm.groups;
    let chunks = max((per_group + CHUNK - 1u) / CHUNK, 1u);
    if (i >= chunks * cols) { return; }
    let col = i % cols;
    let g = col / c;
    let ch = col % c;
    let j0 = (i / cols) * CHUNK;
    let j1 = min(j0 + CHUNK, per_group);
    var sg = 0.0;
    var sb = 0.0;
    for (var j = j0; j < j1; j = j + 1u) {
        let r = g + j * prm.groups;
        let o = r * c;
        let xhat = (x[o + ch] - x[o] - stats[2u * r]) * stats[2u * r + 1u];
        sg = sg + dy[o + ch] * xhat;
        sb = sb + dy[o + ch];
    }
    pgamma[i] = sg;
    pbeta[i] = sb;
}

// ln_add_fwd: ln_fwd of s = x + res (a residual sum), with s written to sum_out for the backward:
// one pass over the rows instead of an add kernel and then ln_fwd. Each lane reads back only the
// elements of s it wrote itself, so no barrier is needed between the passes.
@group(0) @binding(6) var<storage, read> res: array<f32>;
@group(0) @binding(7) var<storage, read_write> sum_out: array<f32>;

@compute @workgroup_size(WG)
fn ln_add_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let c = prm.cols;
    let o = r * c;
    let k = (r % prm.groups) * c;
    let x0 = x[o] + res[o];
    let n = f32(c);
    var s = 0.0;
    for (var i = lid; i < c; i = i + WG) {
        let v = x[o + i] + res[o + i];
        sum_out[o + i] = v;
        s = s + (v - x0);
    }
    let mean = reduce_sum_f32(lid, s, WG) / n;
    var v = 0.0;
    for (var i = lid; i < c; i = i + WG) {
        let d = sum_out[o + i] - x0 - mean;
        v = v + d * d;
    }
    let rstd = 1.0 / sqrt(reduce_sum_f32(lid, v, WG) / n + prm.eps);
    for (var i = lid; i < c; i = i + WG) {
        y[o + i] = (sum_out[o + i] - x0 - mean) * rstd * gamma[k + i] + beta[k + i];
    }
    if (lid == 0u) {
        stats_out[2u * r] = mean;
        stats_out[2u * r + 1u] = rstd;
    }
}
