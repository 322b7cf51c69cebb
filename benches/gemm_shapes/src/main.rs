//! GFLOP/s of each of the model's matrix-product shapes on the calling core: matrixmultiply's
//! sgemm and the gemm crate (built with or without its x86-v4 feature), best of 3 rounds of
//! ~2 GFLOP each, the two results checked against each other.
use std::time::Instant;

/// Deterministic values in [-0.5, 0.5).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 1000.0 - 0.5).collect()
}

/// (m, k, n, A transposed, B transposed, what it is in the model); C = op(A) op(B) row-major.
const SHAPES: &[(usize, usize, usize, bool, bool, &str)] = &[
    (5316, 64, 64, false, false, "token x weight"),
    (5316, 64, 256, false, false, "FFN up"),
    (5316, 256, 64, false, false, "FFN down"),
    (64, 5316, 64, true, false, "weight gradient"),
    (1024, 64, 4926, false, true, "catalog scores"),
    (49260, 768, 64, false, false, "attention pooling's projection"),
    (768, 49260, 64, true, false, "its weight gradient"),
    (1024, 1024, 1024, false, false, "peak reference"),
];

fn best(flop: f64, mut f: impl FnMut()) -> f64 {
    let reps = ((2e9 / flop) as usize).max(3);
    let mut t = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        for _ in 0..reps {
            f();
        }
        t = t.min(t0.elapsed().as_secs_f64() / reps as f64);
    }
    flop / t / 1e9
}

fn main() {
    let kernel = if cfg!(feature = "x86-v4") { "gemm x86-v4" } else { "gemm default (AVX2+FMA)" };
    println!("shape\twhere\tmatrixmultiply\t{kernel}\tmax abs diff");
    for &(m, k, n, ta, tb, what) in SHAPES {
        let (a, b) = (values(m * k, 1), values(k * n, 2));
        let (rsa, csa) = if ta { (1isize, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if tb { (1isize, k as isize) } else { (n as isize, 1) };
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        let flop = 2.0 * (m * n * k) as f64;
        // SAFETY: the buffers cover the (m, k), (k, n) and (m, n) views given by the strides.
        let mm = best(flop, || unsafe {
            matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, 0.0, c1.as_mut_ptr(), n as isize, 1)
        });
        let gm = best(flop, || unsafe {
            gemm::gemm(m, n, k, c2.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), csa, rsa, b.as_ptr(), csb, rsb, 0.0f32, 1.0f32, false, false, false, gemm::Parallelism::None)
        });
        let diff = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        println!("{m}x{k}x{n}\t{what}\t{mm:.1}\t{gm:.1}\t{diff:.1e}");
    }
}
