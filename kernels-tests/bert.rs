//! Sentence-BERT on the engine (`msm4sr::model::bert`) and the `featurize` pipeline.
//!
//! - A tiny random BERT (2 layers, hidden 32, 4 heads, 48 positions; fixtures written by
//!   tools/make_bert_fixtures.py) must give PyTorch's (float64) token ids and sentence vectors on the
//!   CPU backend and on the GPU.
//! - The real all-MiniLM-L6-v2 must match sentence-transformers (cosine >= 0.9999 for each of 30
//!   sentences, CPU and GPU) when `models/all-MiniLM-L6-v2/` exists (tools/get_minilm.sh); the
//!   test says it skipped otherwise. `MSM4SR_MINILM=DIR` points it at another folder.
//! - `featurize` on a hand-made `.item` file writes features that `data::read_features` accepts,
//!   and bad inputs give errors that name the file, line, field or missing model.

use std::path::{Path, PathBuf};

use msm4sr::data::read_features;
use msm4sr::engine::Device;
use msm4sr::featurize::{self, FeaturizeOptions};
use msm4sr::model::bert::SentenceEncoder;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("msm4sr-bert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The tiny model's fixture files laid out as a model folder.
fn tiny_model_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    for (src, dst) in [
        ("bert_tiny_model.safetensors", "model.safetensors"),
        ("bert_tiny_tokenizer.json", "tokenizer.json"),
        ("bert_tiny_config.json", "config.json"),
    ] {
        std::fs::copy(fixtures().join(src), d.join(dst)).unwrap();
    }
    d
}

struct Reference {
    sentences: Vec<String>,
    ids: Vec<Vec<u32>>,
    /// (count, dim) row-major.
    emb: Vec<f32>,
    dim: usize,
}

fn read_st(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e} (run tools/make_bert_fixtures.py)", path.display()))
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), bytemuck::pod_collect_to_vec(t.data()))
}

fn minilm_json() -> (Vec<String>, Vec<Vec<u32>>) {
    let v: serde_json::Value = serde_json::from_slice(&read_st(&fixtures().join("bert_minilm_ref.json"))).unwrap();
    let sentences = v["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let ids =
        v["ids"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()).collect();
    (sentences, ids)
}

fn tiny_reference() -> Reference {
    let (sentences, _) = minilm_json();
    let bytes = read_st(&fixtures().join("bert_tiny_ref.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, emb) = f32s(&st, "embeddings");
    let flat: Vec<i32> = bytemuck::pod_collect_to_vec(st.tensor("ids").unwrap().data());
    let lens: Vec<i32> = bytemuck::pod_collect_to_vec(st.tensor("ids_len").unwrap().data());
    let mut ids = Vec::new();
    let mut at = 0;
    for &n in &lens {
        ids.push(flat[at..at + n as usize].iter().map(|&i| i as u32).collect());
        at += n as usize;
    }
    assert_eq!(sentences.len(), shape[0]);
    Reference { sentences, ids, emb, dim: shape[1] }
}

fn minilm_reference() -> Reference {
    let (sentences, ids) = minilm_json();
    let bytes = read_st(&fixtures().join("bert_minilm_ref.safetensors"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (shape, emb) = f32s(&st, "embeddings");
    assert_eq!(sentences.len(), shape[0]);
    Reference { sentences, ids, emb, dim: shape[1] }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Encode the reference sentences and compare: ids exactly, cosine >= `min_cos` per sentence and,
/// when `atol` is given, every element within it.
fn check(enc: &SentenceEncoder, r: &Reference, min_cos: f64, atol: Option<f32>, what: &str) {
    let ids = enc.tokenize(&r.sentences).unwrap();
    for (i, (got, want)) in ids.iter().zip(&r.ids).enumerate() {
        assert_eq!(got, want, "{what}: token ids of sentence {i} {:?}", r.sentences[i]);
    }
    let t0 = std::time::Instant::now();
    let got = enc.encode(&r.sentences).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let mut worst = (f64::INFINITY, 0.0f32);
    for (i, g) in got.iter().enumerate() {
        let want = &r.emb[i * r.dim..(i + 1) * r.dim];
        assert_eq!(g.len(), r.dim, "{what}: vector size");
        let c = cosine(g, want);
        let diff = g.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        worst = (worst.0.min(c), worst.1.max(diff));
        assert!(c >= min_cos, "{what}: sentence {i} {:?}: cosine {c:.6} < {min_cos}", r.sentences[i]);
        if let Some(tol) = atol {
            assert!(diff <= tol, "{what}: sentence {i} {:?}: max abs difference {diff:.3e} > {tol:.0e}", r.sentences[i]);
        }
    }
    eprintln!("{what}: {} sentences in {secs:.2}s, min cosine {:.7}, max abs diff {:.2e}", got.len(), worst.0, worst.1);
}

fn tiny_on(dev: Device) {
    let dir = tiny_model_dir(&format!("tiny-{dev:?}"));
    let mut enc = SentenceEncoder::load(&dir, dev).unwrap();
    assert_eq!((enc.config.layers, enc.config.hidden, enc.config.heads, enc.config.intermediate), (2, 32, 4, 64));
    assert_eq!(enc.max_tokens, 48, "truncation at the model's 48 positions");
    // Batches of 7 mix lengths, so padding and the key mask matter.
    enc.batch = 7;
    check(&enc, &tiny_reference(), 0.9999, Some(1e-4), &format!("tiny BERT on {dev:?}"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tiny_bert_matches_pytorch_cpu() {
    tiny_on(Device::Cpu);
}

#[test]
fn tiny_bert_matches_pytorch_gpu() {
    tiny_on(Device::Gpu);
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = std::env::var_os("MSM4SR_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"));
    if !dir.join("model.safetensors").is_file() {
        eprintln!("skipped: {} has no model.safetensors (run tools/get_minilm.sh)", dir.display());
        return;
    }
    let r = minilm_reference();
    for dev in [Device::Cpu, Device::Gpu] {
        let mut enc = SentenceEncoder::load(&dir, dev).unwrap();
        assert_eq!((enc.config.layers, enc.config.hidden, enc.config.heads, enc.config.intermediate), (6, 384, 12, 1536));
        assert_eq!(enc.max_tokens, 256);
        enc.batch = 8;
        check(&enc, &r, 0.9999, None, &format!("all-MiniLM-L6-v2 on {dev:?}"));
    }
}

const ITEM: &str = "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\tdescription:token_seq\n\
a1\tHunt for Red October, The\t1990\tAction Thriller\tA submarine defects. The chase is on!\n\
b2\tMars Attacks!\tunknown\tComedy\t\n\
c3\tunkonwn\tunkonwn\tunknown\t\n\
\n\
d4\tToy Story\t1995\tAnimation Children's Comedy\tToys come alive. Friends fight. Friends make up. Everyone is happy.\n";

fn small_dataset(name: &str) -> (PathBuf, PathBuf) {
    let d = tmp(name);
    std::fs::write(d.join("toy.item"), ITEM).unwrap();
    std::fs::write(d.join("toy.inter"), "user_id:token\titem_id:token\ttimestamp:float\nu1\ta1\t1\n").unwrap();
    (d.clone(), d.join("toy.item"))
}

#[test]
fn featurize_writes_readable_features() {
    let model = tiny_model_dir("feat-model");
    let (d, item) = small_dataset("feat");
    std::fs::write(d.join("toy.images.txt"), "a1\tsubmarine ocean navy\nd4\tcowboy toy\nd4\tspace ranger toy\nb2\tmartian\n\n").unwrap();
    let out = d.join("out");
    let mut opts = FeaturizeOptions::new(&item, &out);
    opts.text_fields =
        vec!["title={title}.".into(), "year=Released in {year}.".into(), "genres=Genres: {list}.".into(), "description".into()];
    opts.max_sentences = 5;
    opts.model_dir = model.clone();
    opts.batch = 3;
    opts.image_keywords = Some(d.join("toy.images.txt"));
    let s = featurize::run(&opts, Device::Cpu, true).unwrap();
    assert_eq!((s.items, s.items_with_text, s.sentences, s.sentences_dropped), (4, 3, 12, 2));
    assert_eq!((s.images, s.items_with_images, s.images_dropped), (4, 3, 0));
    assert_eq!(s.text_shape, [4, 5, 32]);
    assert_eq!(s.image_shape, Some([4, 2, 32]));
    assert_eq!(s.inter_copied.as_deref(), Some(out.join("toy.inter").as_path()));

    let f = read_features(&out.join("toy.features.safetensors"), &out.join("toy.items.txt")).unwrap();
    assert_eq!(f.tokens, ["a1", "b2", "c3", "d4"]);
    let text = f.text.unwrap();
    assert_eq!(text.lens, [5, 2, 0, 5]);
    let image = f.image.unwrap();
    assert_eq!(image.lens, [1, 1, 0, 2]);

    // The rows are the sentences' own vectors, in field order.
    let enc = SentenceEncoder::load(&model, Device::Cpu).unwrap();
    let want = enc
        .encode(&[
            "The Hunt for Red October.".into(),
            "Released in 1990.".into(),
            "Genres: Action, Thriller.".into(),
            "A submarine defects.".into(),
            "The chase is on!".into(),
            "Mars Attacks!".into(),
            "Genres: Comedy.".into(),
            "space ranger toy".into(),
        ])
        .unwrap();
    let row = |m: &msm4sr::data::Modality, i: usize, j: usize| m.item(i).unwrap()[j * m.dim..(j + 1) * m.dim].to_vec();
    for (j, w) in want[..5].iter().enumerate() {
        assert!(cosine(&row(&text, 0, j), w) > 0.99999, "item a1 sentence {j}");
    }
    assert!(cosine(&row(&text, 1, 0), &want[5]) > 0.99999 && cosine(&row(&text, 1, 1), &want[6]) > 0.99999);
    assert!(row(&text, 2, 0).iter().all(|&v| v == 0.0), "item without text is zero");
    assert!(cosine(&row(&image, 3, 1), &want[7]) > 0.99999);

    // The output directory is a dataset directory.
    let ds = msm4sr::data::Dataset::load(&out, &msm4sr::data::LoadOptions { min_user_inter: 1, ..Default::default() }).unwrap();
    assert_eq!(ds.text.as_ref().unwrap().dim, 32);
    let _ = std::fs::remove_dir_all(d);
    let _ = std::fs::remove_dir_all(model);
}

#[test]
fn featurize_errors_name_the_problem() {
    let model = tiny_model_dir("err-model");
    let (d, item) = small_dataset("err");
    let run = |opts: &FeaturizeOptions| featurize::run(opts, Device::Cpu, true).unwrap_err().to_string();

    let mut o = FeaturizeOptions::new(&item, d.join("out"));
    o.model_dir = d.join("no-such-model");
    let e = run(&o);
    assert!(e.contains("no-such-model/model.safetensors") && e.contains("tools/get_minilm.sh"), "{e}");

    o.model_dir = model.clone();
    o.text_fields = vec!["title".into(), "plot".into()];
    let e = run(&o);
    assert!(e.contains("toy.item:1") && e.contains("`plot`") && e.contains("item_id, title, year, genres, description"), "{e}");

    o.text_fields = vec!["title=no placeholder".into()];
    assert!(run(&o).contains("placeholder"));

    o.text_fields = vec!["title".into()];
    let bad = d.join("bad.item");
    std::fs::write(&bad, "item_id:token\ttitle:token_seq\nx1\tFine\nx2\ttoo\tmany\n").unwrap();
    let e = run(&FeaturizeOptions { items: bad.clone(), ..o.clone() });
    assert!(e.contains("bad.item:3") && e.contains("expected 2 tab-separated fields, found 3"), "{e}");
    std::fs::write(&bad, "item_id:token\ttitle:token_seq\nx1\tFine\nx1\tAgain\n").unwrap();
    let e = run(&FeaturizeOptions { items: bad.clone(), ..o.clone() });
    assert!(e.contains("bad.item:3") && e.contains("duplicate item \"x1\""), "{e}");
    std::fs::write(&bad, "title:token_seq\nFine\n").unwrap();
    let e = run(&FeaturizeOptions { items: bad.clone(), ..o.clone() });
    assert!(e.contains("bad.item:1") && e.contains("no item_id field"), "{e}");

    let kw = d.join("kw.txt");
    std::fs::write(&kw, "a1\tsubmarine\nzz\tunknown item\n").unwrap();
    let e = run(&FeaturizeOptions { image_keywords: Some(kw.clone()), ..o.clone() });
    assert!(e.contains("kw.txt:2") && e.contains("\"zz\""), "{e}");
    std::fs::write(&kw, "a1 submarine\n").unwrap();
    let e = run(&FeaturizeOptions { image_keywords: Some(kw.clone()), ..o.clone() });
    assert!(e.contains("kw.txt:1") && e.contains("TAB"), "{e}");
    assert!(!d.join("out").exists(), "nothing is written when the inputs are bad");
    let _ = std::fs::remove_dir_all(d);
    let _ = std::fs::remove_dir_all(model);
}

/// The Office features command (`experiments/office/features.sh`) on four items copied from
/// `office.item`: per item the title, "Brand: ...", "Categories: ...", then the description's
/// sentences, at most 10; and one keyword sentence (title words longer than 3 characters, then the
/// brand) as the image stand-in, also written to `office.image_words.tsv`.
#[test]
fn office_features_command_builds_the_stated_sentences() {
    let model = tiny_model_dir("office-model");
    let d = tmp("office");
    let out = d.join("out");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments/office/features.sh");
    let items = fixtures().join("office/office.item");
    let run = std::process::Command::new("bash")
        .arg(&script)
        .arg(&items)
        .arg(&out)
        .args(["--model-dir", model.to_str().unwrap(), "--json"])
        .env("BIN", env!("CARGO_BIN_EXE_msm4sr"))
        .env("DEVICE", "cpu")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(s["image_stand_in"], "title>3,brand");
    assert_eq!(s["text_len_histogram"], serde_json::json!([0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 2]), "{s}");

    let f = read_features(&out.join("office.features.safetensors"), &out.join("office.items.txt")).unwrap();
    assert_eq!(f.tokens, ["B00000JBLH", "B00000JBLU", "B00000K3T0", "B00004Z5QO"]);
    let (text, image) = (f.text.unwrap(), f.image.unwrap());
    // HP: 3 field sentences + the first 7 of the description's; TI: its description is one sentence
    // (no space after its periods); Canon: no brand, 8 description sentences; Avery: no description.
    assert_eq!(text.lens, [10, 4, 10, 3]);
    assert_eq!(image.lens, [1, 1, 1, 1]);
    let words = std::fs::read_to_string(out.join("office.image_words.tsv")).unwrap();
    assert_eq!(
        words,
        "B00000JBLH\tFinancial Calculator HP\n\
         B00000JBLU\tTexas Instruments TI-1795 Standard Function Calculator Texas Instruments\n\
         B00000K3T0\tCanon LS-85H Portable Display Calculator\n\
         B00004Z5QO\tAvery Easy Peel Return Address Labels Inkjet Printers Inches White Pack 2000 08167 Avery\n"
    );

    // The rows are these sentences' own vectors, in this order.
    let enc = SentenceEncoder::load(&model, Device::Cpu).unwrap();
    let row = |m: &msm4sr::data::Modality, i: usize, j: usize| m.item(i).unwrap()[j * m.dim..(j + 1) * m.dim].to_vec();
    let expect = |m: &msm4sr::data::Modality, i: usize, sentences: &[&str]| {
        let want = enc.encode(&sentences.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for (j, w) in want.iter().enumerate() {
            assert!(cosine(&row(m, i, j), w) > 0.99999, "item {i} row {j}: {:?}", sentences[j]);
        }
    };
    expect(
        &text,
        0,
        &[
            "HP 12C Financial Calculator",
            "Brand: HP.",
            "Categories: Office Electronics, Calculators, Scientific.",
            "If you bought yourself a financial calculator during the 1980s, chances are it was this bad boy.",
        ],
    );
    expect(
        &text,
        1,
        &[
            "Texas Instruments TI-1795 SV Standard Function Calculator",
            "Brand: Texas Instruments.",
            "Categories: Office Electronics, Calculators, Basic.",
        ],
    );
    expect(&text, 2, &[
        "Canon LS-85H Portable Display Calculator",
        "Categories: Office Electronics, Calculators, Basic.",
        "The Canon LS-85H calculator does what a simple calculator is supposed to do quite handily: it easily accomplishes basic mathematical functions via a keypad with practical key size and has provision for memory calculations, working with percentages, and finding square roots.",
    ]);
    expect(
        &text,
        3,
        &[
            "Avery Easy Peel Return Address Labels for Inkjet Printers, 0.5 x 1.75 Inches, White, Pack of 2000 (08167)",
            "Brand: Avery.",
            "Categories: Office & School Supplies, Labels, Indexes & Stamps, Labels & Stickers, Printer Labels: Laser & Inkjet.",
        ],
    );
    expect(&image, 2, &["Canon LS-85H Portable Display Calculator"]);
    let _ = std::fs::remove_dir_all(d);
    let _ = std::fs::remove_dir_all(model);
}
