//! Cases for matmul / linear, l2norm, concat and the full-catalog cross-entropy. Sizes are chosen around the matmul kernel's
//! 64 x 64 output tile and 16-deep K slices (odd sizes, K = 37 spans three slices, M or N = 1,
//! 70 x 67 spans four tiles) and its split-K path (a long K with a small output).
//!
//! Product inputs are scaled by MM_SCALE / sqrt(largest dimension). Two f32 sums of n products in
//! different orders (GPU tiles vs the CPU GEMM) differ by about n^(1/2) ulps of the partial sums;
//! at unit scale that exceeds the gpu check's 1e-4 relative tolerance on the few outputs that
//! cancel to just above 1e-3. With small partial sums every such output is within the absolute
//! tolerance, while an indexing bug still shows up as an error of the size of the values.

use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{catalog_ce, concat, l2norm, linear, linear_gelu, matmul};
use crate::engine::Indices;
use crate::harness::gradcheck::{gauss, Case, Input};

const MM_SCALE: f64 = 0.1;

/// A random input for a product whose largest dimension (M, N, K or rows summed over) is `dim`.
fn mm_input(shape: &[usize], dim: usize, rng: &mut ChaCha8Rng) -> Input {
    Input::randn(shape, rng).scaled(MM_SCALE / (dim as f64).sqrt())
}

fn mm(rng: &mut ChaCha8Rng, desc: &str, sa: &[usize], sb: &[usize], ta: bool, tb: bool) -> Case {
    let dim = sa.iter().chain(sb).copied().max().unwrap();
    Case::new("matmul", desc, vec![mm_input(sa, dim, rng), mm_input(sb, dim, rng)], move |x| matmul(&x[0], &x[1], ta, tb))
}

/// Rows of width `cols` with the given norms (0 makes an all-zero row).
fn rows_with_norms(norms: &[f64], cols: usize, rng: &mut ChaCha8Rng) -> Input {
    let mut data = Vec::with_capacity(norms.len() * cols);
    for &n in norms {
        let row: Vec<f64> = (0..cols).map(|_| gauss(rng)).collect();
        let len = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        data.extend(row.iter().map(|v| v * n / len));
    }
    Input { shape: vec![norms.len(), cols], data, grad: true }
}

pub fn cases(rng: &mut ChaCha8Rng) -> Vec<Case> {
    let mut v = vec![
        mm(rng, "(13,17).(17,9)", &[13, 17], &[17, 9], false, false),
        mm(rng, "(17,13)^T.(17,9)", &[17, 13], &[17, 9], true, false),
        mm(rng, "(13,17).(9,17)^T", &[13, 17], &[9, 17], false, true),
        mm(rng, "(17,13)^T.(9,17)^T", &[17, 13], &[9, 17], true, true),
        mm(rng, "(70,37).(37,67)", &[70, 37], &[37, 67], false, false),
        mm(rng, "M=1 (1,37).(37,5)", &[1, 37], &[37, 5], false, false),
        mm(rng, "N=1 (6,37)^T.(1,37)^T", &[37, 6], &[1, 37], true, true),
        mm(rng, "(3,5,7).(3,7,4)", &[3, 5, 7], &[3, 7, 4], false, false),
        mm(rng, "(2,5,7).(2,6,7)^T", &[2, 5, 7], &[2, 6, 7], false, true),
        mm(rng, "(2,7,5)^T.(2,7,4)", &[2, 7, 5], &[2, 7, 4], true, false),
        mm(rng, "(1,6,5).(1,5,3) batch 1", &[1, 6, 5], &[1, 5, 3], false, false),
        mm(rng, "(3,5,7).(7,4)", &[3, 5, 7], &[7, 4], false, false),
        mm(rng, "(3,7,5)^T.(4,7)^T", &[3, 7, 5], &[4, 7], true, true),
        mm(rng, "(5,7).(3,7,4)", &[5, 7], &[3, 7, 4], false, false),
        mm(rng, "(7,5)^T.(3,4,7)^T", &[7, 5], &[3, 4, 7], true, true),
        mm(rng, "split-K (600,3)^T.(600,5)", &[600, 3], &[600, 5], true, false),
    ];
    let lin = |rng: &mut ChaCha8Rng, desc: &str, sx: &[usize], k: usize, n: usize, bias: bool| {
        let dim = (sx.iter().product::<usize>() / k).max(k).max(n);
        let mut inputs = vec![mm_input(sx, dim, rng), mm_input(&[k, n], dim, rng)];
        if bias {
            inputs.push(mm_input(&[n], dim, rng));
        }
        Case::new("matmul", desc, inputs, |x| linear(&x[0], &x[1], x.get(2)))
    };
    v.push(lin(rng, "linear (2,3,5).(5,4)+b", &[2, 3, 5], 5, 4, true));
    v.push(lin(rng, "linear (2,3,5).(5,4)", &[2, 3, 5], 5, 4, false));
    // Split-K in the weight gradient x^T . g (K = 700 rows), and in the forward with the bias fused.
    v.push(lin(rng, "linear dw split-K (2,350,6).(6,5)", &[2, 350, 6], 6, 5, false));
    v.push(lin(rng, "linear split-K (3,600).(600,2)+b", &[3, 600], 600, 2, true));
    // The GELU epilogue (on the GPU one kernel writes the product and its GELU); K = 700 would be
    // split in a plain product, never with the epilogue.
    let lin_gelu = |rng: &mut ChaCha8Rng, desc: &str, sx: &[usize], k: usize, n: usize| {
        let dim = (sx.iter().product::<usize>() / k).max(k).max(n);
        let inputs = vec![mm_input(sx, dim, rng), mm_input(&[k, n], dim, rng), mm_input(&[n], dim, rng)];
        Case::new("linear_gelu", desc, inputs, |x| linear_gelu(&x[0], &x[1], x.get(2)))
    };
    v.push(lin_gelu(rng, "(2,3,5).(5,4)+b", &[2, 3, 5], 5, 4));
    v.push(lin_gelu(rng, "(3,700).(700,2)+b", &[3, 700], 700, 2));

    v.push(Case::new("l2norm", "(4,7)", vec![Input::randn(&[4, 7], rng)], |x| l2norm(&x[0], 1e-12)));
    v.push(Case::new("l2norm", "(1,64)", vec![Input::randn(&[1, 64], rng)], |x| l2norm(&x[0], 1e-12)));
    // Rows longer than the 64-invocation workgroup. Few rows: the finite-difference noise of the
    // loss grows with the number of unit-norm output rows.
    v.push(Case::new("l2norm", "(3,1,67)", vec![Input::randn(&[3, 1, 67], rng)], |x| l2norm(&x[0], 1e-12)));
    // Rows below eps (and an all-zero row) take the y = x / eps branch. With eps = 1e-12 a finite
    // difference step would cross the kink at ||x|| = eps, so this case uses eps = 0.5 and norms
    // far from it on both sides.
    v.push(Case::new("l2norm", "(5,7) eps=0.5, 3 rows < eps", vec![rows_with_norms(&[0.2, 1.3, 0.0, 0.45 * 0.5, 2.0], 7, rng)], |x| {
        l2norm(&x[0], 0.5)
    }));

    let cat = |rng: &mut ChaCha8Rng, desc: &str, shapes: &[&[usize]]| {
        let inputs = shapes.iter().map(|s| Input::randn(s, rng)).collect();
        Case::new("concat", desc, inputs, |x| concat(&x.iter().collect::<Vec<_>>()))
    };
    v.push(cat(rng, "(2,3)+(4,3)", &[&[2, 3], &[4, 3]]));
    v.push(cat(rng, "(3,2,3)+(1,2,3)+(2,2,3)", &[&[3, 2, 3], &[1, 2, 3], &[2, 2, 3]]));
    v.push(cat(rng, "(1,5)+(300,5)", &[&[1, 5], &[300, 5]]));

    // Full-catalog cross-entropy: one term over two item blocks, and two cosine-scaled terms.
    v.push(Case::new("catalog_ce", "h (3,2) items (515,2)", vec![Input::randn(&[3, 2], rng), Input::randn(&[515, 2], rng)], |x| {
        catalog_ce(&[(&x[0], &x[1])], &Indices::new(vec![514, 3, 511]), 1.0)
    }));
    v.push(Case::new(
        "catalog_ce",
        "2 terms (4,3)(9,3) (4,2)(9,2) x1/0.07",
        vec![
            Input::randn(&[4, 3], rng).scaled(0.3),
            Input::randn(&[9, 3], rng).scaled(0.3),
            Input::randn(&[4, 2], rng).scaled(0.3),
            Input::randn(&[9, 2], rng).scaled(0.3),
        ],
        |x| catalog_ce(&[(&x[0], &x[1]), (&x[2], &x[3])], &Indices::new(vec![0, 8, 8, 2]), 1.0 / 0.07),
    ));
    v
}
