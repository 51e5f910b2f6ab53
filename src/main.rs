//! The `tca` binary: parses the command line and reports errors without panicking.

use clap::Parser;
use std::process::ExitCode;
use tca::cli;

fn main() -> ExitCode {
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
