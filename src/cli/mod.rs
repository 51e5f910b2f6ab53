//! The `tca` command line: each subcommand is a thin layer over the library.

pub mod commands;
pub mod gpu;
pub mod model;
pub mod niah;
pub mod quality;
pub mod report;

use clap::{Parser, Subcommand};

/// TCA-Attention reference harness.
#[derive(Parser, Debug)]
#[command(
    name = "tca",
    version,
    about,
    after_help = "The method, each reading of the paper and its configuration key: docs/algorithm.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Calibrate per-KV-head budgets on an input and write a profile (JSON).
    Calibrate(commands::CalibrateArgs),
    /// Check every reading of Theorem 1 on an input; write queries.csv and summary.json.
    Bound(commands::BoundArgs),
    /// Write a seeded synthetic layer as safetensors.
    Synth(commands::SynthArgs),
    /// Prefill with TCA, then decode the input's last tokens with the compacted cache.
    Decode(commands::DecodeArgs),
    /// Search for, shrink and write a counterexample to one reading of Theorem 1.
    Counterexample(commands::CounterexampleArgs),
    /// The main job: verdict tables on the synthetic heads and every figure (figures/).
    Reproduce(commands::ReproduceArgs),
    /// Capture per-layer post-RoPE Q, K, V of SmolLM2-135M on a text.
    Capture(model::CaptureArgs),
    /// Perplexity of SmolLM2-135M on a text.
    Perplexity(model::PerplexityArgs),
    /// Calibrate every layer and KV head of SmolLM2-135M on a passage; write a profile.
    CalibrateModel(model::CalibrateModelArgs),
    /// Write the model (default: the SmolLM2 GGUF) as a Hugging Face folder.
    ExportHf(model::ExportHfArgs),
    /// Perplexity and top-1 agreement with exact attention, TCA across tau (table).
    QualityPpl(quality::QualityPplArgs),
    /// Needle-in-a-haystack retrieval for exact attention, TCA and the peers (table).
    QualityNiah(niah::QualityNiahArgs),
    /// Per layer and KV head: budget, keep fraction, gamma statistics (table).
    QualityHeads(quality::QualityHeadsArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> crate::Result<()> {
    match cli.command {
        Command::Calibrate(a) => commands::calibrate(a),
        Command::Bound(a) => commands::bound(a),
        Command::Synth(a) => commands::synth(a),
        Command::Decode(a) => commands::decode(a),
        Command::Counterexample(a) => commands::counterexample(a),
        Command::Reproduce(a) => commands::reproduce(a),
        Command::Capture(a) => model::run_capture(a),
        Command::Perplexity(a) => model::run_perplexity(a),
        Command::CalibrateModel(a) => model::run_calibrate_model(a),
        Command::ExportHf(a) => model::run_export_hf(a),
        Command::QualityPpl(a) => quality::run_quality_ppl(a),
        Command::QualityNiah(a) => niah::run_quality_niah(a),
        Command::QualityHeads(a) => quality::run_quality_heads(a),
    }
}
