//! Regenerates `figures/fig4_ablations.*`: see `tca::experiments` (`--quick`, `--out DIR`,
//! `--capture caps.safetensors` for real layers).

fn main() -> std::process::ExitCode {
    tca::experiments::main_for("fig4_ablations")
}
