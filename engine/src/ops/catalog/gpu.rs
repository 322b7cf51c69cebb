//! The GPU forms of the catalog ops (see the module docs): per block, the item rows are copied
//! out, `matmul` gives the block of scores, and one kernel per row updates the running statistics,
//! writes dz or counts.

use super::blocks;
use crate::error::Result;
use crate::gpu::{gpu, groups_1d, kernel_params, row_groups, Access::*, GpuBuf, Kernel};
use crate::ops::concat::{copy_gpu, owned_gpu};
use crate::ops::elementwise::add;
use crate::ops::{matmul, wgsl};
use crate::tensor::{Indices, Storage, Tensor};

const SRC: &str = wgsl!("catalog.wgsl");
static FWD: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_fwd", &[Read, Read, ReadWrite]);
static FIN: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_finish", &[Read, ReadWrite, ReadWrite]);
static BWD: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_bwd", &[Read, Read, Read, ReadWrite]);
static RANK_T: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_rank_target", &[Read, Read, ReadWrite]);
static RANK_C: Kernel<CatalogParams> = Kernel::new("catalog", SRC, "catalog_rank_count", &[Read, Read, Read, Read, ReadWrite]);

/// This family's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![FWD.contract(), FIN.contract(), BWD.contract(), RANK_T.contract(), RANK_C.contract()]
}

kernel_params! {
    /// `struct P` of catalog.wgsl (every kernel).
    struct CatalogParams {
        /// B
        rows: u32,
        /// Items in this block.
        width: u32,
        /// First item of the block.
        start: u32,
        /// 1 for the first block (the running statistics start empty).
        first: u32,
        scale: f32,
    }
}

/// Rows j0 .. j0 + w of e (I, d), copied out.
fn item_block_gpu(e: &Tensor, j0: usize, w: usize) -> Result<Tensor> {
    let d = e.shape()[1];
    let buf = gpu()?.alloc(4 * (w * d) as u64)?;
    copy_gpu(&*e.gbuf()?, j0 * d, &buf, 0, w * d)?;
    Ok(Tensor::from_storage(Storage::Gpu(buf), vec![w, d]))
}

/// sum_k h_k blk_k^T (B, w) on the GPU for the item blocks `blks` (the row kernels apply the scale).
fn block_scores_gpu(hs: &[Tensor], blks: &[Tensor]) -> Result<Tensor> {
    let mut z: Option<Tensor> = None;
    for (h, blk) in hs.iter().zip(blks) {
        let s = matmul(h, blk, false, true)?;
        z = Some(match z {
            None => s,
            Some(z) => add(&z, &s)?,
        });
    }
    Ok(z.expect("at least one term"))
}

/// Rows j0 .. j0 + w of every term's item table.
fn item_blocks_gpu(es: &[Tensor], j0: usize, w: usize) -> Result<Vec<Tensor>> {
    es.iter().map(|e| item_block_gpu(e, j0, w)).collect()
}

pub(super) fn catalog_ce_gpu(hs: &[Tensor], es: &[Tensor], targets: &Indices, n_items: usize, scale: f32) -> Result<(GpuBuf, GpuBuf)> {
    let b = targets.len();
    let g = gpu()?;
    // Running (max, sum, target logit) per row, then (loss, lse) per row.
    let stat = g.alloc(4 * (3 * b) as u64)?;
    for (j0, w) in blocks(n_items) {
        let z = block_scores_gpu(hs, &item_blocks_gpu(es, j0, w)?)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: (j0 == 0) as u32, scale };
        g.dispatch(&FWD, &[&*z.gbuf()?, targets.gpu()?, &stat], &prm, row_groups(b))?;
    }
    let (loss, lse) = (g.alloc(4 * b as u64)?, g.alloc(4 * b as u64)?);
    let prm = CatalogParams { rows: b as u32, width: 0, start: 0, first: 0, scale };
    g.dispatch(&FIN, &[&stat, &loss, &lse], &prm, groups_1d(b))?;
    Ok((loss, lse))
}

/// Backward on the GPU from lse (B) and the rows' gradient g (B): [dh_0, de_0, ..].
pub(super) fn catalog_ce_bwd_gpu(
    hs: &[Tensor],
    es: &[Tensor],
    targets: &Indices,
    n_items: usize,
    scale: f32,
    (lse, g): (&GpuBuf, &GpuBuf),
) -> Result<Vec<GpuBuf>> {
    let b = targets.len();
    let gp = gpu()?;
    // The row kernel reads lse (B) then g (B) from one buffer.
    let lg = gp.alloc(4 * (2 * b) as u64)?;
    copy_gpu(lse, 0, &lg, 0, b)?;
    copy_gpu(g, 0, &lg, b, b)?;
    let lg = &lg;
    let mut dh: Vec<Option<Tensor>> = vec![None; hs.len()];
    let de: Vec<GpuBuf> = es.iter().map(|e| gp.alloc(4 * e.numel() as u64)).collect::<Result<_>>()?;
    for (j0, w) in blocks(n_items) {
        let blks = item_blocks_gpu(es, j0, w)?;
        let z = block_scores_gpu(hs, &blks)?;
        let dz = gp.alloc(4 * (b * w) as u64)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: 0, scale };
        gp.dispatch(&BWD, &[&*z.gbuf()?, targets.gpu()?, lg, &dz], &prm, row_groups(b))?;
        let dz = Tensor::from_storage(Storage::Gpu(dz), vec![b, w]);
        for (k, (h, blk)) in hs.iter().zip(&blks).enumerate() {
            let d = blk.shape()[1];
            let part = matmul(&dz, blk, false, false)?; // (B, d)
            dh[k] = Some(match dh[k].take() {
                None => part,
                Some(acc) => add(&acc, &part)?,
            });
            let deb = matmul(&dz, h, true, false)?; // (w, d)
            copy_gpu(&*deb.gbuf()?, 0, &de[k], j0 * d, w * d)?;
        }
    }
    let mut out = Vec::with_capacity(2 * hs.len());
    for (dh, de) in dh.into_iter().zip(de) {
        out.extend([owned_gpu(&dh.expect("at least one block"))?, de]);
    }
    Ok(out)
}

pub(super) fn catalog_rank_gpu(
    hs: &[Tensor],
    es: &[Tensor],
    targets: &Indices,
    n_items: usize,
    scale: f32,
    mask: &Indices,
) -> Result<Vec<u32>> {
    let b = targets.len();
    let g = gpu()?;
    let (st, counts) = (g.alloc(4 * b as u64)?, g.alloc(4 * b as u64)?);
    let t = targets.host();
    for (j0, w) in blocks(n_items) {
        if !t.iter().any(|&t| (j0..j0 + w).contains(&(t as usize))) {
            continue;
        }
        let z = block_scores_gpu(hs, &item_blocks_gpu(es, j0, w)?)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: 0, scale };
        g.dispatch(&RANK_T, &[&*z.gbuf()?, targets.gpu()?, &st], &prm, groups_1d(b))?;
    }
    for (j0, w) in blocks(n_items) {
        let z = block_scores_gpu(hs, &item_blocks_gpu(es, j0, w)?)?;
        let prm = CatalogParams { rows: b as u32, width: w as u32, start: j0 as u32, first: (j0 == 0) as u32, scale };
        g.dispatch(&RANK_C, &[&*z.gbuf()?, targets.gpu()?, &st, mask.gpu()?, &counts], &prm, row_groups(b))?;
    }
    Ok(bytemuck::pod_collect_to_vec(&g.read(&counts, 4 * b as u64)?))
}
