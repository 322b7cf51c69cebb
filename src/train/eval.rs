//! Full-ranking evaluation: every target ranked among all real items, Recall/NDCG from the ranks.

use crate::config::TrainConfig;
use crate::data::metrics::Metrics;
use crate::data::Sample;
use crate::engine::no_grad;
use crate::model::nn::Seeds;
use crate::model::Recommender;
use crate::Result;

/// Rank every sample's target among all real items; returns one 0-based rank per sample. The item
/// side is encoded once; each batch's scores are reduced block by block on the model's device
/// (`Recommender::rank_targets`), only the ranks coming back.
pub fn ranks<M: Recommender>(model: &M, samples: &[Sample], eval_batch: usize, with_id: bool, mask_history: bool) -> Result<Vec<u32>> {
    let r = ranks_inner(model, samples, eval_batch, with_id, mask_history);
    if r.is_ok() {
        crate::fault::reached("evaluated");
    }
    r
}

fn ranks_inner<M: Recommender>(model: &M, samples: &[Sample], eval_batch: usize, with_id: bool, mask_history: bool) -> Result<Vec<u32>> {
    no_grad(|| {
        let mut out = Vec::with_capacity(samples.len());
        let mut seeds = Seeds::new(0);
        if samples.is_empty() {
            return Ok(out);
        }
        let tables = model.score_tables(with_id, &mut seeds)?;
        for chunk in samples.chunks(eval_batch.max(1)) {
            let refs: Vec<&Sample> = chunk.iter().collect();
            out.extend(model.rank_targets(&tables, &refs, mask_history, &mut seeds)?);
        }
        Ok(out)
    })
}

/// Recall/NDCG@{5,10,20} of `samples`.
pub fn evaluate<M: Recommender>(model: &M, samples: &[Sample], cfg: &TrainConfig, with_id: bool) -> Result<Metrics> {
    Ok(Metrics::from_ranks(&ranks(model, samples, cfg.eval_batch, with_id, cfg.mask_history)?))
}
