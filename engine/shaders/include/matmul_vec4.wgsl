// The operands and the K-slice machinery of the vec4 matmul variants (3 and 4): 128 x 128 tiles of C
// per 16 x 16 workgroup, 8 x 8 outputs per invocation, K-slices BK = 8 deep.
//
// Every global load is a vec4 along the stored matrix's contiguous axis (K of A, or M when ta = 1; N
// of B, or K when tb = 1), so that axis's length and the batch strides must be multiples of 4: then a
// vec4 lies entirely inside or entirely outside the matrix, and the host gives these variants no other
// products (`MatmulVariant::supports`). A slice is staged as vec4s of 4 rows (4 columns):
//
//   As[off + kk * 32 + r] = op(A)[m0 + 4r .. m0 + 4r + 4, kt + kk]
//   Bs[off + kk * 32 + q] = op(B)[kt + kk, n0 + 4q .. n0 + 4q + 4]
//
// (one slice buffer is 256 vec4s at `off`; a variant declares As and Bs with one or two buffers), so
// the inner loop reads two vec4s of each operand from workgroup memory per 64 FMAs. Invocation
// (tx, ty) owns rows m0 + 4 ty + i and m0 + 64 + 4 ty + i, columns n0 + 4 tx + j and n0 + 64 + 4 tx + j
// (i, j < 4): acc[8 hr + 2 i + hc][j], hr, hc the row and column halves.

@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;

const TILE: u32 = 128u;
const BK: u32 = 8u;

// One invocation's share of a slice: one vec4 of op(A) and one of op(B), as stored.
struct Frag {
    a: vec4<f32>,
    b: vec4<f32>,
}

// The global loads of invocation `li` for the slice at kt, coalesced along the contiguous axis:
// a stored (M, K) A gives row m0 + li / 2, k kt + 4 (li % 2) .. + 4 (two invocations per row); a
// stored (K, M) one k kt + li / 32, rows m0 + 4 (li % 32) .. + 4 (a warp per k); B likewise. 0 outside.
fn fetch(li: u32, abase: u32, bbase: u32, m0: u32, n0: u32, kt: u32) -> Frag {
    var f = Frag(vec4<f32>(0.0), vec4<f32>(0.0));
    if (prm.ta == 1u) {
        let k = kt + li / 32u;
        let row = m0 + 4u * (li % 32u);
        if (k < prm.k && row < prm.m) { f.a = a[(abase + k * prm.m + row) / 4u]; }
    } else {
        let row = m0 + li / 2u;
        let k = kt + 4u * (li % 2u);
        if (row < prm.m && k < prm.k) { f.a = a[(abase + row * prm.k + k) / 4u]; }
    }
    if (prm.tb == 1u) {
        let col = n0 + li / 2u;
        let k = kt + 4u * (li % 2u);
        if (col < prm.n && k < prm.k) { f.b = b[(bbase + col * prm.k + k) / 4u]; }
    } else {
        let k = kt + li / 32u;
        let col = n0 + 4u * (li % 32u);
        if (k < prm.k && col < prm.n) { f.b = b[(bbase + k * prm.n + col) / 4u]; }
    }
    return f;
}

// Write invocation `li`'s share into the slice buffer at `off`: a vec4 along M (N) is stored as is,
// a vec4 along K is spread over four rows of the slice.
fn put(li: u32, f: Frag, off: u32) {
    if (prm.ta == 1u) {
        As[off + li] = f.a;
    } else {
        let row = li / 2u;
        let at = off + 4u * (li % 2u) * 32u + row / 4u;
        As[at][row % 4u] = f.a.x;
        As[at + 32u][row % 4u] = f.a.y;
        As[at + 64u][row % 4u] = f.a.z;
        As[at + 96u][row % 4u] = f.a.w;
    }
    if (prm.tb == 1u) {
        let col = li / 2u;
        let at = off + 4u * (li % 2u) * 32u + col / 4u;
        Bs[at][col % 4u] = f.b.x;
        Bs[at + 32u][col % 4u] = f.b.y;
        Bs[at + 64u][col % 4u] = f.b.z;
        Bs[at + 96u][col % 4u] = f.b.w;
    } else {
        Bs[off + li] = f.b;
    }
}

// acc += the slice buffer at `off` (op(A) rows . op(B) columns of invocation (tx, ty)).
fn mac(off: u32, tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 16>>) {
    for (var kk = 0u; kk < BK; kk = kk + 1u) {
        let r = off + kk * 32u;
        let a0 = As[r + ty];
        let a1 = As[r + 16u + ty];
        let b0 = Bs[r + tx];
        let b1 = Bs[r + 16u + tx];
        for (var i = 0u; i < 4u; i = i + 1u) {
            (*acc)[2u * i] = fma(vec4<f32>(a0[i]), b0, (*acc)[2u * i]);
            (*acc)[2u * i + 1u] = fma(vec4<f32>(a0[i]), b1, (*acc)[2u * i + 1u]);
            (*acc)[8u + 2u * i] = fma(vec4<f32>(a1[i]), b0, (*acc)[8u + 2u * i]);
            (*acc)[9u + 2u * i] = fma(vec4<f32>(a1[i]), b1, (*acc)[9u + 2u * i]);
        }
    }
}

// Store invocation (tx, ty)'s 8 x 8 outputs of the tile at (m0, n0).
fn store_tile(cbase: u32, m0: u32, n0: u32, tx: u32, ty: u32, acc: ptr<function, array<vec4<f32>, 16>>, add_bias: bool) {
    for (var hr = 0u; hr < 2u; hr = hr + 1u) {
        for (var i = 0u; i < 4u; i = i + 1u) {
            let row = m0 + 64u * hr + 4u * ty + i;
            for (var hc = 0u; hc < 2u; hc = hc + 1u) {
                let v = (*acc)[8u * hr + 2u * i + hc];
                let col = n0 + 64u * hc + 4u * tx;
                store(cbase, row, col, v.x, add_bias);
                store(cbase, row, col + 1u, v.y, add_bias);
                store(cbase, row, col + 2u, v.z, add_bias);
                store(cbase, row, col + 3u, v.w, add_bias);
            }
        }
    }
}
