//! Checkpoints: safetensors files holding every parameter under its model name (see the README's
//! table), the Adam moments as `adam.m.NAME` / `adam.v.NAME`, and in the metadata the run's config,
//! the item-token order and the training position. Written atomically (temp file + rename), so an
//! interrupted run never leaves a half-written checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::engine::{Device, Tensor};
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

/// Save named tensors and string metadata.
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &BTreeMap<String, String>) -> Result<()> {
    let host: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.shape().to_vec(), bytemuck::cast_slice(&t.to_vec()?).to_vec())))
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView)> = host
        .iter()
        .map(|(n, s, b)| {
            Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Invalid(format!("tensor {n}: {e}")))?))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = meta.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// A loaded checkpoint: tensors on the host, and the metadata.
pub struct Checkpoint {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: BTreeMap<String, String>,
}

pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let bad = |e: safetensors::SafeTensorError| Error::Invalid(format!("{} is not a valid checkpoint: {e}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut tensors = HashMap::new();
    for (name, v) in st.tensors() {
        if v.dtype() != Dtype::F32 {
            return Err(Error::Invalid(format!("{}: tensor {name} has dtype {:?}, expected F32", path.display(), v.dtype())));
        }
        let data: Vec<f32> = bytemuck::pod_collect_to_vec(v.data());
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "{}: tensor {name} holds a non-finite value ({} at element {i}); a model with NaN or Inf weights cannot be used",
                path.display(),
                data[i]
            )));
        }
        tensors.insert(name.to_string(), (v.shape().to_vec(), data));
    }
    Ok(Checkpoint { tensors, meta })
}

impl Checkpoint {
    /// A tensor by name on `dev`, checking its shape.
    pub fn tensor(&self, name: &str, shape: &[usize], dev: Device) -> Result<Option<Tensor>> {
        match self.tensors.get(name) {
            None => Ok(None),
            Some((s, data)) => {
                if s != shape {
                    return Err(Error::Shape {
                        op: "checkpoint",
                        msg: format!("tensor {name} is {s:?} in the checkpoint, the model needs {shape:?}"),
                    });
                }
                Ok(Some(Tensor::from_vec(data.clone(), shape, dev)?))
            }
        }
    }

    /// Copy the checkpoint's values into `params` (in place). With `strict`, every parameter must be
    /// present; otherwise missing ones keep their values. Returns how many were loaded.
    pub fn load_into(&self, params: &[(String, Tensor)], strict: bool) -> Result<usize> {
        let mut n = 0;
        for (name, p) in params {
            match self.tensor(name, p.shape(), p.device())? {
                Some(t) => {
                    p.assign(&t)?;
                    n += 1;
                }
                None if strict => return Err(Error::Invalid(format!("checkpoint has no tensor '{name}'"))),
                None => {}
            }
        }
        Ok(n)
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
                    return Err(Error::Invalid(format!(
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
