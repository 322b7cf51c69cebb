// Variant 6 of the matrix product (see matmul.wgsl for the contract, which is the same), for narrow
// outputs (N <= 8, e.g. the attention-pooling energies, a matrix . vector product) on adapters with
// subgroup operations: a tiled kernel would leave most of its tile idle there. A workgroup of 256
// invocations computes ROWS = 32 rows of C (all N columns); each of its subgroups takes outputs
// slot, slot + nsub, .. in turn and computes each as one dot product, its lanes striding over K
// (coalesced along a stored (M, K) A) and summing their partials with subgroupAdd; the lowest lane
// stores it.
//
// Nothing depends on the subgroup size or on how invocations are grouped into subgroups: a subgroup
// numbers itself through a workgroup atomic (its lowest active lane draws the slot), and a lane's
// stride and offset are the number of active lanes and its rank among them, so every output is
// computed by exactly one subgroup and every k by exactly one of its lanes, whatever the adapter.

const ROWS: u32 = 32u;

var<workgroup> subgroups: atomic<u32>;

@compute @workgroup_size(256)
fn matmul_subgroup(@builtin(workgroup_id) wid: vec3<u32>) {
    let lanes = subgroupAdd(1u);
    let lane = subgroupExclusiveAdd(1u); // 0 for the lowest active lane
    var drawn = 0u;
    if (lane == 0u) { drawn = atomicAdd(&subgroups, 1u); }
    let slot = subgroupBroadcastFirst(drawn);
    workgroupBarrier();
    let nsub = atomicLoad(&subgroups);

    let m0 = wid.y * ROWS;
    let sl = slab(wid.z);
    let cbase = sl.cbase;
    let add_bias = sl.add_bias;
    for (var o = slot; o < ROWS * prm.n; o = o + nsub) {
        let row = m0 + o / prm.n;
        let col = o % prm.n;
        if (row >= prm.m) { break; }
        var acc = 0.0;
        for (var s = 0u; s < prm.nsum; s = s + 1u) {
            let i = sl.first + s;
            let abase = i * prm.a_bs;
            let bbase = i * prm.b_bs;
            for (var kb = sl.k0; kb < sl.k1; kb = kb + lanes) {
                let k = kb + lane;
                if (k < sl.k1) { acc = fma(load_a(abase, row, k), load_b(bbase, k, col), acc); }
            }
        }
        let total = subgroupAdd(acc);
        if (lane == 0u) { store(cbase, row, col, total, add_bias); }
    }
}
