//! Weights into a model: from a checkpoint of the same items, or (cross-domain) the
//! item-independent tensors of another dataset's checkpoint.

use std::path::Path;

use super::checkpoint::Checkpoint;
use crate::model::Recommender;
use crate::{Error, Result};

/// Load model weights (and check the item order) from a checkpoint written by `fit`.
pub fn load_weights<M: Recommender>(model: &M, ck: &Checkpoint, item_tokens: &[String], strict: bool) -> Result<usize> {
    let tokens = ck.meta.get("item_tokens").ok_or_else(|| {
        Error::Invalid(
            "the checkpoint has no item_tokens metadata (not an msm4sr checkpoint?), so its ID rows cannot be matched to the items".into(),
        )
    })?;
    let saved: Vec<String> = serde_json::from_str(tokens).map_err(|e| Error::Invalid(format!("checkpoint item_tokens: {e}")))?;
    if saved != item_tokens {
        return Err(Error::Invalid(item_set_difference(&saved, item_tokens)));
    }
    ck.load_into(&model.params(), strict)
}

/// Cross-domain: load the item-independent tensors of `ck` (the transformer and the item encoders;
/// not the ID embeddings or the pre-training heads) into `model`, whatever items `ck` was trained
/// on. Returns the names carried and those left as initialised. Every carried tensor must be in
/// `ck` with the same shape; the item encoders' input width is the features' width.
pub fn load_transfer<M: Recommender>(model: &M, ck: &Checkpoint, src: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (mut carried, mut left) = (Vec::new(), Vec::new());
    for (name, p) in model.params() {
        if name == "item_embedding" || name.starts_with("head_") {
            left.push(name);
            continue;
        }
        let Some((shape, _)) = ck.tensors.get(&name) else {
            return Err(Error::Invalid(format!(
                "--init {}: no tensor {name} (another model kind, other --modalities, or not an msm4sr checkpoint)",
                src.display()
            )));
        };
        if shape.as_slice() != p.shape() {
            let why = if name.starts_with("text_encoder") || name.starts_with("image_encoder") {
                " (the target's features must have the source's width and the model the source's --hidden / --experts)"
            } else {
                " (the model must have the source's --hidden, --inner, --layers, --max-len)"
            };
            return Err(Error::Invalid(format!(
                "--init {}: tensor {name} is {shape:?} there and {:?} here{why}",
                src.display(),
                p.shape()
            )));
        }
        if let Some(t) = ck.tensor(&name, p.shape(), p.device())? {
            p.assign(&t)?;
        }
        carried.push(name);
    }
    Ok((carried, left))
}

/// How a checkpoint's items (`saved`, index 0 padding) differ from a dataset's, in words.
fn item_set_difference(saved: &[String], here: &[String]) -> String {
    use std::collections::HashSet;
    let (a, b): (HashSet<&String>, HashSet<&String>) = (saved.iter().skip(1).collect(), here.iter().skip(1).collect());
    if a == b {
        let k = saved.iter().zip(here).position(|(x, y)| x != y).unwrap_or(0);
        return format!(
            "the checkpoint has the same {} items as this dataset but in another order (item {k} is \"{}\" there and \"{}\" here): \
             its ID embeddings would belong to the wrong items; items are numbered by first appearance in the .inter file",
            a.len(),
            saved[k],
            here[k]
        );
    }
    let only_ck = saved.iter().skip(1).find(|t| !b.contains(t));
    let only_ds = here.iter().skip(1).find(|t| !a.contains(t));
    let mut msg = format!(
        "the checkpoint was trained on a different item set ({} items) than this dataset ({} items; fine-tuning across domains: --cross-domain)",
        a.len(),
        b.len()
    );
    if let Some(t) = only_ck {
        msg += &format!("; \"{t}\" is in the checkpoint only");
    }
    if let Some(t) = only_ds {
        msg += &format!("; \"{t}\" is in this dataset only");
    }
    msg
}
