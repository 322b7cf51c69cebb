//! One module per op family. Each op: shape checks, a WGSL forward and backward kernel (in
//! `shaders/`), a plain-Rust form generic over f32/f64, and the shapes and backward rule in its
//! module's doc comment; each is an [`Op`](crate::op::Op) run through [`apply`](crate::op::apply).
//!
//! Uses the tensors, the op contract and the two backends ([`cpu`](crate::cpu), [`gpu`](crate::gpu));
//! `autograd` and `optim` use it, and everything above the engine.

pub mod attention;
pub mod catalog;
pub mod concat;
pub mod elementwise;
pub mod embedding;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod pool;
pub mod rank;
pub mod reduce;
pub mod softmax;

pub use attention::attention_ragged;
pub use catalog::{catalog_ce, catalog_rank};
pub use concat::concat;
pub use elementwise::{add, add_into, add_scaled, dropout, dropout_rows, gelu, mean, mul, quick_gelu, scale, sub};
pub use embedding::embedding;
pub use layernorm::{add_layernorm, layernorm};
pub use loss::{cross_entropy, info_nce};
pub use matmul::{
    linear, linear_gelu, linear_gelu_variant, matmul, matmul_tuned, matmul_variant, matmul_variant_summed, matmul_variant_support,
    MatmulVariant, Support,
};
pub use moe::{moe_adaptor, MoeWeights};
pub use norm::l2norm;
pub use pool::{attention_pool, attention_pool_dot, mean_ragged, moe};
pub use rank::rank_of_targets;
pub use reduce::{broadcast_to, sum, sum_rows};
pub use softmax::softmax;

/// WGSL source of one kernel family, with the shared helpers prepended.
macro_rules! wgsl {
    ($file:literal) => {
        concat!(
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common.wgsl")),
            "\n",
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $file))
        )
    };
    // A kernel built on code it shares with others (files of shaders/include/, in order), the
    // kernel's file last.
    ($($shared:literal),+ ; $file:literal) => {
        concat!(
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common.wgsl")),
            "\n",
            $(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/include/", $shared)), "\n",)+
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $file))
        )
    };
}
pub(crate) use wgsl;
