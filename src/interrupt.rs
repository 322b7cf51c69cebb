//! Ctrl-C (SIGINT) and SIGTERM. The first asks a training run to stop after the step it is in:
//! the run then ends with [`Error::Interrupted`](crate::Error::Interrupted), naming where it stopped
//! and how to continue (`--resume` picks up from the last finished epoch; every file is written
//! atomically, so none is half-written). A second signal ends the process at once (exit code 130).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Install the handler (once per process; the CLI does it at start-up).
pub fn install() -> crate::Result<()> {
    ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping after the current step (interrupt again to exit at once)");
    })
    .map_err(|e| crate::Error::Invalid(format!("cannot install the Ctrl-C handler: {e}")))
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}
