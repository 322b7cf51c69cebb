// Tiled matrix product, batched, with optional transposes, a fused bias and split-K:
//
//   C[z] (M, N) = sum_{s < nsum} op(A[i]) . op(B[i])  (+ bias),   i = (z / nsplit) * nsum + s
//
// op(A) is A (M, K) stored row-major or, when ta = 1, the transpose of a stored (K, M) matrix;
// op(B) is B (K, N) or, when tb = 1, the transpose of a stored (N, K) matrix. Matrix i of A starts at
// i * a_bs (a_bs = 0 broadcasts a 2-D operand), likewise B. nsum > 1 sums a batch of products into
// one output (the gradient of a broadcast operand). With nsplit > 1, slab z covers only the K range
// [(z % nsplit) * kc, +kc) (kc a multiple of BK) and writes a partial product; the host sums the
// nsplit partials.
//
// Each workgroup of 16 x 16 invocations computes a 64 x 64 tile of C; invocation (tx, ty) keeps the
// 4 x 4 outputs at rows ty + 16 i, columns tx + 16 j in registers (strided, so workgroup-memory reads
// and the final stores are contiguous across tx). The K loop stages BK-deep slices of op(A) and
// op(B) in workgroup memory (`stage`, include/matmul_stage.wgsl). The parameters, bindings and
// `store` (the one place an output element is written) are in include/matmul_tiles.wgsl, the
// operand loads in include/matmul_scalar.wgsl; every variant shares them.

const TILE: u32 = 64u;
const BK: u32 = 16u;
const LDS: u32 = 65u; // padded row of the staged slices (avoids bank conflicts on the stores)

var<workgroup> As: array<f32, 1040>; // BK * LDS: As[kk * LDS + row] = op(A)[m0 + row, kt + kk]
var<workgroup> Bs: array<f32, 1040>; // Bs[kk * LDS + col] = op(B)[kt + kk, n0 + col]

@compute @workgroup_size(16, 16)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let li = ty * 16u + tx;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let sl = slab(wid.z);

    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
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
                let bv = vec4<f32>(Bs[rb], Bs[rb + 16u], Bs[rb + 32u], Bs[rb + 48u]);
                acc[0] = fma(vec4<f32>(As[ra]), bv, acc[0]);
                acc[1] = fma(vec4<f32>(As[ra + 16u]), bv, acc[1]);
                acc[2] = fma(vec4<f32>(As[ra + 32u]), bv, acc[2]);
                acc[3] = fma(vec4<f32>(As[ra + 48u]), bv, acc[3]);
            }
            workgroupBarrier();
        }
    }

    let cbase = sl.cbase;
    let add_bias = sl.add_bias;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = m0 + ty + 16u * i;
        if (row >= prm.m) { break; }
        for (var j = 0u; j < 4u; j = j + 1u) { store(cbase, row, n0 + tx + 16u * j, acc[i][j], add_bias); }
    }
}
