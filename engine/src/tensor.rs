//! Tensors: a shape plus storage on one device, and (when made by an op that needs gradients) the
//! tape node that made it.

use std::cell::{Cell, OnceCell, Ref, RefCell, RefMut};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

use super::cpu::Real;
use super::gpu::{gpu, GpuBuf};
use crate::device::Device;
use crate::error::{Error, Result};

// ---- The tape: the node that made a tensor, and whether ops record one -----------------------

/// How a tensor was made, for the backward walk (`autograd`): the op, its inputs, and its backward
/// rule with the state the forward saved for it (see `op`).
pub(crate) struct Node {
    pub(crate) op: &'static str,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) rule: Box<dyn Rule>,
}

/// The backward rule of one recorded op, with the state its forward saved (see `op::apply`).
/// It owns the output's gradient `g`: a rule may write into g's storage when it is g's sole owner.
pub(crate) trait Rule {
    fn grads(&self, g: Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// The backward rule of `reshape`: the gradient viewed in the input's shape.
struct ReshapeRule(Vec<usize>);

impl Rule for ReshapeRule {
    fn grads(&self, g: Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(g.reshape(&self.0)?)])
    }
}

thread_local! {
    static GRAD: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops record nodes for the backward walk (false inside [`no_grad`]).
pub fn grad_enabled() -> bool {
    GRAD.with(|g| g.get())
}

/// Run `f` without recording anything on the tape (evaluation, optimizer updates).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let prev = GRAD.with(|g| g.replace(false));
    let r = f();
    GRAD.with(|g| g.set(prev));
    r
}

/// The host element types (f32 on `Device::Cpu`, f64 on `Device::Cpu64`): how a [`Real`] sits in
/// [`Storage`].
pub trait Element: Real {
    fn view(s: &Storage) -> Option<&Vec<Self>>;
    fn view_mut(s: &mut Storage) -> Option<&mut Vec<Self>>;
    fn wrap(v: Vec<Self>) -> Storage;
    fn device() -> Device;
}

macro_rules! element {
    ($t:ty, $variant:ident, $dev:ident) => {
        impl Element for $t {
            fn view(s: &Storage) -> Option<&Vec<Self>> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn view_mut(s: &mut Storage) -> Option<&mut Vec<Self>> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> Storage {
                Storage::$variant(v)
            }
            fn device() -> Device {
                Device::$dev
            }
        }
    };
}
element!(f32, F32, Cpu);
element!(f64, F64, Cpu64);

/// Gradients of a scalar with respect to every trainable leaf it depends on.
pub struct Grads(HashMap<u64, Tensor>);

impl Grads {
    pub(crate) fn new(leaves: HashMap<u64, Tensor>) -> Grads {
        Grads(leaves)
    }
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Element storage. `F32`/`F64` live in host memory (the CPU backend), `Gpu` in a pooled buffer.
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Gpu(GpuBuf),
}

impl Drop for Storage {
    /// Host vectors go back to the CPU storage pool (`engine::pool`); GPU buffers to theirs.
    fn drop(&mut self) {
        match self {
            Storage::F32(v) => crate::cpu::pool::give(std::mem::take(v)),
            Storage::F64(v) => crate::cpu::pool::give(std::mem::take(v)),
            Storage::Gpu(_) => {}
        }
    }
}

pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) shape: Vec<usize>,
    pub(crate) storage: Rc<RefCell<Storage>>,
    pub(crate) requires_grad: bool,
    pub(crate) node: Option<Node>,
}

/// A reference-counted n-d array of floats. Cloning is cheap (shares storage).
#[derive(Clone)]
pub struct Tensor(pub(crate) Rc<Inner>);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>) -> Tensor {
        Tensor(Rc::new(Inner { id: next_id(), shape, storage: Rc::new(RefCell::new(storage)), requires_grad: false, node: None }))
    }

    /// This freshly made op output, tracked, with the node that made it (see `op::apply`).
    pub(crate) fn record(mut self, op: &'static str, inputs: &[&Tensor], rule: Box<dyn Rule>) -> Tensor {
        let inner = Rc::get_mut(&mut self.0).expect("an op's output is recorded before it is shared");
        inner.requires_grad = true;
        inner.node = Some(Node { op, inputs: inputs.iter().map(|t| (*t).clone()).collect(), rule });
        self
    }

    /// A tensor from host f32 data on `dev`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], dev: Device) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::Shape {
                op: "from_vec",
                msg: format!("{} values for shape {:?} ({} elements)", data.len(), shape, numel(shape)),
            });
        }
        let storage = match dev {
            Device::Cpu => Storage::F32(data),
            Device::Cpu64 => Storage::F64(data.iter().map(|&x| x as f64).collect()),
            Device::Gpu => Storage::Gpu(gpu()?.upload(bytemuck::cast_slice(&data))?),
        };
        Ok(Tensor::from_storage(storage, shape.to_vec()))
    }

    /// A tensor from host f64 data (kept in f64 on `Cpu64`, rounded to f32 elsewhere).
    pub fn from_f64(data: Vec<f64>, shape: &[usize], dev: Device) -> Result<Tensor> {
        match dev {
            Device::Cpu64 => {
                if data.len() != numel(shape) {
                    return Err(Error::Shape { op: "from_f64", msg: format!("{} values for shape {:?}", data.len(), shape) });
                }
                Ok(Tensor::from_storage(Storage::F64(data), shape.to_vec()))
            }
            _ => Tensor::from_vec(data.iter().map(|&x| x as f32).collect(), shape, dev),
        }
    }

    pub fn zeros(shape: &[usize], dev: Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, dev)
    }

    pub fn full(shape: &[usize], v: f32, dev: Device) -> Result<Tensor> {
        Tensor::from_vec(vec![v; numel(shape)], shape, dev)
    }

    /// N(0, std^2) entries drawn on the host (so every device gets the same values for a seed).
    pub fn randn(shape: &[usize], std: f32, rng: &mut impl Rng, dev: Device) -> Result<Tensor> {
        let n = numel(shape);
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std);
            if v.len() < n {
                v.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32 * std);
            }
        }
        Tensor::from_vec(v, shape, dev)
    }

    /// Uniform(-a, a) entries.
    pub fn uniform(shape: &[usize], a: f32, rng: &mut impl Rng, dev: Device) -> Result<Tensor> {
        let v = (0..numel(shape)).map(|_| rng.random_range(-a..=a)).collect();
        Tensor::from_vec(v, shape, dev)
    }

    /// Mark as a trainable leaf: the tape tracks ops on it and `backward` returns its gradient.
    pub fn param(self) -> Tensor {
        let inner = Inner { id: self.0.id, shape: self.0.shape.clone(), storage: self.0.storage.clone(), requires_grad: true, node: None };
        Tensor(Rc::new(inner))
    }

    /// Whether this handle alone reaches its storage, which lives on the host, and it is not on
    /// the tape: then writing the storage in place changes nothing anyone else can see.
    pub(crate) fn sole_host_owner(&self) -> bool {
        Rc::strong_count(&self.0) == 1
            && Rc::strong_count(&self.0.storage) == 1
            && self.0.node.is_none()
            && !matches!(*self.0.storage.borrow(), Storage::Gpu(_))
    }

    /// The same values, cut from the tape.
    pub fn detach(&self) -> Tensor {
        Tensor(Rc::new(Inner {
            id: next_id(),
            shape: self.0.shape.clone(),
            storage: self.0.storage.clone(),
            requires_grad: false,
            node: None,
        }))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    /// Size of the last axis.
    pub fn last_dim(&self) -> usize {
        *self.0.shape.last().unwrap_or(&1)
    }
    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }
    pub fn device(&self) -> Device {
        match &*self.0.storage.borrow() {
            Storage::F32(_) => Device::Cpu,
            Storage::F64(_) => Device::Cpu64,
            Storage::Gpu(_) => Device::Gpu,
        }
    }

    /// Host view of CPU storage of element type `T`.
    pub fn host<T: Element>(&self) -> Result<Ref<'_, [T]>> {
        let s = self.0.storage.borrow();
        if T::view(&s).is_none() {
            return Err(Error::Device(format!("tensor {:?} is on {:?}, expected {:?}", self.shape(), self.device(), T::device())));
        }
        Ok(Ref::map(s, |s| T::view(s).unwrap().as_slice()))
    }

    pub fn host_mut<T: Element>(&self) -> Result<RefMut<'_, [T]>> {
        let dev = self.device();
        let s = self.0.storage.borrow_mut();
        if T::view(&s).is_none() {
            return Err(Error::Device(format!("tensor {:?} is on {:?}, expected {:?}", self.shape(), dev, T::device())));
        }
        Ok(RefMut::map(s, |s| T::view_mut(s).unwrap().as_mut_slice()))
    }

    /// The GPU buffer behind a GPU tensor.
    pub fn gbuf(&self) -> Result<Ref<'_, GpuBuf>> {
        let s = self.0.storage.borrow();
        if !matches!(&*s, Storage::Gpu(_)) {
            return Err(Error::Device(format!("tensor {:?} is on {:?}, expected Gpu", self.shape(), self.device())));
        }
        Ok(Ref::map(s, |s| match s {
            Storage::Gpu(b) => b,
            _ => unreachable!(),
        }))
    }

    /// Copy to the host as f32 (reads back from the GPU).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.0.storage.borrow() {
            Storage::F32(v) => Ok(v.clone()),
            Storage::F64(v) => Ok(v.iter().map(|&x| x as f32).collect()),
            Storage::Gpu(b) => {
                let bytes = gpu()?.read(b, 4 * self.numel() as u64)?;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            }
        }
    }

    /// Copy to the host as f64.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        if let Storage::F64(v) = &*self.0.storage.borrow() {
            return Ok(v.clone());
        }
        Ok(self.to_vec()?.into_iter().map(|x| x as f64).collect())
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::Shape { op: "item", msg: format!("item() needs one element, tensor has shape {:?}", self.shape()) });
        }
        Ok(self.to_vec()?[0])
    }

    /// A copy on another device.
    pub fn to_device(&self, dev: Device) -> Result<Tensor> {
        if dev == Device::Cpu64 {
            return Tensor::from_f64(self.to_vec_f64()?, self.shape(), dev);
        }
        Tensor::from_vec(self.to_vec()?, self.shape(), dev)
    }

    /// The same storage viewed with another shape of equal size (differentiable).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::Shape { op: "reshape", msg: format!("cannot view {:?} as {:?}", self.shape(), shape) });
        }
        let old = self.shape().to_vec();
        let needs = grad_enabled() && self.requires_grad();
        let node = needs.then(|| Node { op: "reshape", inputs: vec![self.clone()], rule: Box::new(ReshapeRule(old)) });
        Ok(Tensor(Rc::new(Inner { id: next_id(), shape: shape.to_vec(), storage: self.0.storage.clone(), requires_grad: needs, node })))
    }

    /// Overwrite this tensor's values in place with those of `src` (same shape and device).
    /// Used by optimizers and checkpoint loading; not recorded on the tape.
    pub fn assign(&self, src: &Tensor) -> Result<()> {
        if src.shape() != self.shape() {
            return Err(Error::Shape { op: "assign", msg: format!("{:?} into {:?}", src.shape(), self.shape()) });
        }
        let new = match &*src.0.storage.borrow() {
            Storage::F32(v) => Storage::F32(v.clone()),
            Storage::F64(v) => Storage::F64(v.clone()),
            Storage::Gpu(b) => {
                // A device-side copy into a fresh pooled buffer, queued in order with the dispatches.
                let g = gpu()?;
                let out = g.alloc(b.bytes())?;
                g.copy(b, &out, 0)?;
                Storage::Gpu(out)
            }
        };
        *self.0.storage.borrow_mut() = new;
        Ok(())
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?})", self.shape(), self.device())
    }
}

/// Integer indices held on the host (validated there before any dispatch) and uploaded to the GPU
/// once, lazily. Used for item ids, sequence lengths and targets.
#[derive(Clone)]
pub struct Indices {
    host: Rc<Vec<u32>>,
    gpu: Rc<OnceCell<GpuBuf>>,
}

impl Indices {
    pub fn new(v: Vec<u32>) -> Indices {
        Indices { host: Rc::new(v), gpu: Rc::new(OnceCell::new()) }
    }
    pub fn host(&self) -> &[u32] {
        &self.host
    }
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    pub fn gpu(&self) -> Result<&GpuBuf> {
        if let Some(b) = self.gpu.get() {
            return Ok(b);
        }
        let b = gpu()?.upload(bytemuck::cast_slice(&self.host))?;
        Ok(self.gpu.get_or_init(|| b))
    }
    /// Reject any index >= `bound` before it reaches a kernel.
    pub fn check_below(&self, bound: usize, op: &'static str, what: &str) -> Result<()> {
        if let Some((pos, &v)) = self.host.iter().enumerate().find(|(_, &v)| v as usize >= bound) {
            return Err(Error::Index { op, msg: format!("{what} {v} at position {pos} is out of range (must be < {bound})") });
        }
        Ok(())
    }
}

impl std::fmt::Debug for Indices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Indices({:?})", self.host)
    }
}

impl From<Vec<u32>> for Indices {
    fn from(v: Vec<u32>) -> Self {
        Indices::new(v)
    }
}

/// All tensors must be on one device; returns it.
pub fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts[0].device();
    for t in &ts[1..] {
        if t.device() != d {
            return Err(Error::Device(format!("{op}: inputs on different devices ({:?} and {:?})", d, t.device())));
        }
    }
    Ok(d)
}
