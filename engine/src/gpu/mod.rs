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
//! field for field. `dispatch` only takes that `P`, and the layout tests (`engine/src/tests/layout.rs`) reflect
//! every kernel's shader with naga and compare names, offsets, types, size and bindings.
//!
//! Workloads: kernels are 1-D ([`groups_1d`], `lin()` in `shaders/common.wgsl`) or one workgroup per
//! row ([`row_groups`], `row_index()`); both fold counts past one dimension's limit into 2-D.
//!
//! Files: this one holds the context (adapter choice, device, the shared state); [`kernel`] the
//! kernel contract and workload helpers; [`buffer`] pooled buffers; [`stream`] the deferred command
//! stream (dispatch, copy, flush, readback).
//!
//! Uses only the engine's error type: the tensors and the ops above use it.

mod buffer;
mod kernel;
mod stream;

pub use buffer::{GpuBuf, PoolStats};
pub(crate) use kernel::kernel_params;
pub use kernel::{groups_1d, row_groups, Access, Contract, Field, Kernel, Params, Scalar, ScalarKind};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::error::{Error, Result};

/// Bytes reserved per dispatch in the uniform arena (the minimum dynamic-offset alignment): the
/// largest parameter block a kernel may take.
pub const UNIFORM_STRIDE: u64 = 256;
/// Dispatches queued before an automatic flush.
const MAX_PENDING: usize = 2048;
/// Invocations per workgroup of the 1-D and most per-row kernels: `const WG` of
/// `shaders/common.wgsl`, used as `@workgroup_size(WG)`.
pub const WG: u32 = 256;

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

impl Gpu {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Largest storage buffer one binding may address.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// Dispatches and copies recorded, submits made, since start.
    pub fn counters(&self) -> Counters {
        let st = self.state();
        Counters { dispatches: st.dispatches, submits: st.submits, copies: st.copies }
    }
}
