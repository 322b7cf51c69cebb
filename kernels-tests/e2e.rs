//! End to end on a tiny synthetic dataset: training lowers the loss, checkpoints round-trip,
//! `--resume` continues exactly where an interrupted run stopped, the CPU and GPU backends give the
//! same losses (dropout, item dropout and mixup on), GPU ranking equals CPU ranking, and the CLI
//! reports bad input as errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use msm4sr::app::{runs, train as train_cmd};
use msm4sr::config::ModelKind;
use msm4sr::config::RunConfig;
use msm4sr::config::Stage;
use msm4sr::data::synth::{self, SynthConfig};
use msm4sr::data::{make_batch, Dataset, LoadOptions, Sample};
use msm4sr::engine::ops::rank_of_targets;
use msm4sr::engine::optim::{Adam, AdamConfig};
use msm4sr::engine::{backward, Device, Indices, Tensor};
use msm4sr::model::msm4sr::Model;
use msm4sr::model::nn::Seeds;
use msm4sr::train::{self};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("msm4sr-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small synthetic dataset (about 120 users, 60 items).
/// Run `cmd`, send it SIGINT (Ctrl-C) once a line of its stderr contains `marker`, and return its
/// exit status and everything it wrote to stderr.
#[cfg(unix)]
fn interrupt_after(mut cmd: Command, marker: &str) -> (std::process::ExitStatus, String) {
    use std::io::{BufRead, BufReader, Read};
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen += &line;
        if line.contains(marker) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            break;
        }
    }
    reader.read_to_string(&mut seen).unwrap();
    (child.wait().unwrap(), seen)
}

fn tiny_dataset(name: &str) -> (PathBuf, Dataset) {
    let dir = tmp(name);
    let cfg = SynthConfig { users: 120, items: 60, topics: 6, min_len: 5, max_len: 12, seed: 3, ..SynthConfig::default() };
    synth::write(&dir, &cfg).unwrap();
    let ds = Dataset::load(&dir, &LoadOptions::default()).unwrap();
    (dir, ds)
}

fn small_cfg(kind: ModelKind) -> RunConfig {
    let mut c = RunConfig::default();
    c.model.model = kind;
    c.model.hidden = 16;
    c.model.inner = 32;
    c.model.experts = 3;
    c.model.max_len = 12;
    c.train.batch = 64;
    c.train.pretrain_batch = 64;
    c.train.lr = 5e-3;
    c.train.pretrain_lr = 5e-3;
    c.train.patience = 100;
    c.train.pretrain_patience = 100;
    c
}

#[test]
fn training_lowers_the_loss_and_checkpoints_round_trip() {
    let (dir, ds) = tiny_dataset("fall");
    let mut cfg = small_cfg(ModelKind::Sasrec);
    cfg.train.epochs = 6;
    let split = ds.split(cfg.model.max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let model = Model::new(cfg.model.clone(), ds.num_items(), None, None, &mut rng, Device::Cpu).unwrap();
    let out = dir.join("sasrec.safetensors");
    let s = train::fit(&model, &split, &cfg, Stage::Finetune, &ds.item_tokens, &out, false, true).unwrap();
    eprintln!("losses per epoch: {:?}", s.losses);
    assert!(s.losses.last().unwrap() < &(0.95 * s.losses[0]), "loss did not fall: {:?}", s.losses);
    // The model now holds the best epoch's weights; a model rebuilt from the checkpoint ranks the same.
    let before = train::ranks(&model, &split.test, 256, true, false).unwrap();
    let r = runs::model_from_checkpoint(&ds, &out, Device::Cpu).unwrap();
    assert_eq!((r.cfg.model.hidden, r.stage, r.with_id()), (16, Stage::Finetune, true));
    let after = train::ranks(&r.model, &split.test, 256, true, false).unwrap();
    assert_eq!(before, after);
    // A checkpoint for another item set is refused with a clear message.
    let (_, other) = {
        let d = tmp("other");
        synth::write(&d, &SynthConfig { users: 100, items: 50, min_len: 5, max_len: 10, seed: 9, ..SynthConfig::default() }).unwrap();
        let o = Dataset::load(&d, &LoadOptions::default()).unwrap();
        (d, o)
    };
    let err = runs::model_from_checkpoint(&other, &out, Device::Cpu).err().expect("must refuse");
    assert!(err.to_string().contains("different item set"), "{err}");
    // The same items in another order: said so, not "a different item set (60 items) than (60 items)".
    let mut swapped = ds.item_tokens.clone();
    swapped.swap(1, 2);
    let ck = msm4sr::train::checkpoint::load(&out).unwrap();
    let err = train::load_weights(&reloaded_model(&ds, &out), &ck, &swapped, true).expect_err("must refuse").to_string();
    assert!(err.contains("same") && err.contains("another order") && err.contains(&ds.item_tokens[1]), "{err}");
}

fn reloaded_model(ds: &Dataset, ck: &std::path::Path) -> Model {
    runs::model_from_checkpoint(ds, ck, Device::Cpu).unwrap().model
}

#[test]
fn resume_continues_exactly() {
    let (dir, ds) = tiny_dataset("resume");
    let mut cfg = small_cfg(ModelKind::Msm4sr);
    let split = ds.split(cfg.model.max_len);
    let build = || {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
        Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, Device::Cpu).unwrap()
    };
    // Uninterrupted: 3 epochs.
    cfg.train.epochs = 3;
    let a = build();
    let sa = train::fit(&a, &split, &cfg, Stage::Finetune, &ds.item_tokens, &dir.join("a.safetensors"), false, true).unwrap();
    // Interrupted after 1 epoch, then resumed to 3.
    cfg.train.epochs = 1;
    let b = build();
    train::fit(&b, &split, &cfg, Stage::Finetune, &ds.item_tokens, &dir.join("b.safetensors"), false, true).unwrap();
    cfg.train.epochs = 3;
    let b2 = build(); // a fresh process would start from fresh weights
    let sb = train::fit(&b2, &split, &cfg, Stage::Finetune, &ds.item_tokens, &dir.join("b.safetensors"), true, true).unwrap();
    assert_eq!(sb.losses.len(), 2, "resume should run only the 2 missing epochs");
    assert_eq!(&sa.losses[1..], &sb.losses[..], "resumed epochs differ from the uninterrupted run");
    for ((n, x), (_, y)) in a.params().iter().zip(b2.params()) {
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "parameter {n} differs after resume");
    }
}

/// A few optimisation steps of `stage` on `dev`; returns the losses.
fn steps(ds: &Dataset, cfg: &RunConfig, dev: Device, pretrain: bool, n: usize) -> Vec<f64> {
    steps_and_grads(ds, cfg, dev, pretrain, n).0
}

/// [`steps`], with each parameter's gradient in the last step (none for a parameter without one).
fn steps_and_grads(ds: &Dataset, cfg: &RunConfig, dev: Device, pretrain: bool, n: usize) -> (Vec<f64>, Vec<Option<Tensor>>) {
    let split = ds.split(cfg.model.max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, dev).unwrap();
    let params: Vec<Tensor> = model.params().into_iter().map(|(_, t)| t).collect();
    let mut opt = Adam::new(params.clone(), AdamConfig::default()).unwrap();
    let mut seeds = Seeds::new(5);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut out, mut last) = (Vec::new(), Vec::new());
    for k in 0..n {
        let samples: Vec<&Sample> = split.train[k * 32..(k + 1) * 32].iter().collect();
        let batch = make_batch(&samples);
        let loss = if pretrain {
            model.pretrain_loss(&batch, 0.4, &mut rng, &mut seeds).unwrap()
        } else {
            model.finetune_loss(&batch, &mut seeds).unwrap()
        };
        let grads = backward(&loss).unwrap();
        opt.step(&grads).unwrap();
        out.push(loss.to_vec_f64().unwrap()[0]);
        if k + 1 == n {
            last = params.iter().map(|p| grads.get(p).cloned()).collect();
        }
    }
    (out, last)
}

#[test]
fn cpu_and_gpu_give_the_same_losses() {
    let (_, ds) = tiny_dataset("cpugpu");
    let cfg = small_cfg(ModelKind::Msm4sr); // dropout 0.2, mixup on
    for pretrain in [true, false] {
        let c = steps(&ds, &cfg, Device::Cpu, pretrain, 4);
        let g = steps(&ds, &cfg, Device::Gpu, pretrain, 4);
        eprintln!("{} cpu {c:?}\n gpu {g:?}", if pretrain { "pre-training" } else { "fine-tuning" });
        for (a, b) in c.iter().zip(&g) {
            assert!(((a - b) / a).abs() < 1e-3, "cpu {c:?} vs gpu {g:?}");
        }
    }
}

/// Training steps give the same bits on one thread and on three: matrix products split over the
/// pool (the catalog's by columns, the tall ones by rows), elementwise and row-wise work in pieces.
/// The losses and every gradient of the last step (Adam's normalized update can absorb a last-bit
/// difference in a gradient, so the losses alone may not show one).
#[test]
fn one_thread_and_three_give_the_same_bits() {
    let dir = tmp("threads");
    let sc = SynthConfig { users: 200, items: 2000, topics: 8, min_len: 5, max_len: 20, seed: 5, ..SynthConfig::default() };
    synth::write(&dir, &sc).unwrap();
    let ds = Dataset::load(&dir, &LoadOptions::default()).unwrap();
    let mut cfg = RunConfig::default(); // hidden 64: the (32, 64) . (64, 2000) catalog products split
    cfg.model.max_len = 20;
    let on = |threads: usize, pretrain: bool| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let bits = |g: &Option<Tensor>| g.as_ref().map(|g| g.to_vec().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<u32>>());
        pool.install(|| {
            let (losses, grads) = steps_and_grads(&ds, &cfg, Device::Cpu, pretrain, 3);
            (losses.iter().map(|l| l.to_bits()).collect::<Vec<u64>>(), grads.iter().map(bits).collect::<Vec<_>>())
        })
    };
    for pretrain in [true, false] {
        let ((l1, g1), (l3, g3)) = (on(1, pretrain), on(3, pretrain));
        assert_eq!(l1, l3, "pre-training {pretrain}: losses");
        for (i, (a, b)) in g1.iter().zip(&g3).enumerate() {
            let (a, b) = (a.as_deref().unwrap_or_default(), b.as_deref().unwrap_or_default());
            let first = a.iter().zip(b).position(|(x, y)| x != y);
            assert!(a.len() == b.len() && first.is_none(), "pre-training {pretrain}: parameter {i}'s gradient differs at {first:?}");
        }
    }
}

#[test]
fn gpu_ranking_matches_cpu_ranking() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (b, n) = (37, 1001);
    // Scores on a coarse grid so that ties occur.
    let scores: Vec<f32> = (0..b * n).map(|_| (rand::Rng::random_range(&mut rng, 0..50) as f32) * 0.1).collect();
    let targets = Indices::new((0..b as u32).map(|i| (i * 27) % n as u32).collect());
    let cpu = rank_of_targets(&Tensor::from_vec(scores.clone(), &[b, n], Device::Cpu).unwrap(), &targets).unwrap();
    let gpu = rank_of_targets(&Tensor::from_vec(scores.clone(), &[b, n], Device::Gpu).unwrap(), &targets).unwrap();
    assert_eq!(cpu, gpu);
    for (r, &t) in targets.host().iter().enumerate() {
        let row = &scores[r * n..(r + 1) * n];
        let want = row.iter().enumerate().filter(|&(j, &s)| j != t as usize && s >= row[t as usize]).count() as u32;
        assert_eq!(cpu[r], want, "row {r}: ties must count against the target");
    }
}

/// The fused full-catalog ranking (two terms, three item blocks, history masks) equals
/// `metrics::rank_of_target_masked` on the materialised scores, on the CPU and the GPU. Entries
/// are small integers, so every score is exact in f32: ties are common and the devices must agree
/// to the last rank; one row's NaN scores rank its target last.
#[test]
fn fused_ranking_matches_the_materialised_ranking() {
    use msm4sr::data::metrics::rank_of_target_masked;
    use msm4sr::engine::ops::catalog::BLOCK;
    use msm4sr::engine::ops::catalog_rank;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (b, n) = (9usize, 2 * BLOCK + 33);
    let mut int = |len: usize| (0..len).map(|_| rand::Rng::random_range(&mut rng, -2..=2) as f32).collect::<Vec<f32>>();
    let (mut h1, e1, h2, e2) = (int(b * 3), int(n * 3), int(b * 2), int(n * 2));
    h1[3 * 3] = f32::NAN;
    let t: Vec<u32> = vec![0, 17, (n - 1) as u32, BLOCK as u32, 17, 600, 1, (2 * BLOCK) as u32, 5];
    let masks: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            let mut m: Vec<u32> = (0..12).map(|k| ((r * 131 + k * 97) % n) as u32).collect();
            m.extend([m[0], t[r], n as u32 + 3]); // a repeat, the target itself, out of range
            m
        })
        .collect();
    let dot = |h: &[f32], e: &[f32], d: usize, r: usize, j: usize| (0..d).map(|k| h[r * d + k] * e[j * d + k]).sum::<f32>();
    let want = |masked: bool| -> Vec<u32> {
        (0..b)
            .map(|r| {
                // Column 0 is the padding item in rank_of_target_masked's layout.
                let row: Vec<f32> =
                    std::iter::once(0.0).chain((0..n).map(|j| 0.5 * (dot(&h1, &e1, 3, r, j) + dot(&h2, &e2, 2, r, j)))).collect();
                let m: Vec<u32> = if masked { masks[r].iter().map(|&j| j + 1).collect() } else { vec![] };
                rank_of_target_masked(&row, t[r] as usize + 1, &m)
            })
            .collect()
    };
    let (want_plain, want_masked) = (want(false), want(true));
    assert!(want_masked.iter().zip(&want_plain).any(|(m, p)| m < p), "the masks must change some rank");
    assert_eq!(want_plain[3], (n - 1) as u32, "a NaN row ranks its target last");
    for dev in [Device::Cpu, Device::Gpu] {
        let up = |v: &Vec<f32>, rows: usize| Tensor::from_vec(v.clone(), &[rows, v.len() / rows], dev).unwrap();
        let (th1, te1, th2, te2) = (up(&h1, b), up(&e1, n), up(&h2, b), up(&e2, n));
        let terms = [(&th1, &te1), (&th2, &te2)];
        let targets = Indices::new(t.clone());
        assert_eq!(catalog_rank(&terms, &targets, 0.5, None).unwrap(), want_plain, "{dev:?}, no mask");
        assert_eq!(catalog_rank(&terms, &targets, 0.5, Some(&masks)).unwrap(), want_masked, "{dev:?}, history masks");
    }
}

fn msm4sr_bin(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_msm4sr")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn cli_trains_evaluates_and_reports_bad_input() {
    let (dir, _) = tiny_dataset("cli");
    let d = dir.to_str().unwrap();
    let ck = dir.join("m.safetensors");
    let ck = ck.to_str().unwrap();
    let common = ["--hidden", "16", "--inner", "32", "--experts", "2", "--batch", "128", "--max-len", "12"];
    let mut args = vec!["--device", "cpu", "train", "--data", d, "--model", "sasrec", "--epochs", "2", "--out", ck, "--json"];
    args.extend(common);
    let (ok, out, err) = msm4sr_bin(&args);
    assert!(ok, "train failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for split in ["valid", "test"] {
        for k in ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"] {
            assert!(v[split][k].is_number(), "missing {split}.{k} in {out}");
        }
    }
    assert_eq!(v["model"], "sasrec");
    assert_eq!(v["epochs"], 2);
    let ranks = dir.join("ranks.tsv");
    let (ok, out2, err) =
        msm4sr_bin(&["--device", "cpu", "evaluate", "--data", d, "--ckpt", ck, "--json", "--ranks", ranks.to_str().unwrap()]);
    assert!(ok, "evaluate failed: {err}");
    let v2: serde_json::Value = serde_json::from_str(&out2).unwrap();
    assert_eq!(v["test"], v2["test"], "evaluate must reproduce the test metrics of train");
    // The per-user ranks file: one line per validation and test user, consistent with the metrics.
    let text = std::fs::read_to_string(&ranks).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("split\tuser\ttarget\trank"));
    let (mut test_ranks, mut n_valid) = (Vec::new(), 0);
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 4, "{line}");
        assert!(f[1].starts_with('u') && f[2].starts_with('i'), "{line}");
        match f[0] {
            "valid" => n_valid += 1,
            "test" => test_ranks.push(f[3].parse::<u32>().unwrap()),
            other => panic!("unknown split {other}"),
        }
    }
    assert_eq!(n_valid, test_ranks.len());
    let recall10 = test_ranks.iter().filter(|&&r| r < 10).count() as f64 / test_ranks.len() as f64;
    assert!((recall10 - v2["test"]["recall@10"].as_f64().unwrap()).abs() < 1e-9, "ranks file disagrees with recall@10");
    let (ok, out3, err) = msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", ck, "--user", "u1", "--k", "3"]);
    assert!(ok, "recommend failed: {err}");
    assert_eq!(out3.lines().count(), 4, "{out3}");
    // Bad input: a missing directory, an unknown user, a missing adapter.
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "train", "--data", "/nonexistent/dir"]);
    assert!(!ok && err.contains("/nonexistent/dir"), "{err}");
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", ck, "--user", "nobody"]);
    assert!(!ok && err.contains("unknown user 'nobody'"), "{err}");
    let (ok, _, err) = msm4sr_bin(&["--device", "gpu", "--adapter", "no-such-adapter", "info"]);
    assert!(!ok && err.contains("no adapter matches 'no-such-adapter'"), "{err}");
}

/// Pre-training decays with `--pretrain-weight-decay` only: the fine-tuning `--weight-decay` leaves
/// a pre-training run unchanged to the last bit, and the pre-training one changes it.
#[test]
fn pretraining_has_its_own_weight_decay() {
    let (dir, ds) = tiny_dataset("wd");
    let split = ds.split(12);
    let run = |wd: f32, pwd: f32| -> Vec<Vec<f32>> {
        let mut cfg = small_cfg(ModelKind::Msm4sr);
        (cfg.train.pretrain_epochs, cfg.train.weight_decay, cfg.train.pretrain_weight_decay) = (1, wd, pwd);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
        let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, Device::Cpu).unwrap();
        let out = dir.join(format!("pre-{wd}-{pwd}.safetensors"));
        train::fit(&model, &split, &cfg, Stage::Pretrain, &ds.item_tokens, &out, false, true).unwrap();
        model.pretrain_params().iter().map(|(_, t)| t.to_vec().unwrap()).collect()
    };
    let plain = run(0.0, 0.0);
    assert!(plain == run(0.5, 0.0), "--weight-decay changed pre-training");
    assert!(plain != run(0.0, 0.5), "--pretrain-weight-decay had no effect");
}

/// RecBole's early stopping: a tie with the best validation score is an improvement (the later
/// epoch becomes the best), and a stage stops after patience + 1 epochs without one.
#[test]
fn early_stopping_counts_ties_as_improvements() {
    let mut e = train::EarlyStop::new(1);
    let steps: Vec<(bool, bool)> = [0.2, 0.2, 0.1, 0.1].iter().map(|&s| (e.update(s), e.done())).collect();
    assert_eq!(steps, [(true, false), (true, false), (false, false), (false, true)]);
    // lr 1e-20 leaves the weights as they are: every epoch ties the first, so none stops the run.
    let (dir, ds) = tiny_dataset("ties");
    let mut cfg = small_cfg(ModelKind::Sasrec);
    (cfg.train.epochs, cfg.train.patience, cfg.train.lr) = (4, 1, 1e-20);
    let split = ds.split(cfg.model.max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let model = Model::new(cfg.model.clone(), ds.num_items(), None, None, &mut rng, Device::Cpu).unwrap();
    let s = train::fit(&model, &split, &cfg, Stage::Finetune, &ds.item_tokens, &dir.join("t.safetensors"), false, true).unwrap();
    assert_eq!((s.epochs, s.best_epoch), (4, 4), "ties must count as improvements");
}

/// `--e2e` sums MSM4SR's two losses; the ID-only baselines have no pre-training loss and are refused.
#[test]
fn e2e_is_refused_for_the_baselines() {
    let (dir, _) = tiny_dataset("e2e-refused");
    for model in ["sasrec", "sasrecm"] {
        let (ok, _, err) =
            msm4sr_bin(&["--device", "cpu", "train", "--data", dir.to_str().unwrap(), "--model", model, "--e2e", "--epochs", "1"]);
        assert!(!ok && err.contains("--e2e") && err.contains(model), "--model {model} --e2e: {err}");
    }
}

/// `evaluate` on a pre-training checkpoint scores as that stage was selected: modality scores only,
/// without the (untrained) ID embeddings.
#[test]
fn evaluate_scores_a_pretraining_checkpoint_without_ids() {
    let (dir, ds) = tiny_dataset("eval-pre");
    let mut cfg = small_cfg(ModelKind::Msm4sr);
    cfg.train.pretrain_epochs = 1;
    let split = ds.split(cfg.model.max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, Device::Cpu).unwrap();
    let out = dir.join("m.pretrain.safetensors");
    train::fit(&model, &split, &cfg, Stage::Pretrain, &ds.item_tokens, &out, false, true).unwrap();
    let want = train::ranks(&model, &split.valid, 256, false, false).unwrap();
    assert_ne!(want, train::ranks(&model, &split.valid, 256, true, false).unwrap(), "the ID embeddings must change some rank here");
    let ranks = dir.join("ranks.tsv");
    let (ok, _, err) = msm4sr_bin(&[
        "--device",
        "cpu",
        "evaluate",
        "--data",
        dir.to_str().unwrap(),
        "--ckpt",
        out.to_str().unwrap(),
        "--ranks",
        ranks.to_str().unwrap(),
    ]);
    assert!(ok, "evaluate failed: {err}");
    let got: Vec<u32> = std::fs::read_to_string(&ranks)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("valid\t"))
        .map(|l| l.rsplit('\t').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, want, "evaluate must rank a pre-training checkpoint with modality scores only");
}

/// `--drop-score` changes fine-tuning's scores only: pre-training validates (and selects its epoch)
/// with both modalities, so its validation ranks are the same with and without it.
#[test]
fn drop_score_leaves_pretraining_selection_alone() {
    use msm4sr::config::Mod;
    let (dir, ds) = tiny_dataset("drop-pre");
    let split = ds.split(12);
    let run = |drop: Option<Mod>| {
        let mut cfg = small_cfg(ModelKind::Msm4sr);
        (cfg.train.pretrain_epochs, cfg.model.drop_score) = (1, drop);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
        let model = Model::new(cfg.model.clone(), ds.num_items(), ds.text.as_ref(), ds.image.as_ref(), &mut rng, Device::Cpu).unwrap();
        let out = dir.join(format!("{drop:?}.safetensors"));
        let s = train::fit(&model, &split, &cfg, Stage::Pretrain, &ds.item_tokens, &out, false, true).unwrap();
        (s.valid, train::ranks(&model, &split.valid, 256, false, false).unwrap())
    };
    let both = run(None);
    for drop in [Mod::Text, Mod::Image] {
        assert_eq!(run(Some(drop)), both, "--drop-score {drop:?} changed pre-training's validation");
    }
}

/// Every setting is range-checked before any work, in the user's terms: the flag, its value and
/// what is allowed (never an engine-level message or a silent clamp).
#[test]
fn bad_settings_are_named_before_training() {
    let (dir, _) = tiny_dataset("ranges");
    let d = dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--batch", "0"], "--batch 0"),
        (&["--lr", "-1"], "--lr -1"),
        (&["--lr", "NaN"], "--lr NaN"),
        (&["--pretrain-lr", "inf"], "--pretrain-lr inf"),
        (&["--tau", "0"], "--tau 0"),
        (&["--tau", "-1"], "--tau -1"),
        (&["--lambda", "NaN"], "--lambda NaN"),
        (&["--weight-decay", "-1"], "--weight-decay -1"),
        (&["--inner", "0"], "--inner 0"),
        (&["--max-len", "0"], "--max-len 0"),
        (&["--experts", "0"], "--experts 0"),
        (&["--hidden", "0"], "--hidden 0"),
        (&["--heads", "3"], "--heads 3"),
        (&["--dropout", "1.5"], "--dropout 1.5"),
        (&["--min-user-inter", "1"], "--min-user-inter 1"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--device", "cpu", "train", "--data", d, "--model", "sasrec", "--epochs", "1"];
        args.extend_from_slice(extra);
        let (ok, _, err) = msm4sr_bin(&args);
        assert!(!ok && err.contains(want), "{extra:?}: expected an error naming `{want}`, got: {err}");
    }
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", "x.safetensors", "--user", "u1", "--k", "0"]);
    assert!(!ok && err.contains("--k 0"), "{err}");
}

/// A config file with an unknown key or section is an error naming it and the closest valid name.
#[test]
fn config_files_reject_unknown_keys_with_a_suggestion() {
    let (dir, _) = tiny_dataset("cfg-keys");
    for (text, bad, near) in [
        ("[model]\nhiden = 32\n", "hiden", "hidden"),
        ("[modle]\nhidden = 32\n", "modle", "model"),
        ("[train]\nlearning_rate = 0.1\n", "learning_rate", ""),
    ] {
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, text).unwrap();
        let (ok, _, err) =
            msm4sr_bin(&["--device", "cpu", "train", "--data", dir.to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--print-config"]);
        assert!(!ok && err.contains(bad), "{text:?}: {err}");
        if !near.is_empty() {
            assert!(err.contains(&format!("did you mean `{near}`?")), "{text:?}: {err}");
        }
    }
}

/// Nothing the user gave is overwritten: an output onto a dataset file, a checkpoint or a
/// directory is refused before any work, and an earlier run's outputs need --resume or --overwrite.
#[test]
fn outputs_never_overwrite_inputs_or_earlier_runs() {
    let (dir, _) = tiny_dataset("no-overwrite");
    let d = dir.to_str().unwrap();
    let train = |out: &str, extra: &[&str]| {
        let mut a = vec!["--device", "cpu", "train", "--data", d, "--model", "sasrec", "--epochs", "1", "--hidden", "16", "--out", out];
        a.extend_from_slice(extra);
        msm4sr_bin(&a)
    };
    let feats = dir.join("synth.features.safetensors");
    let before = std::fs::read(&feats).unwrap();
    let (ok, _, err) = train(feats.to_str().unwrap(), &[]);
    assert!(!ok && err.contains("refusing to write") && err.contains("--data"), "{err}");
    assert_eq!(std::fs::read(&feats).unwrap(), before, "the dataset's features were touched");
    let (ok, _, err) = train(d, &[]);
    assert!(!ok && err.contains("is a directory"), "{err}");

    let ck = dir.join("out").join("m.safetensors");
    let ck = ck.to_str().unwrap();
    let (ok, _, err) = train(ck, &[]);
    assert!(ok, "first run: {err}");
    let first = std::fs::read(ck).unwrap();
    let (ok, _, err) = train(ck, &["--seed", "7"]);
    assert!(!ok && err.contains("already exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(ck).unwrap(), first, "the earlier run's checkpoint was touched");
    let (ok, _, err) = train(ck, &["--seed", "7", "--overwrite"]);
    assert!(ok, "--overwrite: {err}");

    let inter = dir.join("synth.inter");
    let inter_bytes = std::fs::read(&inter).unwrap();
    for target in [inter.to_str().unwrap(), ck] {
        let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "evaluate", "--data", d, "--ckpt", ck, "--ranks", target]);
        assert!(!ok && err.contains("refusing to write"), "--ranks {target}: {err}");
    }
    assert_eq!(std::fs::read(&inter).unwrap(), inter_bytes, "the dataset's interactions were touched");
}

/// `synth` and `featurize` check their outputs before any work: an earlier dataset is refused
/// without --overwrite (and left as it was), an input is never an output.
#[test]
fn synth_and_featurize_never_overwrite() {
    let dir = tmp("synth-no-overwrite");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let synth = |extra: &[&str]| {
        let mut a = vec!["synth", "--out", d, "--users", "40", "--items", "60"];
        a.extend_from_slice(extra);
        msm4sr_bin(&a)
    };
    let (ok, _, err) = synth(&[]);
    assert!(ok, "first synth: {err}");
    let inter = dir.join("synth.inter");
    let before = std::fs::read(&inter).unwrap();
    let (ok, _, err) = synth(&["--seed", "9"]);
    assert!(!ok && err.contains("already exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&inter).unwrap(), before, "an earlier dataset was touched");
    let (ok, _, err) = synth(&["--seed", "9", "--overwrite"]);
    assert!(ok, "--overwrite: {err}");
    assert_ne!(std::fs::read(&inter).unwrap(), before, "--overwrite --seed 9 wrote the same data");
    // A config file that is one of the outputs is refused.
    let (ok, _, err) = synth(&["--config", dir.join("synth.items.txt").to_str().unwrap(), "--overwrite"]);
    assert!(!ok, "{err}");

    // featurize: refused before the sentence model is looked for (there is none at this path).
    let items = dir.join("shop.item");
    std::fs::write(&items, "item_id:token\ttitle:token_seq\ni1\ta red hat\n").unwrap();
    let out = dir.join("feats");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("shop.items.txt"), "earlier\n").unwrap();
    let (ok, _, err) = msm4sr_bin(&[
        "--device",
        "cpu",
        "featurize",
        "--items",
        items.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--model-dir",
        dir.join("no-model").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("shop.items.txt already exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("shop.items.txt")).unwrap(), "earlier\n");
}

/// `pretrain` runs through the same checks and library call as `train`: it writes `--out`, its
/// resume state and `<stem>.config.toml`, refuses an earlier run's outputs and the baselines, and
/// reports the modality-only metrics its checkpoint gives under `evaluate`.
#[test]
fn pretrain_goes_through_the_training_path() {
    let (dir, _) = tiny_dataset("pretrain-path");
    let d = dir.to_str().unwrap();
    let ck = dir.join("out").join("p.safetensors");
    let c = ck.to_str().unwrap();
    let pre = |extra: &[&str]| {
        let mut a = vec!["--device", "cpu", "pretrain", "--data", d, "--out", c, "--hidden", "16", "--inner", "32", "--experts", "2"];
        a.extend(["--pretrain-epochs", "1", "--pretrain-batch", "64", "--json"]);
        a.extend_from_slice(extra);
        msm4sr_bin(&a)
    };
    let (ok, _, err) = pre(&["--model", "sasrec"]);
    assert!(!ok && err.contains("--model sasrec has no pre-training"), "{err}");
    let (ok, out, err) = pre(&[]);
    assert!(ok, "{err}");
    let o = dir.join("out");
    assert!(o.join("p.config.toml").is_file() && o.join("p.last.safetensors").is_file());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (ok, _, err) = pre(&[]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, ev, err) = msm4sr_bin(&["--device", "cpu", "evaluate", "--data", d, "--ckpt", c, "--json"]);
    assert!(ok, "{err}");
    let ev: serde_json::Value = serde_json::from_str(&ev).unwrap();
    assert_eq!(r["test"], ev["test"], "pretrain's reported metrics differ from its checkpoint's");
    assert_eq!(r["valid"], ev["valid"]);
}

/// A training run writes its directory: the configuration, the per-epoch log (JSON lines and CSV,
/// every stage, each loss term), the console log, the result and the per-user ranks; `evaluate`
/// takes the directory for its checkpoint.
#[test]
fn run_directory_holds_the_log_and_results() {
    let (dir, ds) = tiny_dataset("run-dir");
    let d = dir.to_str().unwrap();
    let run = tmp("run-dir-out").join("r");
    let r = run.to_str().unwrap();
    let (ok, out, err) = msm4sr_bin(&[
        "--device",
        "cpu",
        "train",
        "--data",
        d,
        "--run-dir",
        r,
        "--hidden",
        "16",
        "--inner",
        "32",
        "--experts",
        "2",
        "--batch",
        "64",
        "--pretrain-batch",
        "64",
        "--pretrain-epochs",
        "2",
        "--epochs",
        "3",
        "--patience",
        "100",
        "--json",
    ]);
    assert!(ok, "{err}");
    for f in ["model.safetensors", "model.pretrain.safetensors", "model.last.safetensors", "model.config.toml"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let result: serde_json::Value = serde_json::from_str(&out).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("model.result.json")).unwrap()).unwrap();
    assert_eq!(result, saved, "result.json differs from --json");
    let history = result["history"].as_array().unwrap();
    let records: Vec<train::EpochRecord> =
        std::fs::read_to_string(run.join("model.epochs.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 5);
    assert_eq!(history.len(), 5);
    let stages: Vec<(Stage, usize)> = records.iter().map(|r| (r.stage, r.epoch)).collect();
    assert_eq!(stages, [(Stage::Pretrain, 1), (Stage::Pretrain, 2), (Stage::Finetune, 1), (Stage::Finetune, 2), (Stage::Finetune, 3)]);
    for r in &records[..2] {
        let names: Vec<&str> = r.terms.keys().map(String::as_str).collect();
        assert_eq!(names, ["cmcl_image", "cmcl_text", "nip_image", "nip_text"]);
        let sum: f64 = r.terms.values().sum();
        assert!((sum - r.loss).abs() < 1e-4 * r.loss.abs(), "terms {sum} vs loss {}", r.loss);
    }
    assert_eq!(records[2].terms.keys().collect::<Vec<_>>(), ["ce"]);
    // The best epoch of each stage is marked, and the fine-tuning one is what valid reports.
    let best_ft = records[2..].iter().rfind(|r| r.best).unwrap();
    assert_eq!(serde_json::to_value(best_ft.valid).unwrap(), result["valid"]);
    let csv = std::fs::read_to_string(run.join("model.epochs.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "stage,epoch,loss,nip_text,nip_image,cmcl_text,cmcl_image,cmcl,ce,valid_recall@5,valid_recall@10,valid_recall@20,\
         valid_ndcg@5,valid_ndcg@10,valid_ndcg@20,best,samples_per_s,train_seconds,valid_seconds,lr"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|r| r.len() == 20));
    assert_eq!((rows[0][0], rows[0][1], rows[0][8]), ("pretrain", "1", ""));
    assert_eq!(rows[4][0..2], ["finetune", "3"]);
    assert_eq!(rows[4][2].parse::<f64>().unwrap(), records[4].loss);
    let log = std::fs::read_to_string(run.join("model.log")).unwrap();
    assert!(log.contains("Pretrain epoch   1  loss") && log.contains("Finetune epoch   3  loss"), "{log}");
    let ranks = std::fs::read_to_string(run.join("model.ranks.tsv")).unwrap();
    let split = ds.split(50);
    assert_eq!(ranks.lines().count(), 1 + split.valid.len() + split.test.len());
    // evaluate takes the run directory; --groups splits the test users by history length.
    let (ok, ev, err) = msm4sr_bin(&["--device", "cpu", "evaluate", "--data", d, "--ckpt", r, "--json", "--groups", "3"]);
    assert!(ok, "{err}");
    let ev: serde_json::Value = serde_json::from_str(&ev).unwrap();
    assert_eq!(ev["test"], result["test"]);
    let groups = ev["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3);
    assert_eq!(groups.iter().map(|g| g["users"].as_u64().unwrap() as usize).sum::<usize>(), split.test.len());
    let uppers: Vec<u64> = groups.iter().map(|g| g["upper"].as_u64().unwrap()).collect();
    assert!(uppers.windows(2).all(|w| w[0] <= w[1]), "{uppers:?}");
}

/// A run killed with SIGKILL (by the fault-injection hook: mid-epoch in pre-training and in
/// fine-tuning, and inside a checkpoint write) and then resumed gives the same validation and test
/// metrics as an uninterrupted run, and leaves no temporary file behind.
#[test]
fn resume_after_kill_gives_the_same_metrics() {
    let (dir, _) = tiny_dataset("kill");
    let d = dir.to_str().unwrap().to_string();
    let args = |out: &str| -> Vec<String> {
        let a = [
            "--device",
            "cpu",
            "train",
            "--data",
            &d,
            "--model",
            "msm4sr",
            "--hidden",
            "16",
            "--inner",
            "32",
            "--experts",
            "2",
            "--batch",
            "64",
            "--pretrain-batch",
            "64",
            "--max-len",
            "12",
            "--epochs",
            "3",
            "--pretrain-epochs",
            "2",
            "--patience",
            "100",
            "--pretrain-patience",
            "100",
            "--json",
            "--out",
            out,
        ];
        a.iter().map(|s| s.to_string()).collect()
    };
    // The metrics and the per-epoch history without its timings.
    let metrics = |stdout: &[u8]| -> (serde_json::Value, serde_json::Value, Vec<serde_json::Value>) {
        let v: serde_json::Value = serde_json::from_slice(stdout).unwrap();
        let mut h = v["history"].as_array().cloned().unwrap_or_default();
        for r in &mut h {
            for k in ["samples_per_s", "train_seconds", "valid_seconds"] {
                r.as_object_mut().unwrap().remove(k);
            }
        }
        (v["valid"].clone(), v["test"].clone(), h)
    };
    let bin = env!("CARGO_BIN_EXE_msm4sr");
    let full = Command::new(bin).args(args(dir.join("full/m.safetensors").to_str().unwrap())).output().unwrap();
    assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));
    let want = metrics(&full.stdout);
    assert_eq!(want.2.len(), 5, "2 pre-training and 3 fine-tuning epochs: {:?}", want.2);
    // About 11 steps per epoch: step 5 is in pre-training epoch 1, step 30 in fine-tuning epoch 1;
    // write 4 is pre-training epoch 2's first checkpoint.
    for fault in ["step:5", "step:30", "write:4"] {
        let out_dir = dir.join(fault.replace(':', "-"));
        let out = out_dir.join("m.safetensors");
        let killed = Command::new(bin).args(args(out.to_str().unwrap())).env("MSM4SR_FAULT", fault).output().unwrap();
        assert!(!killed.status.success(), "{fault}: the run was not killed");
        #[cfg(unix)]
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&killed.status), Some(9), "{fault}: not SIGKILL");
        let mut resume = args(out.to_str().unwrap());
        resume.push("--resume".into());
        let again = Command::new(bin).args(&resume).output().unwrap();
        assert!(again.status.success(), "{fault}: resume failed: {}", String::from_utf8_lossy(&again.stderr));
        assert_eq!(metrics(&again.stdout), want, "{fault}: resumed metrics or history differ from the uninterrupted run");
        // The run's time covers the epochs run before the kill, not only the resumed call's.
        let v: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
        let epochs: f64 = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["train_seconds"].as_f64().unwrap() + r["valid_seconds"].as_f64().unwrap())
            .sum();
        let secs = v["seconds"].as_f64().unwrap();
        assert!(secs >= epochs && epochs > 0.0, "{fault}: seconds {secs} does not cover the epochs' {epochs}");
        let log = std::fs::read_to_string(out_dir.join("m.epochs.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 5, "{fault}: the run log has other epochs than the run: {log}");
        let left: Vec<String> = std::fs::read_dir(&out_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{fault}: temporary files left: {left:?}");
    }
    // Ctrl-C (SIGINT) once the first epoch is done: the run stops after its step, exits 130 and
    // says how to continue; --resume then gives the same metrics.
    #[cfg(unix)]
    {
        let out = dir.join("sigint/m.safetensors");
        let mut cmd = Command::new(bin);
        cmd.args(args(out.to_str().unwrap()));
        let (status, seen) = interrupt_after(cmd, "Pretrain epoch   1  loss");
        assert_eq!(status.code(), Some(130), "SIGINT: {seen}");
        assert!(seen.contains("interrupted in Pretrain") && seen.contains("--resume"), "{seen}");
        let mut resume = args(out.to_str().unwrap());
        resume.push("--resume".into());
        let again = Command::new(bin).args(&resume).output().unwrap();
        assert!(again.status.success(), "SIGINT: resume failed: {}", String::from_utf8_lossy(&again.stderr));
        assert_eq!(metrics(&again.stdout), want, "SIGINT: resumed metrics differ from the uninterrupted run");
    }
}

/// Resume is exact when validation scores tie: on this dataset a later epoch ties the best
/// validation Recall@20 (24/66), which counts as an improvement only if the best score read back from
/// the resume state is the one written, bit for bit. Killed mid-run at several steps, the resumed run
/// stops at the same epoch with the same metrics and a history identical to the last bit (timings
/// aside), and the run log holds exactly its epochs.
#[test]
fn resume_is_exact_when_validation_scores_tie() {
    let dir = std::env::temp_dir().join(format!("msm4sr-e2e-{}-ties", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    let (ok, _, err) = msm4sr_bin(&["synth", "--out", data.to_str().unwrap(), "--users", "66", "--items", "300", "--seed", "3"]);
    assert!(ok, "{err}");
    let args = |run: &Path| -> Vec<String> {
        let d = data.to_str().unwrap();
        let a = ["--device", "cpu", "train", "--data", d, "--model", "sasrec", "--epochs", "25", "--patience", "3", "--batch", "64"];
        let mut a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        a.extend(["--seed", "1", "--json", "--run-dir", run.to_str().unwrap()].map(String::from));
        a
    };
    // Metrics and history with every float as its bits (the timings removed).
    let exact = |stdout: &[u8]| -> (String, String, Vec<String>) {
        let v: serde_json::Value = serde_json::from_slice(stdout).unwrap();
        let mut h = v["history"].as_array().cloned().unwrap_or_default();
        for r in &mut h {
            for k in ["samples_per_s", "train_seconds", "valid_seconds"] {
                r.as_object_mut().unwrap().remove(k);
            }
        }
        (v["valid"].to_string(), v["test"].to_string(), h.iter().map(|r| r.to_string()).collect())
    };
    let bin = env!("CARGO_BIN_EXE_msm4sr");
    let full = Command::new(bin).args(args(&dir.join("full"))).output().unwrap();
    assert!(full.status.success(), "{}", String::from_utf8_lossy(&full.stderr));
    let want = exact(&full.stdout);
    let v: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    let scores: Vec<f64> = v["history"].as_array().unwrap().iter().map(|r| r["valid"]["recall@20"].as_f64().unwrap()).collect();
    let best: Vec<bool> = v["history"].as_array().unwrap().iter().map(|r| r["best"].as_bool().unwrap()).collect();
    // The case this test is for: an epoch that ties the best so far (and so becomes the best).
    let tie = (1..scores.len()).find(|&e| best[e] && scores[..e].iter().any(|&s| s == scores[e]));
    assert!(tie.is_some(), "no tied best epoch in {scores:?} (the test needs one)");
    let tie = tie.unwrap();
    // About 4 steps per epoch: kill early, in the epoch that ties (the resume state then holds the
    // earlier best), and late.
    for step in [3, 4 * tie - 2, 4 * (scores.len() - 1) - 1] {
        let run = dir.join(format!("k{step}"));
        let killed = Command::new(bin).args(args(&run)).env("MSM4SR_FAULT", format!("step:{step}")).output().unwrap();
        assert!(!killed.status.success(), "step {step}: the run was not killed");
        let mut resume = args(&run);
        resume.push("--resume".into());
        let again = Command::new(bin).args(&resume).output().unwrap();
        assert!(again.status.success(), "step {step}: resume failed: {}", String::from_utf8_lossy(&again.stderr));
        let got = exact(&again.stdout);
        assert_eq!(got, want, "step {step}: the resumed run differs from the uninterrupted one");
        let log = std::fs::read_to_string(run.join("model.epochs.jsonl")).unwrap();
        assert_eq!(log.lines().count(), scores.len(), "step {step}: the run log has other epochs than the run");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Non-finite weights are never saved or used: a parameter that became NaN stops the run at that
/// epoch with nothing saved, and a checkpoint holding NaN is refused by evaluate and recommend.
#[test]
fn non_finite_weights_are_never_saved_or_used() {
    let (dir, ds) = tiny_dataset("nan-weights");
    let mut cfg = small_cfg(ModelKind::Sasrec);
    cfg.train.epochs = 2;
    let split = ds.split(cfg.model.max_len);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let model = Model::new(cfg.model.clone(), ds.num_items(), None, None, &mut rng, Device::Cpu).unwrap();
    // Row 0 (padding) never enters a loss: the losses stay finite while the weights do not.
    let e = model.item_emb.as_ref().unwrap();
    let mut w = e.to_vec().unwrap();
    w[0] = f32::NAN;
    e.assign(&Tensor::from_vec(w, e.shape(), Device::Cpu).unwrap()).unwrap();
    let out = dir.join("nan.safetensors");
    let err = train::fit(&model, &split, &cfg, Stage::Finetune, &ds.item_tokens, &out, false, true).expect_err("must stop");
    assert!(err.to_string().contains("item_embedding") && err.to_string().contains("epoch 1"), "{err}");
    assert!(!out.exists(), "a non-finite model was saved as best");

    // A checkpoint with a NaN: train a good one, then poison one tensor.
    let good = dir.join("good.safetensors");
    let model = Model::new(cfg.model.clone(), ds.num_items(), None, None, &mut rng, Device::Cpu).unwrap();
    cfg.train.epochs = 1;
    train::fit(&model, &split, &cfg, Stage::Finetune, &ds.item_tokens, &good, false, true).unwrap();
    let ck = msm4sr::train::checkpoint::load(&good).unwrap();
    let mut tensors = model.params();
    let (name, t) = tensors[1].clone();
    let mut v = t.to_vec().unwrap();
    v[3] = f32::INFINITY;
    tensors[1] = (name.clone(), Tensor::from_vec(v, t.shape(), Device::Cpu).unwrap());
    let bad = dir.join("bad.safetensors");
    msm4sr::train::checkpoint::save(&bad, &tensors, &ck.meta).unwrap();
    let d = dir.to_str().unwrap();
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "evaluate", "--data", d, "--ckpt", bad.to_str().unwrap()]);
    assert!(!ok && err.contains(&name) && err.contains("non-finite"), "evaluate: {err}");
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", bad.to_str().unwrap(), "--user", "u1"]);
    assert!(!ok && err.contains("non-finite"), "recommend: {err}");
}

/// `--resume` continues only the run it was: a changed setting (other than epochs, patience and the
/// evaluation batch) or other data (here the same items in another order) is an error naming it.
#[test]
fn resume_refuses_another_run() {
    let (dir, ds) = tiny_dataset("resume-guard");
    let mut cfg = small_cfg(ModelKind::Sasrec);
    cfg.train.epochs = 1;
    let split = ds.split(cfg.model.max_len);
    let build = |c: &RunConfig| {
        let mut rng = ChaCha8Rng::seed_from_u64(c.train.seed);
        Model::new(c.model.clone(), ds.num_items(), None, None, &mut rng, Device::Cpu).unwrap()
    };
    let out = dir.join("r.safetensors");
    train::fit(&build(&cfg), &split, &cfg, Stage::Finetune, &ds.item_tokens, &out, false, true).unwrap();
    type Change = (&'static str, fn(&mut RunConfig));
    let changes: [Change; 4] = [
        ("train.lr", |c| c.train.lr = 0.01),
        ("train.seed", |c| c.train.seed += 1),
        ("train.batch", |c| c.train.batch = 32),
        ("model.hidden", |c| c.model.hidden = 32),
    ];
    for (key, change) in changes {
        let mut c = cfg.clone();
        change(&mut c);
        c.train.epochs = 2;
        let err = train::fit(&build(&c), &split, &c, Stage::Finetune, &ds.item_tokens, &out, true, true).expect_err("must refuse");
        assert!(err.to_string().contains(&format!("`{key}`")), "{key}: {err}");
    }
    let mut more = cfg.clone();
    (more.train.epochs, more.train.patience, more.train.eval_batch) = (2, 5, 64);
    let mut swapped = ds.item_tokens.clone();
    swapped.swap(1, 2);
    let err = train::fit(&build(&more), &split, &more, Stage::Finetune, &swapped, &out, true, true).expect_err("must refuse");
    assert!(err.to_string().contains("other data"), "{err}");
    let s = train::fit(&build(&more), &split, &more, Stage::Finetune, &ds.item_tokens, &out, true, true).unwrap();
    assert_eq!(s.losses.len(), 1, "more epochs, patience and evaluation batch may change on resume");
}

/// A checkpoint is checked against the configuration it carries before a model is built from it:
/// sizes that disagree with its tensors (a huge `hidden`, 2^32 layers), a missing or an extra
/// tensor, no `format` or no `item_tokens` are clear errors, never an abort; and a model too large
/// for the memory is refused before it is allocated.
#[test]
fn checkpoints_are_checked_before_a_model_is_built() {
    let (dir, _) = tiny_dataset("ckpt-checks");
    let d = dir.to_str().unwrap();
    let good = dir.join("good.safetensors");
    let (ok, _, err) = msm4sr_bin(&[
        "--device",
        "cpu",
        "train",
        "--data",
        d,
        "--model",
        "sasrec",
        "--epochs",
        "1",
        "--hidden",
        "16",
        "--out",
        good.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let ck = msm4sr::train::checkpoint::load(&good).unwrap();
    let tensors = |skip: &str, add: bool| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = ck
            .tensors
            .iter()
            .filter(|(n, _)| n.as_str() != skip)
            .map(|(n, (s, x))| (n.clone(), Tensor::from_vec(x.clone(), s, Device::Cpu).unwrap()))
            .collect();
        if add {
            v.push(("transformer.extra.weight".into(), Tensor::zeros(&[2, 2], Device::Cpu).unwrap()));
        }
        v
    };
    let with_config = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut meta = ck.meta.clone();
        let mut c: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
        edit(&mut c);
        meta.insert("config".into(), c.to_string());
        meta
    };
    let without = |key: &str| {
        let mut meta = ck.meta.clone();
        meta.remove(key);
        meta
    };
    type Case = (&'static str, Vec<(String, Tensor)>, std::collections::BTreeMap<String, String>, &'static str);
    let cases: Vec<Case> = vec![
        ("hidden", tensors("", false), with_config(&|c| c["model"]["hidden"] = 1_000_000_000u64.into()), "transformer.position"),
        ("layers", tensors("", false), with_config(&|c| c["model"]["layers"] = (1u64 << 32).into()), "layers"),
        ("missing tensor", tensors("transformer.ln.weight", false), ck.meta.clone(), "transformer.ln.weight"),
        ("extra tensor", tensors("", true), ck.meta.clone(), "transformer.extra.weight"),
        ("no format", tensors("", false), without("format"), "format"),
        ("no item_tokens", tensors("", false), without("item_tokens"), "item_tokens"),
    ];
    for (what, t, meta, want) in cases {
        let bad = dir.join(format!("{}.safetensors", what.replace(' ', "-")));
        msm4sr::train::checkpoint::save(&bad, &t, &meta).unwrap();
        let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "evaluate", "--data", d, "--ckpt", bad.to_str().unwrap()]);
        assert!(!ok && err.contains("error: ") && err.contains(want), "{what}: {err}");
    }
    let big = dir.join("big.safetensors");
    let (ok, _, err) =
        msm4sr_bin(&["--device", "cpu", "train", "--data", d, "--model", "sasrec", "--hidden", "1000000", "--out", big.to_str().unwrap()]);
    assert!(!ok && err.contains("parameters") && err.contains("available"), "--hidden 1000000: {err}");
    assert!(!dir.join("big.config.toml").exists(), "the configuration of a refused run was written");
}

/// Probing GPU adapters prints nothing from the Vulkan loader: without XDG_RUNTIME_DIR its
/// window-system layers used to print four "XDG_RUNTIME_DIR is invalid" lines.
#[test]
fn info_output_is_clean_without_xdg_runtime_dir() {
    let o = Command::new(env!("CARGO_BIN_EXE_msm4sr")).arg("info").env_remove("XDG_RUNTIME_DIR").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

fn report_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures/report").join(name)
}

/// `report`'s table and paired bootstrap equal the independent Python reference
/// (kernels-tests/fixtures/report/make.py) on committed results, ranks and resample indices.
#[test]
fn report_table_and_bootstrap_match_the_python_reference() {
    use msm4sr::app::report;
    let arg = |label: &str, run: &str| format!("{label}={}", report_fixture(&format!("{run}.result.json")).display());
    let runs: Vec<report::Run> = [arg("A", "a-s1"), arg("A", "a-s2"), arg("A", "a-s3"), arg("B", "b-s1"), arg("B", "b-s2")]
        .iter()
        .map(|a| report::load_run(a).unwrap())
        .collect();
    let groups = report::group(runs);
    assert_eq!(groups.len(), 2);
    assert_eq!(report::table(&groups), std::fs::read_to_string(report_fixture("table.md")).unwrap());
    let indices: Vec<Vec<usize>> = std::fs::read_to_string(report_fixture("indices.txt"))
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();
    let ranks = |names: &[&str]| -> Vec<PathBuf> { names.iter().map(|n| report_fixture(&format!("{n}.ranks.tsv"))).collect() };
    let rows = report::paired(&ranks(&["a-s1", "a-s2", "a-s3"]), &ranks(&["b-s1", "b-s2"]), "test", &indices).unwrap();
    assert_eq!(report::paired_table(&rows), std::fs::read_to_string(report_fixture("paired.md")).unwrap());
    // Unlabelled runs group by their model (here: the result's model name).
    let plain: Vec<report::Run> = ["a-s1", "b-s1", "a-s2"]
        .iter()
        .map(|n| report::load_run(report_fixture(&format!("{n}.result.json")).to_str().unwrap()).unwrap())
        .collect();
    let g = report::group(plain);
    assert_eq!(g.iter().map(|g| (g.label.as_str(), g.runs.len())).collect::<Vec<_>>(), [("model a", 2), ("model b", 1)]);
}

/// `sweep` runs every point × seed into its own run directory, skips finished runs when run again,
/// resumes an interrupted one (same metrics as uninterrupted), and `report` on the sweep writes the
/// table, curves and sweep lines as SVG.
#[test]
fn sweep_skips_finished_runs_and_resumes_an_interrupted_one() {
    let (dir, _) = tiny_dataset("sweep");
    let d = dir.to_str().unwrap();
    let grid = dir.join("grid.toml");
    std::fs::write(
        &grid,
        "seeds = [1]\n[base.model]\nhidden = 16\ninner = 32\nexperts = 2\n[base.train]\nbatch = 64\npretrain_batch = 64\n\
         epochs = 2\npretrain_epochs = 2\npatience = 100\n[grid]\n\"model.lambda\" = [0.01, 1.0]\n",
    )
    .unwrap();
    let sweep = |out: &std::path::Path, fault: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_msm4sr"));
        c.args(["--device", "cpu", "sweep", grid.to_str().unwrap(), "--data", d, "--out", out.to_str().unwrap(), "--quiet"]);
        if let Some(f) = fault {
            c.env("MSM4SR_FAULT", f);
        }
        c.output().unwrap()
    };
    let full = tmp("sweep-full");
    let o = sweep(&full, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        table.contains("| lambda=0.01 | 1 |") && table.contains("| lambda=1.0 | 1 |") && table.contains("best on validation"),
        "{table}"
    );
    let again = sweep(&full, None);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.matches("done earlier, skipped").count() == 2, "{err}");
    assert_eq!(String::from_utf8_lossy(&again.stdout), table);
    // The grid changed under a finished sweep: its runs are not silently reused.
    let text = std::fs::read_to_string(&grid).unwrap();
    std::fs::write(&grid, text.replace("hidden = 16", "hidden = 8")).unwrap();
    let changed = sweep(&full, None);
    let err = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success() && err.contains("other settings") && err.contains("model.hidden"), "{err}");
    std::fs::write(&grid, text).unwrap();

    // A run another process is training (its lock held, here by this test) is left to it: not a
    // failure; the sweep does the rest and says so.
    let busy = tmp("sweep-busy");
    {
        let _held = msm4sr::files::RunLock::acquire(&busy.join("lambda_0.01-s1/model.lock"), "test").unwrap();
        let o = sweep(&busy, None);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("running in another process, left to it") && err.contains("1 of 2 runs are being trained by another process"),
            "{err}"
        );
        let table = String::from_utf8_lossy(&o.stdout);
        assert!(table.contains("| lambda=1.0 | 1 |") && !table.contains("| lambda=0.01 |"), "{table}");
    }

    // Killed in the first run's pre-training (about 4 steps per epoch): resume it, then run the other.
    let cut = tmp("sweep-cut");
    let killed = sweep(&cut, Some("step:6"));
    assert!(!killed.status.success());
    let resumed = sweep(&cut, None);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success() && err.contains("(resuming)") && !err.contains("skipped"), "{err}");
    let result = |root: &std::path::Path, run: &str| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join(run).join("model.result.json")).unwrap()).unwrap();
        serde_json::json!([v["valid"], v["test"]])
    };
    for run in ["lambda_0.01-s1", "lambda_1.0-s1"] {
        assert_eq!(result(&cut, run), result(&full, run), "{run}: the interrupted sweep differs");
    }

    let rep = full.join("report");
    let (ok, out, err) = msm4sr_bin(&["report", full.to_str().unwrap(), "--out", rep.to_str().unwrap(), "--resamples", "200"]);
    assert!(ok, "{err}");
    assert!(out.contains("| lambda=0.01 | 1 |"), "{out}");
    for f in ["curves.svg", "sweep.svg"] {
        let svg = std::fs::read_to_string(rep.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{f} is not an SVG document");
        assert!(svg.matches("<polyline").count() >= 2, "{f} has no lines");
    }
    assert!(std::fs::read_to_string(rep.join("paired.md")).unwrap().contains("| recall@20 |"));
    let (ok, _, err) = msm4sr_bin(&["report", full.to_str().unwrap(), "--out", rep.to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

/// Every committed grid under experiments/ expands to valid configurations.
#[test]
fn experiment_grids_are_valid() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            let g = msm4sr::app::sweep::read_grid(&p, &[]).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let (m, planned) = msm4sr::app::sweep::expand(&g).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(!planned.is_empty() && m.runs.len() == planned.len());
            n += 1;
        }
    }
    assert!(n >= 7, "{n} grids");
    let g = msm4sr::app::sweep::read_grid(&dir.join("finetune_grid.toml"), &["train.epochs=5".into()]).unwrap();
    let (_, planned) = msm4sr::app::sweep::expand(&g).unwrap();
    assert_eq!(planned.len(), 27);
    assert!(planned.iter().all(|p| p.cfg.train.epochs == 5 && p.plan == train_cmd::Plan::FINETUNE));
}

/// `recommend --users all` (batched) gives every user the same items and scores as `--user`
/// alone; `--history` serves a new user; items are named by NAME.item's title field.
#[test]
fn batch_recommend_equals_one_user_recommend() {
    let (dir, ds) = tiny_dataset("recommend");
    let d = dir.to_str().unwrap();
    let mut item = String::from("item_id:token\ttitle:token_seq\n");
    for t in &ds.item_tokens[1..] {
        item += &format!("{t}\tThe {t} story\n");
    }
    std::fs::write(dir.join("synth.item"), item).unwrap();
    let run = tmp("recommend-run").join("r");
    let r = run.to_str().unwrap();
    let (ok, _, err) = msm4sr_bin(&[
        "--device",
        "cpu",
        "train",
        "--data",
        d,
        "--run-dir",
        r,
        "--model",
        "sasrec",
        "--hidden",
        "16",
        "--epochs",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let all = run.join("recs.tsv");
    let (ok, _, err) = msm4sr_bin(&[
        "--device",
        "cpu",
        "recommend",
        "--data",
        d,
        "--ckpt",
        r,
        "--users",
        "all",
        "--k",
        "5",
        "--mask-history",
        "--out",
        all.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let tsv = std::fs::read_to_string(&all).unwrap();
    let mut lines = tsv.lines();
    assert_eq!(lines.next().unwrap(), "user\trank\titem\tscore\tin_history\ttitle");
    let rows: Vec<Vec<String>> = lines.map(|l| l.split('\t').map(String::from).collect()).collect();
    assert_eq!(rows.len(), 5 * ds.user_tokens.len());
    assert!(rows.iter().all(|r| r[4] == "false" && r[5] == format!("The {} story", r[2])), "masked history or titles wrong");
    for u in [&ds.user_tokens[0], &ds.user_tokens[7], ds.user_tokens.last().unwrap()] {
        let (ok, out, err) =
            msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", r, "--user", u, "--k", "5", "--mask-history", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let one: Vec<(String, f32)> = v[0]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["item"].as_str().unwrap().to_string(), x["score"].as_f64().unwrap() as f32))
            .collect();
        let batch: Vec<(String, f32)> = rows.iter().filter(|r| &r[0] == u).map(|r| (r[2].clone(), r[3].parse().unwrap())).collect();
        assert_eq!(one.len(), 5);
        for ((a, sa), (b, sb)) in one.iter().zip(&batch) {
            assert_eq!(a, b, "user {u}: {one:?} vs {batch:?}");
            assert!((sa - sb).abs() <= 1e-5 * sa.abs().max(1.0), "user {u}: {one:?} vs {batch:?}");
        }
    }
    // A new user from their history alone: as the dataset's user with that history.
    let u = 3;
    let hist: Vec<&str> = ds.seqs[u].iter().map(|&i| ds.item_tokens[i as usize].as_str()).collect();
    let (ok, out, err) =
        msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", r, "--history", &hist.join(","), "--k", "3", "--json"]);
    assert!(ok, "{err}");
    let (ok, same, _) =
        msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", r, "--user", &ds.user_tokens[u], "--k", "3", "--json"]);
    assert!(ok);
    let items = |s: &str| -> serde_json::Value { serde_json::from_str::<serde_json::Value>(s).unwrap()[0]["items"].clone() };
    assert_eq!(items(&out), items(&same));
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", r, "--history", "nope", "--k", "3"]);
    assert!(!ok && err.contains("unknown item 'nope'"), "{err}");
}

/// Cross-domain fine-tuning carries the transformer (frozen: bit for bit the source's after
/// training) and the item encoders (trained) from a checkpoint of another item set, and says so;
/// features of another width are refused with a clear message; without --cross-domain another item
/// set is refused.
#[test]
fn cross_domain_round_trip_keeps_the_frozen_transformer() {
    let root = tmp("cross");
    let _ = std::fs::remove_dir_all(&root);
    let synth = |name: &str, toml: &str| -> String {
        let cfg = root.join(format!("{name}.toml"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(&cfg, toml).unwrap();
        let out = root.join(name);
        let (ok, _, err) = msm4sr_bin(&["synth", "--out", out.to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
        assert!(ok, "{err}");
        out.to_str().unwrap().to_string()
    };
    let src = synth("src", "domain = 1\nusers = 120\nitems = 240\n");
    let tgt = synth("tgt", "domain = 2\nusers = 100\nitems = 200\n");
    let wide = synth("wide", "domain = 3\nusers = 100\nitems = 200\ndim = 16\n");
    let m = ["--hidden", "16", "--inner", "32", "--experts", "2", "--batch", "64", "--pretrain-batch", "64"];
    let src_run = root.join("src-run");
    let mut a =
        vec!["--device", "cpu", "pretrain", "--data", &src, "--run-dir", src_run.to_str().unwrap(), "--pretrain-epochs", "2", "--json"];
    a.extend(m);
    let (ok, _, err) = msm4sr_bin(&a);
    assert!(ok, "{err}");
    let ft = |data: &str, out: &str, extra: &[&str]| {
        let run = root.join(out);
        let mut a = vec![
            "--device",
            "cpu",
            "finetune",
            "--data",
            data,
            "--init",
            src_run.to_str().unwrap(),
            "--run-dir",
            run.to_str().unwrap(),
            "--epochs",
            "2",
        ];
        a.extend(m);
        a.extend_from_slice(extra);
        msm4sr_bin(&a)
    };
    let (ok, _, err) = ft(&tgt, "plain", &[]);
    assert!(!ok && err.contains("different item set") && err.contains("--cross-domain"), "{err}");
    let (ok, _, err) = ft(&tgt, "xd", &["--cross-domain"]);
    assert!(ok, "{err}");
    assert!(err.contains("cross-domain: carried") && err.contains("transformer frozen, ID embeddings unused"), "{err}");
    let before = msm4sr::train::checkpoint::load(&src_run.join("model.safetensors")).unwrap();
    let after = msm4sr::train::checkpoint::load(&root.join("xd").join("model.safetensors")).unwrap();
    let mut frozen = 0;
    for (name, (shape, data)) in &after.tensors {
        if name.starts_with("transformer.") {
            assert_eq!(Some(&(shape.clone(), data.clone())), before.tensors.get(name), "{name} changed");
            frozen += 1;
        }
    }
    assert!(frozen > 10, "{frozen} transformer tensors");
    let enc = "text_encoder.experts.weight";
    let changed = after.tensors.keys().filter(|n| n.starts_with("text_encoder.")).any(|n| after.tensors[n] != before.tensors[n]);
    assert!(changed, "the item encoders were not trained ({enc})");
    // Trained everything: the transformer moves.
    let (ok, _, err) = ft(&tgt, "all", &["--cross-domain", "--freeze", "none", "--target-ids"]);
    assert!(ok && err.contains("transformer trained, ID embeddings trained"), "{err}");
    let all = msm4sr::train::checkpoint::load(&root.join("all").join("model.safetensors")).unwrap();
    assert!(all.tensors.keys().filter(|n| n.starts_with("transformer.")).any(|n| all.tensors[n] != before.tensors[n]));
    // Features of another width.
    let (ok, _, err) = ft(&wide, "wide", &["--cross-domain"]);
    assert!(!ok && err.contains("features must have the source's width"), "{err}");
}

/// A `from_scratch` variant of a transfer grid trains on the target alone with the ordinary
/// defaults (ID embeddings, nothing frozen), not cross-domain's.
#[test]
fn from_scratch_variants_have_no_cross_domain_defaults() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let g = msm4sr::app::sweep::read_grid(&dir.join("cross_domain.toml"), &[]).unwrap();
    let (_, planned) = msm4sr::app::sweep::expand(&g).unwrap();
    let get = |name: &str| planned.iter().find(|p| p.entry.variant == name).unwrap();
    let t = get("transfer");
    assert!(t.cfg.train.cross_domain && !t.cfg.model.ids && t.cfg.train.freeze == msm4sr::config::Freeze::Transformer && t.init.is_some());
    let s = get("target only");
    assert!(!s.cfg.train.cross_domain && s.cfg.model.ids && s.cfg.train.freeze == msm4sr::config::Freeze::None && s.init.is_none());
    assert!(!get("target only, no IDs").cfg.model.ids);
    assert!(get("transfer + target IDs").cfg.model.ids);
}

/// Reliability, second round (one block per finding; each failed before its fix): special files
/// are never replaced, one writer per run, non-finite scores and vanishing losses are refused,
/// sizes are bounded up front, stdout errors are clean, nothing is written before a run is
/// accepted, a resume is checked before work, and reports check their inputs.
#[test]
fn reliability_second_round() {
    let root = std::env::temp_dir().join(format!("msm4sr-e2e-{}-rel2", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let p = |n: &str| root.join(n).to_str().unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_msm4sr");
    let run = |args: &[&str]| -> (Option<i32>, String, String) {
        let o = Command::new(bin).args(args).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (d, d2) = (p("D"), p("D2"));
    assert_eq!(run(&["synth", "--out", &d, "--users", "60", "--items", "80", "--seed", "3"]).0, Some(0));
    assert_eq!(run(&["synth", "--out", &d2, "--users", "60", "--items", "80", "--seed", "4"]).0, Some(0));
    let small = ["--hidden", "16", "--inner", "32", "--experts", "2", "--max-len", "12", "--batch", "64", "--pretrain-batch", "64"];
    let train = |extra: &[&str]| {
        let mut a = vec!["--device", "cpu", "train", "--data", d.as_str(), "--model", "sasrec", "--epochs", "1"];
        a.extend(small);
        a.extend(extra);
        run(&a)
    };

    // 2. A special file is never replaced, --overwrite or not.
    #[cfg(unix)]
    {
        let fifo = root.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let (code, _, err) = train(&["--out", fifo.to_str().unwrap(), "--overwrite"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("FIFO") && err.contains("regular file"), "{err}");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    }

    // 3. One writer per run: a run directory whose lock is held is refused, naming the holder.
    {
        let dir = root.join("locked");
        let _held = msm4sr::files::RunLock::acquire(&dir.join("model.lock"), "test").unwrap();
        let (code, _, err) = train(&["--run-dir", dir.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("in use by another msm4sr process") && err.contains(&std::process::id().to_string()), "{err}");
        assert!(!dir.join("model.config.toml").exists(), "the refused run wrote its config");
    }
    // ... and a lock left by a dead process is taken over: the run goes ahead.
    std::fs::create_dir_all(root.join("stale")).unwrap();
    std::fs::write(root.join("stale/model.lock"), "999999999\n").unwrap();
    let (code, _, err) = train(&["--run-dir", &p("stale")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!root.join("stale/model.lock").exists(), "the lock outlived its run");

    // 4. Non-finite scores are refused, naming the stage and epoch (not metrics of 0).
    let (code, out, err) =
        run(&["--device", "cpu", "train", "--data", &d, "--model", "sasrec", "--epochs", "1", "--lr", "1e30", "--run-dir", &p("nan")]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("Finetune epoch 1") && err.contains("non-finite scores"), "{err}");

    // 5. A batch that makes the contrastive losses vanish is refused.
    let (code, _, err) = run(&["--device", "cpu", "pretrain", "--data", &d, "--pretrain-batch", "1", "--out", &p("p1/m.safetensors")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--pretrain-batch 1") && err.contains("at least 2"), "{err}");

    // 6. Sizes are bounded before anything is allocated.
    for flag in ["--items", "--users"] {
        let (code, _, err) = run(&["synth", "--out", &p("huge"), flag, "100000000000"]);
        assert_eq!(code, Some(1), "{flag}: {err}");
        assert!(err.contains("at most"), "{err}");
    }
    let (_, _, err) = train(&["--run-dir", &p("ok")]);
    let ok = p("ok");
    let (code, _, err2) = run(&["--device", "cpu", "evaluate", "--data", &d, "--ckpt", &ok, "--groups", "1000000"]);
    assert_eq!(code, Some(2), "{err}{err2}");
    let (code, _, err) = run(&["report", &ok, "--out", &p("r0"), "--resamples", "0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--resamples 0"), "{err}");

    // 7. stdout: a closed pipe ends quietly, a write error is a clean error (not a panic, exit 101).
    {
        let mut child = Command::new(bin)
            .args(["--device", "cpu", "recommend", "--data", &d, "--ckpt", &ok, "--users", "all", "--k", "80"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success() || o.status.code().is_none(), "closed pipe: {:?} {}", o.status, String::from_utf8_lossy(&o.stderr));
        assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    }
    #[cfg(target_os = "linux")]
    {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let o =
            Command::new(bin).args(["--device", "cpu", "evaluate", "--data", &d, "--ckpt", &ok, "--json"]).stdout(full).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("standard output") && !err.contains("panicked"), "{err}");
    }

    // 8. A run refused at validation writes nothing (here: --init of another item set).
    let (code, _, err) =
        run(&["--device", "cpu", "finetune", "--data", &d2, "--init", &ok, "--model", "sasrec", "--run-dir", &p("refused")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(!root.join("refused/model.config.toml").exists() && !root.join("refused/model.log").exists(), "{err}");

    // 9. A resume is checked before any work: a `train` run resumed by `finetune`, and settings
    // that contradict each other.
    {
        let mut a = vec!["--device", "cpu", "train", "--data", d.as_str(), "--model", "msm4sr", "--epochs", "1", "--pretrain-epochs", "1"];
        a.extend(small);
        a.extend(["--run-dir", ok.as_str()]);
        let two = p("two");
        *a.last_mut().unwrap() = two.as_str();
        assert_eq!(run(&a).0, Some(0));
        let mut f = vec!["--device", "cpu", "finetune", "--data", d.as_str(), "--model", "msm4sr", "--epochs", "2"];
        f.extend(small);
        f.extend(["--run-dir", two.as_str(), "--resume"]);
        let (code, _, err) = run(&f);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("pre-trains and then fine-tunes") && !err.contains("Finetune epoch"), "{err}");
    }
    let (code, _, err) =
        run(&["--device", "cpu", "train", "--data", &d, "--drop-score", "image", "--modalities", "image", "--out", &p("c/m.safetensors")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--drop-score image with --modalities image"), "{err}");

    // 13. A checkpoint whose saved configuration is `{}` (every field would take its default) is refused.
    {
        let bytes = std::fs::read(root.join("ok/model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        meta.insert("config".into(), "{}".into());
        let views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
        let out = safetensors::serialize(views, Some(meta)).unwrap();
        let bad = root.join("empty-config.safetensors");
        std::fs::write(&bad, out).unwrap();
        let (code, _, err) = run(&["--device", "cpu", "evaluate", "--data", &d, "--ckpt", bad.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("no model and train settings"), "{err}");
    }

    // 12. Report labels print a setting as given (lr=0.003, not its f64 widening).
    {
        let mut a = vec!["--device", "cpu", "train", "--data", d.as_str(), "--model", "sasrec", "--epochs", "1", "--lr", "0.003"];
        a.extend(small);
        let lr = p("lr");
        a.extend(["--run-dir", lr.as_str()]);
        assert_eq!(run(&a).0, Some(0));
        let (code, _, err) = run(&["report", &ok, &lr, "--out", &p("rl")]);
        assert_eq!(code, Some(0), "{err}");
        let table = std::fs::read_to_string(root.join("rl/table.md")).unwrap();
        assert!(table.contains("lr=0.003 ") && table.contains("lr=0.001 ") && !table.contains("0.0030000"), "{table}");
    }

    // 10. A report grouping users by another dataset's histories is refused.
    let (code, _, err) = run(&["report", &ok, "--out", &p("rg"), "--groups", "3", "--data", &d2]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("trained on other data"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Settings that mean nothing for the model or plan given are refused, not silently accepted.
#[test]
fn meaningless_settings_are_refused() {
    let root = std::env::temp_dir().join(format!("msm4sr-e2e-{}-meaningless", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let d = root.join("D");
    let d = d.to_str().unwrap();
    let (ok, _, err) = msm4sr_bin(&["synth", "--out", d, "--users", "40", "--items", "60", "--seed", "3"]);
    assert!(ok, "{err}");
    let out = root.join("x/m.safetensors");
    let out = out.to_str().unwrap();
    for (args, want) in [
        (vec!["train", "--model", "sasrec", "--no-ids"], "--no-ids"),
        (vec!["train", "--model", "sasrec", "--modalities", "text"], "--modalities"),
        (vec!["train", "--model", "msm4sr", "--target-ids"], "--cross-domain"),
        (vec!["train", "--model", "msm4sr", "--e2e", "--no-pretrain"], "pass one"),
    ] {
        let mut a = vec!["--device", "cpu"];
        a.extend(&args);
        a.extend(["--data", d, "--epochs", "1", "--out", out]);
        let (ok, _, err) = msm4sr_bin(&a);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    assert!(!root.join("x").exists(), "a refused run wrote something");
    let users = root.join("users.txt");
    std::fs::write(&users, "\n  \n").unwrap();
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "recommend", "--data", d, "--ckpt", out, "--users", users.to_str().unwrap()]);
    assert!(!ok && err.contains("no user tokens"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Messages say what is wrong in the user's terms: a --run-dir that is a file, an output directory
/// that cannot be made, a .inter that is not a regular file, a seed listed twice in a grid.
#[test]
fn messages_name_the_problem() {
    let root = std::env::temp_dir().join(format!("msm4sr-e2e-{}-messages", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let d = root.join("D");
    let ds = d.to_str().unwrap();
    let (ok, _, err) = msm4sr_bin(&["synth", "--out", ds, "--users", "40", "--items", "60", "--seed", "3"]);
    assert!(ok, "{err}");
    let afile = root.join("afile");
    std::fs::write(&afile, "x").unwrap();
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "train", "--data", ds, "--model", "sasrec", "--run-dir", afile.to_str().unwrap()]);
    assert!(!ok && err.contains("it is a file; give a directory"), "{err}");
    let under_file = afile.join("m.safetensors");
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "train", "--data", ds, "--model", "sasrec", "--out", under_file.to_str().unwrap()]);
    assert!(!ok && err.contains("cannot be created or written"), "{err}");
    #[cfg(unix)]
    {
        let bad = root.join("fifo-data");
        std::fs::create_dir_all(&bad).unwrap();
        let c = std::ffi::CString::new(bad.join("x.inter").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "train", "--data", bad.to_str().unwrap(), "--model", "sasrec"]);
        assert!(!ok && err.contains("x.inter") && err.contains("FIFO"), "{err}");
    }
    let grid = root.join("g.toml");
    std::fs::write(&grid, "seeds = [1, 2, 1]\n[[variant]]\nname = \"a\"\nmodel = { model = \"sasrec\" }\n").unwrap();
    let (ok, _, err) =
        msm4sr_bin(&["--device", "cpu", "sweep", grid.to_str().unwrap(), "--data", ds, "--out", root.join("sw").to_str().unwrap()]);
    assert!(!ok && err.contains("seed 1 is listed twice"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Ctrl-C during a sweep stops it after the current step and says how to continue a sweep (the
/// same command again), not the single run's `--resume`, which `sweep` does not take.
#[cfg(unix)]
#[test]
fn interrupted_sweep_says_how_to_continue() {
    let root = std::env::temp_dir().join(format!("msm4sr-e2e-{}-sweepint", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let d = root.join("D");
    let (ok, _, err) = msm4sr_bin(&["synth", "--out", d.to_str().unwrap(), "--users", "60", "--items", "80", "--seed", "3"]);
    assert!(ok, "{err}");
    let grid = root.join("g.toml");
    std::fs::write(&grid, "seeds = [1]\n[base.model]\nmodel = \"sasrec\"\nhidden = 16\ninner = 32\n[base.train]\nepochs = 50\npatience = 100\nbatch = 16\n[[variant]]\nname = \"a\"\n").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msm4sr"));
    cmd.args([
        "--device",
        "cpu",
        "sweep",
        grid.to_str().unwrap(),
        "--data",
        d.to_str().unwrap(),
        "--out",
        root.join("sw").to_str().unwrap(),
    ]);
    let (status, seen) = interrupt_after(cmd, "Finetune epoch   1  loss");
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("run the same sweep command again") && !seen.contains("with --resume to continue"), "{seen}");
    let _ = std::fs::remove_dir_all(&root);
}

/// `bench --steps-from`: the three stages timed on one batch of the dataset's training prefixes,
/// each with its loss at the initial weights; the export holds the batch, the paper-size features
/// and both models' initial weights, and an existing file is never written over.
#[test]
fn same_batch_bench_exports_the_batch_and_never_overwrites() {
    let (dir, ds) = tiny_dataset("same-batch");
    let f = dir.join("batch.safetensors");
    let args = ["--device", "cpu", "bench", "--steps-from", dir.to_str().unwrap(), "--batch", "32", "--reps", "2", "--steps", "1"];
    let with_export = [&args[..], &["--export", f.to_str().unwrap(), "--json"]].concat();
    let (ok, out, err) = msm4sr_bin(&with_export);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let stages = v["same_batch"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(names, ["sasrec", "pretrain", "finetune"]);
    for s in stages {
        assert!(s["check_loss"].as_f64().unwrap().is_finite(), "{s}");
        assert_eq!(s["ms"].as_array().unwrap().len(), 2, "{s}");
    }
    // SASRec's initial item embeddings are small (N(0, 0.02)): its scores are nearly uniform and the
    // loss of the batch is a little above ln(items) (4.09 here; the scores' spread adds about half
    // their variance).
    let (sasrec, uniform) = (stages[0]["check_loss"].as_f64().unwrap(), (ds.num_items() as f64).ln());
    assert!(sasrec > uniform && sasrec < uniform + 0.2, "SASRec loss {sasrec} for {} items", ds.num_items());
    let ck = train::checkpoint::load(&f).unwrap();
    assert_eq!(ck.tensors["batch.ids"].0[0], 32);
    assert_eq!(ck.tensors["batch.targets"].0, [32]);
    assert_eq!(ck.tensors["features.image"].0, [ds.num_items() + 1, 10, 768]);
    for name in [
        "sasrec.item_embedding",
        "sasrec.transformer.layer1.ffn2.weight",
        "msm4sr.text_encoder.moe.gate",
        "msm4sr.image_encoder.pool.w1.weight",
    ] {
        assert!(ck.tensors.contains_key(name), "{name} missing from the export");
    }
    let before = std::fs::read(&f).unwrap();
    let (ok, _, err) = msm4sr_bin(&with_export);
    assert!(!ok && err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&f).unwrap(), before, "the export was written over");
    // --ops: where the fine-tuning step's time goes, by phase and by op; the ops' time lies within
    // the step's, and the fused catalog loss and the products are among them.
    let (ok, out, err) = msm4sr_bin(&[&args[..], &["--stage", "finetune", "--ops", "--json"]].concat());
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v["same_batch"][0];
    let p = &s["phases_ms"];
    let step: f64 = ["forward", "backward", "adam"].iter().map(|k| p[k].as_f64().unwrap()).sum();
    let ops = s["ops"].as_array().unwrap();
    let in_ops: f64 = ops.iter().map(|o| o["ms_per_step"].as_f64().unwrap()).sum();
    assert!(in_ops > 0.0 && in_ops <= step * 1.01, "ops {in_ops} ms of a {step} ms step: {s}");
    for name in ["matmul", "catalog_ce", "attention_pool_dot"] {
        assert!(ops.iter().any(|o| o["op"] == name), "{name} missing: {s}");
    }
    let (ok, _, err) = msm4sr_bin(&["--device", "cpu", "bench", "--ops"]);
    assert!(!ok && err.contains("--steps-from"), "{err}");
    // --scaling: on two threads, each repetition also on one (same loss bits, checked inside), with
    // the speed-up and the one-thread step's share of the one-thread GEMM peak; on one thread there
    // is nothing to compare; with --ops, each op's time on one thread and its speed-up too.
    let scaling = [&args[..], &["--stage", "sasrec", "--scaling", "--json"]].concat();
    for (threads, measured) in [("2", true), ("1", false)] {
        let o = Command::new(env!("CARGO_BIN_EXE_msm4sr")).args(&scaling).env("RAYON_NUM_THREADS", threads).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let s = &v["same_batch"][0];
        assert_eq!(s["threads"].as_u64(), Some(threads.parse().unwrap()), "{s}");
        assert_eq!(s["ms_one_thread"].as_array().unwrap().len(), if measured { 2 } else { 0 }, "{s}");
        for key in ["median_ms_one_thread", "scaling", "peak_fraction_one_thread"] {
            assert_eq!(s[key].as_f64().is_some_and(|x| x > 0.0), measured, "{key}: {s}");
        }
    }
    let both = [&args[..], &["--stage", "sasrec", "--scaling", "--ops", "--json"]].concat();
    let o = Command::new(env!("CARGO_BIN_EXE_msm4sr")).args(&both).env("RAYON_NUM_THREADS", "2").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = &v["same_batch"][0];
    let ops = s["ops"].as_array().unwrap();
    assert!(ops.iter().any(|o| o["op"] == "catalog_ce"), "{s}");
    for o in ops {
        assert!(o["ms_per_step_one_thread"].as_f64().is_some(), "{o}");
        if o["op"] == "catalog_ce" || o["op"] == "matmul" {
            for key in ["ms_per_step", "ms_per_step_one_thread", "scaling"] {
                assert!(o[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {o}");
            }
        }
    }
}

/// `msm4sr import` on the committed raw samples: the dataset directory it writes loads for
/// training; a second import into it is refused (nothing is replaced) unless --overwrite; wrong
/// flags for a format are named.
#[test]
fn import_writes_a_dataset_and_never_overwrites() {
    let dir = tmp("import");
    let raw = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels-tests/fixtures/raw");
    let out = dir.join("office");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "import".to_string(),
            "amazon".into(),
            "--reviews".into(),
            raw.join("amazon2014/reviews_Office_Products_5.json").display().to_string(),
            "--meta".into(),
            raw.join("amazon2014/meta_Office_Products.json").display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| msm4sr_bin(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, stdout, err) = run(args(&[]));
    assert!(ok, "{err}");
    assert!(stdout.contains("5 interactions of 2 users") && stdout.contains("3 items, 1 without metadata"), "{stdout}");
    let inter = out.join("office.inter");
    let rows = msm4sr::data::read_inter(&inter).unwrap();
    assert_eq!(rows.len(), 5);
    let before = std::fs::read(&inter).unwrap();
    let (ok, _, err) = run(args(&[]));
    assert!(!ok && err.contains("already exists") && err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&inter).unwrap(), before);
    let (ok, _, err) = run(args(&["--overwrite"]));
    assert!(ok, "{err}");

    let (ok, _, err) = msm4sr_bin(&["import", "ml-100k", "--reviews", "x.json", "--out", dir.join("ml").to_str().unwrap()]);
    assert!(!ok && err.contains("--dir"), "{err}");
    let ml = raw.join("ml-100k");
    let (ok, stdout, err) =
        msm4sr_bin(&["import", "ml-100k", "--dir", ml.to_str().unwrap(), "--out", dir.join("ml-100k").to_str().unwrap()]);
    assert!(ok && stdout.contains("ml-100k.item (5 items)"), "{stdout}{err}");
}
