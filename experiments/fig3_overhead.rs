//! Regenerates `figures/fig3_overhead.*` and `figures/latency_breakdown.*` from the
//! device benchmark's measured output in bench/h200/final (see `tca::experiments::fig3`).

fn main() -> std::process::ExitCode {
    tca::experiments::main_for("fig3_overhead")
}
