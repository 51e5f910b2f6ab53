//! GPU backend (feature `cuda`): CUDA kernels in `kernels/*.cu`, compiled at run time
//! with NVRTC and launched through cudarc. The f64 CPU code of this crate is the oracle;
//! nothing here re-implements it on the host.
//!
//! Stages (one launcher file each): [`selection`] (importance, redundancy, ranking and
//! budgets, per-block top-t and compaction of K/V into a contiguous cache),
//! [`prefill`] (sparse and dense prefill attention on tensor cores, bf16 in, f32
//! accumulation, O and log-sum-exp out), [`decode`] (split-KV decode over the compacted
//! cache, GQA-aware), [`f32path`] (an f32 attention for small shapes), [`keysets`]
//! (attention over per-query key sets: the oracle top-k and StreamingLLM peers).
//!
//! bf16 tensors live on the device as `u16` bit patterns.

pub mod audit;
pub mod backend;
pub mod bench_io;
pub mod compact_cache;
pub mod decode;
pub mod f32path;
pub mod keysets;
pub mod launch;
pub mod model;
pub mod prefill;
pub mod selection;
pub mod shape;
pub mod synth;

pub use backend::{GpuAttention, GpuBackend, GpuSelectionResult};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::Arc;

/// The kernel sources, compiled at run time (name, text).
pub const SOURCES: &[(&str, &str)] = &[
    (
        "attention_bf16",
        include_str!("../../kernels/attention_bf16.cu"),
    ),
    (
        "attention_hopper",
        include_str!("../../kernels/attention_hopper.cu"),
    ),
    (
        "attention_f32",
        include_str!("../../kernels/attention_f32.cu"),
    ),
    ("selection", include_str!("../../kernels/selection.cu")),
    ("decode", include_str!("../../kernels/decode.cu")),
    ("model", include_str!("../../kernels/model.cu")),
    ("audit", include_str!("../../kernels/audit.cu")),
    ("peers", include_str!("../../kernels/peers.cu")),
];

pub use shape::{DIMS, GROUPS};

/// Errors of the GPU path; every CUDA call is checked and reported with its context.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver error in {what}: {err:?}")]
    Driver { what: String, err: DriverError },
    #[error("NVRTC could not compile kernels/{name}.cu:\n{log}")]
    Compile { name: String, log: String },
    #[error("{0}")]
    Invalid(String),
}

pub type GpuResult<T> = std::result::Result<T, GpuError>;

/// Attaches context to a driver result.
pub trait Ctx<T> {
    fn ctx(self, what: &str) -> GpuResult<T>;
}
impl<T> Ctx<T> for std::result::Result<T, DriverError> {
    fn ctx(self, what: &str) -> GpuResult<T> {
        self.map_err(|err| GpuError::Driver {
            what: what.to_string(),
            err,
        })
    }
}

/// Headers the kernels include, by the name in their `#include "..."` line.
const HEADERS: &[(&str, &str)] = &[
    (
        "mma_common.cuh",
        include_str!("../../kernels/mma_common.cuh"),
    ),
    ("bf16_rows.cuh", include_str!("../../kernels/bf16_rows.cuh")),
    (
        "prefill_store.cuh",
        include_str!("../../kernels/prefill_store.cuh"),
    ),
];

/// The kernel text with each `#include "NAME"` of [`HEADERS`] replaced by the header
/// (NVRTC searches no include path of its own).
pub fn expand_includes(src: &str) -> String {
    HEADERS.iter().fold(src.to_string(), |s, (name, text)| {
        s.replace(&format!("#include \"{name}\""), text)
    })
}

/// Compiles every kernel source to PTX for `arch` (e.g. "compute_90"). `include` is a
/// list of include directories (none is needed by the current kernels). The sources are
/// compiled in parallel, one thread each (NVRTC programs are independent), so the wall
/// time is about that of the largest file.
pub fn compile_all(arch: &'static str, include: &[String]) -> GpuResult<Vec<(&'static str, Ptx)>> {
    let load = quiet_catch(|| {
        std::thread::scope(|scope| {
            let jobs: Vec<_> = SOURCES
                .iter()
                .map(|&(name, src)| scope.spawn(move || compile_one(name, src, arch, include)))
                .collect();
            jobs.into_iter()
                .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<GpuResult<Vec<_>>>()
        })
    });
    load.unwrap_or_else(|_| {
        Err(GpuError::NoDevice(
            "libnvrtc could not be loaded (set LD_LIBRARY_PATH)".into(),
        ))
    })
}

/// Compiles one kernel source to PTX.
fn compile_one(
    name: &'static str,
    src: &str,
    arch: &'static str,
    include: &[String],
) -> GpuResult<(&'static str, Ptx)> {
    let opts = CompileOptions {
        arch: Some(arch_for(name, arch)),
        include_paths: include.to_vec(),
        options: vec!["--std=c++17".into(), "-lineinfo".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(expand_includes(src), opts)
        .map(|p| (name, p))
        .map_err(|e| GpuError::Compile {
            name: name.to_string(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            },
        })
}

/// Runs `f`, turning a panic (cudarc panics when a CUDA library cannot be loaded) into
/// an error without printing it.
pub(crate) fn quiet_catch<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r
}

/// The architecture a source is compiled for: the Hopper kernel (wgmma, setmaxnreg)
/// needs the architecture-specific target (sm_90a), the rest build for `arch`.
pub fn arch_for(name: &str, arch: &'static str) -> &'static str {
    match (name, arch) {
        ("attention_hopper", "compute_90") => "compute_90a",
        ("attention_hopper", "sm_90") => "sm_90a",
        _ => arch,
    }
}

/// Number of CUDA devices, 0 when the driver library is missing or reports none.
pub fn device_count() -> usize {
    quiet_catch(CudaContext::device_count)
        .ok()
        .and_then(|r| r.ok())
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// A CUDA context, one stream and every kernel, loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Each module with the kernel names its PTX defines.
    modules: Vec<(Arc<CudaModule>, Vec<String>)>,
    funcs: std::sync::Mutex<HashMap<String, CudaFunction>>,
    /// Dynamic shared memory each kernel has been allowed, so the attribute is set once
    /// per kernel and size, not on every launch (a host cost of microseconds).
    smem_set: std::sync::Mutex<HashMap<String, usize>>,
    /// How the decode kernels are launched ([`launch::Launch::choose`]: programmatic
    /// dependent launch on sm_90 unless `TCA_DECODE_PDL=0`); [`decode::DevDecode`]
    /// copies it and a caller may change its copy.
    pub decode_launch: launch::Launch,
    /// Whether programmatic dependent launch can run here (device and kernels sm_90+).
    pub pdl_available: bool,
}

impl Gpu {
    /// Opens device 0, compiles the kernels with NVRTC (`compute_90` unless `TCA_NVRTC_ARCH`
    /// names another) and loads them. All work goes to one stream, in order: the legacy
    /// default stream, or a stream of its own with `TCA_STREAM=own`.
    pub fn new() -> GpuResult<Self> {
        if device_count() == 0 {
            return Err(GpuError::NoDevice(
                "no device found (or libcuda missing)".into(),
            ));
        }
        let ctx = CudaContext::new(0).ctx("cuCtxCreate")?;
        // One stream and in-order work: cudarc's per-buffer event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        // The legacy default stream, or with TCA_STREAM=own a (non-blocking) stream of
        // the context's own, e.g. to compare programmatic dependent launch on both.
        let stream = match std::env::var("TCA_STREAM").as_deref() {
            Err(_) | Ok("") | Ok("default") => ctx.default_stream(),
            Ok("own") => ctx.new_stream().ctx("cuStreamCreate")?,
            Ok(v) => {
                return Err(GpuError::Invalid(format!(
                    "TCA_STREAM must be default or own, not {v:?}"
                )))
            }
        };
        let arch: &'static str = match std::env::var("TCA_NVRTC_ARCH").as_deref() {
            Ok("sm_90") => "sm_90",
            Ok("compute_80") => "compute_80",
            _ => "compute_90",
        };
        let include = std::env::var("TCA_CUDA_INCLUDE")
            .map(|s| vec![s])
            .unwrap_or_default();
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR;
        let cc_major = ctx
            .attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .ctx("cuDeviceGetAttribute(compute capability)")?;
        let env = std::env::var("TCA_DECODE_PDL").ok();
        let decode_launch = launch::Launch::choose(env.as_deref(), cc_major, arch)?;
        let pdl_available = launch::Launch::choose(Some("1"), cc_major, arch).is_ok();
        let ptx = compile_all(arch, &include)?;
        let modules = ptx
            .into_iter()
            .map(|(n, p)| {
                let names = entry_names(&p.to_src());
                ctx.load_module(p)
                    .ctx(&format!("cuModuleLoadData({n})"))
                    .map(|m| (m, names))
            })
            .collect::<GpuResult<Vec<_>>>()?;
        Ok(Gpu {
            ctx,
            stream,
            modules,
            funcs: std::sync::Mutex::new(HashMap::new()),
            smem_set: std::sync::Mutex::new(HashMap::new()),
            decode_launch,
            pdl_available,
        })
    }

    /// The kernel `name`, from whichever module defines it.
    pub fn func(&self, name: &str) -> GpuResult<CudaFunction> {
        let mut map = self.funcs.lock().expect("kernel table poisoned");
        if let Some(f) = map.get(name) {
            return Ok(f.clone());
        }
        // Only the module that defines it is asked (a failed lookup is a CUDA API error
        // that compute-sanitizer would report).
        for (m, names) in &self.modules {
            if names.iter().any(|n| n == name) {
                let f = m
                    .load_function(name)
                    .ctx(&format!("cuModuleGetFunction({name})"))?;
                map.insert(name.to_string(), f.clone());
                return Ok(f);
            }
        }
        Err(GpuError::Invalid(format!("kernel {name} not found")))
    }

    /// The kernel `name`, allowed `bytes` of dynamic shared memory (the attribute is set
    /// the first time a size above the one already allowed is asked for).
    pub fn func_smem(&self, name: &str, bytes: usize) -> GpuResult<CudaFunction> {
        let f = self.func(name)?;
        let mut set = self.smem_set.lock().expect("shared memory table poisoned");
        if set.get(name).is_none_or(|&b| b < bytes) {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .ctx(&format!("cuFuncSetAttribute({name}, dynamic shared memory {bytes})"))?;
            set.insert(name.to_string(), bytes);
        }
        Ok(f)
    }

    /// Device name.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "?".into())
    }

    pub fn sync(&self) -> GpuResult<()> {
        self.stream.synchronize().ctx("cuStreamSynchronize")
    }

    pub fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> GpuResult<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(n.max(1))
            .ctx(&format!("alloc {n} elements"))
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, x: &[T]) -> GpuResult<CudaSlice<T>> {
        self.stream.clone_htod(x).ctx("copy host to device")
    }

    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        x: &CudaSlice<T>,
    ) -> GpuResult<Vec<T>> {
        self.stream.clone_dtoh(x).ctx("copy device to host")
    }

    /// Keeps the GPU busy for about `us` microseconds (see `tca_spin`).
    pub fn spin(&self, us: u64) -> GpuResult<()> {
        let f = self.func("tca_spin")?;
        let ns = us * 1000;
        use cudarc::driver::PushKernelArg;
        unsafe {
            self.stream
                .launch_builder(&f)
                .arg(&ns)
                .launch(cfg((1, 1, 1), 32, 0))
        }
        .ctx("tca_spin")?;
        Ok(())
    }

    /// Fills a buffer of 4-byte or 2-byte elements with NaN bit patterns (poisoning).
    pub fn poison<T>(&self, x: &mut CudaSlice<T>) -> GpuResult<()> {
        let bytes = x.num_bytes();
        let words = (bytes / 4) as u64;
        let f = self.func("tca_fill_u32")?;
        let nan = 0x7fc0_7fc0u32; // a NaN as f32, and two bf16 NaNs
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (1024, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        use cudarc::driver::PushKernelArg;
        unsafe {
            self.stream
                .launch_builder(&f)
                .arg(x)
                .arg(&words)
                .arg(&nan)
                .launch(cfg)
        }
        .ctx("tca_fill_u32")?;
        Ok(())
    }
}

/// The `.entry` names of a PTX text.
pub fn entry_names(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or("").trim().to_string())
        .collect()
}

/// f32 to bf16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// bf16 bits to f32.
pub fn bf16_to_f32(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// One layer's Q, K, V on the device (bf16): Q [Hq, L, D], K and V [Hkv, L, D].
pub struct DevHeads {
    pub q: CudaSlice<u16>,
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
    pub hq: usize,
    pub hkv: usize,
    pub len: usize,
    pub dim: usize,
}

impl DevHeads {
    /// Uploads bf16 bit patterns (row-major [H, L, D]).
    pub fn from_bf16(
        gpu: &Gpu,
        (hq, hkv, len, dim): (usize, usize, usize, usize),
        q: &[u16],
        k: &[u16],
        v: &[u16],
    ) -> GpuResult<Self> {
        if q.len() != hq * len * dim || k.len() != hkv * len * dim || v.len() != k.len() {
            return Err(GpuError::Invalid(
                "Q/K/V sizes do not match the shape".into(),
            ));
        }
        shape::check(dim, hq, hkv)?;
        Ok(DevHeads {
            q: gpu.upload(q)?,
            k: gpu.upload(k)?,
            v: gpu.upload(v)?,
            hq,
            hkv,
            len,
            dim,
        })
    }

    /// Uploads f64 heads rounded to bf16.
    pub fn from_heads(gpu: &Gpu, heads: &crate::Heads) -> GpuResult<Self> {
        let (q, k, v) = heads.tensors();
        let cv =
            |a: &ndarray::Array3<f64>| a.iter().map(|&x| f32_to_bf16(x as f32)).collect::<Vec<_>>();
        Self::from_bf16(
            gpu,
            (
                heads.num_q_heads(),
                heads.num_kv_heads(),
                heads.len(),
                heads.dim(),
            ),
            &cv(q),
            &cv(k),
            &cv(v),
        )
    }

    pub fn group(&self) -> usize {
        self.hq / self.hkv
    }

    /// Softmax scale times log2(e) (the kernels work in base 2).
    pub fn scale_log2(&self) -> f32 {
        (std::f64::consts::LOG2_E / (self.dim as f64).sqrt()) as f32
    }
}

/// Launch configuration helper.
pub(crate) fn cfg(grid: (u32, u32, u32), block: u32, smem: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem,
    }
}
