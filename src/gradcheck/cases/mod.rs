//! The cases every op is checked on: random shapes including sizes that are not multiples of the
//! kernels' tile sizes, length-1 sequences, fully padded rows and a batch of 1.

mod elementwise;
mod encoder;
mod matmul;
mod optim;
mod transformer;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Case, CheckResult};

pub fn all_cases() -> Vec<Case> {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let mut v = Vec::new();
    v.extend(elementwise::cases(&mut rng));
    v.extend(encoder::cases(&mut rng));
    v.extend(transformer::cases(&mut rng));
    v.extend(matmul::cases(&mut rng));
    v
}

/// Checks that are not gradients of a function (the optimizer).
pub fn special_checks(ops: &[String], gpu: bool) -> Vec<CheckResult> {
    if ops.is_empty() || ops.iter().any(|o| o == "adam") {
        optim::checks(gpu)
    } else {
        Vec::new()
    }
}
