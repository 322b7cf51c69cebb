// Full-catalog cross-entropy over blocks of recomputed scores (see catalog.rs). One block: the raw
// scores z (rows, width) = sum_k h_k e_k^T of items start .. start + width; logits are scale * z.
//   catalog_fwd:    one workgroup per row: update the running (max, sum of exp, target logit).
//   catalog_finish: per row: loss = lse - target logit, lse = max + ln(sum).
//   catalog_bwd:    one workgroup per row: dz = scale * (exp(scale * z - lse) - onehot) * g.
// Full-catalog ranking over the same blocks (two passes):
//   catalog_rank_target: per row: st = scale * z of the row's target, if it lies in this block.
//   catalog_rank_count:  one workgroup per row: counts += #{j != target : !(scale * z_j < st)}
//                        minus the row's masked items in the block that count (ties and NaN count
//                        against the target).

struct P {
    rows: u32,
    width: u32,
    start: u32,   // first item of the block
    first: u32,   // 1 for the first block (statistics start empty)
    scale: f32,
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> z: array<f32>;             // fwd, bwd
@group(0) @binding(1) var<storage, read> stat_r: array<f32>;        // finish
@group(0) @binding(2) var<storage, read> targets: array<u32>;       // fwd, bwd
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;    // finish
@group(0) @binding(3) var<storage, read_write> stat: array<f32>;    // fwd: (max, sum, target) x rows
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;     // finish
@group(0) @binding(3) var<storage, read> lg: array<f32>;            // bwd: lse (rows) then g (rows)
@group(0) @binding(3) var<storage, read_write> st: array<f32>;     // rank_target: target scores
@group(0) @binding(3) var<storage, read> st_in: array<f32>;         // rank_count
@group(0) @binding(4) var<storage, read_write> dz: array<f32>;      // bwd
@group(0) @binding(4) var<storage, read> mask: array<u32>;          // rank_count: offsets (rows + 1), then items
@group(0) @binding(5) var<storage, read_write> counts: array<u32>;  // rank_count

@compute @workgroup_size(WG)
fn catalog_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let base = r * prm.width;
    var m = NEG;
    for (var j = t; j < prm.width; j = j + WG) {
        m = max(m, prm.scale * z[base + j]);
    }
    var s = 0.0;
    for (var j = t; j < prm.width; j = j + WG) {
        s = s + exp(prm.scale * z[base + j] - m);
    }
    let ms = reduce_max_sum(t, m, s, WG);
    if (t == 0u) {
        let tg = targets[r];
        var om = NEG;
        var os = 0.0;
        var ot = 0.0;
        if (prm.first == 0u) {
            om = stat[3u * r];
            os = stat[3u * r + 1u];
            ot = stat[3u * r + 2u];
        }
        let nm = max(om, ms.x);
        var ns = ms.y * exp(ms.x - nm);
        if (os > 0.0) {
            ns = ns + os * exp(om - nm);
        }
        if (tg >= prm.start && tg < prm.start + prm.width) {
            ot = prm.scale * z[base + tg - prm.start];
        }
        stat[3u * r] = nm;
        stat[3u * r + 1u] = ns;
        stat[3u * r + 2u] = ot;
    }
}

@compute @workgroup_size(WG)
fn catalog_finish(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = lin(gid, nwg);
    if (r >= prm.rows) { return; }
    let l = stat_r[3u * r] + log(stat_r[3u * r + 1u]);
    lse[r] = l;
    loss[r] = l - stat_r[3u * r + 2u];
}

@compute @workgroup_size(WG)
fn catalog_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let base = r * prm.width;
    let l = lg[r];
    let g = lg[prm.rows + r];
    let tg = targets[r];
    for (var j = t; j < prm.width; j = j + WG) {
        var hit = 0.0;
        if (prm.start + j == tg) {
            hit = 1.0;
        }
        dz[base + j] = prm.scale * ((exp(prm.scale * z[base + j] - l) - hit) * g);
    }
}

@compute @workgroup_size(WG)
fn catalog_rank_target(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = lin(gid, nwg);
    if (r >= prm.rows) { return; }
    let tg = targets[r];
    if (tg >= prm.start && tg < prm.start + prm.width) {
        st[r] = prm.scale * z[r * prm.width + tg - prm.start];
    }
}

@compute @workgroup_size(WG)
fn catalog_rank_count(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let r = row_index(wid, nwg);
    if (r >= prm.rows) { return; }
    let base = r * prm.width;
    let tg = targets[r];
    let s_t = st_in[r];
    var c = 0u;
    for (var j = t; j < prm.width; j = j + WG) {
        if (prm.start + j != tg && !(prm.scale * z[base + j] < s_t)) {
            c = c + 1u;
        }
    }
    // The masked items (deduplicated, target left out) are among those counted: take them back out.
    // A thread's c may wrap below zero; the workgroup's sum is exact modulo 2^32 and non-negative.
    let m1 = mask[r + 1u];
    for (var i = mask[r] + t; i < m1; i = i + WG) {
        let j = mask[prm.rows + 1u + i];
        if (j >= prm.start && j < prm.start + prm.width && !(prm.scale * z[base + j - prm.start] < s_t)) {
            c = c - 1u;
        }
    }
    let total = reduce_sum_u32(t, c, WG);
    if (t == 0u) {
        if (prm.first == 1u) {
            counts[r] = total;
        } else {
            counts[r] = counts[r] + total;
        }
    }
}
