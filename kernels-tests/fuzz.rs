//! A fuzz harness for the readers, on stable Rust: mutated `.inter` files, feature files,
//! `items.txt`, config files, checkpoints, the files of an interrupted run directory (resume states,
//! run logs, saved config) resumed with `--resume`, and sweep grid files, each run by the real binary in a child process with a
//! timeout and a memory limit (an abort or a hang cannot be caught in-process). Every outcome is
//! classified — a clean error (`error: ...`, exit 1), success, a panic, an abort (killed by a
//! signal), a hang (past the timeout) — and the stages each input reached are counted (`parsed`,
//! `model`, `step`, `evaluated`; see `msm4sr::fault::reached`), so that a harness whose mutants all
//! die at the first byte cannot pass. A success whose JSON reports every test metric as 0 is
//! counted too (`zero_metrics`): that is how wrong scores used to pass silently.
//!
//! `cargo test --release --test fuzz` runs for `MSM4SR_FUZZ_SECS` seconds (default 30) with seed
//! `MSM4SR_FUZZ_SEED` (default 1); the README records the counts of a 10-minute run:
//! `MSM4SR_FUZZ_SECS=600 cargo test --release --test fuzz -- --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use msm4sr::data::synth::{self, SynthConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TIMEOUT: Duration = Duration::from_secs(60);
/// Address-space limit of each child (bytes).
const MEMORY: u64 = 8 << 30;

#[derive(Debug, Default)]
struct Tally {
    runs: usize,
    ok: usize,
    clean_error: usize,
    panic: usize,
    abort: usize,
    hang: usize,
    /// Successes whose `--json` output has every test metric 0.
    zero_metrics: usize,
    stages: BTreeMap<String, usize>,
    by_target: BTreeMap<&'static str, usize>,
}

/// Run the binary with `args`; classify the outcome and record the stages reached.
fn run(args: &[String], tally: &mut Tally) -> Option<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msm4sr"));
    cmd.args(args).env("MSM4SR_TRACE_STAGES", "1").env("RAYON_NUM_THREADS", "1").stdout(Stdio::piped()).stderr(Stdio::piped());
    #[cfg(unix)]
    unsafe {
        use std::os::unix::process::CommandExt;
        // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
        cmd.pre_exec(|| {
            let r = libc::rlimit { rlim_cur: MEMORY as libc::rlim_t, rlim_max: MEMORY as libc::rlim_t };
            libc::setrlimit(libc::RLIMIT_AS, &r);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut stdout = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = reader.join().unwrap();
    let out = out_reader.join().unwrap();
    tally.runs += 1;
    for line in err.lines() {
        if let Some(st) = line.strip_prefix("msm4sr-stage: ") {
            *tally.stages.entry(st.to_string()).or_default() += 1;
        }
    }
    let bad = match status {
        None => {
            tally.hang += 1;
            Some("hang")
        }
        Some(s) if err.contains("panicked") || s.code() == Some(101) => {
            tally.panic += 1;
            Some("panic")
        }
        Some(s) if s.code().is_none() => {
            tally.abort += 1;
            Some("abort")
        }
        Some(s) if s.success() => {
            tally.ok += 1;
            let zero = serde_json::from_str::<serde_json::Value>(&out).ok().and_then(|v| {
                let t = v.get("test")?.as_object()?.clone();
                Some(!t.is_empty() && t.values().all(|m| m.as_f64() == Some(0.0)))
            });
            if zero == Some(true) {
                tally.zero_metrics += 1;
                Some("every test metric 0 with exit 0")
            } else {
                None
            }
        }
        Some(_) if err.contains("error: ") => {
            tally.clean_error += 1;
            None
        }
        Some(_) => {
            tally.abort += 1;
            Some("unexplained failure")
        }
    };
    bad.map(|what| {
        format!("{what}: msm4sr {}\n{}", args.join(" "), err.chars().rev().take(2000).collect::<String>().chars().rev().collect::<String>())
    })
}

/// A byte-level mutation of `data`: flips, deletions, duplications, truncation, inserted junk.
fn mutate_bytes(data: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut v = data.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if v.is_empty() {
            v.push(b'x');
        }
        let i = rng.random_range(0..v.len());
        match rng.random_range(0..6) {
            0 => v[i] ^= 1 << rng.random_range(0..8),
            1 => v[i] = rng.random(),
            2 => {
                let n = rng.random_range(1..=16).min(v.len() - i);
                v.drain(i..i + n);
            }
            3 => {
                let n = rng.random_range(1..=64).min(v.len() - i);
                let piece: Vec<u8> = v[i..i + n].to_vec();
                v.splice(i..i, piece);
            }
            4 => v.truncate(i),
            _ => {
                let junk: &[u8] =
                    [&b"\xff\xfe"[..], b"-1", b"NaN", b"1e308", b"\t", b"\n", b"99999999999999999999", b"\0"][rng.random_range(0..8)];
                v.splice(i..i, junk.iter().copied());
            }
        }
    }
    v
}

/// A text-level mutation: a line deleted, duplicated or swapped, or a field replaced.
fn mutate_lines(text: &str, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return b"x".to_vec();
    }
    let i = rng.random_range(0..lines.len());
    match rng.random_range(0..4) {
        0 => {
            lines.remove(i);
        }
        1 => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        2 => {
            let j = rng.random_range(0..lines.len());
            lines.swap(i, j);
        }
        _ => {
            let mut f: Vec<String> = lines[i].split(['\t', '=']).map(str::to_string).collect();
            let k = rng.random_range(0..f.len());
            f[k] = ["", "-1", "0", "NaN", "inf", "1e30", "4294967296", "abc", "\"x\"", "[model]"][rng.random_range(0..10)].to_string();
            lines[i] = f.join(if lines[i].contains('\t') { "\t" } else { " = " });
        }
    }
    (lines.join("\n") + "\n").into_bytes()
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn mutated_inputs_never_panic_abort_or_hang() {
    let secs: u64 = std::env::var("MSM4SR_FUZZ_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let seed: u64 = std::env::var("MSM4SR_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let root = std::env::temp_dir().join(format!("msm4sr-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let base = root.join("base");
    let cfg = SynthConfig {
        users: 60,
        items: 40,
        topics: 4,
        sentences: 3,
        images: 2,
        dim: 8,
        min_len: 5,
        max_len: 10,
        seed: 3,
        ..SynthConfig::default()
    };
    synth::write(&base, &cfg).unwrap();
    let config_text = "[model]\nhidden = 8\ninner = 16\nexperts = 2\nmax_len = 8\n\n[train]\nepochs = 1\npretrain_epochs = 1\nbatch = 64\npretrain_batch = 64\n";
    std::fs::write(root.join("base.toml"), config_text).unwrap();
    let train = |data: &Path, config: &Path, out: &Path| -> Vec<String> {
        let mut a = s(&["--device", "cpu", "train", "--model", "msm4sr", "--overwrite", "--json"]);
        a.extend([
            "--data".into(),
            data.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]);
        a
    };
    let ckpt = root.join("good/m.safetensors");
    let mut tally = Tally::default();
    assert!(run(&train(&base, &root.join("base.toml"), &ckpt), &mut tally).is_none(), "the unmutated run must succeed");
    assert!(tally.stages.contains_key("step"), "the unmutated run must reach a training step: {tally:?}");
    let ckpt_bytes = std::fs::read(&ckpt).unwrap();
    // An interrupted run directory (killed in its second training step) to mutate and resume.
    let killed = root.join("killed");
    let resume_args = |dir: &Path, config: &Path| -> Vec<String> {
        let mut a = s(&["--device", "cpu", "train", "--model", "msm4sr", "--json", "--resume"]);
        a.extend([
            "--data".into(),
            base.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--run-dir".into(),
            dir.display().to_string(),
        ]);
        a
    };
    {
        let mut a = resume_args(&killed, &root.join("base.toml"));
        a.retain(|x| x != "--resume");
        let o = Command::new(env!("CARGO_BIN_EXE_msm4sr")).args(&a).env("MSM4SR_FAULT", "step:2").output().unwrap();
        assert!(!o.status.success(), "the run to interrupt was not killed");
        assert!(killed.join("model.pretrain.last.safetensors").exists() || killed.join("model.config.toml").exists());
    }
    let run_files: Vec<PathBuf> = std::fs::read_dir(&killed).unwrap().flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
    let grid_text = "seeds = [1]\n\n[base.model]\nhidden = 8\ninner = 16\nexperts = 2\nmax_len = 8\n\n[base.train]\nepochs = 1\npretrain_epochs = 1\nbatch = 64\npretrain_batch = 64\n\n[[variant]]\nname = \"SASRec\"\nmodel = { model = \"sasrec\" }\n\n[[variant]]\nname = \"w/o pre-train\"\nplan = \"no-pretrain\"\n\n[grid]\n\"model.lambda\" = [0.01, 0.1]\n";

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut failures = Vec::new();
    let start = Instant::now();
    let mut k = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        k += 1;
        let dir = root.join(format!("m{}", k % 4));
        copy_dir(&base, &dir);
        let cfg_path = dir.join("run.toml");
        std::fs::write(&cfg_path, config_text).unwrap();
        let out = dir.join("out/m.safetensors");
        let target: &'static str = ["inter", "features", "items", "config", "checkpoint", "run-dir", "grid"][rng.random_range(0..7)];
        *tally.by_target.entry(target).or_default() += 1;
        let text_or_bytes = |path: &Path, rng: &mut ChaCha8Rng| {
            let bytes = std::fs::read(path).unwrap();
            let m = if rng.random_bool(0.5) { mutate_lines(&String::from_utf8_lossy(&bytes), rng) } else { mutate_bytes(&bytes, rng) };
            std::fs::write(path, m).unwrap();
        };
        let args = match target {
            "inter" => {
                text_or_bytes(&dir.join("synth.inter"), &mut rng);
                train(&dir, &cfg_path, &out)
            }
            "features" => {
                let p = dir.join("synth.features.safetensors");
                let m = mutate_bytes(&std::fs::read(&p).unwrap(), &mut rng);
                std::fs::write(&p, m).unwrap();
                train(&dir, &cfg_path, &out)
            }
            "items" => {
                text_or_bytes(&dir.join("synth.items.txt"), &mut rng);
                train(&dir, &cfg_path, &out)
            }
            "config" => {
                text_or_bytes(&cfg_path, &mut rng);
                train(&dir, &cfg_path, &out)
            }
            "run-dir" => {
                let rd = dir.join("run");
                let _ = std::fs::remove_dir_all(&rd);
                copy_dir(&killed, &rd);
                let f = &run_files[rng.random_range(0..run_files.len())];
                let p = rd.join(f.file_name().unwrap());
                if p.extension().is_some_and(|e| e == "safetensors") {
                    let m = mutate_bytes(&std::fs::read(&p).unwrap(), &mut rng);
                    std::fs::write(&p, m).unwrap();
                } else {
                    text_or_bytes(&p, &mut rng);
                }
                resume_args(&rd, &root.join("base.toml"))
            }
            "grid" => {
                let g = dir.join("grid.toml");
                std::fs::write(&g, grid_text).unwrap();
                text_or_bytes(&g, &mut rng);
                let _ = std::fs::remove_dir_all(dir.join("sweep"));
                let mut a = s(&["--device", "cpu", "sweep"]);
                a.extend([
                    g.display().to_string(),
                    "--data".into(),
                    dir.display().to_string(),
                    "--out".into(),
                    dir.join("sweep").display().to_string(),
                ]);
                a
            }
            _ => {
                let p = dir.join("ck.safetensors");
                std::fs::write(&p, mutate_bytes(&ckpt_bytes, &mut rng)).unwrap();
                let mut a = s(&["--device", "cpu", "evaluate", "--json", "--data"]);
                a.extend([dir.display().to_string(), "--ckpt".into(), p.display().to_string()]);
                a
            }
        };
        if let Some(f) = run(&args, &mut tally) {
            // Keep the input that failed for inspection.
            let keep: PathBuf = root.join(format!("failure-{}", failures.len()));
            copy_dir(&dir, &keep);
            failures.push(format!("{f}\n(input kept in {})", keep.display()));
        }
    }
    eprintln!("fuzz: {secs} s, seed {seed}: {tally:?}");
    assert!(failures.is_empty(), "{} of {} mutated inputs failed badly:\n{}", failures.len(), tally.runs, failures.join("\n---\n"));
    let _ = std::fs::remove_dir_all(&root);
    // The harness must exercise more than the readers' first bytes.
    let reached = |st: &str| tally.stages.get(st).copied().unwrap_or(0);
    assert!(tally.runs >= 10, "too few runs: {tally:?}");
    assert!(reached("parsed") > 1 && reached("step") > 1, "mutants never got past parsing: {tally:?}");
    assert!(tally.clean_error > 0, "no mutant was rejected: the mutations do nothing: {tally:?}");
}
