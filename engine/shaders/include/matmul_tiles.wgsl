// What every matmul variant shares (matmul.wgsl has the contract): the parameters, the bias and
// output bindings, and `store`, the one place an output element is written (an epilogue such as a
// fused activation goes there). The operands come from include/matmul_scalar.wgsl (f32 loads, any
// layout) or include/matmul_vec4.wgsl (vec4 loads, aligned layouts only).

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
    gelu: u32,   // 1: pre[..] = the value, c[..] = GELU of it (never split over K)
}

@group(0) @binding(0) var<uniform> prm: P;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
@group(0) @binding(5) var<storage, read_write> pre: array<f32>;

// What the workgroup of output slab z computes: the K range [k0, k1) of its split (z % nsplit), the
// matrix index `first` of its first product (product s uses matrices first + s of A and B), where
// its output matrix starts, and whether it adds the bias (the first split only).
struct Slab {
    k0: u32,
    k1: u32,
    first: u32,
    cbase: u32,
    add_bias: bool,
}

fn slab(z: u32) -> Slab {
    let split = z % prm.nsplit;
    let k0 = split * prm.kc;
    return Slab(k0, min(prm.k, k0 + prm.kc), (z / prm.nsplit) * prm.nsum, z * prm.m * prm.n, prm.bias == 1u && split == 0u);
}

// C[row, col] of the output matrix at `cbase` = v (+ bias[col] when `add_bias`), or with the GELU
// epilogue pre[..] = that and C[row, col] = GELU of it (as gelu_fwd computes it); nothing outside (M, N).
fn store(cbase: u32, row: u32, col: u32, v: f32, add_bias: bool) {
    if (row >= prm.m || col >= prm.n) { return; }
    var x = v;
    if (add_bias) { x = x + bias[col]; }
    let i = cbase + row * prm.n + col;
    if (prm.gelu == 1u) {
        pre[i] = x;
        x = x * norm_cdf(x);
    }
    c[i] = x;
}
