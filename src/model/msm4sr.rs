//! MSM4SR (M²SE backbone, pre-training losses, fine-tuning scorer) and the SASRec / SASRecM
//! baselines, on the engine's ops. Shapes: B batch, L longest sequence in the batch, I real items,
//! S/V sentence/image rows per item, d feature size, d0 hidden size.
//!
//! Item encoders run once per step over the items a step needs — the distinct items of a pre-training
//! batch, or every item when fine-tuning scores all of them — and sequences gather their rows.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::{Freeze, Mod, Modalities, ModelConfig, ModelKind, Score, Stage};
use crate::data::{item_dropout, make_batch, Batch, Modality, Sample};
use crate::engine::ops::{add, catalog_ce, catalog_rank, concat, embedding, l2norm, matmul, mean, scale};
use crate::engine::{Device, Indices, Ragged, Tensor};
use crate::model::nn::{cmcl_loss, nip_loss, ItemEncoder, Linear, Seeds, Transformer};
use crate::model::{Loss, Recommender};
use crate::{Error, Result};

/// Item features of one modality on the device.
pub struct DeviceModality {
    /// (I + 1, rows * d): row 0 is the padding item.
    pub feats: Tensor,
    /// Row count per item (I + 1), on the host and (lazily) on the device.
    pub lens: Indices,
    pub rows: usize,
    pub dim: usize,
}

impl DeviceModality {
    pub fn new(m: &Modality, dev: Device) -> Result<DeviceModality> {
        let n = m.lens.len();
        Ok(DeviceModality {
            feats: Tensor::from_vec(m.data.clone(), &[n, m.rows * m.dim], dev)?,
            lens: Indices::new(m.lens.clone()),
            rows: m.rows,
            dim: m.dim,
        })
    }
    /// Features of `items` (U), in place (the encoder reads the table's rows; nothing is copied):
    /// (the table (I + 1, rows, d), the items, lens (U)).
    fn gather(&self, items: &[u32]) -> Result<(Tensor, Option<Indices>, Indices)> {
        let lens = Indices::new(items.iter().map(|&i| self.lens.host()[i as usize]).collect());
        Ok((self.table()?, Some(Indices::new(items.to_vec())), lens))
    }
    /// Features of every item, in place (no copy): ((I + 1, rows, d), none, lens (I + 1)).
    fn all(&self) -> Result<(Tensor, Option<Indices>, Indices)> {
        Ok((self.table()?, None, self.lens.clone()))
    }
    fn table(&self) -> Result<Tensor> {
        self.feats.reshape(&[self.lens.len(), self.rows, self.dim])
    }
}

/// The item side of scoring (see [`Model::score_tables`]).
pub struct ScoreTables {
    /// (table (I + 1, d0), real items as scored (I, d0)) per score term.
    tables: Vec<(Tensor, Tensor)>,
    cos: bool,
    pub scale: f32,
}

/// How a batch's sequences travel through the transformer (see `Model::layout`): real rows only,
/// with the item id of each packed row.
struct Layout {
    r: Ragged,
    ids: Indices,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub n_items: usize,
    pub transformer: Transformer,
    /// ID embeddings (I + 1, d0), row 0 = padding (kept at zero).
    pub item_emb: Option<Tensor>,
    pub enc_t: Option<ItemEncoder>,
    pub enc_v: Option<ItemEncoder>,
    pub head_t: Option<Linear>,
    pub head_v: Option<Linear>,
    pub text: Option<DeviceModality>,
    pub image: Option<DeviceModality>,
    /// Ids 1..=I, the columns of the score matrix (uploaded once).
    real_items: Indices,
}

impl Model {
    /// Build a model for `n_items` real items with the given features (either may be missing).
    pub fn new(
        cfg: ModelConfig,
        n_items: usize,
        text: Option<&Modality>,
        image: Option<&Modality>,
        rng: &mut impl Rng,
        dev: Device,
    ) -> Result<Model> {
        let h = cfg.hidden;
        let multimodal = cfg.model != ModelKind::Sasrec;
        let use_t = multimodal && cfg.modalities != Modalities::Image;
        let use_v = multimodal && cfg.modalities != Modalities::Text;
        let text = if use_t { text } else { None };
        let image = if use_v { image } else { None };
        if multimodal && text.is_none() && image.is_none() {
            return Err(Error::Invalid(format!(
                "model {:?} with modalities {:?} needs item features, but the dataset has none for them (NAME.features.safetensors)",
                cfg.model, cfg.modalities
            )));
        }
        let transformer = Transformer::new(cfg.max_len, h, cfg.inner, cfg.layers, cfg.heads, cfg.dropout, cfg.attn_dropout, rng, dev)?;
        let mut emb = Tensor::randn(&[n_items + 1, h], 0.02, rng, dev)?.to_vec()?;
        emb[..h].iter_mut().for_each(|x| *x = 0.0);
        let item_emb = Some(Tensor::from_vec(emb, &[n_items + 1, h], dev)?.param());
        let enc_t = text.map(|m| ItemEncoder::new(m.dim, h, cfg.experts, cfg.moe_dropout, rng, dev)).transpose()?;
        let enc_v = image.map(|m| ItemEncoder::new(m.dim, h, cfg.experts, cfg.moe_dropout, rng, dev)).transpose()?;
        let pre = cfg.model == ModelKind::Msm4sr && cfg.proj_heads;
        Ok(Model {
            n_items,
            transformer,
            item_emb,
            head_t: if pre && enc_t.is_some() { Some(Linear::new(h, h, true, rng, dev)?) } else { None },
            head_v: if pre && enc_v.is_some() { Some(Linear::new(h, h, true, rng, dev)?) } else { None },
            enc_t,
            enc_v,
            text: text.map(|m| DeviceModality::new(m, dev)).transpose()?,
            image: image.map(|m| DeviceModality::new(m, dev)).transpose()?,
            real_items: Indices::new((1..=n_items as u32).collect()),
            cfg,
        })
    }

    /// The number of parameters `Model::new` would make for `cfg`, `n_items` items and features
    /// of widths `text_dim` / `image_dim` (None: absent), without making them (for checking that a
    /// model fits in memory before it is built).
    pub fn param_count(cfg: &ModelConfig, n_items: usize, text_dim: Option<usize>, image_dim: Option<usize>) -> u128 {
        let (h, f, l, e) = (cfg.hidden as u128, cfg.inner as u128, cfg.layers as u128, cfg.experts as u128);
        let multimodal = cfg.model != ModelKind::Sasrec;
        let dims = [
            text_dim.filter(|_| multimodal && cfg.modalities != Modalities::Image),
            image_dim.filter(|_| multimodal && cfg.modalities != Modalities::Text),
        ];
        let layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h;
        let mut n = cfg.max_len as u128 * h + 2 * h + l * layer + (n_items as u128 + 1) * h;
        for d in dims.into_iter().flatten() {
            let d = d as u128;
            n += (d * 64 + 64) + (64 + 1) + (d * e * h + e * h) + 2 * e * h + d * e;
            if cfg.model == ModelKind::Msm4sr && cfg.proj_heads {
                n += h * h + h;
            }
        }
        n
    }

    /// Every trainable tensor by its checkpoint name.
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.transformer.params().into_iter().map(|(n, t)| (format!("transformer.{n}"), t)).collect();
        if let Some(e) = &self.item_emb {
            v.push(("item_embedding".into(), e.clone()));
        }
        for (p, e) in [("text_encoder", &self.enc_t), ("image_encoder", &self.enc_v)] {
            if let Some(e) = e {
                v.extend(e.params().into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
            }
        }
        for (p, l) in [("head_text", &self.head_t), ("head_image", &self.head_v)] {
            if let Some(l) = l {
                v.extend(l.params().into_iter().map(|(n, t)| (format!("{p}.{n}"), t)));
            }
        }
        v
    }

    /// Parameters trained in pre-training (no ID embeddings).
    pub fn pretrain_params(&self) -> Vec<(String, Tensor)> {
        self.params().into_iter().filter(|(n, _)| n != "item_embedding").collect()
    }

    /// Parameters trained in fine-tuning (the projection heads belong to pre-training only).
    /// Without ID embeddings (`ids` off), they are not trained either.
    pub fn finetune_params(&self) -> Vec<(String, Tensor)> {
        let ids = self.cfg.uses_ids();
        self.params().into_iter().filter(|(n, _)| !n.starts_with("head_") && (ids || n != "item_embedding")).collect()
    }

    fn encoders(&self) -> Vec<(Mod, &ItemEncoder, &DeviceModality)> {
        let mut v = Vec::new();
        if let (Some(e), Some(m)) = (&self.enc_t, &self.text) {
            v.push((Mod::Text, e, m));
        }
        if let (Some(e), Some(m)) = (&self.enc_v, &self.image) {
            v.push((Mod::Image, e, m));
        }
        v
    }

    /// Item representations for scoring: one tensor (I + 1, d0) per score term, tagged with the
    /// modality it comes from (None for ID-only or fused tables).
    fn item_tables(&self, train: bool, with_id: bool, seeds: &mut Seeds) -> Result<Vec<(Option<Mod>, Tensor)>> {
        let e = self.item_emb.as_ref().unwrap();
        // `with_id` is the fine-tuning mode; the ID embeddings join it unless the model has none.
        let add_id = with_id && self.cfg.uses_ids();
        match self.cfg.model {
            ModelKind::Sasrec => Ok(vec![(None, e.clone())]),
            ModelKind::Sasrecm => {
                let mut t: Option<Tensor> = add_id.then(|| e.clone());
                for (_, enc, m) in self.encoders() {
                    let (x, items, lens) = m.all()?;
                    let z = enc.forward(&x, items.as_ref(), &lens, train, seeds)?;
                    t = Some(match t {
                        Some(t) => add(&t, &z)?,
                        None => z,
                    });
                }
                Ok(vec![(None, t.unwrap())])
            }
            ModelKind::Msm4sr => {
                let mut v = Vec::new();
                for (md, enc, m) in self.encoders() {
                    // --drop-score removes a term from fine-tuning's scores only; pre-training is
                    // validated (and its epoch selected) with both modalities.
                    if with_id && self.cfg.drop_score == Some(md) {
                        continue;
                    }
                    let (x, items, lens) = m.all()?;
                    let z = enc.forward(&x, items.as_ref(), &lens, train, seeds)?;
                    v.push((Some(md), if add_id { add(&z, e)? } else { z }));
                }
                Ok(v)
            }
        }
    }

    /// The layout a batch's sequences take through the transformer, from padded ids (B' x l,
    /// row-major, left-aligned, B' = lens.len()): packed into their real rows. Built once per batch
    /// and shared by every item table.
    fn layout(&self, ids: &[u32], lens: &[u32], l: usize) -> Result<Layout> {
        let r = Ragged::new(lens, l)?;
        Ok(Layout { ids: Indices::new(r.pack(ids, l)), r })
    }

    /// Sequence representations h (B', d0): the sequences of `lay` with their item rows from
    /// `table`, through the transformer, each sequence's last position.
    fn sequences(&self, table: &Tensor, lay: &Layout, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
        let Layout { r, ids } = lay;
        self.transformer.forward(&embedding(table, ids, &[r.rows()])?, r, train, seeds)
    }

    /// The item side of scoring, once per step or per evaluation: each item table (I + 1, d0)
    /// and its real items (I, d0) as scored (L2-normalised for MSM4SR's cosine scorer), and the
    /// scale (1 / tau for the cosine scorer, else 1).
    pub fn score_tables(&self, train: bool, with_id: bool, seeds: &mut Seeds) -> Result<ScoreTables> {
        let cos = self.cfg.model == ModelKind::Msm4sr && self.cfg.score == Score::Cos;
        let mut tables = Vec::new();
        for (_, table) in self.item_tables(train, with_id, seeds)? {
            let items = embedding(&table, &self.real_items, &[self.n_items])?;
            let items = if cos { l2norm(&items, 1e-12)? } else { items };
            if !train {
                check_finite(&items, "the item representations")?;
            }
            tables.push((table, items));
        }
        if tables.is_empty() {
            return Err(Error::Invalid("no score term left (--drop-score removed the only modality)".into()));
        }
        Ok(ScoreTables { tables, cos, scale: if cos { 1.0 / self.cfg.tau } else { 1.0 } })
    }

    /// The score terms of a batch: one (h_k (B, d0), items_k (I, d0)) per item table, so that the
    /// scores over all real items are `t.scale` * sum_k h_k items_k^T (column j = item j + 1).
    fn terms_with(&self, t: &ScoreTables, batch: &Batch, train: bool, seeds: &mut Seeds) -> Result<Vec<(Tensor, Tensor)>> {
        let lay = self.layout(&batch.ids, &batch.lens, batch.l)?;
        let mut terms = Vec::new();
        for (table, items) in &t.tables {
            let h = self.sequences(table, &lay, train, seeds)?;
            let h = if t.cos { l2norm(&h, 1e-12)? } else { h };
            if !train {
                check_finite(&h, "the sequence representations")?;
            }
            terms.push((h, items.clone()));
        }
        Ok(terms)
    }

    fn score_terms(&self, batch: &Batch, train: bool, with_id: bool, seeds: &mut Seeds) -> Result<(Vec<(Tensor, Tensor)>, f32)> {
        let t = self.score_tables(train, with_id, seeds)?;
        Ok((self.terms_with(&t, batch, train, seeds)?, t.scale))
    }

    /// 0-based full-catalog ranks of a batch's targets (see `metrics`), the scores never
    /// materialised (`catalog_rank`); with `mask_history` each sample's input items are taken
    /// out of its ranking. Evaluation mode (no dropout).
    pub fn rank_targets(&self, t: &ScoreTables, batch: &Batch, mask_history: bool, seeds: &mut Seeds) -> Result<Vec<u32>> {
        let terms = self.terms_with(t, batch, false, seeds)?;
        let pairs: Vec<(&Tensor, &Tensor)> = terms.iter().map(|(h, e)| (h, e)).collect();
        let targets = Indices::new(batch.targets.iter().map(|&i| i - 1).collect());
        let mask: Option<Vec<Vec<u32>>> = mask_history.then(|| {
            (0..batch.b)
                .map(|r| batch.ids[r * batch.l..r * batch.l + batch.lens[r] as usize].iter().filter(|&&i| i > 0).map(|&i| i - 1).collect())
                .collect()
        });
        catalog_rank(&pairs, &targets, t.scale, mask.as_deref())
    }

    /// Fine-tuning / evaluation scores over all real items: (B, I), column j = item j + 1.
    /// `with_id: false` scores with the modality encoders alone (validation during pre-training).
    pub fn scores(&self, batch: &Batch, train: bool, with_id: bool, seeds: &mut Seeds) -> Result<Tensor> {
        let t = self.score_tables(train, with_id, seeds)?;
        self.scores_with(&t, batch, train, seeds)
    }

    /// [`Model::scores`] with item tables encoded once ([`Model::score_tables`]) for many batches.
    pub fn scores_with(&self, t: &ScoreTables, batch: &Batch, train: bool, seeds: &mut Seeds) -> Result<Tensor> {
        let (terms, sc) = (self.terms_with(t, batch, train, seeds)?, t.scale);
        let mut total: Option<Tensor> = None;
        for (h, items) in &terms {
            let s = matmul(h, items, false, true)?;
            let s = if sc != 1.0 { scale(&s, sc)? } else { s };
            total = Some(match total {
                Some(t) => add(&t, &s)?,
                None => s,
            });
        }
        Ok(total.expect("at least one term"))
    }

    /// Cross-entropy of the next item over all real items, without the (B, I) score matrix
    /// (`catalog_ce`: scores recomputed in blocks of items in the backward pass).
    pub fn finetune_loss(&self, batch: &Batch, seeds: &mut Seeds) -> Result<Tensor> {
        let (terms, sc) = self.score_terms(batch, true, true, seeds)?;
        let pairs: Vec<(&Tensor, &Tensor)> = terms.iter().map(|(h, e)| (h, e)).collect();
        mean(&catalog_ce(&pairs, &Indices::new(batch.targets.iter().map(|&t| t - 1).collect()), sc)?)
    }

    /// Single-modality pre-training (paper IV-D): no mixup and no cross-modal CMCL; the NIP loss of
    /// the one modality with one view (`m = head(h)`, or `h` itself without heads).
    fn pretrain_loss_single(&self, batch: &Batch, local: &Local, seeds: &mut Seeds) -> Result<Tensor> {
        let (_, enc, feats) = self.encoders()[0];
        let head = self.head_t.as_ref().or(self.head_v.as_ref());
        if !self.cfg.nip {
            return Err(Error::Invalid("single-modality pre-training has only the NIP loss; --no-nip leaves nothing".into()));
        }
        let (x, items, lens) = feats.gather(&local.uniq)?;
        let z = enc.forward(&x, items.as_ref(), &lens, true, seeds)?;
        let ids: Vec<u32> = batch.ids.iter().map(|&i| local.of(i)).collect();
        let h = self.sequences(&z, &self.layout(&ids, &batch.lens, batch.l)?, true, seeds)?;
        let h = match head {
            Some(w) => w.forward(&h)?,
            None => h,
        };
        let z_tgt = embedding(&z, &Indices::new(batch.targets.iter().map(|&t| local.of(t)).collect()), &[batch.b])?;
        crate::model::nn::nip_single(&h, &z_tgt, &Indices::new(batch.targets.clone()), self.cfg.tau)
    }

    /// Pre-training loss (eq. 11) of a batch whose sequences already went through item dropout.
    /// `p_mix` is the batch's mixup ratio; `rng` draws the swaps.
    pub fn pretrain_loss(&self, batch: &Batch, p_mix: f64, rng: &mut impl Rng, seeds: &mut Seeds) -> Result<Tensor> {
        sum_terms(self.pretrain_terms(batch, p_mix, rng, seeds)?)
    }

    /// The terms of the pre-training loss by name, each as it enters the sum (CMCL terms already
    /// weighted by lambda): `nip_text`, `nip_image`, `cmcl_text`, `cmcl_image` (with the projection
    /// heads) or one `cmcl` (without them); one `nip_text` or `nip_image` for a single modality.
    pub fn pretrain_terms(&self, batch: &Batch, p_mix: f64, rng: &mut impl Rng, seeds: &mut Seeds) -> Result<Vec<(&'static str, Tensor)>> {
        if self.encoders().is_empty() {
            return Err(Error::Invalid("pre-training needs item features (text and/or image)".into()));
        }
        let local = Local::new(batch);
        let (Some(enc_t), Some(text), Some(enc_v), Some(image)) = (&self.enc_t, &self.text, &self.enc_v, &self.image) else {
            let name = if self.enc_t.is_some() { "nip_text" } else { "nip_image" };
            return Ok(vec![(name, self.pretrain_loss_single(batch, &local, seeds)?)]);
        };
        let u = local.uniq.len() as u32;
        let (xt, it, lt) = text.gather(&local.uniq)?;
        let (xv, iv, lv) = image.gather(&local.uniq)?;
        let zt = enc_t.forward(&xt, it.as_ref(), &lt, true, seeds)?; // (U, d0)
        let zv = enc_v.forward(&xv, iv.as_ref(), &lv, true, seeds)?;
        let z_all = concat(&[&zt, &zv])?; // rows [0, U) text, [U, 2U) image
                                          // Complementary mixup: a swapped position takes the other modality's row.
        let (mut ids_t, mut ids_v) = (Vec::with_capacity(2 * batch.ids.len()), Vec::with_capacity(batch.ids.len()));
        for (pos, &i) in batch.ids.iter().enumerate() {
            let li = local.of(i);
            let valid = (pos % batch.l) < batch.lens[pos / batch.l] as usize;
            let swap = self.cfg.mixup && valid && rng.random_bool(p_mix);
            ids_t.push(if swap { u + li } else { li });
            ids_v.push(if swap { li } else { u + li });
        }
        let mut both = ids_t;
        both.extend(ids_v);
        // The 2B sequences M_t then M_v, rows of z_all.
        let mut lens2 = batch.lens.clone();
        lens2.extend(&batch.lens);
        let h = self.sequences(&z_all, &self.layout(&both, &lens2, batch.l)?, true, seeds)?; // (2B, d0)
        let b = batch.b as u32;
        let ht = embedding(&h, &Indices::new((0..b).collect()), &[batch.b])?;
        let hv = embedding(&h, &Indices::new((b..2 * b).collect()), &[batch.b])?;
        let tl: Vec<u32> = batch.targets.iter().map(|&t| local.of(t)).collect();
        let targets = Indices::new(batch.targets.clone());
        let z_tgt_t = embedding(&zt, &Indices::new(tl.clone()), &[batch.b])?;
        let z_tgt_v = embedding(&zv, &Indices::new(tl), &[batch.b])?;
        let tau = self.cfg.tau;
        let mut terms: Vec<(&'static str, Tensor)> = Vec::new();
        match (&self.head_t, &self.head_v) {
            (Some(wt), Some(wv)) => {
                let (mh_t, mt_t) = (wt.forward(&ht)?, wt.forward(&hv)?);
                let (mh_v, mt_v) = (wv.forward(&hv)?, wv.forward(&ht)?);
                if self.cfg.nip {
                    terms.push(("nip_text", nip_loss(&mh_t, &mt_t, &z_tgt_t, &targets, tau)?));
                    terms.push(("nip_image", nip_loss(&mh_v, &mt_v, &z_tgt_v, &targets, tau)?));
                }
                if self.cfg.cmcl {
                    terms.push(("cmcl_text", scale(&cmcl_loss(&mh_t, &mt_t, &targets, tau)?, self.cfg.lambda)?));
                    terms.push(("cmcl_image", scale(&cmcl_loss(&mh_v, &mt_v, &targets, tau)?, self.cfg.lambda)?));
                }
            }
            _ => {
                // --no-heads: one view per space and one CMCL term between h_t and h_v.
                if self.cfg.nip {
                    terms.push(("nip_text", crate::model::nn::nip_single(&ht, &z_tgt_t, &targets, tau)?));
                    terms.push(("nip_image", crate::model::nn::nip_single(&hv, &z_tgt_v, &targets, tau)?));
                }
                if self.cfg.cmcl {
                    terms.push(("cmcl", scale(&cmcl_loss(&ht, &hv, &targets, tau)?, self.cfg.lambda)?));
                }
            }
        }
        if terms.is_empty() {
            return Err(Error::Invalid("pre-training with both --no-nip and --no-cmcl has no loss".into()));
        }
        Ok(terms)
    }
}

/// A batch's distinct items (padding 0 first, then the sequences' items and the targets in order
/// of first appearance) and each one's place among them, looked up by item id.
struct Local {
    uniq: Vec<u32>,
    /// Place of item i among `uniq` (u32::MAX for items not in the batch).
    place: Vec<u32>,
}

impl Local {
    fn new(batch: &Batch) -> Local {
        let all = || std::iter::once(&0).chain(&batch.ids).chain(&batch.targets);
        let mut place = vec![u32::MAX; all().max().map_or(0, |&m| m as usize) + 1];
        let mut uniq = Vec::new();
        for &i in all() {
            if place[i as usize] == u32::MAX {
                place[i as usize] = uniq.len() as u32;
                uniq.push(i);
            }
        }
        Local { uniq, place }
    }

    /// The place of item `i`, one of the batch's.
    fn of(&self, i: u32) -> u32 {
        self.place[i as usize]
    }
}

/// The sum of named loss terms, added in reverse order (the last term first, as the loss has
/// always been summed; the order fixes the float rounding).
pub fn sum_terms(mut terms: Vec<(&'static str, Tensor)>) -> Result<Tensor> {
    let (_, mut loss) = terms.pop().ok_or_else(|| Error::Invalid("a loss with no terms".into()))?;
    for (_, t) in terms {
        loss = add(&loss, &t)?;
    }
    Ok(loss)
}

/// Scores are never ranked when what they are made of is NaN or Inf (every metric would read 0).
fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    if let Some(v) = t.to_vec()?.into_iter().find(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "the model gives non-finite scores ({what} hold {v}): its weights are too large or became NaN \
             (e.g. a too-high learning rate); nothing is evaluated"
        )));
    }
    Ok(())
}

impl Recommender for Model {
    type Tables = ScoreTables;

    fn params(&self) -> Vec<(String, Tensor)> {
        Model::params(self)
    }

    fn trained_params(&self, stage: Stage, freeze: Freeze) -> Vec<(String, Tensor)> {
        match stage {
            Stage::Pretrain => self.pretrain_params(),
            Stage::Finetune if freeze == Freeze::Transformer => {
                self.finetune_params().into_iter().filter(|(n, _)| !n.starts_with("transformer.")).collect()
            }
            Stage::Finetune => self.finetune_params(),
            Stage::E2e => Model::params(self),
        }
    }

    /// Fine-tuning: `ce`. Pre-training: sequence random dropout with a per-batch ratio r ~ U(0, rho),
    /// then a mixup ratio p ~ U(0, 0.5), and the terms of [`Model::pretrain_terms`]. E2E: both.
    fn loss(&self, stage: Stage, samples: &[&Sample], rng: &mut ChaCha8Rng, seeds: &mut Seeds) -> Result<Loss> {
        match stage {
            Stage::Finetune => {
                let ce = self.finetune_loss(&make_batch(samples), seeds)?;
                Ok(Loss { total: ce.clone(), terms: vec![("ce", ce)] })
            }
            Stage::Pretrain | Stage::E2e => {
                let r = rng.random::<f64>() * self.cfg.item_drop as f64;
                let dropped: Vec<Sample> =
                    samples.iter().map(|s| Sample { user: s.user, seq: item_dropout(&s.seq, r, rng), target: s.target }).collect();
                let refs: Vec<&Sample> = dropped.iter().collect();
                let p_mix = rng.random::<f64>() * 0.5;
                let mut terms = self.pretrain_terms(&make_batch(&refs), p_mix, rng, seeds)?;
                let pre = sum_terms(terms.clone())?;
                if stage == Stage::E2e {
                    let ce = self.finetune_loss(&make_batch(samples), seeds)?;
                    terms.push(("ce", ce.clone()));
                    Ok(Loss { total: add(&pre, &ce)?, terms })
                } else {
                    Ok(Loss { total: pre, terms })
                }
            }
        }
    }

    fn score_tables(&self, with_id: bool, seeds: &mut Seeds) -> Result<ScoreTables> {
        Model::score_tables(self, false, with_id, seeds)
    }

    fn rank_targets(&self, tables: &ScoreTables, samples: &[&Sample], mask_history: bool, seeds: &mut Seeds) -> Result<Vec<u32>> {
        Model::rank_targets(self, tables, &make_batch(samples), mask_history, seeds)
    }
}
