//! Tensors: a shape plus storage on one device, and (when made by an op that needs gradients) the
//! tape node that made it.

use std::cell::{OnceCell, Ref, RefCell, RefMut};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

use super::gpu::{gpu, GpuBuf};
use super::tape::{grad_enabled, Node};
use super::Device;
use crate::{Error, Result};

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
            Storage::F32(v) => super::pool::give(std::mem::take(v)),
            Storage::F64(v) => super::pool::give(std::mem::take(v)),
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

/// Host scalar types the CPU backend is generic over (f32 for training, f64 for finite differences).
pub trait Real: num_traits::Float + num_traits::NumAssign + Default + std::fmt::Debug + std::iter::Sum + Send + Sync + 'static {
    fn c(x: f64) -> Self;
    /// e^x for the hot loops of the CPU backend: f32 uses [`expf`] (branch-free, so loops over it
    /// vectorize), f64 the exact `exp` (the finite-difference reference).
    fn fexp(self) -> Self;
    fn view(s: &Storage) -> Option<&Vec<Self>>;
    fn view_mut(s: &mut Storage) -> Option<&mut Vec<Self>>;
    fn wrap(v: Vec<Self>) -> Storage;
    fn device() -> Device;
    /// C (m x n) = alpha * A (m x k) * B (k x n) + beta * C, with arbitrary row/column strides.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        beta: Self,
        c: &mut [Self],
        rsc: isize,
    );
}

/// Seconds and floating-point operations spent in the f32 CPU backend's matrix products since the
/// process started (for reporting how GEMM-bound a run is).
pub fn gemm_counters() -> (f64, f64) {
    (GEMM_NS.load(Ordering::Relaxed) as f64 * 1e-9, GEMM_FLOP.load(Ordering::Relaxed) as f64)
}

static GEMM_NS: AtomicU64 = AtomicU64::new(0);
static GEMM_FLOP: AtomicU64 = AtomicU64::new(0);

thread_local!(static IN_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// Whether this thread is inside a CPU matrix product. The GEMM crate allocates its packing
/// buffers itself, once per call: the one allocation a steady-state CPU step still makes, which
/// the allocation test tells apart from tensor storage with this.
pub fn in_gemm() -> bool {
    IN_GEMM.with(|g| g.get())
}

struct InGemm;

impl InGemm {
    fn enter() -> InGemm {
        IN_GEMM.with(|g| g.set(true));
        InGemm
    }
}

impl Drop for InGemm {
    fn drop(&mut self) {
        IN_GEMM.with(|g| g.set(false));
    }
}

/// Add one product of `flop` operations that started at `t0` to the counters.
pub(crate) fn count_gemm(flop: usize, t0: std::time::Instant) {
    GEMM_NS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    GEMM_FLOP.fetch_add(flop as u64, Ordering::Relaxed);
}

impl Real for f32 {
    fn c(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        expf(self)
    }
    fn view(s: &Storage) -> Option<&Vec<Self>> {
        if let Storage::F32(v) = s {
            Some(v)
        } else {
            None
        }
    }
    fn view_mut(s: &mut Storage) -> Option<&mut Vec<Self>> {
        if let Storage::F32(v) = s {
            Some(v)
        } else {
            None
        }
    }
    fn wrap(v: Vec<Self>) -> Storage {
        Storage::F32(v)
    }
    fn device() -> Device {
        Device::Cpu
    }
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        rsa: isize,
        csa: isize,
        b: &[f32],
        rsb: isize,
        csb: isize,
        beta: f32,
        c: &mut [f32],
        rsc: isize,
    ) {
        let t0 = std::time::Instant::now();
        let _g = InGemm::enter();
        // SAFETY: callers pass slices that cover every strided index of the (m,k), (k,n), (m,n) views.
        unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), rsc, 1) }
        count_gemm(2 * m * n * k, t0);
    }
}

impl Real for f64 {
    fn c(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn fexp(self) -> Self {
        self.exp()
    }
    fn view(s: &Storage) -> Option<&Vec<Self>> {
        if let Storage::F64(v) = s {
            Some(v)
        } else {
            None
        }
    }
    fn view_mut(s: &mut Storage) -> Option<&mut Vec<Self>> {
        if let Storage::F64(v) = s {
            Some(v)
        } else {
            None
        }
    }
    fn wrap(v: Vec<Self>) -> Storage {
        Storage::F64(v)
    }
    fn device() -> Device {
        Device::Cpu64
    }
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: &[f64],
        rsa: isize,
        csa: isize,
        b: &[f64],
        rsb: isize,
        csb: isize,
        beta: f64,
        c: &mut [f64],
        rsc: isize,
    ) {
        // SAFETY: as for f32.
        let _g = InGemm::enter();
        unsafe { matrixmultiply::dgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), rsc, 1) }
    }
}

/// e^x in f32 without branches or calls (Cephes' expf: x = k ln 2 + r with |r| <= ln 2 / 2, a
/// degree-6 polynomial for e^r, 2^k from the exponent bits), within 2 ulp of the exact value for
/// normal results; 0 below -87.33 (where e^x is subnormal), +inf above 88.72, NaN for NaN.
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    let xc = x.clamp(-87.336_55, 88.722_83);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - k * C1) - k * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = (p * (r * r) + r) + 1.0;
    // 2^k as two factors, so k = 128 (x just below the overflow bound) does not overflow.
    let (ki, pow2) = (k as i32, |j: i32| f32::from_bits(((j + 127) as u32) << 23));
    let y = e * pow2(ki >> 1) * pow2(ki - (ki >> 1));
    let y = if x < -87.336_55 { 0.0 } else { y };
    let y = if x > 88.722_83 { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// sum_i a_i b_i with 8 partial sums (combined in a fixed order), so the loop vectorizes; the
/// result depends only on the inputs, never on threads or alignment.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [T::zero(); 8];
    for (ac, bc) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let tail = n / 8 * 8;
    for (&x, &y) in a[tail..].iter().zip(&b[tail..]) {
        t += x * y;
    }
    t
}

/// sum_i e^(x_i - m), the exponentials computed in blocks (vectorized) and summed in order.
pub fn sum_exp<T: Real>(x: &[T], m: T) -> T {
    let mut buf = [T::zero(); 256];
    let mut s = T::zero();
    for chunk in x.chunks(256) {
        let b = &mut buf[..chunk.len()];
        for (o, &v) in b.iter_mut().zip(chunk) {
            *o = (v - m).fexp();
        }
        for &e in b.iter() {
            s += e;
        }
    }
    s
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>) -> Tensor {
        Tensor(Rc::new(Inner { id: next_id(), shape, storage: Rc::new(RefCell::new(storage)), requires_grad: false, node: None }))
    }

    /// The result of an op: records a tape node when gradients are enabled and any input needs one.
    /// `backward` maps the output's gradient to one optional gradient per input (same order).
    pub(crate) fn from_op(
        op: &'static str,
        storage: Storage,
        shape: Vec<usize>,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + 'static,
    ) -> Tensor {
        let needs = grad_enabled() && inputs.iter().any(|t| t.requires_grad());
        let node = needs.then(|| Node { op, inputs: inputs.iter().map(|t| (*t).clone()).collect(), backward: Box::new(backward) });
        Tensor(Rc::new(Inner { id: next_id(), shape, storage: Rc::new(RefCell::new(storage)), requires_grad: needs, node }))
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
    pub fn host<T: Real>(&self) -> Result<Ref<'_, [T]>> {
        let s = self.0.storage.borrow();
        if T::view(&s).is_none() {
            return Err(Error::Device(format!("tensor {:?} is on {:?}, expected {:?}", self.shape(), self.device(), T::device())));
        }
        Ok(Ref::map(s, |s| T::view(s).unwrap().as_slice()))
    }

    pub fn host_mut<T: Real>(&self) -> Result<RefMut<'_, [T]>> {
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
        let node = needs.then(|| Node {
            op: "reshape",
            inputs: vec![self.clone()],
            backward: Box::new(move |g: &Tensor| Ok(vec![Some(g.reshape(&old)?)])),
        });
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
            Storage::Gpu(_) => {
                // A device-side copy into a fresh pooled buffer.
                return super::ops::elementwise::copy_into(src, self);
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

#[cfg(test)]
mod exp_tests {
    use super::expf;

    #[test]
    fn expf_is_within_two_ulp_and_handles_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let (got, want) = (expf(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.4e-7, "max relative error {worst:e}");
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(-100.0), 0.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(100.0), f32::INFINITY);
        assert!(expf(f32::NAN).is_nan());
    }
}
