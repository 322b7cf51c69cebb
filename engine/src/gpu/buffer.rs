//! Pooled GPU buffers: size classes (8 per power of two), views into a buffer, and release that
//! waits for the next submit while queued dispatches may still use the buffer.

use std::sync::Arc;

use super::{gpu, Gpu, CTX};
use crate::error::{Error, Result};

/// A pooled GPU buffer, or a view of `len` bytes inside one (see [`GpuBuf::view`]). Dropping an
/// owned buffer returns the allocation to the pool; a view keeps its parent alive.
pub struct GpuBuf {
    pub(super) buf: Option<wgpu::Buffer>,
    /// A view: the parent buffer and the byte offset into it.
    pub(super) parent: Option<(Arc<GpuBuf>, u64)>,
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
    pub(super) fn binding(&self) -> wgpu::BindingResource<'_> {
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

    /// The alignment, in bytes, of a view's offset ([`GpuBuf::view`]): the adapter's minimum
    /// storage-buffer offset alignment (at least 16).
    pub fn view_align(&self) -> u64 {
        (self.limits.min_storage_buffer_offset_alignment as u64).max(16)
    }
}
