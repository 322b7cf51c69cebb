// What every matmul variant shares (matmul.wgsl has the contract): the parameters, the bindings,
// the operand loads and the staging of one K-slice. A variant defines TILE, BK and LDS (TILE * BK
// = 1024: four elements of each operand per invocation of its 16 x 16 workgroup) and the workgroup
// arrays As and Bs (BK * LDS each), then computes and stores its tile.

struct P {
    m: u32,
    n: u32,
    k: u32,
    ta: u32,
    tb: u32,
    a_bs: u32,   // batch stride of A in elements (0 = broadcast)
    b_bs: u32,
    nsum: u32,   // products summed into each output matrix
    nsplit: u32, // K splits (slabs per output matrix)
    kc: u32,     // K range per split
    bias: u32,   // 1: add bias[col] (first split only)
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// op(A)[row, col] of the matrix at `base`, 0 outside (M, K).
fn load_a(base: u32, row: u32, col: u32) -> f32 {
    if (row >= prm.m || col >= prm.k) { return 0.0; }
    if (prm.ta == 1u) { return a[base + col * prm.m + row]; }
    return a[base + row * prm.k + col];
}

// op(B)[row, col] of the matrix at `base`, 0 outside (K, N).
fn load_b(base: u32, row: u32, col: u32) -> f32 {
    if (row >= prm.k || col >= prm.n) { return 0.0; }
    if (prm.tb == 1u) { return b[base + col * prm.k + row]; }
    return b[base + row * prm.n + col];
}

// Stage the BK-deep slices at kt of op(A) rows [m0, m0 + TILE) and op(B) columns [n0, n0 + TILE):
// As[kk * LDS + row] = op(A)[m0 + row, kt + kk], Bs[kk * LDS + col] = op(B)[kt + kk, n0 + col], each
// loaded along the stored matrix's contiguous axis (coalesced). `li`: the invocation's index.
fn stage(li: u32, abase: u32, bbase: u32, m0: u32, n0: u32, kt: u32) {
    for (var l = 0u; l < 4u; l = l + 1u) {
        let t = li + 256u * l;
        var row: u32;
        var kk: u32;
        if (prm.ta == 1u) { kk = t / TILE; row = t % TILE; } else { row = t / BK; kk = t % BK; }
        As[kk * LDS + row] = load_a(abase, m0 + row, kt + kk);
        var col: u32;
        if (prm.tb == 1u) { col = t / BK; kk = t % BK; } else { kk = t / TILE; col = t % TILE; }
        Bs[kk * LDS + col] = load_b(bbase, kt + kk, n0 + col);
    }
}
