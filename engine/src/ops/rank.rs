//! Full-ranking evaluation on the device: `rank_of_targets(scores, targets)`:
//! scores (B, N), targets (B) each < N -> ranks (B), rank = #{ j != t : !(s_j < s_t) } (ties counted
//! against the target; a NaN score ranks last). Only B integers come back to the host. No gradient.

use super::wgsl;
use crate::cpu::Real;
use crate::error::{Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, Kernel};
use crate::tensor::{Indices, Tensor};

static RANK: Kernel<RankParams> = Kernel::new("rank", wgsl!("rank.wgsl"), "rank", &[Read, Read, ReadWrite]);

/// This module's kernels, for the layout tests.
#[cfg(test)]
pub(crate) fn kernels() -> Vec<crate::gpu::Contract> {
    vec![RANK.contract()]
}

kernel_params! {
    /// `struct P` of rank.wgsl.
    struct RankParams {
        rows: u32,
        n: u32,
    }
}

/// CPU reference: one row.
pub fn rank_row_cpu<T: Real>(scores: &[T], t: usize) -> u32 {
    let st = scores[t];
    scores.iter().enumerate().filter(|&(j, &s)| j != t && !(s < st)).count() as u32
}

pub fn rank_of_targets(scores: &Tensor, targets: &Indices) -> Result<Vec<u32>> {
    if scores.rank() != 2 || scores.shape()[0] != targets.len() {
        return Err(Error::Shape {
            op: "rank",
            msg: format!("scores {:?} with {} targets (want (B, N) and B targets)", scores.shape(), targets.len()),
        });
    }
    let (b, n) = (scores.shape()[0], scores.shape()[1]);
    targets.check_below(n, "rank", "target")?;
    on_device!(scores.device(), T => {
        let (host, t) = (scores.host::<T>()?, targets.host());
        let s: &[T] = &host;
        Ok(crate::cpu::par::rows(b, n, 1, |r, o: &mut [u32]| o[0] = rank_row_cpu::<T>(&s[r * n..(r + 1) * n], t[r] as usize)))
    }, {
        let g = gpu()?;
        let out = g.alloc(4 * b as u64)?;
        g.dispatch(&RANK, &[&*scores.gbuf()?, targets.gpu()?, &out], &RankParams { rows: b as u32, n: n as u32 }, row_groups(b))?;
        Ok(bytemuck::pod_collect_to_vec(&g.read(&out, 4 * b as u64)?))
    })
}
