// Deterministic column sums (no atomics): x (R, C) -> partial (ceil(R / CHUNK), C).
// Each invocation sums CHUNK consecutive rows of one column in a fixed order; the host repeats the
// pass on the partials until one row is left. sum(x) is the same kernel with C = 1.
// broadcast: out (R, C) = x (C) repeated over the rows (sum_rows' gradient, and the other way round).

const CHUNK: u32 = 256u;

struct P {
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn sum_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    let chunks = (prm.rows + CHUNK - 1u) / CHUNK;
    if (i >= chunks * prm.cols) { return; }
    let c = i % prm.cols;
    let k = i / prm.cols;
    let r0 = k * CHUNK;
    let r1 = min(r0 + CHUNK, prm.rows);
    var s = 0.0;
    for (var r = r0; r < r1; r = r + 1u) {
        s = s + x[r * prm.cols + c];
    }
    out[k * prm.cols + c] = s;
}

@compute @workgroup_size(WG)
fn broadcast(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.rows * prm.cols) { return; }
    out[i] = x[i % prm.cols];
}
