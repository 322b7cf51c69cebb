//! File helpers every layer that writes uses: atomic writes (a temporary file renamed over the
//! target, so an interrupted process never leaves a half-written file), the clean-up of the
//! temporaries a killed process left, the check that a path may be written at all (not a
//! directory, device or FIFO), the one-writer lock of a run, and the names of the files of a run
//! and of a sweep (one place: the trainer writes them, the commands and `report` read them).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a path that is neither absent nor a regular file is (a directory, a device, a FIFO, ...):
/// `None` when it may be written (absent, or a regular file, also through a symlink).
pub fn not_a_regular_file(path: &Path) -> Option<&'static str> {
    let m = std::fs::metadata(path).ok()?;
    if m.is_file() {
        return None;
    }
    if m.is_dir() {
        return Some("a directory");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = m.file_type();
        if t.is_char_device() {
            return Some("a character device");
        }
        if t.is_block_device() {
            return Some("a block device");
        }
        if t.is_fifo() {
            return Some("a FIFO (named pipe)");
        }
        if t.is_socket() {
            return Some("a socket");
        }
    }
    Some("not a regular file")
}

/// Write `bytes` to `path` atomically: a hidden temp file in the same directory, fsync, rename
/// (the temp file is removed if anything fails). Creates the directory if needed. A `path` that
/// exists and is not a regular file (a device, a FIFO, a directory) is never replaced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| Error::Io { path: p.display().to_string(), source: e };
    if let Some(what) = not_a_regular_file(path) {
        return Err(Error::Invalid(format!(
            "refusing to write {}: it is {what}; an output must be a regular file or absent",
            path.display()
        )));
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    remove_stale_temporaries(dir, &name);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        crate::fault::point("write");
        std::fs::rename(&tmp, path).map_err(|e| io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Remove `.{name}.tmp-PID` files that a killed process left in `dir` (on Linux only those whose
/// process is gone; elsewhere every one but this process's).
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<u32>().ok()) else { continue };
        let alive = pid == std::process::id() || (cfg!(target_os = "linux") && Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// One writer per run: an exclusive advisory lock (`flock`) on `<stem>.lock` beside the run's
/// checkpoint, held while the run writes and released when it ends — also when the process is
/// killed, so a dead process's lock is simply taken over. The file holds the holder's pid (for the
/// message a second writer gets) and is removed when the lock is released.
pub struct RunLock {
    path: std::path::PathBuf,
    #[cfg(unix)]
    _file: std::fs::File,
}

impl RunLock {
    /// Take the lock at `path` for `what` (e.g. "run directory runs/a"), or say who holds it.
    pub fn acquire(path: &Path, what: &str) -> Result<RunLock> {
        let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), source: e };
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Invalid(format!(
                    "cannot write the run's files: their directory {} cannot be created or written ({e})",
                    dir.display()
                ))
            })?;
        }
        #[cfg(unix)]
        {
            use std::io::{Read, Seek};
            use std::os::unix::fs::MetadataExt;
            use std::os::unix::io::AsRawFd;
            // The file can be removed by the holder between our open and our lock: then the lock we
            // got is on a deleted file, and we try again.
            for _ in 0..100 {
                let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
                // SAFETY: flock on a descriptor we own.
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::WouldBlock {
                        return Err(io(err));
                    }
                    let mut pid = String::new();
                    let _ = f.read_to_string(&mut pid);
                    let pid = pid.trim();
                    return Err(Error::Busy(format!(
                        "{what} is in use by another msm4sr process{} (lock {}); wait for it to end, or give this run another --run-dir / --out",
                        if pid.is_empty() { String::new() } else { format!(" (pid {pid})") },
                        path.display()
                    )));
                }
                let same = match (f.metadata(), std::fs::metadata(path)) {
                    (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                    _ => false,
                };
                if !same {
                    continue;
                }
                f.set_len(0).map_err(io)?;
                f.rewind().map_err(io)?;
                std::io::Write::write_all(&mut f, format!("{}\n", std::process::id()).as_bytes()).map_err(io)?;
                return Ok(RunLock { path: path.to_path_buf(), _file: f });
            }
            Err(Error::Invalid(format!("could not take the lock {} (it keeps being replaced)", path.display())))
        }
        #[cfg(not(unix))]
        {
            let _ = what;
            std::fs::write(path, format!("{}\n", std::process::id())).map_err(io)?;
            Ok(RunLock { path: path.to_path_buf() })
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked, so a process that opens the path afterwards gets a new file.
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---- The files of a run and of a sweep -----------------------------------------------------

/// The files of a run besides its checkpoints, named by the `--out` stem (in a `--run-dir` DIR the
/// stem is DIR/model).
#[derive(Clone, Debug)]
pub struct RunFiles {
    /// `<stem>.epochs.jsonl`: one `EpochRecord` per line, every stage.
    pub jsonl: PathBuf,
    /// `<stem>.epochs.csv`: the same as CSV.
    pub csv: PathBuf,
    /// `<stem>.log`: the console lines (appended on resume).
    pub log: PathBuf,
    /// `<stem>.result.json`: the `--json` result.
    pub result: PathBuf,
    /// `<stem>.ranks.tsv`: every user's target rank on valid and test.
    pub ranks: PathBuf,
    /// `<stem>.lock`: held while a process writes the run ([`crate::files::RunLock`]).
    pub lock: PathBuf,
}

impl RunFiles {
    pub fn of(out: &Path) -> Self {
        let f = |ext: &str| sibling(out, ext);
        RunFiles {
            jsonl: f("epochs.jsonl"),
            csv: f("epochs.csv"),
            log: f("log"),
            result: f("result.json"),
            ranks: f("ranks.tsv"),
            lock: f("lock"),
        }
    }
}

/// The checkpoint of a run directory (`--run-dir DIR`): DIR/model.safetensors.
pub fn run_dir_checkpoint(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

/// A checkpoint argument (`--ckpt`, `--init`): a file, or a run directory for its checkpoint.
pub fn checkpoint_arg(p: &Path) -> PathBuf {
    if p.is_dir() {
        run_dir_checkpoint(p)
    } else {
        p.to_path_buf()
    }
}

/// `<stem>.<ext>` beside the checkpoint `out` (whose stem names the run; "model" if it has none).
fn sibling(out: &Path, ext: &str) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    out.with_file_name(format!("{stem}.{ext}"))
}

/// Path of the resume state for checkpoint `out`: `<stem>.last.safetensors`.
pub fn last_path(out: &Path) -> PathBuf {
    stage_path(out, "last")
}

/// `runs/model.safetensors` + "pretrain" -> `runs/model.pretrain.safetensors`.
pub fn stage_path(out: &Path, tag: &str) -> PathBuf {
    sibling(out, &format!("{tag}.safetensors"))
}

/// `<out stem>.config.toml` beside the checkpoint.
pub fn config_path(out: &Path) -> PathBuf {
    sibling(out, "config.toml")
}

/// One run of a sweep, as `sweep.json` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManifestRun {
    /// Run directory, relative to the sweep directory.
    pub dir: String,
    /// The point's label (variant name and grid values), the same for all its seeds.
    pub point: String,
    pub variant: String,
    pub seed: u64,
    /// The value of the sweep's one numeric grid setting, if it has exactly one.
    pub x: Option<f64>,
}

/// `sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// The one numeric grid setting (for sweep lines), if there is exactly one.
    pub axis: Option<String>,
    pub runs: Vec<ManifestRun>,
}

/// Where sweep runs live (for `report`): the run directories of a sweep directory.
pub fn run_dirs(out: &Path, m: &Manifest) -> Vec<PathBuf> {
    m.runs.iter().map(|r| out.join(&r.dir)).collect()
}
