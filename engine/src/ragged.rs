//! Ragged (packed) sequence batches: B sequences of lengths n_b stored row after row as one
//! (N, C) tensor, N = sum n_b, sequence b owning rows offsets[b] .. offsets[b + 1]. Row-wise ops
//! (linear, layernorm, GELU, residual adds) run on the packed rows unchanged; attention and dropout
//! take the layout to stay within each sequence and to draw the same random masks as the padded
//! (B, L, C) layout would.
//!
//! Random keys: the row at position i of sequence b has the key `b * key_len + i`, its flat index in
//! a padded (B, key_len, C) layout divided by C. Dropout of a hidden channel c keys on
//! `key * C + c` and attention dropout of (b, head, i, j) on `((b * heads + head) * key_len + i) *
//! key_len + j`, exactly the flat indices of the padded layout (PyTorch's, and the tests' reference
//! in `kernels-tests/padded.rs`), so a padded batch of width `key_len` and its packed form draw the
//! same masks.

use crate::error::{Error, Result};
use crate::tensor::Indices;

/// The layout of one packed batch (host copies; the GPU copies are uploaded on first use).
#[derive(Clone, Debug)]
pub struct Ragged {
    /// n_b per sequence (B), each >= 1.
    pub lens: Vec<u32>,
    /// Row offsets (B + 1): sequence b is rows offsets[b] .. offsets[b + 1].
    pub offsets: Vec<u32>,
    /// Width of the padded layout the random keys refer to (>= every n_b).
    pub key_len: usize,
    /// Position of each row within its sequence (N): the position-embedding ids.
    pub pos: Indices,
    /// Dropout key of each row (N): b * key_len + position.
    pub keys: Indices,
    /// The last row of each sequence (B): offsets[b + 1] - 1.
    pub last: Indices,
    /// For the GPU kernels: offsets (B + 1), then the start of each sequence's block of attention
    /// probabilities in units of one head (B: sum of n_b'^2 over b' < b), then the sequence of each
    /// row (N).
    pub meta: Indices,
}

impl Ragged {
    /// Layout of sequences with `lens`, random keys relative to a padded width `key_len`.
    /// A sequence of length 0 is an error (nothing would represent it).
    pub fn new(lens: &[u32], key_len: usize) -> Result<Ragged> {
        if let Some(b) = lens.iter().position(|&n| n == 0) {
            return Err(Error::Invalid(format!("ragged batch: sequence {b} of {} is empty (every sequence needs an item)", lens.len())));
        }
        if let Some((b, &n)) = lens.iter().enumerate().find(|(_, &n)| n as usize > key_len) {
            return Err(Error::Invalid(format!("ragged batch: sequence {b} has {n} rows, more than the key width {key_len}")));
        }
        let n_rows: usize = lens.iter().map(|&n| n as usize).sum();
        if n_rows > u32::MAX as usize || lens.len() * key_len * key_len > u32::MAX as usize {
            return Err(Error::Invalid(format!("ragged batch of {} sequences x {key_len} positions is too large", lens.len())));
        }
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        let mut pblocks = Vec::with_capacity(lens.len());
        let (mut o, mut p) = (0u32, 0u32);
        let (mut pos, mut keys, mut seq) = (Vec::with_capacity(n_rows), Vec::with_capacity(n_rows), Vec::with_capacity(n_rows));
        for (b, &n) in lens.iter().enumerate() {
            offsets.push(o);
            pblocks.push(p);
            for i in 0..n {
                pos.push(i);
                keys.push((b * key_len) as u32 + i);
                seq.push(b as u32);
            }
            o += n;
            p += n * n;
        }
        offsets.push(o);
        let last = offsets[1..].iter().map(|&e| e - 1).collect();
        let mut meta = offsets.clone();
        meta.extend(pblocks);
        meta.extend(seq);
        Ok(Ragged {
            lens: lens.to_vec(),
            offsets,
            key_len,
            pos: Indices::new(pos),
            keys: Indices::new(keys),
            last: Indices::new(last),
            meta: Indices::new(meta),
        })
    }

    /// Number of sequences B.
    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// Number of packed rows N.
    pub fn rows(&self) -> usize {
        *self.offsets.last().unwrap_or(&0) as usize
    }

    /// Sum of n_b^2: the attention probabilities of one head.
    pub fn pairs(&self) -> usize {
        self.lens.iter().map(|&n| (n as usize) * (n as usize)).sum()
    }

    /// Start of sequence b's probability block (in units of one head).
    pub fn pblock(&self, b: usize) -> usize {
        self.meta.host()[self.batch() + 1 + b] as usize
    }

    /// The same layout for the sequences repeated `times` times (sequence b of copy t is sequence
    /// t * B + b), keys continuing across copies as a padded batch of t * B rows would.
    pub fn repeat(&self, times: usize) -> Result<Ragged> {
        let lens: Vec<u32> = (0..times).flat_map(|_| self.lens.iter().copied()).collect();
        Ragged::new(&lens, self.key_len)
    }

    /// Pack a padded (B, l) row-major array (left-aligned sequences) into its N real rows.
    pub fn pack<T: Copy>(&self, padded: &[T], l: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.rows());
        for (b, &n) in self.lens.iter().enumerate() {
            out.extend_from_slice(&padded[b * l..b * l + n as usize]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let r = Ragged::new(&[2, 1, 3], 4).unwrap();
        assert_eq!(r.offsets, vec![0, 2, 3, 6]);
        assert_eq!(r.pos.host(), &[0, 1, 0, 0, 1, 2]);
        assert_eq!(r.keys.host(), &[0, 1, 4, 8, 9, 10]);
        assert_eq!(r.last.host(), &[1, 2, 5]);
        assert_eq!(r.pairs(), 4 + 1 + 9);
        assert_eq!((r.pblock(0), r.pblock(1), r.pblock(2)), (0, 4, 5));
        assert_eq!(&r.meta.host()[7..], &[0, 0, 1, 2, 2, 2]);
        assert_eq!(r.pack(&[1, 2, 0, 0, 3, 0, 0, 0, 4, 5, 6, 0], 4), vec![1, 2, 3, 4, 5, 6]);
        let r2 = r.repeat(2).unwrap();
        assert_eq!(r2.keys.host()[6..], [12, 13, 16, 20, 21, 22]);
    }

    #[test]
    fn rejects_empty_and_too_long() {
        assert!(Ragged::new(&[2, 0], 4).unwrap_err().to_string().contains("sequence 1"));
        assert!(Ragged::new(&[5], 4).is_err());
    }
}
