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

/// Every family draws from its own random stream, so adding a case to one family never changes
/// another family's inputs.
pub fn all_cases() -> Vec<Case> {
    let fams: [fn(&mut ChaCha8Rng) -> Vec<Case>; 4] = [elementwise::cases, encoder::cases, transformer::cases, matmul::cases];
    fams.iter().enumerate().flat_map(|(i, f)| f(&mut ChaCha8Rng::seed_from_u64(2024 + i as u64))).collect()
}

/// Checks that are not gradients of a function (the optimizer).
pub fn special_checks(ops: &[String], gpu: bool) -> Vec<CheckResult> {
    if ops.is_empty() || ops.iter().any(|o| o == "adam") {
        optim::checks(gpu)
    } else {
        Vec::new()
    }
}
