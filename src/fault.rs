//! Fault injection, for the tests that kill a run at a chosen point and resume it.
//!
//! `MSM4SR_FAULT=NAME:K` makes the process kill itself with SIGKILL (as `kill -9` would; an abort
//! elsewhere than Unix) the K-th time it reaches the point NAME, counting from 1. Points:
//! - `step`: after a training step's parameter update;
//! - `write`: inside an atomic file write (a checkpoint, a resume state, a config), the temporary
//!   file written and synced but not yet renamed into place.
//!
//! Without the variable every point costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

fn spec() -> &'static Option<(String, u64)> {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var("MSM4SR_FAULT").ok()?;
        let parsed = v.split_once(':').and_then(|(name, k)| Some((name.to_string(), k.parse::<u64>().ok()?)));
        match parsed {
            Some((name, k)) if (name == "step" || name == "write") && k >= 1 => Some((name, k)),
            _ => {
                eprintln!("warning: MSM4SR_FAULT={v} is not step:K or write:K (K >= 1); no fault is injected");
                None
            }
        }
    })
}

static HITS: AtomicU64 = AtomicU64::new(0);

/// Pass the point `name` (see the module docs).
pub fn point(name: &str) {
    let Some((want, k)) = spec() else { return };
    if want == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *k {
        eprintln!("MSM4SR_FAULT: killing the process at {name} #{k}");
        #[cfg(unix)]
        // SAFETY: kill(2) on our own pid; nothing is touched afterwards.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}

/// With `MSM4SR_TRACE_STAGES` set, print `msm4sr-stage: NAME` to stderr the first time the
/// process reaches a stage (`parsed`: the inputs read and validated; `model`: the model built;
/// `step`: a training step done; `evaluated`: ranks computed). The fuzz harness counts how far each
/// mutated input got with it.
pub fn reached(stage: &str) {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if std::env::var_os("MSM4SR_TRACE_STAGES").is_none() {
        return;
    }
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|s| s == stage) {
        seen.push(stage.to_string());
        eprintln!("msm4sr-stage: {stage}");
    }
}
