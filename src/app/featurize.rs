//! `msm4sr featurize`: item text (and images through CLIP words) into feature files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::runs::check_outputs;
use super::Where;
use crate::Result;

/// Embed item texts with a BERT sentence model into NAME.features.safetensors + NAME.items.txt.
#[derive(clap::Args)]
pub struct Args {
    /// RecBole atomic NAME.item file.
    #[arg(long)]
    pub items: PathBuf,
    /// Output dataset directory (NAME.inter is copied there when it sits beside the .item file).
    #[arg(long)]
    pub out: PathBuf,
    /// NAME or NAME=TEMPLATE ({} {title} {list} {year}); repeatable or comma-separated; default: every field but item_id.
    #[arg(long = "text-fields", alias = "text-field", value_name = "NAME[=TEMPLATE]", value_delimiter = ',')]
    pub text_fields: Vec<String>,
    /// Sentences kept per item (the first ones; the paper uses 10).
    #[arg(long, default_value_t = 10)]
    pub max_sentences: usize,
    /// One line per image: item token, TAB, space-separated keywords (e.g. from CLIP).
    #[arg(long)]
    pub image_keywords: Option<PathBuf>,
    /// Data without images: one keyword sentence per item as an image stand-in, from FIELD (as it is) or FIELD>N (its distinct words longer than N characters); repeatable or comma-separated, e.g. title>3,brand.
    #[arg(long = "image-words-from", value_name = "FIELD[>N]", value_delimiter = ',', conflicts_with = "image_keywords")]
    pub image_words_from: Vec<String>,
    /// Item images to turn into words with --clip: a TSV of ITEM<TAB>PATH lines, or a folder of ITEM.ext / ITEM_k.ext files (jpg, png, webp).
    #[arg(long, value_name = "TSV|DIR", conflicts_with_all = ["image_keywords", "image_words_from"], requires = "clip")]
    pub images: Option<PathBuf>,
    /// A Hugging Face CLIP model folder (config.json, model.safetensors, tokenizer.json, preprocessor_config.json).
    #[arg(long, value_name = "DIR", requires = "images")]
    pub clip: Option<PathBuf>,
    /// The words CLIP chooses from, one per line (default: the words of the text fields seen in at least 2 items).
    #[arg(long, value_name = "FILE", requires = "images")]
    pub vocab: Option<PathBuf>,
    /// Words per image (the paper's N).
    #[arg(long, default_value_t = 15)]
    pub top_n: usize,
    /// How a word is put to CLIP's text tower; {} is the word (e.g. "a photo of {}.").
    #[arg(long, default_value = "{}")]
    pub word_template: String,
    /// A BERT sentence model folder (model.safetensors, tokenizer.json, config.json); see tools/get_minilm.sh.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub model_dir: PathBuf,
    /// Sentences per batch, at most (default 64).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Replace existing feature files in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// `msm4sr featurize`.
pub fn run(args: Args, at: Where) -> Result<ExitCode> {
    let Args {
        items,
        out,
        text_fields,
        max_sentences,
        image_keywords,
        image_words_from,
        images,
        clip,
        vocab,
        top_n,
        word_template,
        model_dir,
        batch,
        json,
        overwrite,
    } = args;
    {
        let opts = crate::featurize::FeaturizeOptions {
            items,
            text_fields,
            out,
            max_sentences,
            image_keywords,
            image_words_from,
            images,
            clip,
            vocab,
            top_n,
            word_template,
            model_dir,
            batch,
        };
        let s = featurize(&opts, overwrite, json, at)?;
        if json {
            outln!("{}", serde_json::to_string_pretty(&s).unwrap());
        } else {
            outln!(
                "wrote {}: text {:?}, {} sentences; {} distinct sentences embedded (both modalities), {:.0}/s on {}, {:.1} s in all",
                s.features.display(),
                s.text_shape,
                s.sentences,
                s.distinct_sentences,
                s.sentences_per_s,
                s.device,
                s.total_seconds
            );
            let hist: Vec<String> = s.text_len_histogram.iter().enumerate().map(|(k, n)| format!("{k}:{n}")).collect();
            outln!("sentences per item: mean {:.2}; items by count {}", s.sentences_per_item, hist.join(" "));
            if let Some(shape) = s.image_shape {
                let what = match (&s.image_stand_in, s.clip_images_per_s) {
                    (Some(spec), _) => format!("a keyword stand-in from {spec}, not image content"),
                    (None, Some(ips)) => format!(
                        "CLIP words of {} images ({:.1} images/s; dictionary of {} words{}), {} images skipped",
                        s.images,
                        ips,
                        s.clip_dictionary.unwrap_or(0),
                        if s.clip_words_cached == Some(true) { ", from the cache" } else { "" },
                        s.images_skipped.len()
                    ),
                    (None, None) => "image keywords".to_string(),
                };
                outln!("image {shape:?}: {} of {} items, {what}", s.items_with_images, s.items);
            }
            if let Some(p) = &s.image_words {
                outln!("keyword lines: {}", p.display());
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `featurize`: its outputs checked (not an input, not an earlier dataset's unless `overwrite`)
/// before the sentence model is loaded, then [`crate::featurize::run`].
pub fn featurize(opts: &crate::featurize::FeaturizeOptions, overwrite: bool, quiet: bool, at: Where) -> Result<crate::featurize::Summary> {
    let name = opts.items.file_stem().and_then(|n| n.to_str()).unwrap_or("items").to_string();
    let mut files = vec![opts.out.join(format!("{name}.features.safetensors")), opts.out.join(format!("{name}.items.txt"))];
    if !opts.image_words_from.is_empty() || opts.images.is_some() {
        files.push(opts.out.join(format!("{name}.image_words.tsv")));
    }
    let mut inputs: Vec<(&str, &Path)> = vec![("--items", &opts.items), ("--model-dir", &opts.model_dir)];
    inputs.extend(opts.image_keywords.as_deref().map(|k| ("--image-keywords", k)));
    inputs.extend(opts.images.as_deref().map(|k| ("--images", k)));
    inputs.extend(opts.clip.as_deref().map(|k| ("--clip", k)));
    inputs.extend(opts.vocab.as_deref().map(|k| ("--vocab", k)));
    check_outputs(&files, &inputs, overwrite, "pass --overwrite to replace it")?;
    let (dev, desc) = at.resolve()?;
    eprintln!("device: {desc}");
    crate::featurize::run(opts, dev, quiet)
}
