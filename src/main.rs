//! The `tca` binary: parses the command line and reports errors without panicking.

use clap::Parser;
use std::process::ExitCode;
use tca::cli;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`tca ... | head`) would panic;
    // the default action ends the process quietly, as other command-line tools do.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // 1: a check failed (the tables were written); 2: bad input or usage.
            ExitCode::from(if matches!(e, tca::TcaError::Verdict(_)) {
                1
            } else {
                2
            })
        }
    }
}
