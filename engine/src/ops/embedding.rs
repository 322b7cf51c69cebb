//! Row gathers by integer index. Indices are validated on the host before any dispatch.
//!
//! - `embedding(w, ids, ids_shape)`: w (V, D), ids (prod(ids_shape)) each < V -> ids_shape + [D],
//!   out[i] = w[ids[i]]. `w` may be a parameter or a computed tensor (item-encoder outputs).
//!   Backward: dw[v] = sum of g[i] over the positions i with ids[i] = v, summed in increasing i
//!   (rows never read get 0). Deterministic without atomics: the host builds the inverse index
//!   (CSR: for each row of w, the positions that read it) and one invocation per (v, d) sums them.
//! - `gather_last(x, lens)`: x (B, L, C), lens (B) each in 1..=L -> (B, C) = x[b, lens[b] - 1].
//!   Backward: dx = zeros (B, L, C) with g[b] at row lens[b] - 1.

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Error, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use crate::tensor::{numel, Indices, Storage, Tensor};

const SRC: &str = wgsl!("embedding.wgsl");
static EMB_FWD: Kernel<EmbeddingParams> = Kernel::new("embedding", SRC, "embedding_fwd", &[Read, Read, ReadWrite]);
static EMB_BWD: Kernel<EmbeddingParams> = Kernel::new("embedding", SRC, "embedding_bwd", &[Read, Read, ReadWrite]);
static LAST_FWD: Kernel<EmbeddingParams> = Kernel::new("embedding", SRC, "gather_last_fwd", &[Read, Read, ReadWrite]);
static LAST_BWD: Kernel<EmbeddingParams> = Kernel::new("embedding", SRC, "gather_last_bwd", &[Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![EMB_FWD.contract(), EMB_BWD.contract(), LAST_FWD.contract(), LAST_BWD.contract()]
}

kernel_params! {
    /// `struct P` of embedding.wgsl (every kernel).
    struct EmbeddingParams {
        /// Elements of out.
        total: u32,
        /// Row width (D or C).
        d: u32,
        /// L for gather_last, V for embedding_bwd.
        m: u32,
    }
}

/// Run one gather kernel producing `total` outputs; params (total, d, m) as in the shader.
fn launch(k: &Kernel<EmbeddingParams>, src: &GpuBuf, idx: &GpuBuf, total: usize, d: usize, m: usize) -> Result<Storage> {
    let g = gpu()?;
    let out = g.alloc(4 * total as u64)?;
    g.dispatch(k, &[src, idx, &out], &EmbeddingParams { total: total as u32, d: d as u32, m: m as u32 }, groups_1d(total))?;
    Ok(Storage::Gpu(out))
}

// ---- CPU references -------------------------------------------------------------------------

pub fn embedding_cpu<T: Real>(w: &[T], ids: &[u32], d: usize) -> Vec<T> {
    par::rows(ids.len(), d, d, |i, o| {
        let id = ids[i] as usize;
        o.copy_from_slice(&w[id * d..(id + 1) * d]);
    })
}

/// dw (V, D): positions accumulate into their row in increasing order (as the GPU does). Large
/// gradients go through the inverse index, rows of dw in parallel, in the same order.
pub fn embedding_bwd_cpu<T: Real>(g: &[T], ids: &[u32], v: usize, d: usize) -> Vec<T> {
    if d > 0 && par::worth(ids.len() * d) {
        let csr = inverse_index(ids, v);
        let (offs, pos) = csr.split_at(v + 1);
        return par::rows(v, d + d * ids.len() / v.max(1), d, |r, o| {
            for &i in &pos[offs[r] as usize..offs[r + 1] as usize] {
                for (o, &gv) in o.iter_mut().zip(&g[i as usize * d..(i as usize + 1) * d]) {
                    *o += gv;
                }
            }
        });
    }
    let mut dw = crate::cpu::pool::zeros(v * d);
    for (i, &id) in ids.iter().enumerate() {
        for (o, &gv) in dw[id as usize * d..(id as usize + 1) * d].iter_mut().zip(&g[i * d..(i + 1) * d]) {
            *o += gv;
        }
    }
    dw
}

/// Inverse index of `ids` over `v` rows, as one array: offsets (v + 1), then the positions reading
/// row 0, row 1, ... each list in increasing position.
pub fn inverse_index(ids: &[u32], v: usize) -> Vec<u32> {
    let mut offs = vec![0u32; v + 1];
    for &id in ids {
        offs[id as usize + 1] += 1;
    }
    for r in 0..v {
        offs[r + 1] += offs[r];
    }
    let mut out = offs.clone();
    out.resize(v + 1 + ids.len(), 0);
    let mut next = offs;
    for (i, &id) in ids.iter().enumerate() {
        out[v + 1 + next[id as usize] as usize] = i as u32;
        next[id as usize] += 1;
    }
    out
}

pub fn gather_last_cpu<T: Real>(x: &[T], lens: &[u32], l: usize, c: usize) -> Vec<T> {
    par::rows(lens.len(), c, c, |b, o| {
        let r = b * l + lens[b] as usize - 1;
        o.copy_from_slice(&x[r * c..(r + 1) * c]);
    })
}

pub fn gather_last_bwd_cpu<T: Real>(g: &[T], lens: &[u32], l: usize, c: usize) -> Vec<T> {
    par::rows(lens.len(), l * c, l * c, |b, o| {
        let r = lens[b] as usize - 1;
        o[r * c..(r + 1) * c].copy_from_slice(&g[b * c..(b + 1) * c]);
    })
}

// ---- ops ------------------------------------------------------------------------------------

/// Embedding lookup: w (V, D), ids (prod(ids_shape)) each < V -> ids_shape + [D].
pub fn embedding(w: &Tensor, ids: &Indices, ids_shape: &[usize]) -> Result<Tensor> {
    if w.rank() != 2 {
        return shape_err("embedding", format!("table must be (V, D), got {:?}", w.shape()));
    }
    if numel(ids_shape) != ids.len() {
        return shape_err("embedding", format!("{} ids for ids shape {ids_shape:?}", ids.len()));
    }
    let (v, d) = (w.shape()[0], w.shape()[1]);
    ids.check_below(v, "embedding", "id")?;
    let n = ids.len();
    let st = on_device!(w.device(), T => T::wrap(embedding_cpu::<T>(&w.host::<T>()?, ids.host(), d)),
        launch(&EMB_FWD, &*w.gbuf()?, ids.gpu()?, n * d, d, 0)?);
    let mut shape = ids_shape.to_vec();
    shape.push(d);
    let ids = ids.clone();
    Ok(Tensor::from_op("embedding", st, shape, &[w], move |g| {
        let st = on_device!(g.device(), T => T::wrap(embedding_bwd_cpu::<T>(&g.host::<T>()?, ids.host(), v, d)), {
            let csr = Indices::new(inverse_index(ids.host(), v));
            launch(&EMB_BWD, &*g.gbuf()?, csr.gpu()?, v * d, d, v)?
        });
        Ok(vec![Some(Tensor::from_storage(st, vec![v, d]))])
    }))
}

/// The last valid position of each sequence: x (B, L, C), lens (B) each in 1..=L -> (B, C).
pub fn gather_last(x: &Tensor, lens: &Indices) -> Result<Tensor> {
    if x.rank() != 3 {
        return shape_err("gather_last", format!("x must be (B, L, C), got {:?}", x.shape()));
    }
    let (b, l, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    if lens.len() != b {
        return shape_err("gather_last", format!("{} lengths for x {:?}", lens.len(), x.shape()));
    }
    if let Some((pos, &len)) = lens.host().iter().enumerate().find(|(_, &len)| len == 0 || len as usize > l) {
        return Err(Error::Index {
            op: "gather_last",
            msg: format!("length {len} at position {pos} must be in 1..={l} (x {:?})", x.shape()),
        });
    }
    let st = on_device!(x.device(), T => T::wrap(gather_last_cpu::<T>(&x.host::<T>()?, lens.host(), l, c)),
        launch(&LAST_FWD, &*x.gbuf()?, lens.gpu()?, b * c, c, l)?);
    let lens = lens.clone();
    Ok(Tensor::from_op("gather_last", st, vec![b, c], &[x], move |g| {
        let st = on_device!(g.device(), T => T::wrap(gather_last_bwd_cpu::<T>(&g.host::<T>()?, lens.host(), l, c)),
            launch(&LAST_BWD, &*g.gbuf()?, lens.gpu()?, b * l * c, c, l)?);
        Ok(vec![Some(Tensor::from_storage(st, vec![b, l, c]))])
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;

    #[test]
    fn inverse_index_lists_positions_in_order() {
        // rows: 0 <- [4], 1 <- [0, 2, 3], 2 <- [], 3 <- [1]
        assert_eq!(inverse_index(&[1, 3, 1, 1, 0], 4), vec![0, 1, 4, 4, 5, 4, 0, 2, 3, 1]);
    }

    #[test]
    fn rejects_bad_ids_and_lengths() {
        let w = Tensor::zeros(&[5, 2], Device::Cpu).unwrap();
        let err = embedding(&w, &Indices::new(vec![0, 7, 1]), &[3]).unwrap_err().to_string();
        assert!(err.contains("id 7 at position 1") && err.contains("< 5"), "{err}");
        assert!(matches!(embedding(&w, &Indices::new(vec![0, 1]), &[3]), Err(Error::Shape { .. })));
        let x = Tensor::zeros(&[2, 3, 4], Device::Cpu).unwrap();
        assert!(matches!(gather_last(&x, &Indices::new(vec![0, 3])), Err(Error::Index { .. })));
        assert!(matches!(gather_last(&x, &Indices::new(vec![1, 4])), Err(Error::Index { .. })));
        assert_eq!(gather_last(&x, &Indices::new(vec![1, 3])).unwrap().shape(), &[2, 4]);
    }
}
