//! The console log of a run: lines that go to stderr and, while a run has one, to its
//! `<stem>.log` file (appended, so a resumed run continues it). Progress bars are not logged.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use crate::{Error, Result};

static LOG: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Append every [`line`] to `path` from now on (until [`close`]).
pub fn open(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    Ok(())
}

/// Stop writing the log file.
pub fn close() {
    *LOG.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Print `msg` on stderr and append it to the run's log file, if one is open.
pub fn line(msg: &str) {
    eprintln!("{msg}");
    if let Some(f) = LOG.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = writeln!(f, "{msg}");
    }
}

/// Append `msg` to the run's log file only (what `--json` keeps off stderr).
pub fn log_only(msg: &str) {
    if let Some(f) = LOG.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let _ = writeln!(f, "{msg}");
    }
}
