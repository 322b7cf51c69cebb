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
