//! The op contract: every kernel of the engine is an [`Op`] (shape check, a CPU form generic over
//! the element type, a GPU form), and every differentiable one also a [`Backward`] (what its
//! backward pass needs, as a typed saved state, and the rule that turns the output's gradient into
//! the inputs'). Three functions run them, and they are the only place that dispatches by device:
//!
//! - [`apply`]: a differentiable op on the tape. It checks that the inputs share a device, runs the
//!   op's form for it, and, when gradients are on and an input is tracked, calls [`Backward::save`]
//!   (told which inputs are tracked, so it keeps only what their gradients need) and records a node
//!   that owns the saved state (burn's `Backward` with its typed state; candle's `CustomOp`).
//! - [`run`]: an op off the tape (the backward rules' own kernels), returning all its outputs.
//! - [`query`]: a computation whose result is not a tensor (ranks of targets).
//!
//! An op may have several outputs: the first is its value, the others side results of the same
//! kernels (statistics the backward reuses, or the further gradients of a backward kernel).
//! Integer inputs (ids, lengths, targets, the ragged batch) are fields of the op itself.
//!
//! Public, so that code outside the engine can add an op: the tests' padded reference layout
//! (`kernels-tests/padded.rs`) is one.

use std::cell::Ref;

use crate::cpu::Real;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::gpu::GpuBuf;
use crate::tensor::{grad_enabled, numel, same_device, Element, Rule, Storage, Tensor};

/// A kernel with a CPU and a GPU form.
pub trait Op {
    /// The op's name on the tape and in errors.
    fn name(&self) -> &'static str;

    /// The outputs' shapes, the op's value first. An op is built by a constructor that checks its
    /// inputs' shapes and keeps the sizes its forms need.
    fn shapes(&self) -> Vec<Vec<usize>>;

    /// The CPU form over the inputs' values: the outputs' values, in `shapes`' order.
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>>;

    /// The GPU form over the inputs' buffers: the outputs' buffers, in `shapes`' order.
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>>;

    /// The GPU form over the input tensors: [`Op::gpu`] over their buffers, unless the op's GPU
    /// form is made of other ops (the catalog's blocks of products) and overrides this.
    fn gpu_tensors(&self, x: &[&Tensor]) -> Result<Vec<GpuBuf>> {
        let bufs = x.iter().map(|t| t.gbuf()).collect::<Result<Vec<Ref<GpuBuf>>>>()?;
        let refs: Vec<&GpuBuf> = bufs.iter().map(|b| &**b).collect();
        self.gpu(&refs)
    }
}

/// A differentiable op: what its backward needs and the rule itself.
pub trait Backward: Op + Sized + 'static {
    /// What the backward needs, made only when some input is tracked.
    type Saved: 'static;

    /// The saved state from the inputs, the outputs (cut from the tape; the value first) and which
    /// inputs are tracked: keep only what their gradients need.
    fn save(self, x: &[&Tensor], out: Vec<Tensor>, tracked: &[bool]) -> Self::Saved;

    /// One gradient per input (in order; `None` for an untracked one) from the value's gradient `g`.
    /// Runs with the tape off.
    fn backward(saved: &Self::Saved, g: &Tensor) -> Result<Vec<Option<Tensor>>>;

    /// [`Backward::backward`] given `g` itself: an op whose rule maps g elementwise overrides it to
    /// do so in place when g's storage is its own (`ops::mul_into`; the same values either way).
    fn backward_owned(saved: &Self::Saved, g: Tensor) -> Result<Vec<Option<Tensor>>> {
        Self::backward(saved, &g)
    }
}

/// A computation over tensors whose result is not a tensor (not on the tape).
pub trait Query {
    type Out;
    fn name(&self) -> &'static str;
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Self::Out>;
    fn gpu(&self, x: &[&Tensor]) -> Result<Self::Out>;
}

struct Recorded<B: Backward>(B::Saved);

impl<B: Backward> Rule for Recorded<B> {
    fn grads(&self, g: Tensor) -> Result<Vec<Option<Tensor>>> {
        B::backward_owned(&self.0, g)
    }
}

/// Whether an op over `x` would be recorded: gradients are on and some input is tracked.
pub fn records(x: &[&Tensor]) -> bool {
    grad_enabled() && x.iter().any(|t| t.requires_grad())
}

/// Run `op` on its inputs' device; all outputs, off the tape.
pub fn run<O: Op>(op: &O, x: &[&Tensor]) -> Result<Vec<Tensor>> {
    let shapes = op.shapes();
    let dev = same_device(op.name(), x)?;
    let storages = match dev {
        Device::Cpu => on_host::<O, f32>(op, x, &shapes)?,
        Device::Cpu64 => on_host::<O, f64>(op, x, &shapes)?,
        Device::Gpu => {
            let outs = op.gpu_tensors(x)?;
            check_count(op.name(), outs.len(), shapes.len())?;
            outs.into_iter().map(Storage::Gpu).collect()
        }
    };
    Ok(storages.into_iter().zip(shapes).map(|(s, shape)| Tensor::from_storage(s, shape)).collect())
}

/// Run `op` and put its value on the tape (see the module docs).
pub fn apply<B: Backward>(op: B, x: &[&Tensor]) -> Result<Tensor> {
    let mut outs = run(&op, x)?;
    let value = outs.remove(0);
    if !records(x) {
        return Ok(value);
    }
    let tracked: Vec<bool> = x.iter().map(|t| t.requires_grad()).collect();
    outs.insert(0, value.detach());
    let name = op.name();
    let saved = op.save(x, outs, &tracked);
    Ok(value.record(name, x, Box::new(Recorded::<B>(saved))))
}

/// Run a query on its inputs' device.
pub fn query<Q: Query>(q: &Q, x: &[&Tensor]) -> Result<Q::Out> {
    match same_device(q.name(), x)? {
        Device::Cpu => query_host::<Q, f32>(q, x),
        Device::Cpu64 => query_host::<Q, f64>(q, x),
        Device::Gpu => q.gpu(x),
    }
}

fn on_host<O: Op, T: Element>(op: &O, x: &[&Tensor], shapes: &[Vec<usize>]) -> Result<Vec<Storage>> {
    let hosts = x.iter().map(|t| t.host::<T>()).collect::<Result<Vec<Ref<[T]>>>>()?;
    let refs: Vec<&[T]> = hosts.iter().map(|h| &**h).collect();
    let t0 = crate::cpu::profiling_ops().then(std::time::Instant::now);
    let outs = op.cpu::<T>(&refs)?;
    if let Some(t0) = t0 {
        crate::cpu::count_op(op.name(), t0);
    }
    check_count(op.name(), outs.len(), shapes.len())?;
    for (v, s) in outs.iter().zip(shapes) {
        if v.len() != numel(s) {
            return Err(Error::Shape { op: op.name(), msg: format!("the CPU form made {} values for an output of shape {s:?}", v.len()) });
        }
    }
    Ok(outs.into_iter().map(T::wrap).collect())
}

fn query_host<Q: Query, T: Element>(q: &Q, x: &[&Tensor]) -> Result<Q::Out> {
    let hosts = x.iter().map(|t| t.host::<T>()).collect::<Result<Vec<Ref<[T]>>>>()?;
    let refs: Vec<&[T]> = hosts.iter().map(|h| &**h).collect();
    q.cpu::<T>(&refs)
}

fn check_count(op: &'static str, made: usize, want: usize) -> Result<()> {
    if made != want {
        return Err(Error::Shape { op, msg: format!("the op made {made} outputs, its shapes name {want}") });
    }
    Ok(())
}
