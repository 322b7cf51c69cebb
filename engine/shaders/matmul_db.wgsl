// Variant 4 of the matrix product (see matmul.wgsl for the contract, which is the same): variant 3
// (vec4 loads, 128 x 128 tile, 8 x 8 outputs per invocation, BK = 8; include/matmul_vec4.wgsl) with
// double-buffered workgroup tiles. The K-slices of all nsum products form one sequence u = 0, 1, ..;
// while the workgroup multiplies slice u from one buffer, each invocation already holds its global
// loads of slice u + 1 in registers and writes them into the other buffer afterwards, so the loads'
// latency overlaps the arithmetic and there is one barrier per slice: after it, slice u + 1 is
// complete and nobody reads slice u's buffer any more (it is rewritten only after the next barrier).
// Only for products whose stored contiguous axes and batch strides are multiples of 4; kc must be a
// multiple of 8.

var<workgroup> As: array<vec4<f32>, 512>; // two slice buffers (at 0 and 256), laid out as in variant 3
var<workgroup> Bs: array<vec4<f32>, 512>;

@compute @workgroup_size(16, 16)
fn matmul_db(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let li = ty * 16u + tx;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let sl = slab(wid.z);
    let nk = (max(sl.k1, sl.k0) - sl.k0 + BK - 1u) / BK; // slices per product
    let total = prm.nsum * nk;
    let first = sl.first; // matrix index of product s = 0

    var acc: array<vec4<f32>, 16>;
    if (total > 0u) {
        put(li, fetch(li, first * prm.a_bs, first * prm.b_bs, m0, n0, sl.k0), 0u);
        workgroupBarrier();
        for (var u = 0u; u < total; u = u + 1u) {
            let cur = (u % 2u) * 256u;
            let more = u + 1u < total;
            var next: Frag;
            if (more) {
                let i = first + (u + 1u) / nk;
                next = fetch(li, i * prm.a_bs, i * prm.b_bs, m0, n0, sl.k0 + ((u + 1u) % nk) * BK);
            }
            mac(cur, tx, ty, &acc);
            if (more) { put(li, next, 256u - cur); }
            workgroupBarrier();
        }
    }
    store_tile(sl.cbase, m0, n0, tx, ty, &acc, sl.add_bias);
}
