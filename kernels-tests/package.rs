//! What a new user meets first: the `pip install msm4sr` wheel, `msm4sr quickstart` run from it,
//! and the README's Python section reading the run files it wrote.
//!
//! The wheel comes from `bash tools/build_wheel.sh` (target/wheels) and the Python packages from
//! `bash tools/python_env.sh` (target/pyenv); CI makes both before the tests and sets
//! `MSM4SR_REQUIRE_PACKAGING=1`, so there a missing wheel or environment fails the test. Elsewhere
//! the test says what it left out and runs the rest with the binary cargo built.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn required() -> bool {
    std::env::var("MSM4SR_REQUIRE_PACKAGING").is_ok_and(|v| v == "1")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("msm4sr-package-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Run a command; its stdout, or a panic with everything it printed.
fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{cmd:?} failed ({}):\n{out}\n{err}", o.status);
    out
}

/// This version's wheel in target/wheels, if one was built.
fn wheel() -> Option<PathBuf> {
    let prefix = format!("msm4sr-{}-", env!("CARGO_PKG_VERSION"));
    let dir = repo().join("target/wheels");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl")))
        .collect();
    found.sort();
    found.pop()
}

/// The Python with pandas, numpy and safetensors (tools/python_env.sh), if made.
fn python() -> Option<PathBuf> {
    let py = repo().join("target/pyenv/bin/python");
    let ok = py.is_file() && Command::new(&py).args(["-c", "import pandas, numpy, safetensors"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// The README's Python section: the first ```python block after its heading.
fn readme_python() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme.find("### Reading the run files from Python").expect("README has the Python section");
    let rest = &readme[at..];
    let start = rest.find("```python\n").expect("a python block in that section") + "```python\n".len();
    let end = rest[start..].find("```").unwrap();
    rest[start..start + end].to_string()
}

/// The wheel installs into a fresh virtual environment with no Rust toolchain on its PATH, and the
/// `msm4sr` it puts there runs `info` and the quickstart (SASRec and MSM4SR trained, test metrics
/// side by side, recommendations by name, report files); run again, the quickstart reuses its
/// runs. Then the README's Python code reads what the quickstart wrote.
#[test]
fn wheel_installs_and_runs_the_quickstart_and_python_reads_its_files() {
    let dir = tmpdir("quickstart");
    let bin: PathBuf = match wheel() {
        Some(w) => {
            let venv = dir.join("venv");
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
            run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", "--no-index", "--disable-pip-version-check"]).arg(&w));
            let bin = venv.join("bin/msm4sr");
            assert!(bin.is_file(), "the wheel {} put no msm4sr into {}", w.display(), venv.display());
            bin
        }
        None => {
            assert!(!required(), "no wheel in target/wheels (bash tools/build_wheel.sh builds one)");
            eprintln!("note: no wheel in target/wheels (bash tools/build_wheel.sh): the quickstart runs from cargo's binary");
            PathBuf::from(env!("CARGO_BIN_EXE_msm4sr"))
        }
    };
    // Only the venv (or nothing) on PATH: the installed binary needs no toolchain.
    let path = bin.parent().unwrap().to_path_buf();
    let msm4sr = || {
        let mut c = Command::new(&bin);
        c.current_dir(&dir).env("PATH", &path).env_remove("CARGO").env_remove("RUSTUP_HOME");
        c
    };
    let version = run(msm4sr().arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    let info = run(msm4sr().arg("info"));
    assert!(info.contains("chosen device"), "{info}");

    let first = run(msm4sr().args(["--device", "cpu", "quickstart"]));
    for want in ["Test metrics", "SASRec", "MSM4SR", "paired bootstrap", "top 5 for three users", "recently:", "Next:"] {
        assert!(first.contains(want), "quickstart output lacks {want:?}:\n{first}");
    }
    let q = dir.join("runs/quickstart");
    for f in ["sasrec/model.safetensors", "msm4sr/model.safetensors", "report/curves.svg", "report/table.md", "recommendations.tsv"] {
        assert!(q.join(f).is_file(), "quickstart did not write {f}");
    }
    // Recommendations carry the synthetic items' names, five per user, none from the history.
    let recs = std::fs::read_to_string(q.join("recommendations.tsv")).unwrap();
    let rows: Vec<&str> = recs.lines().skip(1).collect();
    assert_eq!(rows.len(), 15, "{recs}");
    assert!(rows.iter().all(|r| r.split('\t').nth(4) == Some("false") && r.split('\t').count() == 6), "{recs}");
    // Run again: nothing is retrained and the same table comes out.
    let second = run(msm4sr().args(["--device", "cpu", "quickstart"]));
    let table = |s: &str| {
        let row = |l: &&str| {
            let w: Vec<&str> = l.split_whitespace().collect();
            matches!(w.first(), Some(&"SASRec" | &"MSM4SR")) && w.get(1).is_some_and(|v| v.parse::<f64>().is_ok())
        };
        s.lines().filter(row).map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(table(&first).len(), 2, "{first}");
    assert_eq!(table(&first), table(&second));

    match python() {
        Some(py) => {
            let script = dir.join("read_runs.py");
            std::fs::write(&script, readme_python()).unwrap();
            let out = run(Command::new(py).arg(&script).current_dir(&dir));
            assert!(out.contains("test Recall@20") && out.contains("item_embedding"), "{out}");
        }
        None => {
            assert!(!required(), "no Python with pandas, numpy and safetensors in target/pyenv (bash tools/python_env.sh)");
            eprintln!("note: no target/pyenv (bash tools/python_env.sh): the README's Python section was not run");
        }
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
