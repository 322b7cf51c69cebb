//! The wgpu runtime: one instance/adapter/device/queue per process, a pipeline cache, a bind-group
//! cache, a buffer pool, and a deferred command stream.
//!
//! Ops never talk to wgpu directly: they call [`Gpu::dispatch`] with a [`Kernel`], the buffers it binds
//! and its parameter block. Dispatches are queued and encoded into ONE compute pass per [`flush`]
//! (one submit), which happens only when the host needs data back (a readback), when the queue is
//! long, or at the end of a step. wgpu inserts the barriers between dispatches of a pass.
//!
//! Memory: buffers come from a size-classed pool. A buffer released while dispatches that use it are
//! still queued goes to `pending_free` and only becomes reusable after the next submit, so a
//! `write_buffer` upload into a reused buffer can never overtake a queued kernel that reads it.
//!
//! The contract between an op and its kernel: a `Kernel<P>` names its WGSL entry point, its storage
//! bindings (in order) and, as a type, its parameter block `P`, a `#[repr(C)]` struct declared with
//! [`kernel_params!`] that mirrors the shader's `struct P` (the `var<uniform>` at group 0, binding 0)
//! field for field. `dispatch` only takes that `P`, and the layout tests (`engine::layout`) reflect
//! every kernel's shader with naga and compare names, offsets, types, size and bindings.
//!
//! Workloads: kernels are 1-D ([`groups_1d`], `lin()` in `shaders/common.wgsl`) or one workgroup per
//! row ([`row_groups`], `row_index()`); both fold counts past one dimension's limit into 2-D.

use std::borrow::Cow;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::{Error, Result};

/// Bytes reserved per dispatch in the uniform arena (the minimum dynamic-offset alignment): the
/// largest parameter block a kernel may take.
pub const UNIFORM_STRIDE: u64 = 256;
/// Dispatches queued before an automatic flush.
const MAX_PENDING: usize = 2048;
/// Invocations per workgroup of the 1-D and most per-row kernels: `const WG` of
/// `shaders/common.wgsl`, used as `@workgroup_size(WG)`.
pub const WG: u32 = 256;
/// Workgroups a dispatch may have along one dimension (WebGPU's guaranteed minimum); larger counts
/// are folded into 2-D.
const MAX_GROUPS_PER_DIM: u64 = 65535;

/// How a kernel binds one storage buffer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Access {
    Read,
    ReadWrite,
}

/// The WGSL scalar type of one parameter field.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScalarKind {
    U32,
    I32,
    F32,
}

/// A Rust type that is one WGSL scalar in a parameter block.
pub trait Scalar: bytemuck::Pod {
    const KIND: ScalarKind;
}

impl Scalar for u32 {
    const KIND: ScalarKind = ScalarKind::U32;
}

impl Scalar for i32 {
    const KIND: ScalarKind = ScalarKind::I32;
}

impl Scalar for f32 {
    const KIND: ScalarKind = ScalarKind::F32;
}

/// One field of a parameter block: its name, byte offset and scalar type.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub kind: ScalarKind,
}

/// A kernel's parameter block, uploaded as bytes into the uniform at binding 0. Declare one with
/// [`kernel_params!`], which also lists its fields for the layout tests.
pub trait Params: bytemuck::Pod {
    /// The fields in declaration order.
    const FIELDS: &'static [Field];
}

/// Declares the parameter block of a kernel (or of every kernel of a shader file sharing one
/// `struct P`): a `#[repr(C)]` `Pod` struct with the WGSL struct's field names, order and scalar
/// types (`u32`, `i32`, `f32`), and its [`Params`] impl listing the fields with their offsets.
///
/// ```ignore
/// kernel_params! {
///     /// `struct P` of softmax.wgsl.
///     pub(crate) struct SoftmaxParams { rows: u32, cols: u32, has_lens: u32 }
/// }
/// ```
macro_rules! kernel_params {
    ($(#[$meta:meta])* $vis:vis struct $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $crate::engine::gpu::Params for $name {
            const FIELDS: &'static [$crate::engine::gpu::Field] = &[$($crate::engine::gpu::Field {
                name: stringify!($field),
                offset: ::core::mem::offset_of!($name, $field),
                kind: <$ty as $crate::engine::gpu::Scalar>::KIND,
            }),*];
        }

        const _: () = assert!(
            ::core::mem::size_of::<$name>() as u64 <= $crate::engine::gpu::UNIFORM_STRIDE,
            concat!("parameter block ", stringify!($name), " exceeds the uniform stride")
        );
    };
}
pub(crate) use kernel_params;

/// A compute kernel: WGSL source, entry point, its storage bindings (binding 0 is always the
/// `var<uniform>` parameter block; storage buffers follow at bindings 1..) and, as a type, its
/// parameter block `P`.
pub struct Kernel<P> {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Access],
    params: PhantomData<fn() -> P>,
}

impl<P: Params> Kernel<P> {
    pub const fn new(name: &'static str, source: &'static str, entry: &'static str, bindings: &'static [Access]) -> Self {
        Kernel { name, source, entry, bindings, params: PhantomData }
    }

    /// The kernel with its parameter type erased: what the pipeline cache and the layout tests need.
    pub fn contract(&self) -> Contract {
        Contract {
            name: self.name,
            source: self.source,
            entry: self.entry,
            bindings: self.bindings,
            params: std::any::type_name::<P>(),
            fields: P::FIELDS,
            size: std::mem::size_of::<P>(),
        }
    }
}

/// The Rust side of a kernel's contract with its shader.
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    pub name: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub bindings: &'static [Access],
    /// Type name of the parameter block.
    pub params: &'static str,
    pub fields: &'static [Field],
    /// Bytes of the parameter block.
    pub size: usize,
}

/// A pooled GPU buffer, or a view of `len` bytes inside one (see [`GpuBuf::view`]). Dropping an
/// owned buffer returns the allocation to the pool; a view keeps its parent alive.
pub struct GpuBuf {
    buf: Option<wgpu::Buffer>,
    /// A view: the parent buffer and the byte offset into it.
    parent: Option<(Arc<GpuBuf>, u64)>,
    /// Unique id used by the bind-group cache.
    pub(crate) id: u64,
    /// Bytes the pool allocated (size class), >= the bytes the tensor uses.
    pub(crate) cap: u64,
    /// Bytes in use.
    pub(crate) len: u64,
}

impl GpuBuf {
    pub fn raw(&self) -> &wgpu::Buffer {
        match &self.parent {
            Some((p, _)) => p.raw(),
            None => self.buf.as_ref().expect("live buffer"),
        }
    }
    pub fn bytes(&self) -> u64 {
        self.len
    }
    /// Byte offset of this buffer's data inside [`GpuBuf::raw`] (0 unless a view).
    pub fn offset(&self) -> u64 {
        self.parent.as_ref().map_or(0, |(_, o)| *o)
    }
    /// `bytes` bytes at byte `offset` of `parent`, bound to kernels as a buffer of its own (kernels
    /// index it from 0). `offset` must be a multiple of the adapter's storage-offset alignment
    /// ([`Gpu::view_align`]).
    pub fn view(parent: &Arc<GpuBuf>, offset: u64, bytes: u64) -> Result<GpuBuf> {
        let g = gpu()?;
        if !offset.is_multiple_of(g.view_align()) || offset + bytes > parent.len || bytes == 0 {
            return Err(Error::Device(format!("view of {bytes} bytes at offset {offset} does not fit a {}-byte buffer", parent.len)));
        }
        // A view of a view is a view of the root.
        let (root, base) = match &parent.parent {
            Some((r, o)) => (r.clone(), *o),
            None => (parent.clone(), 0),
        };
        let id = g.state().next_id();
        Ok(GpuBuf { buf: None, parent: Some((root, base + offset)), id, cap: bytes, len: bytes })
    }
    /// How this buffer is bound: the whole allocation, or just the view's range.
    fn binding(&self) -> wgpu::BindingResource<'_> {
        match &self.parent {
            None => self.raw().as_entire_binding(),
            Some((p, o)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: p.raw(),
                offset: *o,
                size: wgpu::BufferSize::new(self.len.div_ceil(4) * 4),
            }),
        }
    }
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            if let Some(ctx) = CTX.get().and_then(|c| c.as_ref().ok()) {
                ctx.state().pending_free.push((self.cap, self.id, buf));
            }
        }
    }
}

/// What the chosen adapter is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
}

impl AdapterSummary {
    fn from_info(i: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            name: i.name.clone(),
            backend: format!("{:?}", i.backend),
            device_type: format!("{:?}", i.device_type),
            driver: i.driver.clone(),
            driver_info: i.driver_info.clone(),
            subgroup_min_size: i.subgroup_min_size,
            subgroup_max_size: i.subgroup_max_size,
        }
    }
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }
}

/// Pool statistics, for tests and `info`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolStats {
    /// Bytes of all buffers the pool ever created and still owns.
    pub allocated_bytes: u64,
    /// Number of buffers created.
    pub buffers: u64,
    /// Bytes sitting in the free lists.
    pub free_bytes: u64,
}

/// One queued command of the step: a dispatch, or a buffer-to-buffer copy (encoded between
/// compute passes).
enum Pending {
    Dispatch { pipeline: Arc<wgpu::ComputePipeline>, bind_group: Arc<wgpu::BindGroup>, offset: u32, groups: [u32; 3] },
    Copy { src: wgpu::Buffer, src_offset: u64, dst: wgpu::Buffer, dst_offset: u64, bytes: u64 },
}

struct State {
    pipelines: HashMap<(&'static str, &'static str), (Arc<wgpu::ComputePipeline>, Arc<wgpu::BindGroupLayout>)>,
    bind_groups: HashMap<Vec<u64>, Arc<wgpu::BindGroup>>,
    free: HashMap<u64, Vec<(u64, wgpu::Buffer)>>,
    pending_free: Vec<(u64, u64, wgpu::Buffer)>,
    pending: Vec<Pending>,
    uniforms: Vec<u8>,
    uniform_buf: wgpu::Buffer,
    uniform_id: u64,
    next_id: u64,
    stats: PoolStats,
    dispatches: u64,
    submits: u64,
    copies: u64,
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// Commands recorded since the process started (see [`Gpu::counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Compute dispatches.
    pub dispatches: u64,
    /// Queue submits.
    pub submits: u64,
    /// Buffer-to-buffer copies (no kernel; e.g. gathering gradients into the optimizer's arena).
    pub copies: u64,
}

/// The process-wide GPU context.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    state: Mutex<State>,
}

static CTX: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
static REQUEST: Mutex<Option<String>> = Mutex::new(None);

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc)
}

/// All adapters wgpu can see, hardware and software.
pub fn list_adapters() -> Vec<(AdapterSummary, wgpu::Limits)> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY))
        .into_iter()
        .map(|a| (AdapterSummary::from_info(&a.get_info()), a.limits()))
        .collect()
}

/// Ask for a particular adapter (substring of its name, case-insensitive) before the context is
/// created. `MSM4SR_ADAPTER` does the same from the environment.
pub fn request_adapter(name: Option<String>) {
    *REQUEST.lock().unwrap() = name;
}

/// Whether a hardware (non-software) GPU adapter exists.
pub fn hardware_adapter_available() -> bool {
    list_adapters().iter().any(|(a, _)| !a.is_software())
}

fn choose_adapter() -> std::result::Result<wgpu::Adapter, String> {
    let wanted = REQUEST.lock().unwrap().clone().or_else(|| std::env::var("MSM4SR_ADAPTER").ok()).filter(|s| !s.is_empty());
    let inst = instance();
    let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY));
    let names: Vec<String> = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
        })
        .collect();
    if adapters.is_empty() {
        return Err("no GPU adapter found (wgpu saw none on Vulkan/Metal/DX12). On Linux without a GPU, \
                    install a software Vulkan driver (apt-get install mesa-vulkan-drivers) or use --device cpu"
            .into());
    }
    if let Some(w) = wanted {
        let wl = w.to_lowercase();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&wl))
            .ok_or_else(|| format!("no adapter matches '{w}'; found: {}", names.join("; ")));
    }
    // GPU first: discrete, integrated, virtual, then software.
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let mut adapters = adapters;
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    Ok(adapters.into_iter().next().unwrap())
}

fn create() -> std::result::Result<Gpu, String> {
    let adapter = choose_adapter()?;
    let info = AdapterSummary::from_info(&adapter.get_info());
    // Ask for what the adapter really offers (not WebGPU's defaults), capped where wgpu requires.
    let limits = adapter.limits();
    let desc = wgpu::DeviceDescriptor {
        label: Some("msm4sr"),
        required_features: adapter.features() & wgpu::Features::SUBGROUP, // for matmul variant 6
        required_limits: limits.clone(),
        ..Default::default()
    };
    let (device, queue) =
        pollster::block_on(adapter.request_device(&desc)).map_err(|e| format!("could not open device on adapter '{}': {e}", info.name))?;
    device.on_uncaptured_error(Arc::new(|e| {
        eprintln!("msm4sr: wgpu error: {e}");
    }));
    let uniform_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("uniform arena"),
        size: UNIFORM_STRIDE * MAX_PENDING as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let features = device.features();
    Ok(Gpu {
        device,
        queue,
        adapter: info,
        limits,
        features,
        state: Mutex::new(State {
            pipelines: HashMap::new(),
            bind_groups: HashMap::new(),
            free: HashMap::new(),
            pending_free: Vec::new(),
            pending: Vec::new(),
            uniforms: Vec::with_capacity(UNIFORM_STRIDE as usize * 64),
            uniform_buf,
            uniform_id: u64::MAX,
            next_id: 0,
            stats: PoolStats::default(),
            dispatches: 0,
            submits: 0,
            copies: 0,
        }),
    })
}

/// The shared GPU context, created on first use.
pub fn gpu() -> Result<&'static Gpu> {
    CTX.get_or_init(create).as_ref().map_err(|e| Error::Device(e.clone()))
}

/// Round a byte size up to its pool size class: 8 classes per power of two, at least 256 bytes.
fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(256);
    let p = 63 - b.leading_zeros() as u64; // 2^p <= b
    if p < 3 {
        return b;
    }
    let step = 1u64 << (p - 3);
    b.div_ceil(step) * step
}

impl Gpu {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Largest storage buffer one binding may address.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// A buffer of at least `bytes` bytes from the pool (contents undefined).
    pub fn alloc(&self, bytes: u64) -> Result<GpuBuf> {
        let bytes = bytes.max(4);
        if bytes > self.max_binding() {
            return Err(Error::Device(format!(
                "tensor of {bytes} bytes exceeds the adapter's largest storage binding ({} bytes, adapter '{}'); \
                 split the work into smaller chunks",
                self.max_binding(),
                self.adapter.name
            )));
        }
        let cap = size_class(bytes).min(self.max_binding().max(bytes));
        let mut st = self.state();
        if let Some(list) = st.free.get_mut(&cap) {
            if let Some((id, buf)) = list.pop() {
                st.stats.free_bytes -= cap;
                return Ok(GpuBuf { buf: Some(buf), parent: None, id, cap, len: bytes });
            }
        }
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: cap,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let id = st.next_id();
        st.stats.allocated_bytes += cap;
        st.stats.buffers += 1;
        Ok(GpuBuf { buf: Some(buf), parent: None, id, cap, len: bytes })
    }

    /// Upload host data into a new pooled buffer.
    pub fn upload(&self, data: &[u8]) -> Result<GpuBuf> {
        let b = self.alloc(data.len() as u64)?;
        if !data.is_empty() {
            let n = data.len() & !3;
            self.queue.write_buffer(b.raw(), 0, &data[..n]);
            if n < data.len() {
                let mut tail = [0u8; 4];
                tail[..data.len() - n].copy_from_slice(&data[n..]);
                self.queue.write_buffer(b.raw(), n as u64, &tail);
            }
        }
        Ok(b)
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.state().stats
    }

    /// Dispatches and copies recorded, submits made, since start.
    pub fn counters(&self) -> Counters {
        let st = self.state();
        Counters { dispatches: st.dispatches, submits: st.submits, copies: st.copies }
    }

    /// The alignment, in bytes, of a view's offset ([`GpuBuf::view`]): the adapter's minimum
    /// storage-buffer offset alignment (at least 16).
    pub fn view_align(&self) -> u64 {
        (self.limits.min_storage_buffer_offset_alignment as u64).max(16)
    }

    /// Queue a copy of all of `src` into `dst` at byte `dst_offset` of `dst`'s data, in order with
    /// the queued dispatches.
    pub fn copy(&self, src: &GpuBuf, dst: &GpuBuf, dst_offset: u64) -> Result<()> {
        let bytes = src.len.div_ceil(4) * 4;
        if !dst_offset.is_multiple_of(4) || dst_offset + bytes > dst.len.div_ceil(4) * 4 {
            return Err(Error::Device(format!("copy of {bytes} bytes to offset {dst_offset} of a {}-byte buffer", dst.len)));
        }
        if bytes == 0 {
            return Ok(());
        }
        let mut st = self.state();
        if st.pending.len() >= MAX_PENDING {
            self.flush_locked(&mut st);
        }
        st.pending.push(Pending::Copy {
            src: src.raw().clone(),
            src_offset: src.offset(),
            dst: dst.raw().clone(),
            dst_offset: dst.offset() + dst_offset,
            bytes,
        });
        st.copies += 1;
        Ok(())
    }

    fn pipeline(&self, st: &mut State, k: &Contract) -> (Arc<wgpu::ComputePipeline>, Arc<wgpu::BindGroupLayout>) {
        if let Some(p) = st.pipelines.get(&(k.name, k.entry)) {
            return p.clone();
        }
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer { ty: wgpu::BufferBindingType::Uniform, has_dynamic_offset: true, min_binding_size: None },
            count: None,
        }];
        for (i, a) in k.bindings.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: *a == Access::Read },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let bgl = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(k.name), entries: &entries });
        let layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(k.name),
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(k.name),
            source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(k.source)),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.name),
            layout: Some(&layout),
            module: &module,
            entry_point: Some(k.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        let p = (Arc::new(pipeline), Arc::new(bgl));
        st.pipelines.insert((k.name, k.entry), p.clone());
        p
    }

    /// Queue one dispatch of `k` over `groups` workgroups with `bufs` bound at bindings 1.. and
    /// `params` as the uniform block at binding 0.
    pub fn dispatch<P: Params>(&self, k: &Kernel<P>, bufs: &[&GpuBuf], params: &P, groups: [u32; 3]) -> Result<()> {
        self.dispatch_bytes(&k.contract(), bufs, bytemuck::bytes_of(params), groups)
    }

    fn dispatch_bytes(&self, k: &Contract, bufs: &[&GpuBuf], params: &[u8], groups: [u32; 3]) -> Result<()> {
        if params.len() as u64 > UNIFORM_STRIDE {
            return Err(Error::Device(format!(
                "kernel {}:{} has a {}-byte parameter block; at most {UNIFORM_STRIDE} bytes fit",
                k.name,
                k.entry,
                params.len()
            )));
        }
        if bufs.len() != k.bindings.len() {
            return Err(Error::Device(format!("kernel {}:{} expects {} buffers, got {}", k.name, k.entry, k.bindings.len(), bufs.len())));
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Device(format!(
                "kernel {}:{} needs {:?} workgroups; the adapter allows {max} per dimension",
                k.name, k.entry, groups
            )));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let mut st = self.state();
        if st.pending.len() >= MAX_PENDING {
            self.flush_locked(&mut st);
        }
        let (pipeline, bgl) = self.pipeline(&mut st, k);
        // Bind-group cache key: kernel identity + buffer ids (+ the uniform arena's identity).
        let mut key: Vec<u64> = Vec::with_capacity(bufs.len() + 2);
        key.push(Arc::as_ptr(&pipeline) as u64);
        key.push(st.uniform_id);
        key.extend(bufs.iter().map(|b| b.id));
        let bind_group = if let Some(bg) = st.bind_groups.get(&key) {
            bg.clone()
        } else {
            let mut entries = vec![wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &st.uniform_buf,
                    offset: 0,
                    size: wgpu::BufferSize::new(UNIFORM_STRIDE),
                }),
            }];
            for (i, b) in bufs.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.binding() });
            }
            let bg = Arc::new(self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &bgl, entries: &entries }));
            if st.bind_groups.len() > 8192 {
                st.bind_groups.clear();
            }
            st.bind_groups.insert(key, bg.clone());
            bg
        };
        let offset = st.uniforms.len() as u32;
        let mut block = [0u8; UNIFORM_STRIDE as usize];
        block[..params.len()].copy_from_slice(params);
        st.uniforms.extend_from_slice(&block);
        st.pending.push(Pending::Dispatch { pipeline, bind_group, offset, groups });
        st.dispatches += 1;
        Ok(())
    }

    /// Record every queued command into `enc`: each run of dispatches as one compute pass, copies
    /// between them.
    fn encode_pending(&self, st: &mut State, enc: &mut wgpu::CommandEncoder) {
        if st.pending.is_empty() {
            return;
        }
        self.queue.write_buffer(&st.uniform_buf, 0, &st.uniforms);
        let mut i = 0;
        while i < st.pending.len() {
            if let Pending::Copy { src, src_offset, dst, dst_offset, bytes } = &st.pending[i] {
                enc.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *bytes);
                i += 1;
                continue;
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("step"), timestamp_writes: None });
            while let Some(Pending::Dispatch { pipeline, bind_group, offset, groups }) = st.pending.get(i) {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, Some(bind_group.as_ref()), &[*offset]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                i += 1;
            }
        }
        st.pending.clear();
        st.uniforms.clear();
    }

    /// Submit `enc` and recycle buffers released while their dispatches were queued.
    fn submit(&self, st: &mut State, enc: wgpu::CommandEncoder) {
        self.queue.submit([enc.finish()]);
        st.submits += 1;
        Self::recycle(st);
    }

    /// Make buffers released while their dispatches were queued reusable (call after a submit).
    fn recycle(st: &mut State) {
        for (cap, id, buf) in std::mem::take(&mut st.pending_free) {
            st.stats.free_bytes += cap;
            st.free.entry(cap).or_default().push((id, buf));
        }
    }

    fn flush_locked(&self, st: &mut State) {
        if st.pending.is_empty() {
            // Nothing queued can read a released buffer any more.
            Self::recycle(st);
            return;
        }
        let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step") });
        self.encode_pending(st, &mut enc);
        self.submit(st, enc);
    }

    /// Encode and submit everything queued (one compute pass, one submit).
    pub fn flush(&self) {
        let mut st = self.state();
        self.flush_locked(&mut st);
    }

    /// Copy `bytes` bytes of `b` back to the host (flushes queued work first and waits).
    pub fn read(&self, b: &GpuBuf, bytes: u64) -> Result<Vec<u8>> {
        let size = bytes.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        {
            // The queued step and the copy go out in one submit.
            let mut st = self.state();
            let mut enc = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("step+readback") });
            self.encode_pending(&mut st, &mut enc);
            if size > 0 {
                enc.copy_buffer_to_buffer(b.raw(), b.offset(), &staging, 0, size);
            }
            self.submit(&mut st, enc);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(std::time::Duration::from_secs(600)) })
            .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Device("readback callback never ran".into()))?
            .map_err(|e| Error::Device(format!("mapping the readback buffer failed: {e}")))?;
        let out = staging.slice(..).get_mapped_range().map_err(|e| Error::Device(format!("readback: {e:?}")))?.to_vec();
        staging.unmap();
        Ok(out[..bytes as usize].to_vec())
    }

    /// Block until all submitted work has finished (for timing).
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: Some(std::time::Duration::from_secs(600)) })
            .map_err(|e| Error::Device(format!("waiting for the GPU failed: {e}")))?;
        Ok(())
    }
}

/// Workgroup counts for `n` invocations of a 1-D kernel of [`WG`] lanes, folded into 2-D when the
/// count exceeds one dimension's limit. Kernels rebuild the linear index with `lin(gid, nwg)` and
/// skip indices >= n. No work gives no workgroups (the dispatch is skipped).
pub fn groups_1d(n: usize) -> [u32; 3] {
    fold((n as u64).div_ceil(WG as u64))
}

/// Workgroup counts for one workgroup per row (of any workgroup size), folded into 2-D the same
/// way. Kernels recover the row with `row_index(wid, nwg)` and skip rows >= the row count.
pub fn row_groups(rows: usize) -> [u32; 3] {
    fold(rows as u64)
}

/// `g` workgroups as (x, y, 1) with x, y <= the per-dimension limit and x * y >= g.
fn fold(g: u64) -> [u32; 3] {
    if g <= MAX_GROUPS_PER_DIM {
        [g as u32, 1, 1]
    } else {
        let y = g.div_ceil(MAX_GROUPS_PER_DIM);
        [g.div_ceil(y) as u32, y as u32, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_fold_into_two_dimensions() {
        assert_eq!(groups_1d(0), [0, 1, 1]);
        assert_eq!(groups_1d(1), [1, 1, 1]);
        assert_eq!(groups_1d(WG as usize * 65535), [65535, 1, 1]);
        assert_eq!(row_groups(65535), [65535, 1, 1]);
        for n in [65536usize, 100_000, 65535 * 3 + 1, 1 << 31] {
            let [x, y, z] = row_groups(n);
            assert!(x as u64 <= MAX_GROUPS_PER_DIM && y as u64 <= MAX_GROUPS_PER_DIM && z == 1, "{n}: {x} x {y}");
            assert!(x as u64 * y as u64 >= n as u64, "{n}: {x} x {y}");
            assert_eq!(groups_1d(n * WG as usize), [x, y, z]);
        }
    }
}
