// Variant 2 of the matrix product (see matmul.wgsl for the contract, which is the same: same
// parameters, bindings and results): a 128 x 128 tile of C per workgroup of 16 x 16 invocations,
// each keeping 8 x 8 outputs (rows ty + 16 i, columns tx + 16 j) in registers, and BK = 8 deep
// K-slices — twice the register blocking of variant 1, so twice the arithmetic per workgroup-memory
// read. kc (the split-K range) must be a multiple of 8.

const TILE: u32 = 128u;
const BK: u32 = 8u;
const LDS: u32 = 129u; // padded row of the staged slices (avoids bank conflicts on the stores)

var<workgroup> As: array<f32, 1032>; // BK * LDS: As[kk * LDS + row] = op(A)[m0 + row, kt + kk]
var<workgroup> Bs: array<f32, 1032>; // Bs[kk * LDS + col] = op(B)[kt + kk, n0 + col]

@compute @workgroup_size(16, 16)
fn matmul_8x8(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let li = ty * 16u + tx;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let sl = slab(wid.z);

    var acc: array<array<f32, 8>, 8>;
    for (var s = 0u; s < prm.nsum; s = s + 1u) {
        let i = sl.first + s;
        let abase = i * prm.a_bs;
        let bbase = i * prm.b_bs;
        for (var kt = sl.k0; kt < sl.k1; kt = kt + BK) {
            stage(li, abase, bbase, m0, n0, kt);
            workgroupBarrier();
            for (var kk = 0u; kk < BK; kk = kk + 1u) {
                let ra = kk * LDS + ty;
                let rb = kk * LDS + tx;
                var bv: array<f32, 8>;
                for (var j = 0u; j < 8u; j = j + 1u) { bv[j] = Bs[rb + 16u * j]; }
                for (var i = 0u; i < 8u; i = i + 1u) {
                    let av = As[ra + 16u * i];
                    for (var j = 0u; j < 8u; j = j + 1u) { acc[i][j] = fma(av, bv[j], acc[i][j]); }
                }
            }
            workgroupBarrier();
        }
    }

    let cbase = sl.cbase;
    let add_bias = sl.add_bias;
    for (var i = 0u; i < 8u; i = i + 1u) {
        let row = m0 + ty + 16u * i;
        if (row >= prm.m) { break; }
        for (var j = 0u; j < 8u; j = j + 1u) { store(cbase, row, n0 + tx + 16u * j, acc[i][j], add_bias); }
    }
}
