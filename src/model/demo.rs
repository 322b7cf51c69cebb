//! A tiny content-based next-item model on synthetic data: the smallest complete use of the engine
//! (item encoder -> transformer -> full-softmax cross-entropy -> Adam). It backs the quick-start
//! example, the memory-pool test and the CPU/GPU agreement test.
//!
//! Data: `items` items, each with a random feature matrix (S rows of d floats; the first rows carry a
//! one-hot of the item's topic); sequences walk topics t -> t+1 (mod topics), so the next item's
//! topic is predictable from content.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::ops::{cross_entropy, embedding, matmul};
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{backward, Device, Indices, Ragged, Tensor};
use crate::model::nn::{ItemEncoder, Seeds, Transformer};
use crate::Result;

pub struct TinyConfig {
    pub items: usize,
    pub topics: usize,
    pub sentences: usize,
    pub d: usize,
    pub hidden: usize,
    pub batch: usize,
    pub seq_len: usize,
    /// Shortest sequence drawn (lengths are uniform in min_len..=seq_len).
    pub min_len: usize,
    pub dropout: f32,
    pub seed: u64,
}

impl Default for TinyConfig {
    fn default() -> Self {
        TinyConfig { items: 60, topics: 6, sentences: 3, d: 16, hidden: 16, batch: 32, seq_len: 6, min_len: 1, dropout: 0.1, seed: 7 }
    }
}

pub struct Tiny {
    pub cfg: TinyConfig,
    pub features: Tensor,
    pub feat_lens: Indices,
    pub topic: Vec<usize>,
    pub encoder: ItemEncoder,
    pub transformer: Transformer,
    pub opt: Adam,
    rng: ChaCha8Rng,
    seeds: Seeds,
}

impl Tiny {
    pub fn new(cfg: TinyConfig, dev: Device) -> Result<Tiny> {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let topic: Vec<usize> = (0..cfg.items).map(|i| i % cfg.topics).collect();
        let mut feats = vec![0f32; cfg.items * cfg.sentences * cfg.d];
        for i in 0..cfg.items {
            for s in 0..cfg.sentences {
                for j in 0..cfg.d {
                    let signal = if j == topic[i] { 1.5 } else { 0.0 };
                    feats[(i * cfg.sentences + s) * cfg.d + j] = signal + 0.3 * (rng.random::<f32>() - 0.5);
                }
            }
        }
        let features = Tensor::from_vec(feats, &[cfg.items, cfg.sentences, cfg.d], dev)?;
        let feat_lens = Indices::new((0..cfg.items).map(|i| 1 + (i % cfg.sentences) as u32).collect());
        let encoder = ItemEncoder::new(cfg.d, cfg.hidden, 4, cfg.dropout, &mut rng, dev)?;
        let transformer = Transformer::new(cfg.seq_len, cfg.hidden, 2 * cfg.hidden, 1, 2, cfg.dropout, cfg.dropout, &mut rng, dev)?;
        let params: Vec<Tensor> = encoder.params().into_iter().chain(transformer.params()).map(|(_, t)| t).collect();
        let opt = Adam::new(params, AdamConfig { lr: 3e-3, ..AdamConfig::default() })?;
        let seeds = Seeds::new(cfg.seed);
        Ok(Tiny { cfg, features, feat_lens, topic, encoder, transformer, opt, rng, seeds })
    }

    /// A batch of sequences following topic transitions: (ids (B, L) flattened, lens, targets).
    pub fn batch(&mut self) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let c = &self.cfg;
        let per_topic = c.items / c.topics;
        let (mut ids, mut lens, mut targets) = (vec![0u32; c.batch * c.seq_len], Vec::new(), Vec::new());
        for b in 0..c.batch {
            let len = self.rng.random_range(c.min_len.clamp(1, c.seq_len)..=c.seq_len);
            let mut t = self.rng.random_range(0..c.topics);
            for p in 0..len {
                ids[b * c.seq_len + p] = (self.rng.random_range(0..per_topic) * c.topics + t) as u32;
                t = (t + 1) % c.topics;
            }
            lens.push(len as u32);
            targets.push((self.rng.random_range(0..per_topic) * c.topics + t) as u32);
        }
        (ids, lens, targets)
    }

    /// One training step; returns the loss.
    pub fn step(&mut self) -> Result<f32> {
        let (ids, lens, targets) = self.batch();
        let l = self.cfg.seq_len;
        let z = self.encoder.forward(&self.features, None, &self.feat_lens, true, &mut self.seeds)?; // (I, h)
        let r = Ragged::new(&lens, l)?; // the B sequences packed into N rows
        let seq = embedding(&z, &Indices::new(r.pack(&ids, l)), &[r.rows()])?; // (N, h)
        let h = self.transformer.forward(&seq, &r, true, &mut self.seeds)?; // (B, h)
        let logits = matmul(&h, &z, false, true)?; // (B, I)
        let loss = cross_entropy(&logits, &Indices::new(targets))?;
        let grads = backward(&loss)?;
        self.opt.step(&grads)?;
        loss.item()
    }
}
