//! Dispatches past one dimension's workgroup limit (65535): row kernels with more rows than that and
//! a 1-D kernel with more than 65535 * 256 elements are folded into 2-D grids (`gpu::row_groups`,
//! `gpu::groups_1d`); every row and element must still be computed once, as on the CPU.

use msm4sr::engine::ops::{l2norm, rank_of_targets, scale, softmax};
use msm4sr::engine::{Device, Indices, Tensor};
use msm4sr::gradcheck::compare;

/// Deterministic values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
        })
        .collect()
}

fn on_both(shape: &[usize], seed: u64, f: impl Fn(&Tensor) -> Tensor) {
    let data = values(shape.iter().product(), seed);
    let want = f(&Tensor::from_f64(data.clone(), shape, Device::Cpu).unwrap()).to_vec().unwrap();
    let got = f(&Tensor::from_f64(data, shape, Device::Gpu).unwrap()).to_vec().unwrap();
    let (abs, rel, pass) = compare(&got, &want);
    assert!(pass, "shape {shape:?}: max abs err {abs:.2e}, max rel err {rel:.2e}");
}

#[test]
fn row_kernels_past_the_per_dimension_limit() {
    let rows = 65535 * 2 + 7;
    on_both(&[rows, 3], 1, |x| softmax(x, None).unwrap());
    on_both(&[rows, 5], 2, |x| l2norm(x, 1e-12).unwrap());

    let n = 6;
    let targets = Indices::new((0..rows).map(|r| (r % n) as u32).collect());
    let data = values(rows * n, 4);
    let ranks = |dev| rank_of_targets(&Tensor::from_f64(data.clone(), &[rows, n], dev).unwrap(), &targets).unwrap();
    assert_eq!(ranks(Device::Gpu), ranks(Device::Cpu));
}

#[test]
fn a_1d_kernel_past_the_per_dimension_limit() {
    let n = 65535 * 256 + 1000;
    on_both(&[n], 5, |x| scale(x, -0.5).unwrap());
}

/// Every matmul kernel variant against the CPU product at awkward sizes: not multiples of any
/// tile, a 1 x 1, transposed operands, a batch with a broadcast operand, a fused bias, split-K (a
/// long K with a small output). The bound is the f32 dot-product error bound per element,
/// 2 K u sum_k |a_ik b_kj| (u = 2^-24), so cancellation does not make the check fragile.
#[test]
fn matmul_variants_match_the_cpu() {
    use msm4sr::engine::ops::{matmul, matmul_variant, MatmulVariant};
    // (stored a, stored b, ta, tb, bias)
    type Case<'a> = (&'a [usize], &'a [usize], bool, bool, bool);
    let cases: &[Case] = &[
        (&[1, 1], &[1, 1], false, false, false),
        (&[37, 67], &[67, 129], false, false, false),
        (&[67, 37], &[67, 129], true, false, true),
        (&[130, 5], &[9, 5], false, true, false),
        (&[5, 130], &[9, 5], true, true, false),
        (&[3, 33, 20], &[20, 70], false, false, false),
        (&[9, 3000], &[3000, 11], false, false, true), // split-K
        (&[3000, 9], &[3000, 11], true, false, false), // a weight gradient's shape
    ];
    for (i, &(sa, sb, ta, tb, with_bias)) in cases.iter().enumerate() {
        let data = |shape: &[usize], seed: u64| values(shape.iter().product(), seed);
        let (da, db, dbias) =
            (data(sa, 2 * i as u64), data(sb, 2 * i as u64 + 1), values(if tb { sb[sb.len() - 2] } else { sb[sb.len() - 1] }, 99));
        let n = dbias.len();
        let k = if ta { sa[sa.len() - 2] } else { sa[sa.len() - 1] };
        let cpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Cpu64).unwrap();
        let abs = |d: &[f64]| d.iter().map(|x| x.abs()).collect::<Vec<_>>();
        let mut want = matmul(&cpu(&da, sa), &cpu(&db, sb), ta, tb).unwrap().to_vec().unwrap();
        let mut scale = matmul(&cpu(&abs(&da), sa), &cpu(&abs(&db), sb), ta, tb).unwrap().to_vec().unwrap();
        if with_bias {
            for (j, (w, s)) in want.iter_mut().zip(scale.iter_mut()).enumerate() {
                *w += dbias[j % n] as f32;
                *s += dbias[j % n].abs() as f32;
            }
        }
        for v in MatmulVariant::ALL {
            let gpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Gpu).unwrap();
            let bias = with_bias.then(|| gpu(&dbias, &[n]));
            let got = matmul_variant(&gpu(&da, sa), &gpu(&db, sb), ta, tb, bias.as_ref(), v).unwrap().to_vec().unwrap();
            assert_eq!(got.len(), want.len());
            for (j, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                let bound = 2.0 * (k + 1) as f64 * 2f64.powi(-24) * *s as f64 + 1e-7;
                assert!(
                    ((*g - *w) as f64).abs() <= bound,
                    "{v:?} case {i} (a {sa:?} ta {ta}, b {sb:?} tb {tb}, bias {with_bias}) element {j}: {g} vs {w} (bound {bound:.2e})"
                );
            }
        }
    }
}
