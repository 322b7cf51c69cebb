//! The engine's own tests that need its private parts: every kernel's contract held against its
//! WGSL (`layout`). Op-level tests sit beside each op; the application's tests in `kernels-tests/`.

mod layout;
