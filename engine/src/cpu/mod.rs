//! The native CPU backend: the element types it is generic over ([`Real`]: f32 for training, f64
//! for finite differences) with their matrix product, the parallel loops every CPU kernel uses
//! ([`par`]: results independent of the thread count) and the storage pool ([`pool`]) that keeps a
//! steady-state step free of allocations.
//!
//! Uses nothing else of the engine (its counters of matrix products are read through
//! [`stats`](crate::stats)); the tensors and the ops use it.

mod counters;
pub(crate) mod par;
pub mod pool;
mod real;

pub(crate) use counters::{count_gemm, count_op, profiling_ops};
pub use counters::{gemm_counters, in_gemm, op_times, profile_ops};
pub use par::{keep_awake, threads, with_threads, Awake};
pub(crate) use real::{add_partials, adds_one_chain, k_blocks, same_chains};
pub use real::{dot, dot_rows, expf, max8, sum8_of, sum8_of2, sum8_of3, sum8_rows4, sum_exp, wide, Ahead, Real};
