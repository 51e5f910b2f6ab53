//! Kernel launches with programmatic dependent launch (PDL, Hopper and later): a kernel
//! launched through `cuLaunchKernelEx` with the attribute
//! `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` = 1 may start while the
//! previous kernel of the stream is still running, as soon as every CTA of that kernel
//! has executed `griddepcontrol.launch_dependents` (or exited). Its CTAs then block in
//! `griddepcontrol.wait` until the previous kernel has completed and its memory is
//! visible, so the launch latency between two dependent kernels is hidden. A kernel
//! that uses this must call `griddepcontrol.wait` before it touches global memory that
//! an earlier kernel writes or reads (kernels/decode.cu does so first thing).
//!
//! [`Launch::Plain`] is the ordinary `cuLaunchKernel` (the instructions are then no-ops),
//! kept so that both paths can be timed in one run; `TCA_DECODE_PDL=0` selects it.

use super::{Ctx, Gpu, GpuError, GpuResult};
use cudarc::driver::{sys, CudaFunction, LaunchConfig};
use std::ffi::c_void;

/// How the decode kernels are launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// `cuLaunchKernel`: each kernel starts after the previous one has completed.
    Plain,
    /// `cuLaunchKernelEx` with programmatic stream serialization allowed.
    Pdl,
}

impl Launch {
    pub fn name(self) -> &'static str {
        match self {
            Launch::Plain => "plain",
            Launch::Pdl => "pdl",
        }
    }

    /// The launch path for a device of compute capability major `cc_major` running
    /// kernels compiled for `arch` (e.g. "compute_90"), given the value of
    /// `TCA_DECODE_PDL` (`env`): PDL when the device and the compiled kernels are sm_90
    /// or newer (the `griddepcontrol` instructions are compiled only there) unless
    /// `env` is "0"; "1" insists on PDL (an error where it is unavailable); any other
    /// value is an error.
    pub fn choose(env: Option<&str>, cc_major: i32, arch: &str) -> GpuResult<Launch> {
        let available = cc_major >= 9 && arch_at_least_90(arch);
        match env.map(str::trim) {
            None | Some("") => Ok(if available {
                Launch::Pdl
            } else {
                Launch::Plain
            }),
            Some("0") => Ok(Launch::Plain),
            Some("1") if available => Ok(Launch::Pdl),
            Some("1") => Err(GpuError::Invalid(format!(
                "TCA_DECODE_PDL=1 needs compute capability 9.0 or newer and kernels compiled \
                 for it (device {cc_major}.x, kernels {arch})"
            ))),
            Some(v) => Err(GpuError::Invalid(format!(
                "TCA_DECODE_PDL must be 0 or 1, not {v:?}"
            ))),
        }
    }
}

/// Whether an NVRTC architecture name ("compute_90", "sm_90a", "compute_80", ...) is
/// 9.0 or newer.
fn arch_at_least_90(arch: &str) -> bool {
    let digits: String = arch
        .rsplit('_')
        .next()
        .unwrap_or("")
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse::<u32>().is_ok_and(|v| v >= 90)
}

/// Kernel parameters for `cuLaunchKernel(Ex)`: each value in its own 8-byte slot, whose
/// first bytes hold the value in the machine's byte order (the driver reads as many
/// bytes as the kernel's parameter has).
#[derive(Default)]
pub struct Params {
    slots: Vec<u64>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let mut w = [0u8; 8];
        w[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(u64::from_ne_bytes(w));
        self
    }

    /// A device pointer (or a null pointer as 0).
    pub fn ptr(&mut self, p: sys::CUdeviceptr) -> &mut Self {
        self.push(&p.to_ne_bytes())
    }
    pub fn i32(&mut self, x: i32) -> &mut Self {
        self.push(&x.to_ne_bytes())
    }
    pub fn i64(&mut self, x: i64) -> &mut Self {
        self.push(&x.to_ne_bytes())
    }
    pub fn f32(&mut self, x: f32) -> &mut Self {
        self.push(&x.to_ne_bytes())
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The pointer array the driver takes (valid while `self` is neither moved nor
    /// changed).
    fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect()
    }
}

/// Launches `f` on the GPU's stream with `cfg` and `params`, the plain way or with
/// programmatic stream serialization; the driver's result is checked.
///
/// # Safety
/// `params` must match the kernel's parameter list (count, sizes, and device pointers to
/// buffers that stay allocated until the kernel has run).
pub unsafe fn launch(
    gpu: &Gpu,
    f: &CudaFunction,
    cfg: LaunchConfig,
    mode: Launch,
    params: &mut Params,
    what: &str,
) -> GpuResult<()> {
    gpu.ctx.bind_to_thread().ctx("cuCtxSetCurrent")?;
    let mut ptrs = params.pointers();
    match mode {
        Launch::Plain => cudarc::driver::result::launch_kernel(
            f.cu_function(),
            cfg.grid_dim,
            cfg.block_dim,
            cfg.shared_mem_bytes,
            gpu.stream.cu_stream(),
            &mut ptrs,
        )
        .ctx(&format!("cuLaunchKernel({what})")),
        Launch::Pdl => {
            let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
            attr.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let lc = sys::CUlaunchConfig {
                gridDimX: cfg.grid_dim.0,
                gridDimY: cfg.grid_dim.1,
                gridDimZ: cfg.grid_dim.2,
                blockDimX: cfg.block_dim.0,
                blockDimY: cfg.block_dim.1,
                blockDimZ: cfg.block_dim.2,
                sharedMemBytes: cfg.shared_mem_bytes,
                hStream: gpu.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            sys::cuLaunchKernelEx(
                &lc,
                f.cu_function(),
                ptrs.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
            .ctx(&format!(
                "cuLaunchKernelEx({what}, programmatic serialization)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdl_only_where_device_and_kernels_are_sm90() {
        use Launch::*;
        assert_eq!(Launch::choose(None, 9, "compute_90").unwrap(), Pdl);
        assert_eq!(Launch::choose(Some(""), 10, "sm_90a").unwrap(), Pdl);
        assert_eq!(Launch::choose(Some("1"), 9, "compute_90a").unwrap(), Pdl);
        assert_eq!(Launch::choose(Some(" 0 "), 9, "compute_90").unwrap(), Plain);
        // An older device or kernels compiled for an older architecture: plain.
        assert_eq!(Launch::choose(None, 8, "compute_90").unwrap(), Plain);
        assert_eq!(Launch::choose(None, 9, "compute_80").unwrap(), Plain);
        assert_eq!(Launch::choose(Some("0"), 8, "compute_80").unwrap(), Plain);
        // Asking for PDL where it cannot run, or a value that is neither 0 nor 1.
        let e = Launch::choose(Some("1"), 8, "compute_90").unwrap_err();
        assert!(e.to_string().contains("compute capability 9.0"), "{e}");
        assert!(Launch::choose(Some("1"), 9, "compute_80").is_err());
        for bad in ["yes", "2", "on", "-1"] {
            let e = Launch::choose(Some(bad), 9, "compute_90").unwrap_err();
            assert!(e.to_string().contains("must be 0 or 1"), "{e}");
        }
    }

    #[test]
    fn arch_names_are_read_by_their_number() {
        for a in [
            "compute_90",
            "sm_90",
            "compute_90a",
            "sm_90a",
            "compute_100",
            "sm_120",
        ] {
            assert!(arch_at_least_90(a), "{a}");
        }
        for a in ["compute_80", "sm_86", "compute_75", "", "sm_", "garbage"] {
            assert!(!arch_at_least_90(a), "{a}");
        }
    }

    #[test]
    fn each_parameter_is_read_back_at_its_size() {
        let mut p = Params::new();
        p.ptr(0x1234_5678_9abc_def0)
            .i32(-7)
            .i64(-(1 << 40))
            .f32(0.125)
            .i32(i32::MAX);
        assert_eq!(p.len(), 5);
        let v = p.pointers();
        // The driver reads each parameter at its own size from the slot's address.
        unsafe {
            assert_eq!(*(v[0] as *const u64), 0x1234_5678_9abc_def0);
            assert_eq!(*(v[1] as *const i32), -7);
            assert_eq!(*(v[2] as *const i64), -(1 << 40));
            assert_eq!(*(v[3] as *const f32), 0.125);
            assert_eq!(*(v[4] as *const i32), i32::MAX);
        }
        assert!(Params::new().is_empty());
    }
}
