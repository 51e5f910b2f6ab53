//! Compiles every kernels/*.cu to PTX with NVRTC (compute_90 by default, or the
//! architecture given as the first argument). Needs libnvrtc, no GPU. Used by CI
//! through scripts/check-kernels. With `TCA_PTX_OUT=DIR` it also writes each file's PTX
//! to DIR/NAME.ptx (to compare a refactor's instructions before and after).
use std::process::ExitCode;

fn main() -> ExitCode {
    let arch: &'static str = match std::env::args().nth(1).as_deref() {
        Some("sm_90") => "sm_90",
        Some("compute_80") => "compute_80",
        _ => "compute_90",
    };
    let include: Vec<String> = std::env::var("TCA_CUDA_INCLUDE")
        .map(|s| vec![s])
        .unwrap_or_default();
    let out = std::env::var_os("TCA_PTX_OUT").map(std::path::PathBuf::from);
    match tca::cuda::compile_all(arch, &include) {
        Ok(ptx) => {
            for (name, p) in &ptx {
                let src = p.to_src();
                if let Some(dir) = &out {
                    let path = dir.join(format!("{name}.ptx"));
                    if let Err(e) =
                        std::fs::create_dir_all(dir).and_then(|_| std::fs::write(&path, &src))
                    {
                        eprintln!("cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                let entries = tca::cuda::entry_names(&src);
                println!(
                    "kernels/{name}.cu: PTX for {}, {} bytes, {} kernels: {}",
                    tca::cuda::arch_for(name, arch),
                    src.len(),
                    entries.len(),
                    entries.join(" ")
                );
                if entries.is_empty() {
                    eprintln!("no kernel entry found in kernels/{name}.cu");
                    return ExitCode::FAILURE;
                }
            }
            println!("all {} kernel files compiled", ptx.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
