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
            ExitCode::from(2)
        }
    }
}
