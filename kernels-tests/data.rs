//! Tests of the data layer: atomic-file parsing, dataset building, item features, the
//! leave-one-out split, batches, metrics and the synthetic generator.
//!
//! Small hand-made inputs live in `kernels-tests/data/`; feature files (binary) are written by the
//! tests into temporary directories. The real datasets in `../shared/data/` are loaded when present.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use msm4sr::data::metrics::{rank_batch, rank_of_target, rank_of_target_masked, table, Metrics, RankAccumulator};
use msm4sr::data::synth::{self, SynthConfig};
use msm4sr::data::{
    batches, item_dropout, make_batch, parse_inter, parse_timestamp, read_inter, Dataset, Interaction, LoadOptions, MissingFeatures,
    Modality, Sample, PAD_TOKEN,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/data").join(rel)
}

fn opts(min_user_inter: usize) -> LoadOptions {
    LoadOptions { min_user_inter, ..LoadOptions::default() }
}

/// A fresh, empty temporary directory for one test, removed when dropped.
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("msm4sr-data-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn err_msg<T: std::fmt::Debug>(r: msm4sr::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
    }
}

fn s(user: u32, seq: &[u32], target: u32) -> Sample {
    Sample { user, seq: seq.to_vec(), target }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

#[test]
fn parses_columns_by_name_with_extra_columns() {
    let rows = read_inter(&fixture("basic/basic.inter")).unwrap();
    assert_eq!(rows.len(), 17);
    assert_eq!(rows[0], Interaction { user: "u1".into(), item: "i30".into(), timestamp: 300.0 });
    assert_eq!(rows[16], Interaction { user: "u4".into(), item: "i70".into(), timestamp: 40.0 });
}

#[test]
fn parses_iso_and_numeric_timestamps() {
    assert_eq!(parse_timestamp("881250949"), Some(881250949.0));
    assert_eq!(parse_timestamp("1.5e3"), Some(1500.0));
    assert_eq!(parse_timestamp("1970-01-01"), Some(0.0));
    assert_eq!(parse_timestamp("2015-06-23"), Some(1435017600.0));
    assert_eq!(parse_timestamp("2015-06-22T10:00:00"), Some(1434967200.0));
    assert_eq!(parse_timestamp("2015-06-22 09:59:59"), Some(1434967199.0));
    assert_eq!(parse_timestamp("2000-02-29T13:45:07Z"), Some(951831907.0));
    assert_eq!(parse_timestamp("2000-02-29T13:45:07.25"), Some(951831907.25));
    assert_eq!(parse_timestamp("2015-06-22T10:00"), Some(1434967200.0));
    assert_eq!(parse_timestamp("1969-12-31T23:59:59"), Some(-1.0));
    assert_eq!(parse_timestamp("1900-03-01"), Some(-2203891200.0));
    for bad in [
        "",
        "nan",
        "inf",
        "2015-02-30",
        "2015-13-01",
        "2015-6-23",
        "2015-06-23T25:00:00",
        "2015-06-23x",
        "yesterday",
        "2023-02-29",
        "2015-06-23T10:00:00+02:00",
        "2015-06-23T10:00:00-05:00",
        "2015-W26-2",
    ] {
        assert_eq!(parse_timestamp(bad), None, "{bad:?} should not parse");
    }
}

#[test]
fn dates_file_orders_by_time_with_stable_ties() {
    let ds = Dataset::load(&fixture("dates"), &opts(3)).unwrap();
    assert_eq!(ds.name, "dates");
    assert_eq!(ds.user_tokens, ["a", "b"]);
    assert_eq!(ds.item_tokens, [PAD_TOKEN, "x", "y", "z", "w"]);
    // a: z (06-22 09:59:59) < y (06-22 10:00) < x (06-23) = w (same second; file order keeps x first)
    // b: y (-1 s) < x (1970-01-02) < z (2000)
    assert_eq!(ds.seqs, vec![vec![3, 2, 1, 4], vec![2, 1, 3]]);
    assert!(ds.text.is_none() && ds.image.is_none());
}

#[test]
fn crlf_bom_and_blank_lines_are_accepted() {
    let text = "\u{feff}user_id:token\titem_id:token\r\nu\ta\r\n\r\nu\tb\r\n";
    let rows = parse_inter(text, "mem.inter").unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[1].item.as_str(), rows[1].timestamp), ("b", 0.0));
}

// ---------------------------------------------------------------------------------------------
// Dataset building
// ---------------------------------------------------------------------------------------------

#[test]
fn dedupe_keep_latest_ordering_filtering_and_vocabulary() {
    let ds = Dataset::load(&fixture("basic"), &opts(4)).unwrap();
    assert_eq!(ds.name, "basic");
    // u3 has 2 interactions and is dropped; users numbered by first surviving row.
    // Row 2 (u1, i30, 300) and row 11 (u1, i30, 150) are one pair: the latest by time wins (RecBole
    // sorts by time, then keeps the last), so row 2 stays, and u1 and i30 come first.
    assert_eq!(ds.user_tokens, ["u1", "u2", "u4"]);
    assert_eq!(ds.item_tokens, [PAD_TOKEN, "i30", "i10", "i20", "i40", "i50", "i60", "i70"]);
    assert_eq!(
        ds.seqs,
        vec![
            vec![2, 3, 1, 4, 5], // u1: i10@100, i20@200, i30@300 (kept duplicate), i40@400, i50@500
            vec![4, 2, 3, 5, 1], // u2: i40@50, i10@100, i20@100 (tie, file order), i50@250, i30@300
            vec![6, 2, 3, 7],    // u4
        ]
    );
    let st = ds.stats();
    assert_eq!((st.users, st.items, st.interactions, st.min_len, st.max_len), (3, 7, 14, 4, 5));
    assert!((st.avg_len - 14.0 / 3.0).abs() < 1e-12);
    let shown = ds.to_string();
    assert_has(&shown, &["basic: 3 users, 7 items, 14 interactions", "no text", "no image"]);

    // Default minimum of 5: u4 goes, and with it i60 and i70.
    let ds5 = Dataset::load(&fixture("basic"), &LoadOptions::default()).unwrap();
    assert_eq!(ds5.user_tokens, ["u1", "u2"]);
    assert_eq!(ds5.item_tokens, [PAD_TOKEN, "i30", "i10", "i20", "i40", "i50"]);
    assert_eq!(ds5.seqs, vec![vec![2, 3, 1, 4, 5], vec![4, 2, 3, 5, 1]]);
}

/// Equal timestamps: the later row of a duplicate pair wins (a stable sort by time, then the last).
#[test]
fn duplicates_with_equal_times_keep_the_later_row() {
    let text = "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t5\nu\tb\t1\nu\tc\t2\nu\td\t3\nu\te\t4\nu\ta\t5\n";
    let rows = parse_inter(text, "mem.inter").unwrap();
    let ds = Dataset::from_interactions("mem", &rows, 5).unwrap();
    // Both a rows are at t = 5; the second (the last line) is kept, so a's position is the file's end.
    assert_eq!(ds.item_tokens, [PAD_TOKEN, "b", "c", "d", "e", "a"]);
    assert_eq!(ds.seqs, vec![vec![1, 2, 3, 4, 5]]);
}

#[test]
fn from_interactions_matches_load() {
    let rows = read_inter(&fixture("basic/basic.inter")).unwrap();
    let a = Dataset::from_interactions("basic", &rows, 4).unwrap();
    let b = Dataset::load(&fixture("basic"), &opts(4)).unwrap();
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------------
// Split and batches
// ---------------------------------------------------------------------------------------------

#[test]
fn leave_one_out_split_with_prefixes() {
    let ds = Dataset::load(&fixture("basic"), &opts(4)).unwrap();
    let sp = ds.split(50);
    // Sequences: u1 [2, 3, 1, 4, 5], u2 [4, 2, 3, 5, 1], u4 [6, 2, 3, 7].
    assert_eq!(sp.train, vec![s(0, &[2], 3), s(0, &[2, 3], 1), s(1, &[4], 2), s(1, &[4, 2], 3), s(2, &[6], 2)]);
    assert_eq!(sp.valid, vec![s(0, &[2, 3, 1], 4), s(1, &[4, 2, 3], 5), s(2, &[6, 2], 3)]);
    assert_eq!(sp.test, vec![s(0, &[2, 3, 1, 4], 5), s(1, &[4, 2, 3, 5], 1), s(2, &[6, 2, 3], 7)]);
}

#[test]
fn split_truncates_to_the_most_recent_items() {
    let ds = Dataset::load(&fixture("basic"), &opts(4)).unwrap();
    let sp = ds.split(2);
    assert_eq!(sp.train, vec![s(0, &[2], 3), s(0, &[2, 3], 1), s(1, &[4], 2), s(1, &[4, 2], 3), s(2, &[6], 2)]);
    assert_eq!(sp.valid, vec![s(0, &[3, 1], 4), s(1, &[2, 3], 5), s(2, &[6, 2], 3)]);
    assert_eq!(sp.test, vec![s(0, &[1, 4], 5), s(1, &[3, 5], 1), s(2, &[2, 3], 7)]);
    // max_len 0 is read as 1.
    assert_eq!(ds.split(0).test[0], s(0, &[4], 5));
}

#[test]
fn short_users_keep_a_training_sample_first() {
    let rows: Vec<Interaction> = [("a", "1"), ("b", "1"), ("b", "2"), ("c", "1"), ("c", "2"), ("c", "3")]
        .iter()
        .map(|(u, i)| Interaction { user: u.to_string(), item: i.to_string(), timestamp: 0.0 })
        .collect();
    let ds = Dataset::from_interactions("short", &rows, 1).unwrap();
    let sp = ds.split(50);
    // a (1 item): nothing; b (2 items): one training sample; c (3 items): training + test, no validation.
    assert_eq!(sp.train, vec![s(1, &[1], 2), s(2, &[1], 2)]);
    assert!(sp.valid.is_empty());
    assert_eq!(sp.test, vec![s(2, &[1, 2], 3)]);
}

#[test]
fn batch_padding_is_left_aligned_to_the_longest() {
    let (a, b, c) = (s(7, &[4, 5, 6], 1), s(8, &[9], 2), s(9, &[3, 2], 5));
    let bt = make_batch(&[&a, &b, &c]);
    assert_eq!((bt.b, bt.l), (3, 3));
    assert_eq!(bt.ids, vec![4, 5, 6, 9, 0, 0, 3, 2, 0]);
    assert_eq!(bt.lens, vec![3, 1, 2]);
    assert_eq!(bt.targets, vec![1, 2, 5]);
    assert_eq!(bt.users, vec![7, 8, 9]);
    let short = make_batch(&[&b, &c]);
    assert_eq!((short.l, short.ids), (2, vec![9, 0, 3, 2]));
    let empty = make_batch(&[]);
    assert_eq!((empty.b, empty.l, empty.ids.len()), (0, 0, 0));
}

#[test]
fn batches_cover_every_index_once() {
    assert_eq!(batches(7, 3, None::<&mut ChaCha8Rng>), vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
    assert_eq!(batches(0, 3, None::<&mut ChaCha8Rng>), Vec::<Vec<usize>>::new());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let b = batches(100, 32, Some(&mut rng));
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![32, 32, 32, 4]);
    let mut all: Vec<usize> = b.concat();
    assert_ne!(all, (0..100).collect::<Vec<_>>(), "shuffled");
    all.sort();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    let mut rng2 = ChaCha8Rng::seed_from_u64(1);
    assert_eq!(b, batches(100, 32, Some(&mut rng2)), "deterministic for a seed");
}

#[test]
fn item_dropout_keeps_order_and_at_least_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let seq: Vec<u32> = (1..=20).collect();
    assert_eq!(item_dropout(&seq, 0.0, &mut rng), seq);
    for _ in 0..50 {
        let out = item_dropout(&seq, 1.0, &mut rng);
        assert_eq!(out.len(), 1);
        assert!(seq.contains(&out[0]));
    }
    let mut total = 0;
    for _ in 0..200 {
        let out = item_dropout(&seq, 0.3, &mut rng);
        assert!(!out.is_empty());
        assert!(out.windows(2).all(|w| w[0] < w[1]), "order kept: {out:?}");
        total += out.len();
    }
    let kept = total as f64 / (200.0 * 20.0);
    assert!((kept - 0.7).abs() < 0.05, "kept fraction {kept}");
    assert!(item_dropout(&[], 0.5, &mut rng).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn ranks_are_pessimistic_and_skip_padding() {
    let scores = [9.0, 0.5, 0.9, 0.5, 0.1, 0.7];
    assert_eq!(rank_of_target(&scores, 1), 3); // 0.9, 0.5 (tie), 0.7; padding's 9.0 ignored
    assert_eq!(rank_of_target(&scores, 2), 0);
    assert_eq!(rank_of_target(&scores, 3), 3);
    assert_eq!(rank_of_target(&scores, 4), 4);
    assert_eq!(rank_of_target_masked(&scores, 1, &[2, 5]), 1);
    assert_eq!(rank_of_target_masked(&scores, 1, &[1, 2, 2, 0, 99]), 2, "target, padding, repeats, out of range");
    assert_eq!(rank_of_target(&[0.0, 1.0, 1.0, 1.0], 2), 2, "all tied: worst rank");
    assert_eq!(rank_of_target(&[0.0, f32::NAN, 1.0, 0.0], 2), 1, "a NaN competitor counts against the target");
    assert_eq!(rank_of_target(&[0.0, 0.5, f32::NAN, 0.0], 2), 2, "a NaN target gets the worst rank");
    assert_eq!(rank_of_target(&scores, 0), u32::MAX);
    assert_eq!(rank_of_target(&scores, 6), u32::MAX);
}

#[test]
fn recall_and_ndcg_from_ranks() {
    let ranks = [0, 3, 4, 9, 19, 20, 60];
    let m = Metrics::from_ranks(&ranks);
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    close(m.recall5, 3.0 / 7.0);
    close(m.recall10, 4.0 / 7.0);
    close(m.recall20, 5.0 / 7.0);
    close(m.ndcg5, 0.2596470521868478); // (1/log2(2) + 1/log2(5) + 1/log2(6)) / 7
    close(m.ndcg10, 0.3009420273751175);
    close(m.ndcg20, 0.3334663486175394);
    assert_eq!((m.recall50, m.ndcg50, m.users), (None, None, 7));
    let m50 = Metrics::from_ranks_with_50(&ranks);
    close(m50.recall50.unwrap(), 6.0 / 7.0);
    close(m50.ndcg50.unwrap(), 0.3655011806486216);
    close(m50.get("ndcg@10").unwrap(), m.ndcg10);

    let mut a = RankAccumulator::new();
    a.extend(&ranks[..3]);
    let mut b = RankAccumulator::new();
    b.extend(&ranks[3..]);
    a.merge(&b);
    assert_eq!(a.finish(false), m);
    assert_eq!(Metrics::from_ranks(&[]).recall20, 0.0);
}

#[test]
fn metrics_serialise_to_flat_keys() {
    let m = Metrics::from_ranks(&[0, 7]);
    let v: serde_json::Value = serde_json::to_value(m).unwrap();
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"]));
    assert_eq!(v["recall@10"], 1.0);
    assert_eq!(v["recall@5"], 0.5);
    let v50 = serde_json::to_value(Metrics::from_ranks_with_50(&[0])).unwrap();
    assert_eq!(v50.as_object().unwrap().len(), 8);
    let back: Metrics = serde_json::from_value(v).unwrap();
    assert_eq!(back.recall10, 1.0);
    let t = table(&[("SASRec", &m), ("MSM4SR", &Metrics::from_ranks_with_50(&[1]))]);
    assert_has(&t, &["model", "recall@5", "ndcg@50", "SASRec", "MSM4SR", "0.5000", "1.0000"]);
    assert_eq!(t.lines().count(), 3);
    assert_has(&m.to_string(), &["recall@5 0.5000", "ndcg@20", "(2 users)"]);
}

#[test]
fn rank_batch_uses_rows_and_history_mask() {
    let (a, b) = (s(0, &[2], 1), s(1, &[1, 3], 2));
    let bt = make_batch(&[&a, &b]);
    let scores = [
        0.0, 0.5, 0.9, 0.1, // row 0: target 1, history [2]
        0.0, 0.8, 0.4, 0.6, // row 1: target 2, history [1, 3]
    ];
    assert_eq!(rank_batch(&scores, &bt, false).unwrap(), vec![1, 2]);
    assert_eq!(rank_batch(&scores, &bt, true).unwrap(), vec![0, 0]);
    assert!(rank_batch(&scores[..7], &bt, false).is_err());
}

// ---------------------------------------------------------------------------------------------
// Bad inputs
// ---------------------------------------------------------------------------------------------

#[test]
fn bad_inter_files_name_file_and_line() {
    let m = err_msg(read_inter(&fixture("bad/columns.inter")));
    assert_has(&m, &["columns.inter:3:", "expected 3 tab-separated fields", "found 2"]);
    let m = err_msg(read_inter(&fixture("bad/noitem.inter")));
    assert_has(&m, &["noitem.inter:1:", "item_id:token", "item:token"]);
    let m = err_msg(read_inter(&fixture("bad/timestamp.inter")));
    assert_has(&m, &["timestamp.inter:5:", "`yesterday`"]);
    let m = err_msg(read_inter(&fixture("bad/baddate.inter")));
    assert_has(&m, &["baddate.inter:2:", "`2015-02-30`"]);
    let m = err_msg(read_inter(&fixture("bad/empty.inter")));
    assert_has(&m, &["empty.inter:1:", "empty file"]);
    let m = err_msg(read_inter(&fixture("bad/missing.inter")));
    assert_has(&m, &["missing.inter"]);
    let m = err_msg(parse_inter("user_id:token\titem_id:token\tuser_id:token\n", "dup.inter"));
    assert_has(&m, &["dup.inter:1:", "`user_id` 2 times"]);
    let m = err_msg(parse_inter("user_id:token\titem_id:token\n\tx\n", "blank.inter"));
    assert_has(&m, &["blank.inter:2:", "empty user_id"]);
    // A huge bad value is quoted in part, with its length.
    let long = "9".repeat(100) + "x";
    let m = err_msg(parse_inter(&format!("user_id:token\titem_id:token\ttimestamp:float\nu\ta\t{long}\n"), "long.inter"));
    assert!(m.len() < 300 && m.contains("(101 characters)"), "{m}");
    // Bytes that are not UTF-8: the line and column are named.
    let d = tmpdir("latin1");
    std::fs::write(d.join("x.inter"), b"user_id:token\titem_id:token\nu\ta\nu\tcaf\xe9\n").unwrap();
    let m = err_msg(read_inter(&d.join("x.inter")));
    assert_has(&m, &["x.inter:3:", "not UTF-8", "column 6"]);
}

#[test]
fn bad_dataset_directories() {
    let m = err_msg(Dataset::load(&fixture("bad"), &LoadOptions::default()));
    assert_has(&m, &["exactly one *.inter", "found 5", "baddate.inter", "timestamp.inter"]);
    let m = err_msg(Dataset::load(&fixture("nointer"), &LoadOptions::default()));
    assert_has(&m, &["nointer", "exactly one *.inter", "found: notes.txt"]);
    let m = err_msg(Dataset::load(&fixture("headeronly"), &LoadOptions::default()));
    assert_has(&m, &["headeronly.inter", "no interactions"]);
    let m = err_msg(Dataset::load(&fixture("basic"), &opts(6)));
    assert_has(&m, &["basic.inter", "no user is left", "fewer than 6"]);
    let m = err_msg(Dataset::load(&fixture("basic"), &LoadOptions { require_features: true, ..LoadOptions::default() }));
    assert_has(&m, &["basic", "basic.features.safetensors", "required"]);
}

// ---------------------------------------------------------------------------------------------
// Item features
// ---------------------------------------------------------------------------------------------

/// One tensor to write: name, dtype, shape, little-endian bytes.
struct T(&'static str, Dtype, Vec<usize>, Vec<u8>);

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn f16s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect()
}
fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A dataset directory: the `dates` interactions (items x y z w), `items.txt` lines and tensors.
fn feature_dir(name: &str, items: &str, tensors: &[T]) -> TmpDir {
    let d = tmpdir(name);
    std::fs::copy(fixture("dates/dates.inter"), d.join("dates.inter")).unwrap();
    std::fs::write(d.join("dates.items.txt"), items).unwrap();
    let views: Vec<(&str, TensorView)> = tensors.iter().map(|t| (t.0, TensorView::new(t.1, t.2.clone(), &t.3).unwrap())).collect();
    std::fs::write(d.join("dates.features.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    d
}

/// Items.txt order w, z, extra, y, x; text [5, 2, 2] f32, image [5, 1, 3] f16.
fn good_tensors() -> Vec<T> {
    // text row r of line k holds 10*k + r + {0.25, 0.5}
    let mut text = Vec::new();
    for k in 0..5 {
        for r in 0..2 {
            let base = (10 * k + r) as f32;
            text.extend([base + 0.25, base + 0.5]);
        }
    }
    let image: Vec<f32> = (0..15).map(|x| x as f32 * 0.5).collect();
    vec![
        T("text", Dtype::F32, vec![5, 2, 2], f32s(&text)),
        T("text_len", Dtype::I32, vec![5], i32s(&[2, 1, 2, 0, 2])),
        T("image", Dtype::F16, vec![5, 1, 3], f16s(&image)),
        T("image_len", Dtype::I32, vec![5], i32s(&[1, 1, 0, 1, 1])),
    ]
}
const GOOD_ITEMS: &str = "w\nz\nextra\ny\nx\n";

#[test]
fn features_are_aligned_to_item_indices() {
    let d = feature_dir("good", GOOD_ITEMS, &good_tensors());
    let ds = Dataset::load(&d, &LoadOptions { min_user_inter: 3, require_features: true, ..LoadOptions::default() }).unwrap();
    // Items: 1 = x (line 5), 2 = y (line 4), 3 = z (line 2), 4 = w (line 1).
    let text = ds.text.as_ref().unwrap();
    assert_eq!((text.rows, text.dim, text.len()), (2, 2, 5));
    assert_eq!(text.lens, vec![0, 2, 0, 1, 2]);
    assert_eq!(text.item(0).unwrap(), &[0.0; 4]);
    assert_eq!(text.item(1).unwrap(), &[40.25, 40.5, 41.25, 41.5]);
    assert_eq!(text.item(2).unwrap(), &[0.0; 4], "count 0: rows zeroed");
    assert_eq!(text.item(3).unwrap(), &[10.25, 10.5, 0.0, 0.0], "rows past the count are zeroed");
    assert_eq!(text.item(4).unwrap(), &[0.25, 0.5, 1.25, 1.5]);
    let image = ds.image.as_ref().unwrap();
    assert_eq!((image.rows, image.dim), (1, 3));
    assert_eq!(image.lens, vec![0, 1, 1, 1, 1]);
    assert_eq!(image.item(1).unwrap(), &[6.0, 6.5, 7.0], "f16 converted exactly");
    assert_eq!(image.item(4).unwrap(), &[0.0, 0.5, 1.0]);
    assert_eq!(image.item(0).unwrap(), &[0.0; 3]);
    assert_has(&ds.to_string(), &["text [2 x 2] for 3 items", "image [1 x 3] for 4 items"]);
}

#[test]
fn one_modality_is_enough() {
    let t = good_tensors();
    let only_image: Vec<T> = t.into_iter().filter(|t| t.0.starts_with("image")).collect();
    let d = feature_dir("onlyimage", GOOD_ITEMS, &only_image);
    let ds = Dataset::load(&d, &opts(3)).unwrap();
    assert!(ds.text.is_none());
    assert_eq!(ds.image.unwrap().lens, vec![0, 1, 1, 1, 1]);
}

fn load_err(name: &str, items: &str, tensors: Vec<T>) -> String {
    let d = feature_dir(name, items, &tensors);
    err_msg(Dataset::load(&d, &opts(3)))
}

fn replace(mut t: Vec<T>, new: T) -> Vec<T> {
    t.retain(|x| x.0 != new.0);
    t.push(new);
    t
}

#[test]
fn bad_feature_files_are_reported() {
    let m = load_err("rows", "w\nz\nextra\ny\n", good_tensors());
    assert_has(&m, &["dates.features.safetensors", "`text` has 5 item rows", "dates.items.txt has 4 lines"]);

    let m = load_err("nolen", GOOD_ITEMS, good_tensors().into_iter().filter(|t| t.0 != "text_len").collect());
    assert_has(&m, &["dates.features.safetensors", "`text_len` is missing"]);

    let m = load_err("lenshape", GOOD_ITEMS, replace(good_tensors(), T("image_len", Dtype::I32, vec![5, 1], i32s(&[1; 5]))));
    assert_has(&m, &["dates.features.safetensors", "`image_len` must have shape [5]", "[5, 1]"]);

    let m = load_err("lentype", GOOD_ITEMS, replace(good_tensors(), T("image_len", Dtype::F32, vec![5], f32s(&[1.0; 5]))));
    assert_has(&m, &["`image_len` must be int32"]);

    let m = load_err("toolong", GOOD_ITEMS, replace(good_tensors(), T("text_len", Dtype::I32, vec![5], i32s(&[2, 1, 3, 0, 2]))));
    assert_has(&m, &["dates.features.safetensors", "row 2", "item \"extra\"", "line 3", "count 3 is outside 0..=2"]);

    let m = load_err("negative", GOOD_ITEMS, replace(good_tensors(), T("text_len", Dtype::I32, vec![5], i32s(&[2, -1, 2, 0, 2]))));
    assert_has(&m, &["item \"z\"", "count -1"]);

    let m = load_err("rank", GOOD_ITEMS, replace(good_tensors(), T("image", Dtype::F32, vec![5, 3], f32s(&[0.0; 15]))));
    assert_has(&m, &["dates.features.safetensors", "`image` must have shape [N, rows, d]", "[5, 3]"]);

    let mut text = vec![0.0f32; 20];
    text[4 * 4 + 1] = f32::NAN; // line 5 = item x, sentence 0
    let m = load_err("nan", GOOD_ITEMS, replace(good_tensors(), T("text", Dtype::F32, vec![5, 2, 2], f32s(&text))));
    assert_has(&m, &["dates.features.safetensors", "item \"x\"", "non-finite", "NaN"]);
    let mut image = vec![0.0f32; 15];
    image[3] = f32::INFINITY; // line 2 = item z
    let m = load_err("inf", GOOD_ITEMS, replace(good_tensors(), T("image", Dtype::F16, vec![5, 1, 3], f16s(&image))));
    assert_has(&m, &["item \"z\"", "inf"]);
    // NaN past an item's count is ignored (those rows are zeroed).
    let mut text = vec![0.0f32; 20];
    text[4 * 3 + 2] = f32::NAN; // line 4 = item y, sentence 1, count 0
    let d = feature_dir("nanpad", GOOD_ITEMS, &replace(good_tensors(), T("text", Dtype::F32, vec![5, 2, 2], f32s(&text))));
    let ds = Dataset::load(&d, &opts(3)).unwrap();
    assert!(ds.text.unwrap().data.iter().all(|v| *v == 0.0));

    // Degenerate features: a modality whose every count is 0, and features far from unit scale.
    let m = load_err("allzero", GOOD_ITEMS, replace(good_tensors(), T("image_len", Dtype::I32, vec![5], i32s(&[0; 5]))));
    assert_has(&m, &["`image_len` is 0 for every item", "image modality has no rows"]);
    let mut text = vec![0.5f32; 20];
    text[2 * 4] = 3e30; // line 3 = item extra
    let m = load_err("huge", GOOD_ITEMS, replace(good_tensors(), T("text", Dtype::F32, vec![5, 2, 2], f32s(&text))));
    assert_has(&m, &["dates.features.safetensors", "magnitude 3e30", "item \"extra\"", "line 3", "rescale"]);

    let m = load_err("dup", "w\nz\nw\ny\nx\n", good_tensors());
    assert_has(&m, &["dates.items.txt:3:", "duplicate item token \"w\"", "line 1"]);

    let m = load_err("blank", "w\nz\n\ny\nx\n", good_tensors());
    assert_has(&m, &["dates.items.txt:3:", "empty item token"]);

    let m = load_err("dtype", GOOD_ITEMS, replace(good_tensors(), T("text", Dtype::I32, vec![5, 2, 2], i32s(&[0; 20]))));
    assert_has(&m, &["`text` must be f32 or f16"]);

    let m = load_err("none", GOOD_ITEMS, vec![T("other", Dtype::F32, vec![1], f32s(&[0.0]))]);
    assert_has(&m, &["neither `text` nor `image`", "other"]);
}

#[test]
fn items_without_features_error_or_zero() {
    // items.txt lacks y (line 4 of the good file replaced by another token).
    let d = feature_dir("missing", "w\nz\nextra\nq\nx\n", &good_tensors());
    let m = err_msg(Dataset::load(&d, &opts(3)));
    assert_has(&m, &["dates.features.safetensors", "1 item(s)", "\"y\"", "--missing-features zero"]);
    let ds =
        Dataset::load(&d, &LoadOptions { min_user_inter: 3, missing_features: MissingFeatures::Zero, ..LoadOptions::default() }).unwrap();
    let text = ds.text.unwrap();
    assert_eq!(text.lens, vec![0, 2, 0, 1, 2]);
    assert_eq!(ds.image.unwrap().lens, vec![0, 1, 0, 1, 1], "y (item 2) has zero rows and count 0");
}

#[test]
fn half_a_feature_pair_is_an_error() {
    let d = feature_dir("noitems", GOOD_ITEMS, &good_tensors());
    std::fs::remove_file(d.join("dates.items.txt")).unwrap();
    let m = err_msg(Dataset::load(&d, &opts(3)));
    assert_has(&m, &["dates.features.safetensors", "dates.items.txt is missing"]);
    let d = feature_dir("nofeatures", GOOD_ITEMS, &good_tensors());
    std::fs::remove_file(d.join("dates.features.safetensors")).unwrap();
    let m = err_msg(Dataset::load(&d, &opts(3)));
    assert_has(&m, &["dates.items.txt", "dates.features.safetensors is missing"]);
    let d = feature_dir("garbage", GOOD_ITEMS, &good_tensors());
    std::fs::write(d.join("dates.features.safetensors"), b"not safetensors").unwrap();
    let m = err_msg(Dataset::load(&d, &opts(3)));
    assert_has(&m, &["dates.features.safetensors", "not a valid safetensors file"]);
}

// ---------------------------------------------------------------------------------------------
// Synthetic data
// ---------------------------------------------------------------------------------------------

fn small_synth(seed: u64) -> SynthConfig {
    SynthConfig { users: 120, items: 90, topics: 6, seed, ..SynthConfig::default() }
}

#[test]
fn synth_loads_back_with_features_for_every_item() {
    let d = tmpdir("synth");
    let cfg = small_synth(5);
    synth::write(&d, &cfg).unwrap();
    let ds = Dataset::load(&d, &LoadOptions { require_features: true, ..LoadOptions::default() }).unwrap();
    println!("{ds}");
    assert_eq!(ds.name, "synth");
    assert_eq!(ds.num_users(), cfg.users);
    assert!(ds.seqs.iter().all(|s| (cfg.min_len..=cfg.max_len).contains(&s.len())));
    let (text, image) = (ds.text.as_ref().unwrap(), ds.image.as_ref().unwrap());
    assert_eq!((text.rows, text.dim, image.rows, image.dim), (cfg.sentences, cfg.dim, cfg.images, cfg.dim));
    for i in 1..=ds.num_items() {
        assert!(text.lens[i] > 0 || image.lens[i] > 0, "item {i} has features");
    }
    let partial = (1..=ds.num_items()).filter(|&i| text.lens[i] > 0 && (text.lens[i] as usize) < cfg.sentences).count();
    assert!(partial > 0, "some items have fewer sentences");
    assert!(text.data.iter().chain(&image.data).all(|v| v.is_finite()));
    // No files left behind but the four.
    let mut names: Vec<String> = std::fs::read_dir(&*d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["synth.features.safetensors", "synth.inter", "synth.item", "synth.items.txt"]);
    // Every item has a name, one line each in items.txt order, and the names are distinct.
    let titles = msm4sr::app::recommend::titles(&d, "synth").unwrap();
    assert_eq!(titles.len(), cfg.items);
    assert_eq!(titles.values().collect::<std::collections::HashSet<_>>().len(), cfg.items);
    // The in-memory version agrees with the files.
    let gen = synth::generate(&cfg).unwrap();
    assert_eq!(gen.item_tokens.len(), cfg.items);
    assert_eq!(Dataset::from_interactions("synth", &gen.interactions, 5).unwrap().seqs, ds.seqs);
}

#[test]
fn synth_is_deterministic_for_a_seed() {
    let read = |d: &Path| -> Vec<Vec<u8>> {
        ["synth.inter", "synth.features.safetensors", "synth.items.txt", "synth.item"]
            .iter()
            .map(|f| std::fs::read(d.join(f)).unwrap())
            .collect()
    };
    let (a, b, c) = (tmpdir("synth-a"), tmpdir("synth-b"), tmpdir("synth-c"));
    synth::write(&a, &small_synth(9)).unwrap();
    synth::write(&b, &small_synth(9)).unwrap();
    synth::write(&c, &small_synth(10)).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a)[0], read(&c)[0]);
}

#[test]
fn synth_default_size_and_bad_configs() {
    let cfg = SynthConfig::default();
    assert_eq!((cfg.users, cfg.items, cfg.dim, cfg.sentences, cfg.images), (1000, 3000, 32, 4, 3));
    let g = synth::generate(&cfg).unwrap();
    let ds = Dataset::from_interactions("synth", &g.interactions, 5).unwrap();
    println!("default synth: {}", ds.stats());
    assert_eq!(ds.num_users(), 1000);
    // A long tail: most, not all, items are ever interacted with.
    assert!(ds.num_items() > 1000, "most items are used: {}", ds.num_items());
    let bad = SynthConfig { min_len: 2, ..SynthConfig::default() };
    assert_has(&err_msg(synth::generate(&bad)), &["synth config", "min_len"]);
    let bad = SynthConfig { sentences: 0, images: 0, ..SynthConfig::default() };
    assert_has(&err_msg(synth::generate(&bad)), &["no modality"]);
    let text_only = SynthConfig { images: 0, ..small_synth(1) };
    let g = synth::generate(&text_only).unwrap();
    assert!(g.image.is_none() && g.text.as_ref().unwrap().lens.iter().all(|l| *l > 0));
}

#[test]
fn synth_config_file_sets_some_keys_and_rejects_unknown_ones() {
    let dir = tmpdir("synth-config");
    let good = dir.join("good.toml");
    std::fs::write(&good, "items = 300\nzipf = 0.8\n").unwrap();
    let cfg = SynthConfig::from_toml_file(&good).unwrap();
    assert_eq!((cfg.items, cfg.zipf, cfg.users), (300, 0.8, SynthConfig::default().users));
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "zipff = 0.8\n").unwrap();
    assert_has(&err_msg(SynthConfig::from_toml_file(&typo)), &["typo.toml", "zipff"]);
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "noise = 1.5\n").unwrap();
    assert_has(&err_msg(SynthConfig::from_toml_file(&bad)), &["synth config", "noise"]);
}

// ---------------------------------------------------------------------------------------------
// Real data (skipped when ../shared/data is absent)
// ---------------------------------------------------------------------------------------------

fn shared_data(rel: &str) -> Option<PathBuf> {
    let base = std::env::var_os("MSM4SR_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    let p = base.join(rel);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipped: {} not found", p.display());
        None
    }
}

#[test]
fn real_ml100k_loads() {
    let Some(dir) = shared_data("ml-100k") else { return };
    let ds = Dataset::load(&dir, &LoadOptions::default()).unwrap();
    println!("{ds}");
    let st = ds.stats();
    assert_eq!((st.users, st.items, st.interactions), (943, 1682, 100_000));
    assert_eq!(st.min_len, 20);
    let sp = ds.split(50);
    assert_eq!((sp.valid.len(), sp.test.len()), (943, 943));
    assert_eq!(sp.train.len(), 100_000 - 3 * 943);
    assert!(sp.train.iter().chain(&sp.test).all(|s| !s.seq.is_empty() && s.seq.len() <= 50));
}

#[test]
fn real_pantry_loads() {
    let Some(dir) = shared_data("pantry") else { return };
    let ds = Dataset::load(&dir, &LoadOptions::default()).unwrap();
    println!("{ds}");
    let st = ds.stats();
    // 109,007 rows, 116 repeated (user, item) pairs, 21 users left with fewer than 5.
    assert_eq!((st.users, st.items, st.interactions, st.min_len), (12_587, 4_926, 108_814, 5));
    let sp = ds.split(50);
    assert_eq!(sp.test.len(), st.users);
}

/// Checks the output of `tools/ml100k_features.py` when it has been run (default `runs/ml-100k/`,
/// or `MSM4SR_ML100K_FEATURES`).
#[test]
fn ml100k_text_features_when_built() {
    let dir = std::env::var_os("MSM4SR_ML100K_FEATURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("runs/ml-100k"));
    if !dir.join("ml-100k.features.safetensors").is_file() {
        eprintln!("skipped: no features in {} (run tools/ml100k_features.py)", dir.display());
        return;
    }
    let ds = Dataset::load(&dir, &LoadOptions { require_features: true, ..LoadOptions::default() }).unwrap();
    println!("{ds}");
    let text: &Modality = ds.text.as_ref().unwrap();
    assert_eq!((text.rows, text.dim), (3, 384));
    assert!(ds.image.is_none());
    // Every movie has 3 sentences but the few with missing fields (item 267 has none at all).
    assert!(text.lens[1..].iter().all(|&l| l <= 3));
    assert!(text.lens[1..].iter().filter(|&&l| l == 3).count() > 1600);
    for i in 1..=ds.num_items() {
        let block = text.item(i).unwrap();
        for r in 0..text.lens[i] as usize {
            let norm: f32 = block[r * 384..(r + 1) * 384].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "item {i} sentence {r} has norm {norm}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw public formats (msm4sr import)
// ---------------------------------------------------------------------------------------------

fn raw_fixture(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures/raw").join(p)
}

/// The 2014 Amazon files: reviews by user then time (ties in file order), ASINs as item IDs,
/// the metadata's Python literals read with their byte escapes, HTML entities and line breaks
/// undone; the category path without its root; an item without metadata gets empty fields;
/// gzip read by its suffix.
#[test]
fn import_reads_the_amazon_2014_formats() {
    let reviews = raw_fixture("amazon2014/reviews_Office_Products_5.json");
    let meta = raw_fixture("amazon2014/meta_Office_Products.json");
    let got = msm4sr::data::raw::amazon(&reviews, Some(&meta)).unwrap();
    let (inter, items) = got.files();
    assert_eq!(
        inter,
        "user_id:token\titem_id:token\ttimestamp:float\n\
         A1TESTUSER0001\tB00000JBLU\t1011744000\n\
         A1TESTUSER0001\tB00000JBLH\t1094169600\n\
         A1TESTUSER0002\tB00000JBLU\t1293840000\n\
         A1TESTUSER0002\tB0000TESTX1\t1375574400\n\
         A1TESTUSER0002\tB00000JBLH\t1375574400\n"
    );
    assert_eq!(
        items,
        "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tdescription:token_seq\n\
         B00000JBLH\tHP 12C Financial Calculator\tHP\tOffice Electronics, Calculators, Scientific\t\
         It\u{2019}s the calculator of the 1980s & today. Reverse Polish Notation.\n\
         B00000JBLU\tTexas Instruments TI-1795 SV Standard Function Calculator\tTexas Instruments\t\
         Office Electronics, Calculators, Basic\tBig keys, a 'SuperView' display.\n\
         B0000TESTX1\t\t\t\t\n"
    );
    assert_eq!((got.items_without_meta, got.users()), (1, 2));
    // The same files gzipped give the same dataset.
    let d = tmpdir("raw-gz");
    let gz = |src: &Path, name: &str| {
        use std::io::Write;
        let p = d.join(name);
        let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::default());
        e.write_all(&std::fs::read(src).unwrap()).unwrap();
        e.finish().unwrap();
        p
    };
    let (r, m) = (gz(&reviews, "reviews.json.gz"), gz(&meta, "meta.json.gz"));
    assert_eq!(msm4sr::data::raw::amazon(&r, Some(&m)).unwrap(), got);
    // The imported item file is one featurize reads, and the .inter one the loader reads.
    std::fs::write(d.join("office.item"), &items).unwrap();
    let t = msm4sr::featurize::read_item_table(&d.join("office.item")).unwrap();
    assert_eq!(t.tokens, ["B00000JBLH", "B00000JBLU", "B0000TESTX1"]);
    let rows = parse_inter(&inter, "office.inter").unwrap();
    assert_eq!(rows.len(), 5);
}

/// Bad raw files are errors naming the file and line.
#[test]
fn import_names_the_bad_line_of_a_raw_file() {
    let d = tmpdir("raw-bad");
    let p = d.join("reviews.json");
    std::fs::write(&p, "{\"reviewerID\": \"A\", \"asin\": \"B\", \"unixReviewTime\": 1}\n{\"reviewerID\": \"A\", \"asin\": \"B\"}\n")
        .unwrap();
    let m = err_msg(msm4sr::data::raw::amazon(&p, None));
    assert_has(&m, &["reviews.json:2", "unixReviewTime"]);
    std::fs::write(&p, "{\"reviewerID\": \"A\", \"asin\": \"B\", \"unixReviewTime\": 1}\nnot json\n").unwrap();
    assert_has(&err_msg(msm4sr::data::raw::amazon(&p, None)), &["reviews.json:2", "JSON"]);
    let gz = d.join("reviews.json.gz");
    std::fs::write(&gz, "plain text, not gzip").unwrap();
    assert_has(&err_msg(msm4sr::data::raw::amazon(&gz, None)), &["reviews.json.gz", "gzip"]);
    let ml = d.join("ml");
    std::fs::create_dir_all(&ml).unwrap();
    for f in ["u.genre", "u.data"] {
        std::fs::copy(raw_fixture("ml-100k").join(f), ml.join(f)).unwrap();
    }
    std::fs::write(ml.join("u.item"), "1|Toy Story (1995)|01-Jan-1995||url|0|0\n").unwrap();
    assert_has(&err_msg(msm4sr::data::raw::movielens_100k(&ml)), &["u.item:1", "24 |-separated fields, found 7"]);
}

/// GroupLens' ml-100k files become RecBole's ml-100k atomic files (the rows of
/// ../shared/data/ml-100k for these items; RecBole writes "unkonwn" for item 267's missing title
/// and year, this leaves them as given: "unknown" and empty); u.item is Latin-1.
#[test]
fn import_reads_the_movielens_100k_files() {
    let got = msm4sr::data::raw::movielens_100k(&raw_fixture("ml-100k")).unwrap();
    let (inter, items) = got.files();
    assert_eq!(
        inter,
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t302\t3\t891717742\n\
         22\t377\t1\t878887116\n244\t51\t2\t880606923\n166\t346\t1\t886397596\n298\t474\t4\t884182806\n"
    );
    assert_eq!(
        items,
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
         1\tToy Story\t1995\tAnimation Children's Comedy\n\
         2\tGoldenEye\t1995\tAction Adventure Thriller\n\
         267\tunknown\t\tunknown\n\
         1155\tRendezvous in Paris (Rendez-vous de Paris, Les)\t1995\tComedy Romance\n\
         1373\tGood Morning\t1971\tunknown\n"
    );
    // A Latin-1 title.
    let d = tmpdir("raw-latin1");
    for f in ["u.genre", "u.data"] {
        std::fs::copy(raw_fixture("ml-100k").join(f), d.join(f)).unwrap();
    }
    let mut line = b"711|".to_vec();
    line.extend_from_slice(b"\xc1 k\xf6ldum klaka (Cold Fever) (1994)|08-Mar-1996||url|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n");
    std::fs::write(d.join("u.item"), line).unwrap();
    let got = msm4sr::data::raw::movielens_100k(&d).unwrap();
    assert_eq!(got.items[0], ["711", "\u{c1} k\u{f6}ldum klaka (Cold Fever)", "1994", "Comedy"]);
}
