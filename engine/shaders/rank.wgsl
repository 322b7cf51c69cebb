// Full-ranking evaluation: the 0-based rank of each row's target among all columns, ties counted
// pessimistically: rank = #{ j != t : !(s_j < s_t) } (a NaN score ranks last).
// scores (B, N), targets (B) -> ranks (B) as u32. One workgroup per row.

struct P {
    rows: u32,
    n: u32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> ranks: array<u32>;

@compute @workgroup_size(WG)
fn rank(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = row_index(wid, nwg);
    if (row >= prm.rows) { return; }
    let base = row * prm.n;
    let t = targets[row];
    let st = scores[base + t];
    var c = 0u;
    for (var j = lid.x; j < prm.n; j = j + WG) {
        if (j != t && !(scores[base + j] < st)) {
            c = c + 1u;
        }
    }
    let total = reduce_sum_u32(lid.x, c, WG);
    if (lid.x == 0u) {
        ranks[row] = total;
    }
}
