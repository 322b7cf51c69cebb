//! The error type every layer of msm4sr reports, defined here at the bottom so that one `?` carries a
//! failure from a kernel to the command line. Messages name the op, shape, file or adapter involved.

/// Every failure the library reports. Messages name the op, shape, file or adapter involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape error in {op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("index error in {op}: {msg}")]
    Index { op: &'static str, msg: String },
    #[error("device error: {0}")]
    Device(String),
    #[error("{0}")]
    Invalid(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Bad content in a data file: `line` is 1-based, 0 when the problem concerns the whole file
    /// (then the message is `{file}: {msg}`).
    #[error("{file}{}: {msg}", line_suffix(*line))]
    Data { file: String, line: usize, msg: String },
    /// Another live process holds what this one needs (a run's lock): nothing is wrong, it is
    /// taken; the message names the holder.
    #[error("{0}")]
    Busy(String),
    /// The run was stopped by Ctrl-C or SIGTERM (see [`interrupt`]); the message says how to continue.
    #[error("{0}")]
    Interrupted(String),
}

fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Build a shape error.
pub fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape { op, msg: msg.into() })
}
