//! One module per op family. Each op: shape checks, a WGSL forward and backward kernel (in
//! `shaders/`), a plain-Rust reference generic over f32/f64, and the shapes in its doc comment.

pub mod concat;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod reduce;

pub use concat::concat;
pub use elementwise::{add, add_scaled, broadcast_to, dropout, gelu, mul, scale, sub};
pub use matmul::{linear, matmul};
pub use norm::l2norm;
pub use reduce::{mean, sum, sum_rows};

/// WGSL source of one kernel family, with the shared helpers prepended.
macro_rules! wgsl {
    ($file:literal) => {
        concat!(include_str!("../../../shaders/common.wgsl"), "\n", include_str!(concat!("../../../shaders/", $file)))
    };
}
pub(crate) use wgsl;

/// Bit pattern of an f32 for the u32 parameter block.
pub(crate) fn fbits(x: f32) -> u32 {
    x.to_bits()
}
