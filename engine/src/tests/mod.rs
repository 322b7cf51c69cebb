//! The engine's own tests that need its private parts: every kernel's contract held against its
//! WGSL (`layout`). Op-level tests sit beside each op; the application's tests in `kernels-tests/`.
//! Uses the kernels' contracts (`all_kernels`) and the GPU runtime's reflection types.

mod layout;
