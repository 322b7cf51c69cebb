//! One batch, two programs. The training steps of `bench`, on one batch of a real dataset's
//! training prefixes with random item features of the paper's size, with everything a second
//! program needs to run the identical step: the batch, the features and the models' initial
//! weights (`tensors`, which `msm4sr bench --steps-from DATA --export FILE` writes and
//! `tools/torch_step.py --from FILE` loads), and the loss of each stage at those weights with
//! dropout and mixup off (`check_loss`), which the two programs must agree on.
//!
//! The batch: the dataset's training samples (RecBole's prefixes, at most the 50 most recent items;
//! `Dataset::split`) shuffled with the seed, the first `batch` of them. Features: for each item
//! `rows` text and `rows` image rows of `dim` values uniform in [-0.5, 0.5) (the same for every
//! stage). Models at the bench's settings: hidden 64, 2 layers, 2 heads, inner 256, 8 experts,
//! MSM4SR without projection heads (the authors' command), dropout 0.2 everywhere (also in the peer),
//! mixup ratio 0.25 in pre-training.

use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{ModelConfig, ModelKind};
use crate::data::{make_batch, Batch, Dataset, LoadOptions, Modality};
use crate::engine::optim::{Adam, AdamConfig};
use crate::engine::{backward, Device, Tensor};
use crate::model::msm4sr::Model;
use crate::model::nn::Seeds;
use crate::Result;

/// The stages, in order: (name, model kind, pre-training).
pub const STAGES: [(&str, ModelKind, bool); 3] =
    [("sasrec", ModelKind::Sasrec, false), ("pretrain", ModelKind::Msm4sr, true), ("finetune", ModelKind::Msm4sr, false)];

/// The mixup ratio of the timed pre-training steps.
const P_MIX: f64 = 0.25;

/// A batch of a real dataset with paper-size random features.
pub struct SameBatch {
    pub batch: Batch,
    pub n_items: usize,
    pub text: Modality,
    pub image: Modality,
    /// Real (unpadded) positions of the batch.
    pub tokens: usize,
}

impl SameBatch {
    /// The first `batch` of `data`'s training samples shuffled with `seed`, features drawn from it.
    pub fn load(data: &Path, batch: usize, seed: u64, rows: usize, dim: usize) -> Result<SameBatch> {
        let ds = Dataset::load(data, &LoadOptions::default())?;
        let mut train = ds.split(50).train;
        if train.len() < batch {
            return Err(crate::Error::Invalid(format!(
                "{} has {} training samples, fewer than a batch of {batch}",
                data.display(),
                train.len()
            )));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        train.shuffle(&mut rng);
        let batch = make_batch(&train[..batch].iter().collect::<Vec<_>>());
        let n_items = ds.num_items();
        let mut modality = || Modality {
            rows,
            dim,
            data: (0..(n_items + 1) * rows * dim).map(|_| rng.random::<f32>() - 0.5).collect(),
            lens: std::iter::once(0).chain((0..n_items).map(|_| rows as u32)).collect(),
        };
        let (text, image) = (modality(), modality());
        let tokens = batch.lens.iter().map(|&n| n as usize).sum();
        Ok(SameBatch { batch, n_items, text, image, tokens })
    }

    fn model(&self, kind: ModelKind, dropout: f32, seed: u64, dev: Device) -> Result<Model> {
        let cfg =
            ModelConfig { model: kind, proj_heads: false, dropout, attn_dropout: dropout, moe_dropout: dropout, ..ModelConfig::default() };
        Model::new(cfg, self.n_items, Some(&self.text), Some(&self.image), &mut ChaCha8Rng::seed_from_u64(seed), dev)
    }

    /// The loss of one stage's step on this batch (pre-training with mixup ratio `p_mix`).
    fn loss(&self, model: &Model, pretrain: bool, p_mix: f64, rng: &mut ChaCha8Rng, seeds: &mut Seeds) -> Result<Tensor> {
        if pretrain {
            model.pretrain_loss(&self.batch, p_mix, rng, seeds)
        } else {
            model.finetune_loss(&self.batch, seeds)
        }
    }

    /// What the peer loads: the batch (`batch.ids` (B, l), `batch.lens`, `batch.targets`, as
    /// floats), the features (`features.text`, `features.image`, (I + 1, rows, dim)) and the
    /// initial weights of each model kind under `sasrec.` and `msm4sr.` and their checkpoint names.
    pub fn tensors(&self, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let b = &self.batch;
        let float = |v: &[u32], shape: &[usize]| Tensor::from_vec(v.iter().map(|&x| x as f32).collect(), shape, Device::Cpu);
        let mut out = vec![
            ("batch.ids".to_string(), float(&b.ids, &[b.b, b.l])?),
            ("batch.lens".to_string(), float(&b.lens, &[b.b])?),
            ("batch.targets".to_string(), float(&b.targets, &[b.b])?),
        ];
        for (name, m) in [("text", &self.text), ("image", &self.image)] {
            out.push((format!("features.{name}"), Tensor::from_vec(m.data.clone(), &[m.len(), m.rows, m.dim], Device::Cpu)?));
        }
        for (prefix, kind) in [("sasrec", ModelKind::Sasrec), ("msm4sr", ModelKind::Msm4sr)] {
            let model = self.model(kind, 0.0, seed, Device::Cpu)?;
            out.extend(model.params().into_iter().map(|(n, t)| (format!("{prefix}.{n}"), t)));
        }
        Ok(out)
    }
}

/// One stage on one batch: the loss at the initial weights without dropout or mixup, and the
/// milliseconds per step (forward, backward, Adam, loss read back) of each repetition.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageResult {
    pub stage: String,
    pub device: String,
    pub batch: usize,
    pub tokens: usize,
    pub items: usize,
    pub check_loss: f64,
    /// Mean ms per step of each repetition.
    pub ms: Vec<f64>,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Microseconds per real position (the median step).
    pub us_per_token: f64,
}

/// Run every stage: `reps` repetitions of `steps` timed steps each, after two warm-up steps.
pub fn run(sb: &SameBatch, dev: Device, seed: u64, reps: usize, steps: usize) -> Result<Vec<StageResult>> {
    let mut out = Vec::new();
    for (stage, kind, pretrain) in STAGES {
        let check = sb.model(kind, 0.0, seed, dev)?;
        let check_loss = sb.loss(&check, pretrain, 0.0, &mut ChaCha8Rng::seed_from_u64(seed), &mut Seeds::new(seed))?.to_vec_f64()?[0];
        drop(check);
        let model = sb.model(kind, 0.2, seed, dev)?;
        let params = if pretrain { model.pretrain_params() } else { model.finetune_params() };
        let mut opt = Adam::new(params.into_iter().map(|(_, t)| t).collect(), AdamConfig::default())?;
        let (mut rng, mut seeds) = (ChaCha8Rng::seed_from_u64(seed), Seeds::new(seed));
        let mut step = || -> Result<()> {
            let loss = sb.loss(&model, pretrain, P_MIX, &mut rng, &mut seeds)?;
            opt.step(&backward(&loss)?)?;
            loss.item()?;
            Ok(())
        };
        for _ in 0..2 {
            step()?;
        }
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            for _ in 0..steps.max(1) {
                step()?;
            }
            ms.push(t0.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64);
        }
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let median_ms = sorted[sorted.len() / 2];
        out.push(StageResult {
            stage: stage.into(),
            device: super::bench::device_name(dev),
            batch: sb.batch.b,
            tokens: sb.tokens,
            items: sb.n_items,
            check_loss,
            min_ms: sorted[0],
            max_ms: *sorted.last().unwrap(),
            us_per_token: median_ms * 1e3 / sb.tokens as f64,
            median_ms,
            ms,
        });
    }
    Ok(out)
}
