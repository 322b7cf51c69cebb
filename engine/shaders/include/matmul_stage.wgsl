// The K-slice staging of variants 1 and 2. A variant defines TILE, BK and LDS (TILE * BK = 1024:
// four elements of each operand per invocation of its 16 x 16 workgroup) and the workgroup arrays
// As and Bs (BK * LDS each).

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
