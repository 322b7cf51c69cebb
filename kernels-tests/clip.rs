//! CLIP on the engine (`msm4sr::model::clip`), its image preprocessing (`msm4sr::data::images`) and the images ->
//! words step of `featurize` (`msm4sr::featurize::clip_words`), against transformers.
//!
//! The fixture (kernels-tests/fixtures/clip/, written by tools/make_clip_fixtures.py) is a tiny
//! random `CLIPModel` in a Hugging Face folder (ViT-B/32 layout: 224 x 224 images, 32 x 32
//! patches; small widths; QuickGELU; the real CLIP BPE vocabulary) with float64 transformers
//! outputs of the f16-rounded weights: image embeddings of CLIPImageProcessor's pixel values of
//! generated images (PNG, JPEG, WebP; odd sizes; grey and RGBA), token ids and text embeddings of
//! a word list (punctuation, non-ASCII, truncation at 77 tokens), and each image's top-5 words.
//! The real weights are checked when `MSM4SR_CLIP_DIR` names a downloaded model.

use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;
use msm4sr::engine::Device;
use msm4sr::featurize::clip_words::top_words;
use msm4sr::model::clip::Clip;
use safetensors::SafeTensors;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures/clip")
}

struct Reference {
    json: serde_json::Value,
    bytes: Vec<u8>,
}

impl Reference {
    fn load() -> Reference {
        let json = serde_json::from_slice(&std::fs::read(dir().join("ref.json")).expect("run tools/make_clip_fixtures.py")).unwrap();
        Reference { json, bytes: std::fs::read(dir().join("ref.safetensors")).unwrap() }
    }
    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f64>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("ref.safetensors has no {name}"));
        let v: Vec<f64> = match t.dtype() {
            safetensors::Dtype::F64 => bytemuck::pod_collect_to_vec(t.data()),
            safetensors::Dtype::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(t.data()).into_iter().map(f64::from).collect(),
            d => panic!("{name}: dtype {d:?}"),
        };
        (t.shape().to_vec(), v)
    }
    fn strings(&self, key: &str) -> Vec<String> {
        self.json[key].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    }
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Every row: cosine >= 0.9999 and max abs error within `atol` of the float64 reference.
fn close(what: &str, got: &[Vec<f32>], want: &[f64], atol: f64) -> f64 {
    let d = want.len() / got.len();
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want.chunks_exact(d)).enumerate() {
        let err = g.iter().zip(w).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        let c = cosine(g, w);
        assert!(c >= 0.9999 && err <= atol, "{what} row {i}: cosine {c:.7}, max abs error {err:.2e} (allowed {atol:.0e})");
        worst = worst.max(err);
    }
    worst
}

fn towers_on(dev: Device) {
    let r = Reference::load();
    let clip = Clip::load(&dir().join("model"), dev).unwrap();
    let bar = ProgressBar::hidden();
    // Vision: transformers' own pixel values in, so this checks the tower alone.
    let images = r.strings("images");
    let pixels: Vec<Vec<f32>> =
        images.iter().map(|n| r.tensor(&format!("pixel_values.{n}")).1.into_iter().map(|v| v as f32).collect()).collect();
    let got = clip.encode_pixels(&pixels, &bar).unwrap();
    let err = close(&format!("{dev:?} image embeddings"), &got, &r.tensor("image_embeds_f64").1, 1e-4);
    eprintln!("{dev:?}: image embeddings of {} images, max abs error {err:.2e}", images.len());
    // Text: the tokenizer's ids exactly, then the tower.
    let words = r.strings("words");
    let ids = clip.tokenize(&words).unwrap();
    for (i, (got, want)) in ids.iter().zip(r.json["text_ids"].as_array().unwrap()).enumerate() {
        let want: Vec<u32> = want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(got, &want, "token ids of {:?}", words[i]);
    }
    let got = clip.encode_ids(&ids, &bar).unwrap();
    let err = close(&format!("{dev:?} text embeddings"), &got, &r.tensor("text_embeds_f64").1, 1e-4);
    eprintln!("{dev:?}: text embeddings of {} words, max abs error {err:.2e}", words.len());
    let template = r.json["template"].as_str().unwrap();
    let filled: Vec<String> = words.iter().map(|w| msm4sr::featurize::clip_words::fill(template, w)).collect();
    let got = clip.encode_texts(&filled, &bar).unwrap();
    close(&format!("{dev:?} templated text embeddings"), &got, &r.tensor("text_embeds_template").1, 1e-4);
}

#[test]
fn clip_towers_match_transformers_on_the_cpu() {
    towers_on(Device::Cpu);
}

#[test]
fn clip_towers_match_transformers_on_the_gpu() {
    towers_on(Device::Gpu);
}

/// Preprocessing equals CLIPImageProcessor's: PNG and WebP exactly (the same 8-bit pixels after
/// PIL's bicubic resampling, re-implemented), JPEG within 4 levels of 255 per value (the `image`
/// crate's JPEG decoder differs from libjpeg's by that much on the fixture; the resampling itself is
/// exact). A difference is measured in 8-bit levels of its own channel: |diff| * std[c] * 255.
#[test]
fn preprocessing_matches_clip_image_processor() {
    let r = Reference::load();
    let cfg = msm4sr::data::images::ImageProcessorConfig::load(&dir().join("model/preprocessor_config.json")).unwrap();
    let std = msm4sr::data::images::OPENAI_CLIP_STD;
    for name in r.strings("images") {
        let path = dir().join("images").join(&name);
        let got = msm4sr::data::images::preprocess_file(&path, &cfg).unwrap();
        let (shape, want) = r.tensor(&format!("pixel_values.{name}"));
        assert_eq!(shape, [3, 224, 224], "{name}");
        assert_eq!(got.len(), want.len(), "{name}");
        let levels: Vec<f64> =
            got.iter().zip(&want).enumerate().map(|(i, (&a, &b))| (a as f64 - b).abs() * std[i / (224 * 224)] * 255.0).collect();
        let max = levels.iter().copied().fold(0.0, f64::max);
        let mean = levels.iter().sum::<f64>() / levels.len() as f64;
        eprintln!("{name}: max {max:.3} levels, mean {mean:.4}");
        let bound = if name.ends_with(".jpg") { 4.0 + 1e-3 } else { 1e-3 };
        assert!(max <= bound, "{name}: max difference {max:.3} levels > {bound}");
    }
}

/// The top-5 words of each fixture image, from this crate's embeddings, equal the Python reference's, in order.
#[test]
fn top_words_match_the_reference() {
    let r = Reference::load();
    let clip = Clip::load(&dir().join("model"), Device::Cpu).unwrap();
    let bar = ProgressBar::hidden();
    let words = r.strings("words");
    let mut bank: Vec<f32> = clip.encode_texts(&words, &bar).unwrap().concat();
    let d = clip.config.projection_dim;
    for row in bank.chunks_exact_mut(d) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= n);
    }
    for name in r.strings("images") {
        let px: Vec<f32> = r.tensor(&format!("pixel_values.{name}")).1.into_iter().map(|v| v as f32).collect();
        let e = clip.encode_pixels(&[px], &bar).unwrap().remove(0);
        let want = r.json["top_words"][&name].as_array().unwrap();
        let got = top_words(&words, &bank, d, &e, want.len());
        for (k, ((gw, gs), w)) in got.iter().zip(want).enumerate() {
            assert_eq!(gw, w[0].as_str().unwrap(), "{name}: word {k} (got {got:?})");
            assert!((*gs as f64 - w[1].as_f64().unwrap()).abs() < 1e-4, "{name}: cosine of word {k}");
        }
    }
}

/// With real weights (`MSM4SR_CLIP_DIR`, e.g. openai/clip-vit-base-patch32): a plain red image is
/// closest to "red" among colours, and "a photo of a cat" is closer to "a photo of a kitten" than
/// to "a photo of a truck".
#[test]
fn real_clip_weights_when_present() {
    let Some(d) = std::env::var_os("MSM4SR_CLIP_DIR") else {
        eprintln!("skipped: set MSM4SR_CLIP_DIR to a downloaded CLIP folder to run it");
        return;
    };
    let clip = Clip::load(Path::new(&d), Device::Cpu).unwrap();
    let bar = ProgressBar::hidden();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(300, 240, image::Rgb([220, 20, 30])));
    let e = clip.encode_pixels(&[msm4sr::data::images::preprocess(&img, &clip.processor)], &bar).unwrap().remove(0);
    let colours: Vec<String> = ["red", "green", "blue", "yellow", "black", "white"].map(String::from).to_vec();
    let mut bank: Vec<f32> = clip.encode_texts(&colours, &bar).unwrap().concat();
    let dd = clip.config.projection_dim;
    for row in bank.chunks_exact_mut(dd) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= n);
    }
    let top = top_words(&colours, &bank, dd, &e, 3);
    assert_eq!(top[0].0, "red", "{top:?}");
    let t = clip.encode_texts(&["a photo of a cat".into(), "a photo of a kitten".into(), "a photo of a truck".into()], &bar).unwrap();
    let cos = |a: &[f32], b: &[f32]| cosine(a, &b.iter().map(|&v| v as f64).collect::<Vec<_>>());
    assert!(cos(&t[0], &t[1]) > cos(&t[0], &t[2]));
}

/// Generated images of a handful of items -> `featurize --images --clip` (the fixture model) ->
/// `train --data`: the image rows are the CLIP words' sentences, a corrupt image is reported and
/// skipped, an item without images gets image_len 0, and the dataset trains.
#[test]
fn images_to_words_to_training_end_to_end() {
    let root = std::env::temp_dir().join(format!("msm4sr-clip-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let imgs = root.join("images");
    std::fs::create_dir_all(&imgs).unwrap();
    let items = ["i1", "i2", "i3", "i4", "i5", "i6"];
    let mut item_file = String::from("item_id:token\ttitle:token_seq\n");
    let titles = ["blue stapler", "red pen", "office paper", "blue pen", "paper stapler", "red office chair"];
    for (i, (it, t)) in items.iter().zip(titles).enumerate() {
        item_file += &format!("{it}\t{t}\n");
        if i == 5 {
            continue; // no image
        }
        for k in 0..(1 + i % 2) {
            let img = image::RgbImage::from_fn(120 + 17 * i as u32, 90 + 11 * k as u32, |x, y| {
                image::Rgb([(x * 3 + 40 * i as u32) as u8, (y * 2 + 60 * k as u32) as u8, ((x + y) * (i as u32 + 1)) as u8])
            });
            let name = if k == 0 { format!("{it}.png") } else { format!("{it}_{k}.png") };
            img.save(imgs.join(name)).unwrap();
        }
    }
    std::fs::write(imgs.join("i3_1.jpg"), b"not a jpeg at all").unwrap();
    let data = root.join("raw");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("toy.item"), item_file).unwrap();
    let mut inter = String::from("user_id:token\titem_id:token\ttimestamp:float\n");
    for u in 0..12 {
        for s in 0..6 {
            inter += &format!("u{u}\t{}\t{}\n", items[(u + s * if u % 2 == 0 { 1 } else { 5 }) % 6], s);
        }
    }
    std::fs::write(data.join("toy.inter"), inter).unwrap();
    let bert = root.join("bert");
    std::fs::create_dir_all(&bert).unwrap();
    let fx = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures");
    for (src, dst) in [
        ("bert_tiny_model.safetensors", "model.safetensors"),
        ("bert_tiny_tokenizer.json", "tokenizer.json"),
        ("bert_tiny_config.json", "config.json"),
    ] {
        std::fs::copy(fx.join(src), bert.join(dst)).unwrap();
    }
    let out = root.join("ds");
    let bin = env!("CARGO_BIN_EXE_msm4sr");
    let featurize = |extra: &[&str]| {
        Command::new(bin)
            .args(["--device", "cpu", "featurize"])
            .args(extra)
            .arg("--items")
            .arg(data.join("toy.item"))
            .arg("--out")
            .arg(&out)
            .arg("--model-dir")
            .arg(&bert)
            .arg("--images")
            .arg(&imgs)
            .arg("--clip")
            .arg(dir().join("model"))
            .args(["--top-n", "3", "--json"])
            .output()
            .unwrap()
    };
    let run = featurize(&[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(s["images"], 7, "eight files, one of them corrupt: {s}");
    assert_eq!(s["images_skipped"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(s["images_skipped"][0]["item"], "i3");
    assert_eq!(s["clip_dictionary"], 6, "blue office paper pen red stapler: the title words of 2 or more items: {s}");
    let words = std::fs::read_to_string(out.join("toy.image_words.tsv")).unwrap();
    assert_eq!(words.lines().count(), 7, "{words}");
    for line in words.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{line}");
        assert_eq!(cols[1].split(' ').count(), 3, "{line}");
        assert_eq!(cols[2].split(' ').count(), 3, "{line}");
    }
    let f = msm4sr::data::read_features(&out.join("toy.features.safetensors"), &out.join("toy.items.txt")).unwrap();
    assert_eq!(f.image.unwrap().lens, [1, 2, 1, 2, 1, 0]);
    // A second run reads the word embeddings from the cache.
    let again = featurize(&["--overwrite"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let s2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(s2["clip_words_cached"], true);
    assert_eq!(std::fs::read_to_string(out.join("toy.image_words.tsv")).unwrap(), words);
    let train = Command::new(bin)
        .args(["--device", "cpu", "train", "--data"])
        .arg(&out)
        .args(["--model", "msm4sr", "--hidden", "16", "--inner", "32", "--experts", "2", "--batch", "16", "--pretrain-batch", "16"])
        .args(["--epochs", "1", "--pretrain-epochs", "1", "--json", "--run-dir"])
        .arg(root.join("run"))
        .output()
        .unwrap();
    assert!(train.status.success(), "{}", String::from_utf8_lossy(&train.stderr));
    let v: serde_json::Value = serde_json::from_slice(&train.stdout).unwrap();
    assert!(v["test"]["recall@20"].as_f64().is_some(), "{v}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A second layout read from config.json: 16-pixel patches (196 + class token, as ViT-B/16) and
/// GELU in the vision tower (fixture by tools/make_clip_b16_fixture.py), against transformers.
#[test]
fn clip_b16_layout_with_gelu_matches_transformers() {
    let r = Reference::load();
    let tmp = std::env::temp_dir().join(format!("msm4sr-clip-b16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(dir().join("model-b16").join(f), tmp.join(f)).unwrap();
    }
    std::fs::copy(dir().join("model/tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
    let want = {
        let bytes = std::fs::read(dir().join("ref_b16.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        bytemuck::pod_collect_to_vec::<u8, f64>(st.tensor("image_embeds_f64").unwrap().data())
    };
    let pixels: Vec<Vec<f32>> =
        r.strings("images").iter().map(|n| r.tensor(&format!("pixel_values.{n}")).1.into_iter().map(|v| v as f32).collect()).collect();
    for dev in [Device::Cpu, Device::Gpu] {
        let clip = Clip::load(&tmp, dev).unwrap();
        assert_eq!((clip.config.patch_size, clip.config.patches(), clip.config.vision.act.as_str()), (16, 196, "gelu"));
        let got = clip.encode_pixels(&pixels, &ProgressBar::hidden()).unwrap();
        let err = close(&format!("{dev:?} ViT-B/16-layout image embeddings"), &got, &want, 1e-4);
        eprintln!("{dev:?}: B/16 layout, max abs error {err:.2e}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
