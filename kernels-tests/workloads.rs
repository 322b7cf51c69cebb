//! Dispatches past one dimension's workgroup limit (65535): row kernels with more rows than that and
//! a 1-D kernel with more than 65535 * 256 elements are folded into 2-D grids (`gpu::row_groups`,
//! `gpu::groups_1d`); every row and element must still be computed once, as on the CPU.

use msm4sr::engine::ops::{l2norm, rank_of_targets, scale, softmax};
use msm4sr::engine::{Device, Indices, Tensor};
use msm4sr::harness::gradcheck::compare;

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

/// op(a) . op(b) (+ bias) in f64 on the CPU, and the same product of |a| and |b| (+ |bias|): the
/// reference and the scale of the f32 error bound.
fn matmul_reference(da: &[f64], sa: &[usize], db: &[f64], sb: &[usize], ta: bool, tb: bool, bias: Option<&[f64]>) -> (Vec<f32>, Vec<f32>) {
    use msm4sr::engine::ops::matmul;
    let cpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Cpu64).unwrap();
    let abs = |d: &[f64]| d.iter().map(|x| x.abs()).collect::<Vec<_>>();
    let mut want = matmul(&cpu(da, sa), &cpu(db, sb), ta, tb).unwrap().to_vec().unwrap();
    let mut scale = matmul(&cpu(&abs(da), sa), &cpu(&abs(db), sb), ta, tb).unwrap().to_vec().unwrap();
    if let Some(bias) = bias {
        for (j, (w, s)) in want.iter_mut().zip(scale.iter_mut()).enumerate() {
            *w += bias[j % bias.len()] as f32;
            *s += bias[j % bias.len()].abs() as f32;
        }
    }
    (want, scale)
}

/// Every element of `got` within the f32 dot-product error bound 2 (K + 1) u scale (u = 2^-24) of `want`.
fn within_bound(got: &[f32], want: &[f32], scale: &[f32], k: usize, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (j, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let bound = 2.0 * (k + 1) as f64 * 2f64.powi(-24) * *s as f64 + 1e-7;
        assert!(((*g - *w) as f64).abs() <= bound, "{what} element {j}: {g} vs {w} (bound {bound:.2e})");
    }
}

/// Every matmul kernel variant against the CPU product at awkward sizes: not multiples of any
/// tile, a 1 x 1, transposed operands, a batch with a broadcast operand, a fused bias, split-K (a
/// long K with a small output); shapes where vec4 loads are allowed (contiguous axes multiples of 4)
/// and where not, K <= 64 (variant 5) and N <= 8 (variant 6). Each variant runs every case it
/// supports, and each must support several. The bound is the f32 dot-product error bound per
/// element, 2 K u sum_k |a_ik b_kj| (u = 2^-24), so cancellation does not make the check fragile.
#[test]
fn matmul_variants_match_the_cpu() {
    use msm4sr::engine::ops::{matmul_variant, matmul_variant_summed, matmul_variant_support, MatmulVariant, Support};
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
        // vec4 loads allowed (and K <= 64 for some)
        (&[37, 68], &[68, 132], false, false, true),
        (&[68, 36], &[68, 132], true, false, true),
        (&[130, 20], &[9, 20], false, true, false),
        (&[20, 36], &[12, 20], true, true, true),
        (&[3, 33, 20], &[20, 72], false, false, true), // batch, broadcast b
        (&[2, 40, 24], &[2, 24, 36], false, false, false),
        (&[2, 24, 40], &[2, 36, 24], true, true, false),
        (&[9, 3000], &[3000, 12], false, false, true), // split-K
        (&[3000, 12], &[3000, 16], true, false, false),
        (&[260, 64], &[64, 136], false, false, true), // 3 x 2 tiles of 128, K = 64
        // K <= 64 without vec4 (N or the transposed M odd)
        (&[200, 64], &[64, 70], false, false, true),
        (&[64, 150], &[64, 33], true, false, false),
        // N <= 8
        (&[300, 70], &[70, 1], false, false, false),
        (&[70, 301], &[70, 5], true, false, true),
        (&[40, 2000], &[7, 2000], false, true, true), // split-K
        (&[2, 17, 100], &[100, 8], false, false, true),
    ];
    let mut checked = std::collections::BTreeMap::<&str, usize>::new();
    let mut skipped = std::collections::BTreeMap::<&str, String>::new();
    for (i, &(sa, sb, ta, tb, with_bias)) in cases.iter().enumerate() {
        let data = |shape: &[usize], seed: u64| values(shape.iter().product(), seed);
        let (da, db, dbias) =
            (data(sa, 2 * i as u64), data(sb, 2 * i as u64 + 1), values(if tb { sb[sb.len() - 2] } else { sb[sb.len() - 1] }, 99));
        let n = dbias.len();
        let k = if ta { sa[sa.len() - 2] } else { sa[sa.len() - 1] };
        let (want, scale) = matmul_reference(&da, sa, &db, sb, ta, tb, with_bias.then_some(&dbias[..]));
        for v in MatmulVariant::ALL {
            match matmul_variant_support(sa, sb, ta, tb, v).unwrap() {
                Support::Yes => {}
                Support::NotEligible(_) => continue,
                Support::Skipped(why) => {
                    skipped.insert(v.name(), why);
                    continue;
                }
            }
            let gpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Gpu).unwrap();
            let bias = with_bias.then(|| gpu(&dbias, &[n]));
            let got = matmul_variant(&gpu(&da, sa), &gpu(&db, sb), ta, tb, bias.as_ref(), v).unwrap().to_vec().unwrap();
            within_bound(&got, &want, &scale, k, &format!("{v:?} case {i} (a {sa:?} ta {ta}, b {sb:?} tb {tb}, bias {with_bias})"));
            *checked.entry(v.name()).or_default() += 1;
        }
    }
    // Batches summed into one matrix (nsum > 1), a broadcast operand among them.
    let summed: &[Case] = &[
        (&[3, 37, 20], &[3, 20, 70], false, false, false),
        (&[4, 20, 36], &[20, 72], true, false, false),
        (&[2, 50, 64], &[2, 5, 64], false, true, false),
    ];
    for (i, &(sa, sb, ta, tb, _)) in summed.iter().enumerate() {
        let (da, db) = (values(sa.iter().product(), 50 + i as u64), values(sb.iter().product(), 60 + i as u64));
        let k = if ta { sa[sa.len() - 2] } else { sa[sa.len() - 1] };
        let (want, scale) = matmul_reference(&da, sa, &db, sb, ta, tb, None);
        let bt = if sa.len() == 3 { sa[0] } else { sb[0] };
        let mn = want.len() / bt;
        let sum = |x: &[f32]| (0..mn).map(|j| x.iter().skip(j).step_by(mn).sum::<f32>()).collect::<Vec<f32>>();
        let (want, scale) = (sum(&want), sum(&scale));
        for v in MatmulVariant::ALL {
            if matmul_variant_support(sa, sb, ta, tb, v).unwrap() != Support::Yes {
                continue;
            }
            let gpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Gpu).unwrap();
            let got = matmul_variant_summed(&gpu(&da, sa), &gpu(&db, sb), ta, tb, v).unwrap().to_vec().unwrap();
            within_bound(&got, &want, &scale, k * bt, &format!("{v:?} summed case {i} (a {sa:?} ta {ta}, b {sb:?} tb {tb})"));
            *checked.entry(v.name()).or_default() += 1;
        }
    }
    for v in MatmulVariant::ALL {
        if let Some(why) = skipped.get(v.name()) {
            eprintln!("matmul variant {} ({}): skipped: {why}", v.number(), v.name());
            continue;
        }
        let n = checked.get(v.name()).copied().unwrap_or(0);
        eprintln!("matmul variant {} ({}): {n} cases", v.number(), v.name());
        assert!(n >= 5, "variant {v:?} ran only {n} cases");
    }
}

/// The autotune on (as `MSM4SR_AUTOTUNE=1` makes it) at a small shape: the variant it picks supports
/// the product, the product still matches the CPU (tuning's own runs do not leak into it), the
/// result is written to the cache file and a second tuner reads it back instead of tuning again.
#[test]
fn the_autotune_picks_an_eligible_variant() {
    use msm4sr::engine::ops::matmul::tune::{read_cache, Policy, Tuner};
    use msm4sr::engine::ops::{matmul_tuned, matmul_variant_support, Support};
    let dir = std::env::temp_dir().join(format!("msm4sr-autotune-test-{}", std::process::id()));
    let path = dir.join("matmul_tune.json");
    let policy = Policy { forced: None, tune: true, cache: Some(path.clone()) };
    let (sa, sb): (&[usize], &[usize]) = (&[70, 64], &[64, 40]);
    let (da, db, dbias) = (values(70 * 64, 7), values(64 * 40, 8), values(40, 9));
    let (want, scale) = matmul_reference(&da, sa, &db, sb, false, false, Some(&dbias));
    let gpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Gpu).unwrap();
    let (a, b, bias) = (gpu(&da, sa), gpu(&db, sb), gpu(&dbias, &[40]));
    let mut tuner = Tuner::new(policy.clone());
    let (got, v) = matmul_tuned(&a, &b, false, false, Some(&bias), &mut tuner).unwrap();
    assert_eq!(matmul_variant_support(sa, sb, false, false, v).unwrap(), Support::Yes, "picked {v:?}");
    within_bound(&got.to_vec().unwrap(), &want, &scale, 64, &format!("tuned ({v:?})"));
    let entries = read_cache(&path).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].pick, v);
    assert!(entries[0].micros.len() >= 3 && entries[0].micros.contains_key(v.name()), "{:?}", entries[0]);
    let mut again = Tuner::new(policy);
    let (got, v2) = matmul_tuned(&a, &b, false, false, Some(&bias), &mut again).unwrap();
    assert_eq!((v2, again.entries().next().map(|e| e.micros.clone())), (v, Some(entries[0].micros.clone())), "read, not re-tuned");
    within_bound(&got.to_vec().unwrap(), &want, &scale, 64, "cached");
    assert!(tuner.warnings.is_empty() && again.warnings.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The GELU epilogue of every variant that takes the product: the pre-activation equals the CPU
/// product (+ bias) within the f32 bound, and the output is GELU of the pre-activation as the GPU's
/// GELU kernel computes it (relative 1e-6: the same WGSL function on the same values; how close
/// that function is to the CPU's is the GELU kernel's own test, `gpu::gelu`).
#[test]
fn every_variant_applies_the_gelu_epilogue() {
    use msm4sr::engine::ops::gelu;
    use msm4sr::engine::ops::{linear_gelu_variant, matmul_variant_support, MatmulVariant, Support};
    // K = 700 with a small output would be split over K without the epilogue; 64 x 64 takes vec4.
    for (m, k, n) in [(70usize, 37usize, 67usize), (3, 700, 2), (64, 64, 64)] {
        let (sa, sb) = ([m, k], [k, n]);
        let (da, db, dbias) = (values(m * k, 21), values(k * n, 22), values(n, 23));
        let (want, scale) = matmul_reference(&da, &sa, &db, &sb, false, false, Some(&dbias));
        let gpu = |d: &[f64], shape: &[usize]| Tensor::from_f64(d.to_vec(), shape, Device::Gpu).unwrap();
        let (a, b, bias) = (gpu(&da, &sa), gpu(&db, &sb), gpu(&dbias, &[n]));
        let mut ran = 0;
        for v in MatmulVariant::ALL {
            if matmul_variant_support(&sa, &sb, false, false, v).unwrap() != Support::Yes {
                continue;
            }
            let (y, h) = linear_gelu_variant(&a, &b, Some(&bias), v).unwrap();
            let kernel = gelu(&h).unwrap().to_vec().unwrap();
            let (y, h) = (y.to_vec().unwrap(), h.to_vec().unwrap());
            within_bound(&h, &want, &scale, k, &format!("{v:?} pre-activation ({m},{k}).({k},{n})"));
            for (i, (&g, &e)) in y.iter().zip(&kernel).enumerate() {
                assert!((g - e).abs() <= 1e-6 * e.abs().max(1e-3), "{v:?} ({m},{k}).({k},{n}) element {i}: gelu {g} vs {e}");
            }
            ran += 1;
        }
        assert!(ran >= 2, "only {ran} variants took ({m},{k}).({k},{n})");
    }
}
