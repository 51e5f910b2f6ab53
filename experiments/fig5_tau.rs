//! Regenerates `figures/fig5_tau.*`: see `tca::experiments` (`--quick`, `--out DIR`,
//! `--capture caps.safetensors` for real layers).

fn main() -> std::process::ExitCode {
    tca::experiments::main_for("fig5_tau")
}
