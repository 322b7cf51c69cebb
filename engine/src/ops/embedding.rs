//! Row gathers by integer index. Indices are validated on the host before any dispatch.
//!
//! - `embedding(w, ids, ids_shape)`: w (V, D), ids (prod(ids_shape)) each < V -> ids_shape + [D],
//!   out[i] = w[ids[i]]. `w` may be a parameter or a computed tensor (item-encoder outputs).
//!   Backward: dw[v] = sum of g[i] over the positions i with ids[i] = v, summed in increasing i
//!   (rows never read get 0). Deterministic without atomics: the host builds the inverse index
//!   (CSR: for each row of w, the positions that read it) and one invocation per (v, d) sums them.

use super::wgsl;
use crate::cpu::{par, Real};
use crate::error::{shape_err, Result};
use crate::gpu::{gpu, groups_1d, kernel_params, Access::*, GpuBuf, Kernel};
use crate::op::{apply, run, Backward, Op};
use crate::tensor::{numel, Indices, Tensor};

const SRC: &str = wgsl!("embedding.wgsl");
static EMB_FWD: Kernel<EmbeddingParams> = Kernel::new("embedding", SRC, "embedding_fwd", &[Read, Read, ReadWrite]);
static EMB_BWD: Kernel<EmbeddingParams> = Kernel::new("embedding", SRC, "embedding_bwd", &[Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![EMB_FWD.contract(), EMB_BWD.contract()]
}

kernel_params! {
    /// `struct P` of embedding.wgsl (every kernel).
    struct EmbeddingParams {
        /// Elements of out.
        total: u32,
        /// Row width D.
        d: u32,
        /// V for embedding_bwd.
        m: u32,
    }
}

/// Run one gather kernel producing `total` outputs; params (total, d, m) as in the shader.
fn launch(k: &Kernel<EmbeddingParams>, src: &GpuBuf, idx: &GpuBuf, total: usize, d: usize, m: usize) -> Result<GpuBuf> {
    let g = gpu()?;
    let out = g.alloc(4 * total as u64)?;
    g.dispatch(k, &[src, idx, &out], &EmbeddingParams { total: total as u32, d: d as u32, m: m as u32 }, groups_1d(total))?;
    Ok(out)
}

// ---- CPU references -------------------------------------------------------------------------

pub fn embedding_cpu<T: Real>(w: &[T], ids: &[u32], d: usize) -> Vec<T> {
    par::rows(par::Stale, ids.len(), d, d, |i, o| {
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
        return par::rows(par::Zeroed, v, d + d * ids.len() / v.max(1), d, |r, o| {
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

// ---- ops ------------------------------------------------------------------------------------

/// Rows `ids` of w (V, D), or (`backward`) the gradient of w from the rows' gradient.
#[derive(Clone)]
struct Embedding {
    ids: Indices,
    v: usize,
    d: usize,
    /// ids' shape.
    shape: Vec<usize>,
    backward: bool,
}

impl Op for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn shapes(&self) -> Vec<Vec<usize>> {
        if self.backward {
            return vec![vec![self.v, self.d]];
        }
        let mut shape = self.shape.clone();
        shape.push(self.d);
        vec![shape]
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<Vec<T>>> {
        Ok(vec![match self.backward {
            false => embedding_cpu(x[0], self.ids.host(), self.d),
            true => embedding_bwd_cpu(x[0], self.ids.host(), self.v, self.d),
        }])
    }
    fn gpu(&self, x: &[&GpuBuf]) -> Result<Vec<GpuBuf>> {
        let (v, d, n) = (self.v, self.d, self.ids.len());
        Ok(vec![match self.backward {
            false => launch(&EMB_FWD, x[0], self.ids.gpu()?, n * d, d, 0)?,
            true => {
                let csr = Indices::new(inverse_index(self.ids.host(), v));
                launch(&EMB_BWD, x[0], csr.gpu()?, v * d, d, v)?
            }
        }])
    }
}

impl Backward for Embedding {
    type Saved = Embedding;
    fn save(self, _: &[&Tensor], _: Vec<Tensor>, _: &[bool]) -> Embedding {
        Embedding { backward: true, ..self }
    }
    /// dw[v] = sum of g[i] over ids[i] = v
    fn backward(op: &Embedding, g: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(run(op, &[g])?.remove(0))])
    }
}

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
    apply(Embedding { ids: ids.clone(), v, d, shape: ids_shape.to_vec(), backward: false }, &[w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::error::Error;

    #[test]
    fn inverse_index_lists_positions_in_order() {
        // rows: 0 <- [4], 1 <- [0, 2, 3], 2 <- [], 3 <- [1]
        assert_eq!(inverse_index(&[1, 3, 1, 1, 0], 4), vec![0, 1, 4, 4, 5, 4, 0, 2, 3, 1]);
    }

    #[test]
    fn rejects_bad_ids() {
        let w = Tensor::zeros(&[5, 2], Device::Cpu).unwrap();
        let err = embedding(&w, &Indices::new(vec![0, 7, 1]), &[3]).unwrap_err().to_string();
        assert!(err.contains("id 7 at position 1") && err.contains("< 5"), "{err}");
        assert!(matches!(embedding(&w, &Indices::new(vec![0, 1]), &[3]), Err(Error::Shape { .. })));
    }
}
