//! Images into words (the paper's eq. 2): CLIP scores every word of a dictionary D against an
//! image, and the N words with the highest cosine, joined in rank order, become the image's
//! sentence, which then goes through the same Sentence-BERT as the item's text.
//!
//! - **Dictionary**: `--vocab FILE` (one word or phrase per line, blank lines and duplicates
//!   skipped, order kept), or by default [`dictionary_from_items`]: the words of the item text
//!   fields — maximal runs of letters, lower-cased, at least 3 letters, not in [`STOP_WORDS`], seen
//!   in at least 2 items — in alphabetical order.
//! - **Word embeddings**: each word, filled into the template (`"{}"` by default, as eq. 2; e.g.
//!   `"a photo of {}."`), through CLIP's text tower, L2-normalised. They are computed once per
//!   (model, dictionary, template) and cached in `NAME.clip_words.safetensors` beside the output,
//!   keyed by a hash of the model weights, the template and the words; a cache with another key is
//!   rebuilt.
//! - **Top N** ([`top_words`]): per image, the N words with the highest cosine between the
//!   normalised image embedding and the word embeddings, best first; equal cosines keep the
//!   dictionary's order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::files::write_atomic;
use crate::model::bert::progress_bar;
use crate::model::clip::{fnv1a as fnv, Clip, FNV_OFFSET};
use crate::{Error, Result};

/// The paper's best N.
pub const DEFAULT_TOP_N: usize = 15;
/// Eq. 2 embeds the bare word.
pub const DEFAULT_TEMPLATE: &str = "{}";
/// Items a word must occur in to enter the default dictionary.
pub const MIN_ITEMS: usize = 2;

/// English function words left out of the default dictionary.
pub const STOP_WORDS: [&str; 127] = [
    "about",
    "above",
    "after",
    "again",
    "against",
    "all",
    "also",
    "and",
    "any",
    "are",
    "aren",
    "because",
    "been",
    "before",
    "being",
    "below",
    "between",
    "both",
    "but",
    "can",
    "cannot",
    "could",
    "did",
    "didn",
    "does",
    "doesn",
    "doing",
    "don",
    "down",
    "during",
    "each",
    "few",
    "for",
    "from",
    "further",
    "had",
    "has",
    "have",
    "having",
    "her",
    "here",
    "hers",
    "herself",
    "him",
    "himself",
    "his",
    "how",
    "into",
    "its",
    "itself",
    "just",
    "let",
    "more",
    "most",
    "much",
    "must",
    "myself",
    "nor",
    "not",
    "now",
    "off",
    "once",
    "only",
    "other",
    "ought",
    "our",
    "ours",
    "ourselves",
    "out",
    "over",
    "own",
    "same",
    "she",
    "should",
    "since",
    "some",
    "such",
    "than",
    "that",
    "the",
    "their",
    "theirs",
    "them",
    "themselves",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "too",
    "under",
    "until",
    "upon",
    "very",
    "was",
    "way",
    "were",
    "what",
    "when",
    "where",
    "which",
    "while",
    "who",
    "whom",
    "why",
    "will",
    "with",
    "within",
    "without",
    "won",
    "would",
    "yet",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "isn",
    "wasn",
    "weren",
    "ll",
    "ve",
    "per",
    "via",
    "etc",
];

/// A dictionary with its CLIP text embeddings (L2-normalised rows).
pub struct WordBank {
    pub words: Vec<String>,
    pub template: String,
    /// (words, d), row-major.
    pub embeds: Vec<f32>,
    pub dim: usize,
    /// Whether the embeddings came from the cache file.
    pub cached: bool,
}

/// The default dictionary from item text values (see the module docs).
pub fn dictionary_from_items<'a>(values_per_item: impl Iterator<Item = Vec<&'a str>>) -> Vec<String> {
    let stop: HashSet<&str> = STOP_WORDS.iter().copied().collect();
    let mut items_of: BTreeMap<String, usize> = BTreeMap::new();
    for values in values_per_item {
        let mut seen = HashSet::new();
        for v in values {
            for w in v.split(|c: char| !c.is_alphabetic()) {
                let w = w.to_lowercase();
                if w.chars().count() >= 3 && !stop.contains(w.as_str()) && seen.insert(w.clone()) {
                    *items_of.entry(w).or_default() += 1;
                }
            }
        }
    }
    items_of.into_iter().filter(|(_, n)| *n >= MIN_ITEMS).map(|(w, _)| w).collect()
}

/// A `--vocab` file: one word or phrase per line (trimmed; blank lines and repeats skipped).
pub fn read_vocab(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let mut seen = HashSet::new();
    let words: Vec<String> =
        text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).filter(|l| seen.insert(l.clone())).collect();
    if words.is_empty() {
        return Err(Error::Data { file: path.display().to_string(), line: 0, msg: "no words (expected one word per line)".into() });
    }
    Ok(words)
}

/// `template` with `{}` replaced by `word`.
pub fn fill(template: &str, word: &str) -> String {
    template.replacen("{}", word, 1)
}

/// Check a word template: exactly one `{}`.
pub fn check_template(template: &str) -> Result<()> {
    if template.matches("{}").count() != 1 {
        return Err(Error::Invalid(format!("--word-template \"{template}\" must contain exactly one {{}} (where the word goes)")));
    }
    Ok(())
}

/// The cache key: a hash of the model weights, the template and the words.
pub fn cache_key(model_hash: &str, template: &str, words: &[String]) -> String {
    let mut h = FNV_OFFSET;
    fnv(&mut h, model_hash.as_bytes());
    fnv(&mut h, &[0xff]);
    fnv(&mut h, template.as_bytes());
    for w in words {
        fnv(&mut h, &[0xff]);
        fnv(&mut h, w.as_bytes());
    }
    format!("{h:016x}")
}

fn normalize_rows(x: &mut [f32], d: usize) {
    for row in x.chunks_exact_mut(d) {
        let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12) as f32;
        row.iter_mut().for_each(|v| *v /= n);
    }
}

/// Read the cache if its key is `key`.
fn read_cache(path: &Path, key: &str, words: usize, d: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).ok()?;
    if meta.metadata().as_ref()?.get("key")? != key {
        return None;
    }
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("embeds").ok()?;
    if t.dtype() != Dtype::F32 || t.shape() != [words, d] {
        return None;
    }
    Some(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

impl WordBank {
    /// Embed `words` with `clip` through `template`, or read them from `cache` when its key matches
    /// (the cache is rewritten otherwise).
    pub fn build(clip: &Clip, words: Vec<String>, template: &str, cache: &Path, quiet: bool) -> Result<WordBank> {
        check_template(template)?;
        if words.is_empty() {
            return Err(Error::Invalid("the word dictionary is empty (give --vocab FILE or text fields with words)".into()));
        }
        let d = clip.config.projection_dim;
        let key = cache_key(&clip.model_hash, template, &words);
        if let Some(embeds) = read_cache(cache, &key, words.len(), d) {
            return Ok(WordBank { words, template: template.to_string(), embeds, dim: d, cached: true });
        }
        let texts: Vec<String> = words.iter().map(|w| fill(template, w)).collect();
        let bar = progress_bar(texts.len(), quiet);
        bar.set_prefix("CLIP words");
        let mut embeds: Vec<f32> = clip.encode_texts(&texts, &bar)?.concat();
        bar.finish_and_clear();
        normalize_rows(&mut embeds, d);
        let bytes: Vec<u8> = embeds.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![words.len(), d], &bytes).map_err(|e| Error::Invalid(e.to_string()))?;
        let meta: HashMap<String, String> = [
            ("key".to_string(), key),
            ("template".to_string(), template.to_string()),
            ("model".to_string(), clip.dir.display().to_string()),
            ("words".to_string(), serde_json::to_string(&words).unwrap()),
        ]
        .into_iter()
        .collect();
        let out = safetensors::serialize([("embeds", view)], Some(meta)).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(cache, &out)?;
        Ok(WordBank { words, template: template.to_string(), embeds, dim: d, cached: false })
    }

    /// The `n` best words for one image embedding (not necessarily normalised), best first.
    pub fn top_words(&self, image: &[f32], n: usize) -> Vec<(String, f32)> {
        top_words(&self.words, &self.embeds, self.dim, image, n)
    }
}

/// The `n` words whose (normalised) embeddings have the highest cosine with `image`, best first;
/// equal cosines in dictionary order.
pub fn top_words(words: &[String], embeds: &[f32], d: usize, image: &[f32], n: usize) -> Vec<(String, f32)> {
    let norm = image.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt().max(1e-12);
    let mut scored: Vec<(usize, f64)> = embeds
        .chunks_exact(d)
        .enumerate()
        .map(|(i, e)| (i, e.iter().zip(image).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / norm))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.into_iter().take(n).map(|(i, s)| (words[i].clone(), s as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dictionary_keeps_words_of_two_items() {
        let items = [vec!["Blue Stapler, heavy-duty", "Office"], vec!["blue pens; the BEST pens", "office"], vec!["Stapler 3000", "x"]];
        let d = dictionary_from_items(items.iter().map(|v| v.to_vec()));
        assert_eq!(d, ["blue", "office", "stapler"]);
    }

    #[test]
    fn top_words_rank_by_cosine_then_order() {
        let words: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let mut e = vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8, 0.0, 1.0];
        normalize_rows(&mut e, 2);
        let top = top_words(&words, &e, 2, &[0.0, 2.0], 3);
        let names: Vec<&str> = top.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(names, ["b", "d", "c"]);
        assert!((top[2].1 - 0.8).abs() < 1e-6);
    }

    #[test]
    fn templates_and_keys() {
        assert!(check_template("a photo of {}.").is_ok());
        assert!(check_template("no slot").is_err() && check_template("{} {}").is_err());
        assert_eq!(fill("a photo of {}.", "cat"), "a photo of cat.");
        let w = vec!["a".to_string(), "b".to_string()];
        assert_ne!(cache_key("m", "{}", &w), cache_key("m", "{}.", &w));
        assert_ne!(cache_key("m", "{}", &w), cache_key("n", "{}", &w));
        assert_ne!(cache_key("m", "{}", &w), cache_key("m", "{}", &w[..1]));
    }
}
