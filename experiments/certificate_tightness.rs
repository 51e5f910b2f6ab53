//! Regenerates `figures/certificate_tightness.*`: see `tca::experiments` (`--quick`, `--out DIR`,
//! `--capture caps.safetensors` for real layers).

fn main() -> std::process::ExitCode {
    tca::experiments::main_for("certificate_tightness")
}
