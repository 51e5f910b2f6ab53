//! Stand-in for the `tca capture` / `tca perplexity` subcommands until they are wired
//! into the `tca` binary: the same clap argument structs and entry points.
//!
//!     cargo run --release --example model_cli -- perplexity --tokens 256
//!     cargo run --release --example model_cli -- capture --tokens 1024 --layers 0,15 --out caps.safetensors

use clap::{Parser, Subcommand};
use tca::cli::model::{run_capture, run_perplexity, CaptureArgs, PerplexityArgs};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-layer post-RoPE Q, K, V of the model on a text, to safetensors.
    Capture(CaptureArgs),
    /// Perplexity of the model on a text.
    Perplexity(PerplexityArgs),
}

fn main() {
    let r = match Cli::parse().cmd {
        Cmd::Capture(a) => run_capture(a),
        Cmd::Perplexity(a) => run_perplexity(a),
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
