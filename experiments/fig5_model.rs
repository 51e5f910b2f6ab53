//! Regenerates `figures/fig5_model.*` from the measured quality tables in docs/quality
//! (see `tca::experiments::fig5_model`).

fn main() -> std::process::ExitCode {
    tca::experiments::main_for("fig5_model")
}
