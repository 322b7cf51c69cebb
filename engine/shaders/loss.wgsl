// Per-row losses; the host takes the (deterministic) mean over rows.
//   ce_fwd (one workgroup per row b): logits (B, N), targets (B) -> loss (B), stat = lse (B)
//       loss[b] = logsumexp(logits[b]) - logits[b, t_b]
//   ce_bwd: dlogits[b, i] = (exp(logits[b, i] - lse[b]) - [i == t_b]) g[b]
//   nce_fwd (one workgroup per row j): logits (K, B, B), targets (B) -> loss (B),
//       stat = (lse_den (B), lse_num (B)); loss[j] = lse_den[j] - lse_num[j], where
//       den: entries (k, j, j') with j' == j and exclude_diag[k] clear, or j' != j and t_j' != t_j
//       num: entries (k, j, j) with numerator[k] set
//   nce_bwd: dlogits = g[j] (den ? exp(l - lse_den[j]) : 0 - num ? exp(l - lse_num[j]) : 0) scale
// (InfoNCE's l is scale times the stored logit).
// numerator / exclude_diag are bit masks over k.

struct P {
    rows: u32,      // B
    cols: u32,      // N for cross-entropy, B for InfoNCE
    k: u32,         // InfoNCE matrices
    num_mask: u32,
    excl_mask: u32,
    scale: f32,     // InfoNCE: every logit is taken times this
}


@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
// forward
@group(0) @binding(4) var<storage, read_write> stat: array<f32>;
// backward
@group(0) @binding(4) var<storage, read> stat_in: array<f32>;
@group(0) @binding(5) var<storage, read> g: array<f32>;


@compute @workgroup_size(WG)
fn ce_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) t: u32) {
    let b = row_index(wid, nwg);
    if (b >= prm.rows) { return; }
    let base = b * prm.cols;
    var m = NEG;
    var s = 0.0;
    for (var i = t; i < prm.cols; i = i + WG) {
        let v = logits[base + i];
        let mm = max(m, v);
        s = s * exp(m - mm) + exp(v - mm);
        m = mm;
    }
    let r = reduce_max_sum(t, m, s, WG);
    if (t == 0u) {
        let ls = log(r.y);
        stat[b] = r.x + ls;
        out[b] = (r.x - logits[base + targets[b]]) + ls;
    }
}

@compute @workgroup_size(WG)
fn ce_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    if (i >= prm.rows * prm.cols) { return; }
    let b = i / prm.cols;
    let hit = select(0.0, 1.0, i % prm.cols == targets[b]);
    out[i] = (exp(logits[i] - stat_in[b]) - hit) * g[b];
}

fn bit(mask: u32, k: u32) -> bool {
    return ((mask >> k) & 1u) != 0u;
}

@compute @workgroup_size(WG)
fn nce_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) t: u32) {
    let j = row_index(wid, nwg);
    let nb = prm.rows;
    if (j >= nb) { return; }
    let tj = targets[j];
    var m = NEG;
    var s = 0.0;
    for (var k = 0u; k < prm.k; k = k + 1u) {
        let base = (k * nb + j) * nb;
        let diag = !bit(prm.excl_mask, k);
        for (var c = t; c < nb; c = c + WG) {
            if (select(targets[c] != tj, diag, c == j)) {
                let v = prm.scale * logits[base + c];
                let mm = max(m, v);
                s = s * exp(m - mm) + exp(v - mm);
                m = mm;
            }
        }
    }
    let r = reduce_max_sum(t, m, s, WG);
    if (t == 0u) {
        // The numerator has at most K terms: its own max-shifted log-sum-exp.
        var nm = NEG;
        for (var k = 0u; k < prm.k; k = k + 1u) {
            if (bit(prm.num_mask, k)) { nm = max(nm, prm.scale * logits[(k * nb + j) * nb + j]); }
        }
        var ns = 0.0;
        for (var k = 0u; k < prm.k; k = k + 1u) {
            if (bit(prm.num_mask, k)) { ns = ns + exp(prm.scale * logits[(k * nb + j) * nb + j] - nm); }
        }
        let lden = r.x + log(r.y);
        let lnum = nm + log(ns);
        stat[j] = lden;
        stat[nb + j] = lnum;
        out[j] = lden - lnum;
    }
}

@compute @workgroup_size(WG)
fn nce_bwd(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = lin(gid, nwg);
    let nb = prm.rows;
    if (i >= prm.k * nb * nb) { return; }
    let c = i % nb;
    let j = (i / nb) % nb;
    let k = i / (nb * nb);
    let l = prm.scale * logits[i];
    let den = select(targets[c] != targets[j], !bit(prm.excl_mask, k), c == j);
    let num = c == j && bit(prm.num_mask, k);
    let v = select(0.0, exp(l - stat_in[j]), den) - select(0.0, exp(l - stat_in[nb + j]), num);
    out[i] = (g[j] * v) * prm.scale;
}
