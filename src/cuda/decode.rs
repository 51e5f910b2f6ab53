//! Decode launchers: one new query per query head (here the last prefill query
//! q_{L-1}) over the compacted cache (S_G plus the window) or over the full K/V (dense).
//! Split over KV; each KV head's rows are read once for its g query heads.
//!
//! Two kernels per token: `tca_decode_d{D}_c{C}` writes a partial (m, l, o) per (query
//! head, split), `tca_decode_combine` merges them. Both are launched as
//! [`DevDecode::launch`] says: by default with programmatic dependent launch
//! ([`super::launch`]), so that the combine, and the next token's decode kernel, start
//! while their predecessor ends.

use super::launch::{self, Launch, Params};
use super::selection::DevSelection;
use super::{cfg, shape, DevHeads, Gpu, GpuError, GpuResult};
use cudarc::driver::{CudaSlice, CudaView, DevicePtr};

/// Rows a CTA streams per step (4 warps x 16 rows, NW * ROWS in kernels/decode.cu).
pub const STEP: usize = 64;
/// CTAs aimed at: 2 per multiprocessor of an H100/H200 (132 SMs), one wave.
pub const TARGET_CTAS: usize = 264;
/// Stages of each warp's cp.async ring (NSD in the kernel).
pub const NSD: usize = 3;

/// Most splits the combine kernel merges (MAX_SPLITS in kernels/decode.cu: four per
/// thread of its 256).
pub const MAX_SPLITS: usize = 1024;
/// Threads of a combine CTA (CMB in kernels/decode.cu).
pub const COMBINE_THREADS: u32 = 256;

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

/// Keys per split and number of splits for caches of `lens` keys per KV head, with
/// `chunks` CTAs per (split, KV head): the split size is a multiple of [`STEP`] chosen so
/// that about [`TARGET_CTAS`] CTAs have keys (over all heads), the number of splits
/// covers the longest cache. As the split size is at least total x chunks / TARGET_CTAS,
/// there are at most TARGET_CTAS / chunks + 1 splits, within [`MAX_SPLITS`].
pub fn split_plan(lens: &[usize], chunks: usize) -> (usize, usize) {
    let total: usize = lens.iter().sum();
    let max_keys = lens.iter().copied().max().unwrap_or(1);
    let per = (total * chunks.max(1)).div_ceil(TARGET_CTAS).max(1);
    let sk = per.div_ceil(STEP) * STEP;
    let nsplit = max_keys.div_ceil(sk).max(1);
    (sk, nsplit)
}

/// Decode outputs and partials on the device.
pub struct DevDecode {
    /// How the two kernels are launched (from [`Gpu::decode_launch`]; may be changed,
    /// e.g. to time both paths).
    pub launch: Launch,
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
        // CTAs per split: one per KV head and chunk of the group (grid.z).
        let chunks = shape::HeadChunks::for_group(h.group())?.chunks;
        let (sk, nsplit) = split_plan(lens, chunks);
        Ok(DevDecode {
            launch: gpu.decode_launch,
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
        let s = &gpu.stream;
        let mut p = Params::new();
        p.ptr(self.part_o.device_ptr(s).0)
            .ptr(self.part_ml.device_ptr(s).0)
            .ptr(self.o.device_ptr(s).0)
            .ptr(self.lse.device_ptr(s).0)
            .i32(self.nsplit as i32)
            .i32(h.dim as i32);
        // SAFETY: the parameters are those of tca_decode_combine; the buffers belong to
        // self and were sized for Hq, nsplit and d by for_lengths.
        unsafe {
            launch::launch(
                gpu,
                &f,
                cfg((h.hq as u32, 1, 1), COMBINE_THREADS, 0),
                self.launch,
                &mut p,
                "tca_decode_combine",
            )
        }
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
    if out.nsplit > MAX_SPLITS {
        return Err(GpuError::Invalid(format!(
            "{} decode splits, the combine merges at most {MAX_SPLITS}",
            out.nsplit
        )));
    }
    let (f, lc) = kernel_and_config(gpu, h, out.nsplit)?;
    let st = &gpu.stream;
    let ptr = |v: &CudaView<'_, u16>| v.device_ptr(st).0;
    let mut p = Params::new();
    p.ptr(ptr(&q))
        .i64(q_stride as i64)
        .ptr(ptr(&a.k))
        .ptr(ptr(&a.v));
    match &a.count {
        SegCount::Device(c) => p.ptr(c.device_ptr(st).0),
        SegCount::Fixed(_) => p.ptr(0),
    };
    p.i32(fixed(a.count) as i32).i64(a.stride as i64);
    match b {
        Some(b) => p
            .ptr(ptr(&b.k))
            .ptr(ptr(&b.v))
            .i32(fixed(b.count) as i32)
            .i64(b.stride as i64),
        None => p.ptr(0).ptr(0).i32(0).i64(0),
    };
    p.i32(out.sk as i32)
        .ptr(out.part_o.device_ptr(st).0)
        .ptr(out.part_ml.device_ptr(st).0)
        .f32(h.scale_log2())
        .i32(h.group() as i32);
    // SAFETY: the parameters follow the DECODE macro's list in kernels/decode.cu; the
    // segments' rows and the partials (sized for nsplit splits) outlive the launch, as
    // the stream is in order and nothing is freed before the caller synchronises.
    unsafe { launch::launch(gpu, &f, lc, out.launch, &mut p, "tca_decode") }?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_combine_constants_match_the_kernel() {
        let src = include_str!("../../kernels/decode.cu");
        assert!(src.contains(&format!("#define MAX_SPLITS {MAX_SPLITS}")));
        assert!(src.contains(&format!("#define CMB {COMBINE_THREADS}")));
        // Four (m, l) pairs per thread, and every d has at least one thread per element.
        assert_eq!(MAX_SPLITS % COMBINE_THREADS as usize, 0);
        assert!(crate::cuda::DIMS
            .iter()
            .all(|&d| d <= COMBINE_THREADS as usize));
    }

    #[test]
    fn splits_cover_every_cache_and_stay_within_the_combine() {
        // Equal and unequal caches, from a few keys to 1M, for the chunk counts 1 and 2.
        let cases: Vec<Vec<usize>> = vec![
            vec![1],
            vec![63, 64, 65],
            vec![2048; 8],
            vec![131_072; 8],
            vec![50_000, 10, 10, 10],
            vec![1 << 20],
            vec![(1 << 20) + 17, 3],
            vec![300; 32],
        ];
        for lens in &cases {
            for chunks in [1, 2] {
                let (sk, ns) = split_plan(lens, chunks);
                let max = *lens.iter().max().unwrap();
                let total: usize = lens.iter().sum();
                assert!(sk % STEP == 0 && sk >= STEP, "{lens:?}: sk {sk}");
                assert!(sk * ns >= max, "{lens:?}: {ns} x {sk} < {max}");
                assert!(
                    ns == 1 || sk * (ns - 1) < max,
                    "{lens:?}: a split past the end"
                );
                assert!(
                    ns <= TARGET_CTAS / chunks + 1 && ns <= MAX_SPLITS,
                    "{lens:?}: {ns}"
                );
                // About TARGET_CTAS CTAs with keys: never more than one wave plus the
                // rounding of each head's last split.
                let busy: usize = lens.iter().map(|&n| n.div_ceil(sk)).sum::<usize>() * chunks;
                assert!(
                    busy <= TARGET_CTAS + lens.len() * chunks,
                    "{lens:?} x {chunks}: {busy} CTAs"
                );
                if total * chunks >= TARGET_CTAS * STEP {
                    assert!(busy * 2 >= TARGET_CTAS, "{lens:?}: only {busy} CTAs");
                }
            }
        }
    }
}
