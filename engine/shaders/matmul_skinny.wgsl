// Variant 5 of the matrix product (see matmul.wgsl for the contract, which is the same), for a short
// K (at most KS = 64, e.g. the (51200 x 64) . (64 x 64) projections of a hidden size of 64): a 64 x 64
// tile of C per workgroup of 16 x 16 invocations with 4 x 4 outputs each (rows ty + 16 i, columns
// tx + 16 j, as in variant 1), but all of K is staged at once, so there is no K loop and no barrier
// between slices: each invocation issues its 16 loads of each operand together, then the workgroup
// multiplies. The staged arrays take 32 KiB of workgroup memory (the host gives this variant no
// products on an adapter with less, nor any with K > 64). Element (kk, r) of a staged operand sits at
// kk * 64 + (r ^ (kk % 32)): the XOR spreads both the stores along K and the reads along M (N) over
// all 32 banks without padding.

const TILE: u32 = 64u;
const KS: u32 = 64u; // the K range staged at once: the largest K this variant takes

var<workgroup> As: array<f32, 4096>; // As[at(kk, row)] = op(A)[m0 + row, k0 + kk]
var<workgroup> Bs: array<f32, 4096>; // Bs[at(kk, col)] = op(B)[k0 + kk, n0 + col]

fn at(kk: u32, r: u32) -> u32 {
    return kk * TILE + (r ^ (kk & 31u));
}

@compute @workgroup_size(16, 16)
fn matmul_skinny(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let tx = lid.x;
    let ty = lid.y;
    let li = ty * 16u + tx;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    let sl = slab(wid.z);
    let kn = min(max(sl.k1, sl.k0) - sl.k0, KS);

    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var s = 0u; s < prm.nsum; s = s + 1u) {
        let i = sl.first + s;
        let abase = i * prm.a_bs;
        let bbase = i * prm.b_bs;
        // Along the stored contiguous axis (coalesced): K of a stored (M, K) A, else M; likewise B.
        for (var l = 0u; l < 16u; l = l + 1u) {
            let t = li + 256u * l;
            var row: u32;
            var kk: u32;
            if (prm.ta == 1u) { kk = t / TILE; row = t % TILE; } else { row = t / KS; kk = t % KS; }
            var va = 0.0;
            if (kk < kn) { va = load_a(abase, m0 + row, sl.k0 + kk); }
            As[at(kk, row)] = va;
            var col: u32;
            if (prm.tb == 1u) { col = t / KS; kk = t % KS; } else { kk = t / TILE; col = t % TILE; }
            var vb = 0.0;
            if (kk < kn) { vb = load_b(bbase, sl.k0 + kk, n0 + col); }
            Bs[at(kk, col)] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < kn; kk = kk + 1u) {
            let bv = vec4<f32>(Bs[at(kk, tx)], Bs[at(kk, tx + 16u)], Bs[at(kk, tx + 32u)], Bs[at(kk, tx + 48u)]);
            acc[0] = fma(vec4<f32>(As[at(kk, ty)]), bv, acc[0]);
            acc[1] = fma(vec4<f32>(As[at(kk, ty + 16u)]), bv, acc[1]);
            acc[2] = fma(vec4<f32>(As[at(kk, ty + 32u)]), bv, acc[2]);
            acc[3] = fma(vec4<f32>(As[at(kk, ty + 48u)]), bv, acc[3]);
        }
        if (s + 1u < prm.nsum) { workgroupBarrier(); }
    }

    let cbase = sl.cbase;
    let add_bias = sl.add_bias;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let row = m0 + ty + 16u * i;
        if (row >= prm.m) { break; }
        for (var j = 0u; j < 4u; j = j + 1u) { store(cbase, row, n0 + tx + 16u * j, acc[i][j], add_bias); }
    }
}
