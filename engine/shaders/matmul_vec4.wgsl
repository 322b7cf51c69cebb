// Variant 3 of the matrix product (see matmul.wgsl for the contract, which is the same): vec4 global
// loads, a 128 x 128 tile of C per workgroup of 16 x 16 invocations with 8 x 8 outputs each, and vec4
// reads from workgroup memory (include/matmul_vec4.wgsl). Only for products whose stored contiguous
// axes and batch strides are multiples of 4. Each BK = 8 deep K-slice is loaded (one vec4 of each
// operand per invocation), staged, and multiplied between two barriers. kc must be a multiple of 8.

var<workgroup> As: array<vec4<f32>, 256>; // one slice: As[kk * 32 + r] = op(A)[m0 + 4r .. + 4, kt + kk]
var<workgroup> Bs: array<vec4<f32>, 256>; // Bs[kk * 32 + q] = op(B)[kt + kk, n0 + 4q .. + 4]

@compute @workgroup_size(16, 16)
fn matmul_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let li = ty * 16u + tx;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let sl = slab(wid.z);

    var acc: array<vec4<f32>, 16>;
    for (var s = 0u; s < prm.nsum; s = s + 1u) {
        let i = sl.first + s;
        let abase = i * prm.a_bs;
        let bbase = i * prm.b_bs;
        for (var kt = sl.k0; kt < sl.k1; kt = kt + BK) {
            put(li, fetch(li, abase, bbase, m0, n0, kt), 0u);
            workgroupBarrier();
            mac(0u, tx, ty, &acc);
            workgroupBarrier();
        }
    }
    store_tile(sl.cbase, m0, n0, tx, ty, &acc, sl.add_bias);
}
