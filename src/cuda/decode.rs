//! Decode launchers: one new query per query head (here the last prefill query
//! q_{L-1}) over the compacted cache (S_G plus the window) or over the full K/V (dense).
//! Split over KV; each KV head's rows are read once for its g query heads.

use super::selection::DevSelection;
use super::{cfg, shape, Ctx, DevHeads, Gpu, GpuResult};
use cudarc::driver::{CudaSlice, CudaView, PushKernelArg};

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
/// shared memory. The kernel's arguments are those of [`run_segments`]'s launch followed
/// by g (i32); a grid with fewer than ceil(g / C) in z leaves heads with NaN outputs.
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

/// How many rows of a [`Segment`] each KV head has.
#[derive(Clone, Copy)]
pub enum SegCount<'a> {
    /// Per KV head, on the device (|S_G| after the selection).
    Device(&'a CudaSlice<i32>),
    /// The same for every KV head.
    Fixed(usize),
}

/// A run of cached keys for the decode kernel: rows `[Hkv, stride, d]` of `k` and `v`
/// (bf16), the first `count` rows of each KV head read.
pub struct Segment<'a> {
    pub k: CudaView<'a, u16>,
    pub v: CudaView<'a, u16>,
    pub count: SegCount<'a>,
    pub stride: usize,
}

/// Decode of one query per query head (`q`: row 0 of each head, heads `q_stride`
/// elements apart) over segment `a` followed by segment `b`: the keys attended are the
/// rows of both (split over KV as [`DevDecode`] was sized). `h` gives Hq, Hkv and d.
pub fn run_segments(
    gpu: &Gpu,
    h: &DevHeads,
    q: CudaView<'_, u16>,
    q_stride: usize,
    a: &Segment<'_>,
    b: Option<&Segment<'_>>,
    out: &mut DevDecode,
) -> GpuResult<()> {
    let fixed = |c: SegCount| match c {
        SegCount::Fixed(n) => n,
        SegCount::Device(_) => 0,
    };
    if let SegCount::Fixed(n) = a.count {
        let nb = b.map_or(0, |b| fixed(b.count));
        if out.sk * out.nsplit < n + nb {
            return Err(super::GpuError::Invalid(format!(
                "decode buffers hold {} keys per head, {} asked for",
                out.sk * out.nsplit,
                n + nb
            )));
        }
    }
    if b.is_some_and(|b| matches!(b.count, SegCount::Device(_))) {
        return Err(super::GpuError::Invalid(
            "the second decode segment needs a fixed count".into(),
        ));
    }
    let (f, lc) = kernel_and_config(gpu, h, out.nsplit)?;
    let g = h.group() as i32;
    let (null, zero) = (0u64, 0i32);
    let qs = q_stride as i64;
    let na = fixed(a.count) as i32;
    let sa = a.stride as i64;
    let (nb, sb) = b.map_or((0, 0), |b| (fixed(b.count) as i32, b.stride as i64));
    let sl2 = h.scale_log2();
    let sk = out.sk as i32;
    let mut l = gpu.stream.launch_builder(&f);
    l.arg(&q).arg(&qs).arg(&a.k).arg(&a.v);
    match &a.count {
        SegCount::Device(c) => l.arg(*c),
        SegCount::Fixed(_) => l.arg(&null),
    };
    l.arg(&na).arg(&sa);
    match b {
        Some(b) => l.arg(&b.k).arg(&b.v),
        None => l.arg(&null).arg(&null),
    };
    l.arg(if b.is_some() { &nb } else { &zero })
        .arg(&sb)
        .arg(&sk)
        .arg(&mut out.part_o)
        .arg(&mut out.part_ml)
        .arg(&sl2)
        .arg(&g);
    unsafe { l.launch(lc) }.ctx("tca_decode")?;
    out.combine(gpu, h)
}

/// Decode of the last prefill query over the compacted cache: S_G (count on the
/// device) then the window.
pub fn run_sparse(
    gpu: &Gpu,
    h: &DevHeads,
    sel: &DevSelection,
    out: &mut DevDecode,
) -> GpuResult<()> {
    let a = Segment {
        k: sel.gk.slice(..),
        v: sel.gv.slice(..),
        count: SegCount::Device(&sel.gcount),
        stride: sel.gcap,
    };
    let b = Segment {
        k: sel.wk.slice(..),
        v: sel.wv.slice(..),
        count: SegCount::Fixed(sel.window),
        stride: sel.wcap,
    };
    let q = h.q.slice((h.len - 1) * h.dim..);
    run_segments(gpu, h, q, h.len * h.dim, &a, Some(&b), out)
}

/// Dense decode of the last prefill query over all L keys of K, V.
pub fn run_dense(gpu: &Gpu, h: &DevHeads, out: &mut DevDecode) -> GpuResult<()> {
    let a = Segment {
        k: h.k.slice(..),
        v: h.v.slice(..),
        count: SegCount::Fixed(h.len),
        stride: h.len,
    };
    let q = h.q.slice((h.len - 1) * h.dim..);
    run_segments(gpu, h, q, h.len * h.dim, &a, None, out)
}
