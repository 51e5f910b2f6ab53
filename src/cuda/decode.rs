//! Decode launchers: one new query per query head (here the last prefill query
//! q_{L-1}) over the compacted cache (S_G plus the window) or over the full K/V (dense).
//! Split over KV; each KV head's rows are read once for its g query heads.

use super::selection::DevSelection;
use super::{cfg, shape, Ctx, DevHeads, Gpu, GpuResult};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// Rows a CTA streams per step (4 warps x 16 rows, NW * ROWS in kernels/decode.cu).
pub const STEP: usize = 64;
/// CTAs aimed at: 2 per multiprocessor of an H100/H200 (132 SMs), one wave.
pub const TARGET_CTAS: usize = 264;
/// Stages of each warp's cp.async ring (NSD in the kernel).
pub const NSD: usize = 3;

/// Dynamic shared memory of the decode kernel: 4 warps x NSD stages x (16 K + 16 V rows).
pub fn smem_bytes(d: usize) -> usize {
    4 * NSD * 2 * 16 * d * 2
}

/// The decode kernel for `h`'s shape (C query heads per CTA) and its launch
/// configuration: grid (splits, Hkv, ceil(g / C)), 128 threads, [`smem_bytes`] of dynamic
/// shared memory. The kernel's arguments are those of [`run_dense`]'s launch followed by
/// g (i32); a grid with fewer than ceil(g / C) in z leaves heads with NaN outputs.
pub fn kernel_and_config(
    gpu: &Gpu,
    h: &DevHeads,
    nsplit: usize,
) -> GpuResult<(cudarc::driver::CudaFunction, cudarc::driver::LaunchConfig)> {
    let (name, c) = shape::decode_kernel(h.dim, h.group())?;
    let f = gpu.func_smem(&name, smem_bytes(h.dim))?;
    Ok((
        f,
        cfg(
            (nsplit as u32, h.hkv as u32, c.chunks as u32),
            128,
            smem_bytes(h.dim) as u32,
        ),
    ))
}

/// Decode outputs and partials on the device.
pub struct DevDecode {
    /// Keys per split (a multiple of STEP) and number of splits.
    pub sk: usize,
    pub nsplit: usize,
    pub part_o: CudaSlice<f32>,
    pub part_ml: CudaSlice<f32>,
    /// O [Hq, D] (f32) and the log-sum-exp [Hq].
    pub o: CudaSlice<f32>,
    pub lse: CudaSlice<f32>,
}

impl DevDecode {
    /// Room for up to `max_keys` keys per KV head; the splits are sized from it, so pass
    /// the cache's actual length (|S_G| + w), not a capacity. Keys beyond `sk * nsplit`
    /// are not read: [`run_sparse`] checks |S_G| against it on the host when asked.
    pub fn new(gpu: &Gpu, h: &DevHeads, max_keys: usize) -> GpuResult<Self> {
        Self::for_lengths(gpu, h, &vec![max_keys; h.hkv])
    }

    /// Room for the given cache length of each KV head: the split size comes from the
    /// total (about TARGET_CTAS non-empty splits over all heads), the number of splits
    /// from the longest; the splits past a shorter head's end exit at once.
    pub fn for_lengths(gpu: &Gpu, h: &DevHeads, lens: &[usize]) -> GpuResult<Self> {
        let total: usize = lens.iter().sum();
        let max_keys = lens.iter().copied().max().unwrap_or(1);
        // CTAs per split: one per KV head and chunk of the group (grid.z).
        let chunks = shape::HeadChunks::for_group(h.group())?.chunks;
        let per = (total * chunks).div_ceil(TARGET_CTAS).max(1);
        let sk = per.div_ceil(STEP) * STEP;
        let nsplit = max_keys.div_ceil(sk).max(1);
        Ok(DevDecode {
            sk,
            nsplit,
            part_o: gpu.alloc(h.hq * nsplit * h.dim)?,
            part_ml: gpu.alloc(h.hq * nsplit * 2)?,
            o: gpu.alloc(h.hq * h.dim)?,
            lse: gpu.alloc(h.hq)?,
        })
    }

    pub fn poison(&mut self, gpu: &Gpu) -> GpuResult<()> {
        gpu.poison(&mut self.o)?;
        gpu.poison(&mut self.lse)
    }

    fn combine(&mut self, gpu: &Gpu, h: &DevHeads) -> GpuResult<()> {
        let f = gpu.func("tca_decode_combine")?;
        let (ns, d) = (self.nsplit as i32, h.dim as i32);
        unsafe {
            gpu.stream
                .launch_builder(&f)
                .arg(&self.part_o)
                .arg(&self.part_ml)
                .arg(&mut self.o)
                .arg(&mut self.lse)
                .arg(&ns)
                .arg(&d)
                .launch(cfg((h.hq as u32, 1, 1), 256, 0))
        }
        .ctx("tca_decode_combine")?;
        Ok(())
    }
}

/// Decode over the compacted cache: S_G (count on the device) then the window.
pub fn run_sparse(
    gpu: &Gpu,
    h: &DevHeads,
    sel: &DevSelection,
    out: &mut DevDecode,
) -> GpuResult<()> {
    let (f, lc) = kernel_and_config(gpu, h, out.nsplit)?;
    let g = h.group() as i32;
    let qd = h.q.slice((h.len - 1) * h.dim..);
    let qs = (h.len * h.dim) as i64;
    let (zero, sa, nb, sb) = (0i32, sel.gcap as i64, sel.window as i32, sel.wcap as i64);
    let sl2 = h.scale_log2();
    let sk = out.sk as i32;
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&qd)
            .arg(&qs)
            .arg(&sel.gk)
            .arg(&sel.gv)
            .arg(&sel.gcount)
            .arg(&zero)
            .arg(&sa)
            .arg(&sel.wk)
            .arg(&sel.wv)
            .arg(&nb)
            .arg(&sb)
            .arg(&sk)
            .arg(&mut out.part_o)
            .arg(&mut out.part_ml)
            .arg(&sl2)
            .arg(&g)
            .launch(lc)
    }
    .ctx("tca_decode (sparse)")?;
    out.combine(gpu, h)
}

/// Dense decode over all L keys of K, V.
pub fn run_dense(gpu: &Gpu, h: &DevHeads, out: &mut DevDecode) -> GpuResult<()> {
    let (f, lc) = kernel_and_config(gpu, h, out.nsplit)?;
    let g = h.group() as i32;
    let qd = h.q.slice((h.len - 1) * h.dim..);
    let qs = (h.len * h.dim) as i64;
    let (null, na, sa, zero, zl) = (0u64, h.len as i32, h.len as i64, 0i32, 0i64);
    let sl2 = h.scale_log2();
    let sk = out.sk as i32;
    if out.sk * out.nsplit < h.len {
        return Err(super::GpuError::Invalid(
            "decode buffers too small for L keys".into(),
        ));
    }
    unsafe {
        gpu.stream
            .launch_builder(&f)
            .arg(&qd)
            .arg(&qs)
            .arg(&h.k)
            .arg(&h.v)
            .arg(&null)
            .arg(&na)
            .arg(&sa)
            .arg(&null)
            .arg(&null)
            .arg(&zero)
            .arg(&zl)
            .arg(&sk)
            .arg(&mut out.part_o)
            .arg(&mut out.part_ml)
            .arg(&sl2)
            .arg(&g)
            .launch(lc)
    }
    .ctx("tca_decode (dense)")?;
    out.combine(gpu, h)
}
