//! Prefill attention launchers: TCA sparse prefill over the compacted global cache plus
//! each query's window, and dense causal attention (the audit's full log-sum-exp).

use super::selection::DevSelection;
use super::{cfg, Ctx, DevHeads, Gpu, GpuResult};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};

/// Query rows per CTA and keys per tile of the kernel.
pub const BM: usize = 64;
pub const BN: usize = 64;
/// cp.async pipeline stages (NS in the kernel).
pub const NS: usize = 3;

/// Prefill outputs on the device: O [Hq, L, D] (bf16) and the log-sum-exp [Hq, L].
pub struct DevAttention {
    pub o: CudaSlice<u16>,
    pub lse: CudaSlice<f32>,
}

impl DevAttention {
    pub fn new(gpu: &Gpu, h: &DevHeads) -> GpuResult<Self> {
        Ok(DevAttention {
            o: gpu.alloc(h.hq * h.len * h.dim)?,
            lse: gpu.alloc(h.hq * h.len)?,
        })
    }

    /// NaN-fills both outputs.
    pub fn poison(&mut self, gpu: &Gpu) -> GpuResult<()> {
        gpu.poison(&mut self.o)?;
        gpu.poison(&mut self.lse)
    }
}

fn smem_bytes(d: usize) -> usize {
    NS * 2 * BN * (d + 8) * 2 + NS * BN * 4
}

fn kernel(gpu: &Gpu, d: usize) -> GpuResult<CudaFunction> {
    let f = gpu.func(&format!("tca_prefill_bf16_d{d}"))?;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem_bytes(d) as i32,
    )
    .ctx("cuFuncSetAttribute(max dynamic shared memory)")?;
    Ok(f)
}

/// TCA sparse prefill: query i attends to S_G's keys at positions <= i - w (read from
/// the compacted cache) and to its window [max(0, i - w + 1), i].
pub fn run_sparse(
    gpu: &Gpu,
    h: &DevHeads,
    sel: &DevSelection,
    out: &mut DevAttention,
) -> GpuResult<()> {
    let f = kernel(gpu, h.dim)?;
    let (gcap, l, hq, hkv, w) = (
        sel.gcap as i32,
        h.len as i32,
        h.hq as i32,
        h.hkv as i32,
        sel.window as i32,
    );
    let sl2 = h.scale_log2();
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&h.q)
            .arg(&h.k)
            .arg(&h.v)
            .arg(&sel.gk)
            .arg(&sel.gv)
            .arg(&sel.gpos)
            .arg(&sel.gcount)
            .arg(&gcap)
            .arg(&mut out.o)
            .arg(&mut out.lse)
            .arg(&l)
            .arg(&hq)
            .arg(&hkv)
            .arg(&w)
            .arg(&sl2)
            .launch(cfg(
                (h.len.div_ceil(BM) as u32, h.hq as u32, 1),
                128,
                smem_bytes(h.dim) as u32,
            ))
    }
    .ctx("tca_prefill_bf16 (sparse)")?;
    Ok(())
}

/// Dense causal attention with the same kernel (no global part, w = L).
pub fn run_dense(gpu: &Gpu, h: &DevHeads, out: &mut DevAttention) -> GpuResult<()> {
    let f = kernel(gpu, h.dim)?;
    let (l, hq, hkv) = (h.len as i32, h.hq as i32, h.hkv as i32);
    let sl2 = h.scale_log2();
    let null = 0u64;
    let zero = 0i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&h.q)
            .arg(&h.k)
            .arg(&h.v)
            .arg(&null)
            .arg(&null)
            .arg(&null)
            .arg(&null)
            .arg(&zero)
            .arg(&mut out.o)
            .arg(&mut out.lse)
            .arg(&l)
            .arg(&hq)
            .arg(&hkv)
            .arg(&l)
            .arg(&sl2)
            .launch(cfg(
                (h.len.div_ceil(BM) as u32, h.hq as u32, 1),
                128,
                smem_bytes(h.dim) as u32,
            ))
    }
    .ctx("tca_prefill_bf16 (dense)")?;
    Ok(())
}
