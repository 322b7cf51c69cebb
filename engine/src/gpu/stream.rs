//! The deferred command stream: dispatches and copies are queued and encoded into one compute pass
//! per flush (one submit), which happens on a readback, when the queue is long, or at a step's end.

use std::borrow::Cow;
use std::sync::Arc;

use super::{Access, Contract, Gpu, GpuBuf, Kernel, Params, Pending, State, MAX_PENDING, UNIFORM_STRIDE};
use crate::error::{Error, Result};

impl Gpu {
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
