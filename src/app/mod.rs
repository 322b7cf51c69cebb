//! The commands: what `msm4sr <command>` does, as library calls the thin `main.rs` dispatches to
//! (and the tests call directly): training runs and their files, evaluation, recommendations,
//! sweeps and reports.
//!
//! Uses every layer below; nothing uses it.

/// Write a line to standard output: a closed pipe ends the program quietly (exit 0, as Unix tools
/// do), any other write error (a full disk, /dev/full) is a clean error.
macro_rules! outln {
    () => {
        $crate::app::emit(format_args!("\n"))?
    };
    ($($t:tt)*) => {
        $crate::app::emit(format_args!("{}\n", format_args!($($t)*)))?
    };
}

/// [`outln!`] without the newline.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::app::emit(format_args!($($t)*))?
    };
}

/// A message of at most about `max` characters: a very long value echoed in it (a 100k-character
/// token, a deeply nested TOML line) keeps its start and end, with how much was left out.
pub fn cut_middle(msg: &str, max: usize) -> String {
    let n = msg.chars().count();
    if n <= max {
        return msg.to_string();
    }
    let head: String = msg.chars().take(max * 3 / 4).collect();
    let tail: String = msg.chars().skip(n - max / 4).collect();
    format!("{head} [... {} characters left out ...] {tail}", n - head.chars().count() - tail.chars().count())
}

fn stdout_result(r: std::io::Result<()>) -> crate::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(crate::Error::Io { path: "standard output".into(), source: e }),
    }
}

pub fn emit(args: std::fmt::Arguments) -> crate::Result<()> {
    use std::io::Write;
    stdout_result(std::io::stdout().lock().write_fmt(args))
}

pub mod bench;
pub mod evaluate;
pub mod featurize;
pub mod gradcheck;
pub mod import;
pub mod info;
pub mod quickstart;
pub mod recommend;
pub mod report;
pub mod runs;
pub mod sweep;
pub mod synth;
pub mod train;

use std::process::ExitCode;

use crate::data::MissingFeatures;
use crate::engine::{Device, DeviceChoice};
use crate::{Error, Result};

/// Where a command runs: `--device` and whether `--adapter` named one.
#[derive(Clone, Copy, Debug)]
pub struct Where {
    pub choice: DeviceChoice,
    pub named: bool,
}

impl Where {
    fn resolve(&self) -> Result<(Device, String)> {
        self.choice.resolve(self.named)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MissingArg {
    Error,
    Zero,
}

pub fn missing_of(m: MissingArg) -> MissingFeatures {
    match m {
        MissingArg::Error => MissingFeatures::Error,
        MissingArg::Zero => MissingFeatures::Zero,
    }
}

pub fn print_result(r: &runs::RunResult, json: bool) -> Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(r).unwrap());
    } else {
        let present: Vec<(&str, &crate::data::metrics::Metrics)> =
            [("valid", &r.valid), ("test", &r.test)].into_iter().filter_map(|(n, m)| m.as_ref().map(|m| (n, m))).collect();
        for (n, m) in [("valid", &r.valid), ("test", &r.test)] {
            if m.is_none() {
                outln!("{n}: no samples");
            }
        }
        if !present.is_empty() {
            outln!("{}", crate::data::metrics::table(&present));
        }
        outln!("model {}, {} epochs, {:.1} s", r.model, r.epochs, r.seconds);
    }
    Ok(())
}

/// The process's exit: the command's code, or its error printed (exit 130 after Ctrl-C or SIGTERM,
/// 1 otherwise); standard output flushed first.
pub fn exit_code(result: Result<ExitCode>) -> ExitCode {
    let result = result.and_then(|code| {
        use std::io::Write;
        stdout_result(std::io::stdout().flush()).map(|()| code)
    });
    match result {
        Ok(code) => code,
        Err(e @ Error::Interrupted(_)) => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", cut_middle(&e.to_string(), 2000));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// An error message echoing a huge value stays readable.
    #[test]
    fn long_messages_are_cut_in_the_middle() {
        let long = format!("item \"{}\" is not in the file", "x".repeat(100_000));
        let m = super::cut_middle(&long, 2000);
        assert!(m.chars().count() < 2100 && m.starts_with("item \"xxx") && m.ends_with("is not in the file"), "{}", m.len());
        assert!(m.contains("characters left out"));
        assert_eq!(super::cut_middle("short", 2000), "short");
    }
}
