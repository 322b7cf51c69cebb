// The operands of the matmul variants that read them one f32 at a time (any sizes, any layout).

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

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
