//! The native CPU backend: the element types it is generic over ([`Real`]: f32 for training, f64
//! for finite differences) with their matrix product, the parallel loops every CPU kernel uses
//! ([`par`]: results independent of the thread count) and the storage pool ([`pool`]) that keeps a
//! steady-state step free of allocations.
//!
//! Uses only the engine's [`Storage`](crate::Storage) and [`stats`](crate::stats); the ops call it.

pub(crate) mod par;
pub mod pool;
mod real;

pub use real::{dot, expf, sum_exp, Real};
