//! Regenerates `figures/fig1_attention.*`: see `tca::experiments` (`--quick`, `--out DIR`,
//! `--capture caps.safetensors` for real layers).

fn main() -> std::process::ExitCode {
    tca::experiments::main_for("fig1_attention")
}
