//! Full-ranking evaluation on the device: `rank_of_targets(scores, targets)`:
//! scores (B, N), targets (B) each < N -> ranks (B), rank = #{ j != t : !(s_j < s_t) } (ties counted
//! against the target; a NaN score ranks last). Only B integers come back to the host. No gradient.

use super::wgsl;
use crate::cpu::Real;
use crate::error::{Error, Result};
use crate::gpu::{gpu, kernel_params, row_groups, Access::*, Kernel};
use crate::op::{query, Query};
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
    query(&Rank { targets, b, n }, &[scores])
}

/// Ranks of the targets in rows of scores (B, N).
struct Rank<'a> {
    targets: &'a Indices,
    b: usize,
    n: usize,
}

impl Query for Rank<'_> {
    type Out = Vec<u32>;
    fn name(&self) -> &'static str {
        "rank"
    }
    fn cpu<T: Real>(&self, x: &[&[T]]) -> Result<Vec<u32>> {
        let (s, t, n) = (x[0], self.targets.host(), self.n);
        Ok(crate::cpu::par::rows(crate::cpu::par::Zeroed, self.b, n, 1, |r, o: &mut [u32]| {
            o[0] = rank_row_cpu::<T>(&s[r * n..(r + 1) * n], t[r] as usize)
        }))
    }
    fn gpu(&self, x: &[&Tensor]) -> Result<Vec<u32>> {
        let (g, b) = (gpu()?, self.b);
        let out = g.alloc(4 * b as u64)?;
        let prm = RankParams { rows: b as u32, n: self.n as u32 };
        g.dispatch(&RANK, &[&*x[0].gbuf()?, self.targets.gpu()?, &out], &prm, row_groups(b))?;
        Ok(bytemuck::pod_collect_to_vec(&g.read(&out, 4 * b as u64)?))
    }
}
