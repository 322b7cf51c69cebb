//! Item text features for MSM4SR: sentences from a RecBole `NAME.item` file embedded with a BERT
//! sentence model ([`crate::model::bert`]), written as the `NAME.features.safetensors` + `NAME.items.txt`
//! pair that [`crate::data::Dataset::load`] reads.
//!
//! **Sentences.** Every item (row of `NAME.item`, in file order) gets up to `max_sentences`
//! sentences, taken from the text fields in the order given, each field contributing:
//! - a plain field name (`movie_title`): the value split at sentence boundaries (`.`, `!` or `?`
//!   followed by a space and a capital letter, digit or quote; not after a single letter or a
//!   common abbreviation such as `Mr.` or `St.`), one sentence each;
//! - `NAME=TEMPLATE` (`release_year=Released in {year}.`): one sentence, the template with its
//!   placeholder filled in:
//!   - `{}` the value as it is (trimmed),
//!   - `{title}` the value with a trailing ", The" / ", A" / ", An" moved to the front
//!     ("Hunt for Red October, The" -> "The Hunt for Red October"),
//!   - `{list}` the value's space-separated words joined with ", " ("Action Thriller" ->
//!     "Action, Thriller"), missing words dropped,
//!   - `{year}` the value if it is all digits (else the field gives no sentence).
//!
//!   A `.` right after the placeholder is left out when the value already ends with `.`, `!` or `?`.
//!
//! A value that is empty or one of `unknown`, `unkonwn` (sic, in MovieLens), `n/a`, `none`, `nan`
//! (any case) gives no sentence. With no text fields given, every field except `item_id` is used
//! as a plain field.
//!
//! **Images.** With `image_keywords`, a file with one line per image, `ITEM_TOKEN<TAB>word word ...`,
//! each image's words are embedded as one sentence; up to [`MAX_IMAGES`] images per item, in file order.
//!
//! **Images through CLIP** (the paper's eq. 2). With `images` (a TSV of `ITEM<TAB>PATH` lines or a
//! folder of `ITEM.ext` / `ITEM_k.ext` files; see [`crate::data::images`]) and `clip` (a Hugging Face CLIP
//! folder; [`crate::model::clip`]), every image is preprocessed as CLIP's processor does, embedded by the
//! vision tower, and its `top_n` words of the dictionary ([`crate::featurize::clip_words`]: `vocab`, or the
//! words of the text fields) joined in rank order become its sentence; up to 10 images per item.
//! An image that cannot be read is reported (item, path, reason) and skipped; an item without a
//! readable image gets `image_len` 0. The words and their cosines are written to
//! `NAME.image_words.tsv` (`ITEM<TAB>words<TAB>cosines`, one line per image; the first two columns
//! are the `image_keywords` format) and the dictionary's embeddings are cached in
//! `NAME.clip_words.safetensors`.
//!
//! **An image stand-in from text fields.** For data without images, `image_words_from` builds one
//! keyword sentence per item from named fields (a stand-in for the paper's CLIP words, not image
//! content): each spec is `FIELD` (the value as it is) or `FIELD>N` (the value's distinct words of
//! more than N characters, in order of first appearance, compared case-insensitively; a word is a run
//! of letters, digits, `'`, `-` and `&`, trimmed of the last three at its ends). The pieces are joined
//! with spaces in the order given; an item whose pieces are all empty or missing gets no image
//! (`image_len` 0). E.g. `title>3,brand`: "HP 12C Financial Calculator" by "HP" -> "Financial
//! Calculator HP". The keyword lines are also written to `NAME.image_words.tsv` (the
//! `image_keywords` format).
//!
//! **Output** (in `out`, created if needed, each file written atomically): `NAME.features.safetensors`
//! with `text` [N, S, d] f32 (S = the largest sentence count, rows past an item's count zero) and
//! `text_len` [N] int32, plus `image` [N, V, d] / `image_len` [N] with image keywords; and
//! `NAME.items.txt`, the N item tokens. When `NAME.inter` sits beside the `.item` file and `out` has
//! none, it is copied there too, so `out` is a complete dataset directory.
//!
//! Each distinct sentence is embedded once.
//!
//! The feature-extraction layer: uses `model` (BERT, CLIP), `data` (also `data::images`: listing,
//! reading and CLIP preprocessing), `files` and the engine; the
//! `featurize` command (`app::featurize`) is its only user. Files: this one (sentences, the BERT
//! pass, the output pair), [`items`] (`.item` files), [`sentences`] (text into sentences, keyword
//! lines), [`clip_words`] (images into
//! words).

pub mod clip_words;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::{features_bytes, Modality};
use crate::engine::Device;
use crate::files::write_atomic;
use crate::model::bert::{progress_bar, SentenceEncoder};
use crate::{Error, Result};

mod items;
mod sentences;

pub use items::*;
pub use sentences::*;

/// Images per item kept from an image-keywords file.
pub const MAX_IMAGES: usize = 10;
/// Default `max_sentences`.
pub const DEFAULT_MAX_SENTENCES: usize = 10;
/// Default model folder (written by `tools/get_minilm.sh`).
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";

const MISSING: [&str; 6] = ["", "unknown", "unkonwn", "n/a", "none", "nan"];
const ABBREVIATIONS: [&str; 24] = [
    "mr", "mrs", "ms", "dr", "st", "sr", "jr", "vs", "prof", "sgt", "gen", "col", "lt", "capt", "mt", "ft", "no", "vol", "inc", "ltd",
    "co", "etc", "e.g", "i.e",
];

/// What to embed and where to write it.
#[derive(Clone, Debug)]
pub struct FeaturizeOptions {
    /// The RecBole `NAME.item` file.
    pub items: PathBuf,
    /// Text fields, each `NAME` or `NAME=TEMPLATE` (see the module docs); empty = every field but `item_id`.
    pub text_fields: Vec<String>,
    /// Output directory.
    pub out: PathBuf,
    /// Sentences per item at most.
    pub max_sentences: usize,
    /// Optional image-keywords file: `ITEM_TOKEN<TAB>words` per line, one line per image.
    pub image_keywords: Option<PathBuf>,
    /// An image stand-in: one keyword sentence per item from these field specs (`FIELD` or
    /// `FIELD>N`, see the module docs); empty = none. Not together with `image_keywords`.
    pub image_words_from: Vec<String>,
    /// Item images (a TSV or a folder) to turn into words with `clip`.
    pub images: Option<PathBuf>,
    /// A CLIP model folder (needed with `images`).
    pub clip: Option<PathBuf>,
    /// The word dictionary for CLIP (one per line); default: the words of the text fields.
    pub vocab: Option<PathBuf>,
    /// Words per image (the paper's N).
    pub top_n: usize,
    /// How a word is put to CLIP's text tower (`{}` = the word).
    pub word_template: String,
    /// BERT sentence model folder (model.safetensors + tokenizer.json).
    pub model_dir: PathBuf,
    /// Sentences per batch.
    pub batch: usize,
}

impl FeaturizeOptions {
    /// Options with the defaults: all text fields, 10 sentences, no images, `models/all-MiniLM-L6-v2`, batch 64.
    pub fn new(items: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        FeaturizeOptions {
            items: items.into(),
            text_fields: Vec::new(),
            out: out.into(),
            max_sentences: DEFAULT_MAX_SENTENCES,
            image_keywords: None,
            image_words_from: Vec::new(),
            images: None,
            clip: None,
            vocab: None,
            top_n: crate::featurize::clip_words::DEFAULT_TOP_N,
            word_template: crate::featurize::clip_words::DEFAULT_TEMPLATE.to_string(),
            model_dir: PathBuf::from(DEFAULT_MODEL_DIR),
            batch: crate::model::bert::DEFAULT_BATCH,
        }
    }
}

/// What [`run`] did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    /// Items (rows of the `.item` file).
    pub items: usize,
    pub items_with_text: usize,
    /// Items by their number of text sentences: `text_len_histogram[k]` items have k sentences.
    pub text_len_histogram: Vec<usize>,
    /// Mean text sentences per item (over all items).
    pub sentences_per_item: f64,
    /// The stand-in's field specs when the image rows are keyword sentences built from text fields.
    pub image_stand_in: Option<String>,
    /// `NAME.image_words.tsv`, when the image rows come from `image_words_from` or CLIP.
    pub image_words: Option<PathBuf>,
    /// CLIP: images that could not be read (item, path, reason), skipped.
    pub images_skipped: Vec<crate::data::images::Skipped>,
    /// CLIP: the dictionary's size, whether its embeddings came from the cache, and the images
    /// embedded per second (reading and preprocessing included).
    pub clip_dictionary: Option<usize>,
    pub clip_words_cached: Option<bool>,
    pub clip_images_per_s: Option<f64>,
    /// Sentences kept over all items, and how many were dropped past `max_sentences`.
    pub sentences: usize,
    pub sentences_dropped: usize,
    pub images: usize,
    pub items_with_images: usize,
    pub images_dropped: usize,
    /// Distinct sentences embedded (text and images together).
    pub distinct_sentences: usize,
    /// Shapes written: text [N, S, d], image [N, V, d].
    pub text_shape: [usize; 3],
    pub image_shape: Option<[usize; 3]>,
    /// Embedding time (tokenization included) and throughput over the distinct sentences.
    pub embed_seconds: f64,
    pub sentences_per_s: f64,
    pub total_seconds: f64,
    pub device: String,
    pub features: PathBuf,
    pub items_txt: PathBuf,
    /// The `.inter` file copied into `out`, if one was.
    pub inter_copied: Option<PathBuf>,
}

fn data_err<T>(file: &Path, line: usize, msg: impl Into<String>) -> Result<T> {
    Err(Error::Data { file: file.display().to_string(), line, msg: msg.into() })
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source: e }
}

fn is_missing(v: &str) -> bool {
    let v = v.trim().to_lowercase();
    MISSING.contains(&v.as_str())
}

// ---- run ------------------------------------------------------------------------------------

/// Pack per-item vectors into a [`Modality`]: [N, R, d] with R = max count (at least 1), counts [N].
fn pack(per_item: &[Vec<String>], emb: &HashMap<&str, &[f32]>, d: usize) -> Modality {
    let rows = per_item.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut data = vec![0.0f32; per_item.len() * rows * d];
    for (i, sents) in per_item.iter().enumerate() {
        for (j, s) in sents.iter().enumerate() {
            data[(i * rows + j) * d..(i * rows + j + 1) * d].copy_from_slice(emb[s.as_str()]);
        }
    }
    Modality { rows, dim: d, data, lens: per_item.iter().map(|s| s.len() as u32).collect() }
}

/// What the CLIP path of [`run`] produced.
struct ClipImages {
    /// Per item, one sentence (the top words) per readable image.
    per_item: Vec<Vec<String>>,
    dropped: usize,
    /// `NAME.image_words.tsv`.
    lines: String,
    skipped: Vec<crate::data::images::Skipped>,
    dictionary: usize,
    cached: bool,
    images_per_s: f64,
}

/// Images per chunk read, preprocessed and embedded at once (bounds the memory of the pixels).
const IMAGE_CHUNK: usize = 64;

/// Images -> CLIP image embeddings -> the top-N words of the dictionary, per image (see the module docs).
#[allow(clippy::too_many_arguments)]
fn clip_images(
    opts: &FeaturizeOptions,
    spec: &Path,
    table: &ItemTable,
    specs: &[FieldSpec],
    name: &str,
    dev: Device,
    quiet: bool,
) -> Result<ClipImages> {
    use crate::data::images::{list_images, preprocess_file, ImageSource, Skipped};
    use crate::featurize::clip_words::{dictionary_from_items, read_vocab, WordBank};
    use rayon::prelude::*;

    crate::featurize::clip_words::check_template(&opts.word_template)?;
    if opts.top_n == 0 {
        return Err(Error::Invalid("--top-n must be at least 1".into()));
    }
    let list = list_images(&ImageSource::parse(spec)?, &table.tokens)?;
    for (tok, path) in list.unknown.iter().take(5) {
        crate::console::line(&format!("warning: {}: item \"{tok}\" is not in {}; skipped", path.display(), opts.items.display()));
    }
    if list.unknown.len() > 5 {
        crate::console::line(&format!("warning: {} more images of unknown items skipped", list.unknown.len() - 5));
    }
    let clip = crate::model::clip::Clip::load(opts.clip.as_deref().expect("checked by run"), dev)?;
    let words = match &opts.vocab {
        Some(v) => read_vocab(v)?,
        None => {
            let cols: Vec<usize> = specs.iter().filter_map(|s| table.field(&s.name)).collect();
            dictionary_from_items(table.rows.iter().map(|row| cols.iter().map(|&c| row[c].as_str()).collect()))
        }
    };
    let bank = WordBank::build(&clip, words, &opts.word_template, &opts.out.join(format!("{name}.clip_words.safetensors")), quiet)?;

    let all: Vec<(usize, &PathBuf)> = list.per_item.iter().enumerate().flat_map(|(i, ps)| ps.iter().map(move |p| (i, p))).collect();
    let bar = crate::model::bert::progress_bar_of(all.len(), "images", quiet);
    bar.set_prefix("CLIP images");
    let t0 = Instant::now();
    let mut per_item = vec![Vec::new(); table.tokens.len()];
    let mut lines = String::new();
    let mut skipped = Vec::new();
    for chunk in all.chunks(IMAGE_CHUNK) {
        let loaded: Vec<std::result::Result<Vec<f32>, String>> =
            chunk.par_iter().map(|(_, p)| preprocess_file(p, &clip.processor).map_err(|e| e.to_string())).collect();
        let mut ok = Vec::new();
        let mut pixels = Vec::new();
        for ((item, path), r) in chunk.iter().zip(loaded) {
            match r {
                Ok(px) => {
                    ok.push((*item, *path));
                    pixels.push(px);
                }
                Err(reason) => {
                    skipped.push(Skipped { item: table.tokens[*item].clone(), path: (*path).clone(), reason });
                    bar.inc(1);
                }
            }
        }
        let embeds = clip.encode_pixels(&pixels, &bar)?;
        for ((item, _), e) in ok.iter().zip(&embeds) {
            let top = bank.top_words(e, opts.top_n);
            let sentence = top.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>().join(" ");
            let scores = top.iter().map(|(_, s)| format!("{s:.4}")).collect::<Vec<_>>().join(" ");
            lines += &format!("{}\t{sentence}\t{scores}\n", table.tokens[*item]);
            per_item[*item].push(sentence);
        }
    }
    bar.finish_and_clear();
    for s in skipped.iter().take(10) {
        crate::console::line(&format!("warning: image of item \"{}\" skipped: {}: {}", s.item, s.path.display(), s.reason));
    }
    if skipped.len() > 10 {
        crate::console::line(&format!("warning: {} more images skipped (all listed in --json)", skipped.len() - 10));
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(ClipImages {
        per_item,
        dropped: list.dropped,
        lines,
        skipped,
        dictionary: bank.words.len(),
        cached: bank.cached,
        images_per_s: all.len() as f64 / seconds.max(1e-9),
    })
}

/// Embed the text (and image keywords) of every item of `opts.items` and write the features; see
/// the module docs. `quiet` hides the progress bar.
pub fn run(opts: &FeaturizeOptions, dev: Device, quiet: bool) -> Result<Summary> {
    let t0 = Instant::now();
    if opts.max_sentences == 0 {
        return Err(Error::Invalid("featurize: max_sentences must be at least 1".into()));
    }
    if opts.batch == 0 {
        return Err(Error::Invalid("featurize: --batch 0: a batch needs at least 1 sentence".into()));
    }
    let name = opts
        .items
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".item"))
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Invalid(format!("{}: expected a RecBole item file named NAME.item", opts.items.display())))?
        .to_string();
    let table = read_item_table(&opts.items)?;
    let specs: Vec<FieldSpec> = if opts.text_fields.is_empty() {
        table.fields.iter().filter(|f| *f != "item_id").map(|f| FieldSpec { name: f.clone(), template: None }).collect()
    } else {
        opts.text_fields.iter().map(|s| FieldSpec::parse(s)).collect::<Result<_>>()?
    };
    let (text, sentences_dropped) = item_sentences(&table, &specs, opts.max_sentences, &opts.items)?;
    if text.iter().all(Vec::is_empty) {
        return Err(Error::Data {
            file: opts.items.display().to_string(),
            line: 0,
            msg: format!(
                "no item has any text in the fields {} (all empty or missing): the features would be empty",
                specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let stand_in: Vec<WordsSpec> = opts.image_words_from.iter().map(|s| WordsSpec::parse(s)).collect::<Result<_>>()?;
    let sources = [opts.image_keywords.is_some(), !stand_in.is_empty(), opts.images.is_some()].iter().filter(|&&b| b).count();
    if sources > 1 {
        return Err(Error::Invalid("--image-keywords, --image-words-from and --images each give the image rows: pass one of them".into()));
    }
    if opts.images.is_some() != opts.clip.is_some() {
        return Err(Error::Invalid("--images and --clip go together: the images are turned into words by the CLIP model".into()));
    }
    let mut clip_run = None;
    let (images, images_dropped) = match (&opts.image_keywords, stand_in.is_empty(), &opts.images) {
        (Some(p), _, _) => {
            let (im, d) = read_image_keywords(p, &table.tokens)?;
            (Some(im), d)
        }
        (None, false, _) => (Some(item_keyword_images(&table, &stand_in, &opts.items)?), 0),
        (None, true, Some(spec)) => {
            let c = clip_images(opts, spec, &table, &specs, &name, dev, quiet)?;
            let (im, d) = (c.per_item.clone(), c.dropped);
            clip_run = Some(c);
            (Some(im), d)
        }
        (None, true, None) => (None, 0),
    };
    let stand_in_spec = (!stand_in.is_empty()).then(|| opts.image_words_from.join(","));

    let mut encoder = SentenceEncoder::load(&opts.model_dir, dev)?;
    encoder.batch = opts.batch.max(1);
    let mut distinct: Vec<&str> = text.iter().chain(images.iter().flatten()).flatten().map(String::as_str).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let owned: Vec<String> = distinct.iter().map(|s| s.to_string()).collect();
    let te = Instant::now();
    let bar = progress_bar(owned.len(), quiet);
    let vecs = encoder.encode_with_progress(&owned, &bar)?;
    bar.finish_and_clear();
    let embed_seconds = te.elapsed().as_secs_f64();
    let d = encoder.dim();
    let emb: HashMap<&str, &[f32]> = distinct.iter().copied().zip(vecs.iter().map(Vec::as_slice)).collect();

    let n = table.tokens.len();
    let text_m = pack(&text, &emb, d);
    let image_m = images.as_ref().map(|im| pack(im, &emb, d));
    let source = serde_json::json!({
        "model": encoder.dir.display().to_string(),
        "pooling": "mean + L2",
        "max_tokens": encoder.max_tokens,
        "text_fields": specs.iter().map(|s| match &s.template {
            Some(t) => format!("{}={t}", s.name),
            None => s.name.clone(),
        }).collect::<Vec<_>>(),
        "max_sentences": opts.max_sentences,
        "image_keywords": opts.image_keywords.as_ref().map(|p| p.display().to_string()),
        "image_stand_in": stand_in_spec,
        "images": opts.images.as_ref().map(|p| p.display().to_string()),
        "clip": opts.clip.as_ref().map(|p| p.display().to_string()),
        "clip_top_n": opts.images.as_ref().map(|_| opts.top_n),
        "clip_word_template": opts.images.as_ref().map(|_| opts.word_template.clone()),
        "clip_vocab": opts.vocab.as_ref().map(|p| p.display().to_string()),
    });
    let meta: HashMap<String, String> = [("source".to_string(), source.to_string())].into_iter().collect();
    let bytes = features_bytes(Some(&text_m), image_m.as_ref(), meta)?;

    let features = opts.out.join(format!("{name}.features.safetensors"));
    let items_txt = opts.out.join(format!("{name}.items.txt"));
    write_atomic(&features, &bytes)?;
    write_atomic(&items_txt, table.tokens.iter().map(|t| format!("{t}\n")).collect::<String>().as_bytes())?;
    let words_tsv = match (&stand_in_spec, &images, &clip_run) {
        (_, _, Some(c)) => Some(c.lines.clone()),
        (Some(_), Some(im), None) => Some(image_words_tsv(&table.tokens, im)),
        _ => None,
    };
    let image_words = match words_tsv {
        Some(text) => {
            let p = opts.out.join(format!("{name}.image_words.tsv"));
            write_atomic(&p, text.as_bytes())?;
            Some(p)
        }
        None => None,
    };
    let mut inter_copied = None;
    let inter_src = opts.items.with_file_name(format!("{name}.inter"));
    let inter_dst = opts.out.join(format!("{name}.inter"));
    if inter_src.is_file() && !inter_dst.exists() {
        let bytes = std::fs::read(&inter_src).map_err(|e| io_err(&inter_src, e))?;
        write_atomic(&inter_dst, &bytes)?;
        inter_copied = Some(inter_dst);
    }

    let count = |v: &[Vec<String>]| (v.iter().map(Vec::len).sum::<usize>(), v.iter().filter(|s| !s.is_empty()).count());
    let (sentences, items_with_text) = count(&text);
    let mut text_len_histogram = vec![0usize; text.iter().map(Vec::len).max().unwrap_or(0) + 1];
    for t in &text {
        text_len_histogram[t.len()] += 1;
    }
    let (n_images, items_with_images) = images.as_deref().map(count).unwrap_or((0, 0));
    Ok(Summary {
        items: n,
        items_with_text,
        text_len_histogram,
        sentences_per_item: sentences as f64 / n.max(1) as f64,
        image_stand_in: stand_in_spec,
        image_words,
        images_skipped: clip_run.as_ref().map(|c| c.skipped.clone()).unwrap_or_default(),
        clip_dictionary: clip_run.as_ref().map(|c| c.dictionary),
        clip_words_cached: clip_run.as_ref().map(|c| c.cached),
        clip_images_per_s: clip_run.as_ref().map(|c| c.images_per_s),
        sentences,
        sentences_dropped,
        images: n_images,
        items_with_images,
        images_dropped,
        distinct_sentences: owned.len(),
        text_shape: [n, text_m.rows, d],
        image_shape: image_m.as_ref().map(|m| [n, m.rows, d]),
        embed_seconds,
        sentences_per_s: owned.len() as f64 / embed_seconds.max(1e-9),
        total_seconds: t0.elapsed().as_secs_f64(),
        device: format!("{dev:?}"),
        features,
        items_txt,
        inter_copied,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_and_skip() {
        let t = FieldSpec::parse("movie_title={title}.").unwrap();
        assert_eq!(t.sentences("Hunt for Red October, The"), vec!["The Hunt for Red October."]);
        assert_eq!(t.sentences("Mars Attacks!"), vec!["Mars Attacks!"]);
        assert_eq!(t.sentences("unkonwn"), Vec::<String>::new());
        let y = FieldSpec::parse("release_year=Released in {year}.").unwrap();
        assert_eq!(y.sentences("1995"), vec!["Released in 1995."]);
        assert!(y.sentences("Land Before Time").is_empty());
        let g = FieldSpec::parse("class=Genres: {list}.").unwrap();
        assert_eq!(g.sentences("Animation Children's Comedy"), vec!["Genres: Animation, Children's, Comedy."]);
        assert!(g.sentences("unknown").is_empty());
        assert!(FieldSpec::parse("x=no placeholder").is_err());
        assert!(FieldSpec::parse("x={} and {list}").is_err());
    }

    #[test]
    fn sentence_boundaries() {
        assert_eq!(split_sentences("Great coffee. Dark roast! Would buy again?"), vec!["Great coffee.", "Dark roast!", "Would buy again?"]);
        assert_eq!(split_sentences("Mr. Smith Goes to Washington"), vec!["Mr. Smith Goes to Washington"]);
        assert_eq!(split_sentences("Edward D. Wood Jr. was here. Then 2 more."), vec!["Edward D. Wood Jr. was here.", "Then 2 more."]);
        assert_eq!(split_sentences("version 3.14 is out. and lower case"), vec!["version 3.14 is out. and lower case"]);
        assert_eq!(split_sentences("  "), Vec::<String>::new());
        assert_eq!(split_sentences("He said \"Stop!\" Then left."), vec!["He said \"Stop!\"", "Then left."]);
    }
}
