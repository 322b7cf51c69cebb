//! The engine's own tests that need its private parts: every kernel's contract held against its
//! WGSL (`layout`). Op-level tests sit beside each op; the application's tests in `kernels-tests/`.
//! Uses the kernels' contracts (`all_kernels`) and the GPU runtime's reflection types. Also the
//! deterministic inputs several CPU tests share ([`values`]).

mod layout;

/// n deterministic values with varied exponents and signs: a hash of each index (and `seed`) taken
/// mod 20,011, divided by `div`, minus `off`.
pub(crate) fn values(n: usize, seed: u32, div: f32, off: f32) -> Vec<f32> {
    (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 20_011) as f32 / div - off).collect()
}
