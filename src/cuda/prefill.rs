//! Prefill attention launchers: TCA sparse prefill over the compacted global cache plus
//! each query's window, and dense causal attention (the audit's full log-sum-exp).

use super::selection::DevSelection;
use super::{cfg, Ctx, DevHeads, Gpu, GpuResult};
use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};

/// Keys per tile of the `mma.sync` kernels (the Hopper kernel's tiles have 128 keys).
pub const BN: usize = 64;

/// The prefill kernels: `Mt1` (kernels/attention_bf16.cu: `mma.sync`, one m16 row tile
/// per warp, 64 query rows per CTA, Q fragments in registers, 3 cp.async stages; the
/// fallback where the Hopper kernel has no instance) and `Hopper`
/// (kernels/attention_hopper.cu, sm_90a: a cp.async producer warpgroup and two wgmma
/// consumer warpgroups, 128 query rows per CTA, 128-key tiles; d 64 and 128). The
/// two-tile `mma.sync` kernel (`mt2`) that the Hopper kernel outran is retired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Mt1,
    Hopper,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Mt1, Variant::Hopper];
    pub fn name(self) -> &'static str {
        match self {
            Variant::Mt1 => "mt1",
            Variant::Hopper => "hopper",
        }
    }
    /// Query rows per CTA.
    pub fn bm(self) -> usize {
        match self {
            Variant::Mt1 => 64,
            Variant::Hopper => 128,
        }
    }
    /// Threads per CTA.
    pub fn threads(self) -> u32 {
        match self {
            Variant::Hopper => 384,
            _ => 128,
        }
    }
    fn kernel_name(self, d: usize) -> String {
        match self {
            Variant::Mt1 => format!("tca_prefill_bf16_d{d}"),
            Variant::Hopper => format!("tca_prefill_hopper_d{d}"),
        }
    }
    fn smem_bytes(self, d: usize) -> usize {
        let row = (d + 8) * 2;
        match self {
            Variant::Mt1 => 3 * 2 * BN * row + 3 * BN * 4,
            Variant::Hopper => hopper_smem(d),
        }
    }
}

/// The default prefill kernel: `Hopper` (at d 96, where it has no instance, `Mt1` runs;
/// see [`Variant::for_dim`]). On the H200 it was 1.9x the retired two-tile `mma.sync`
/// kernel at d 128 and 1.4-1.5x at d 64 (bench/RESULTS.md).
pub const DEFAULT: Variant = Variant::Hopper;

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

impl Variant {
    /// The kernel that runs for head dim d: the Hopper kernel exists for d 64 and 128
    /// only, so d 96 falls back to the `Mt1` (mma.sync) kernel.
    pub fn for_dim(self, d: usize) -> Variant {
        match self {
            Variant::Hopper if !HOPPER_DIMS.contains(&d) => Variant::Mt1,
            v => v,
        }
    }
}

/// Head dimensions of the Hopper kernel (kernels/attention_hopper.cu).
pub const HOPPER_DIMS: &[usize] = &[64, 128];

/// Dynamic shared memory of the Hopper kernel at head dim d (`HopperSmem` there): NS
/// stages (3 at d 128, 4 at d 64) of a K and a V tile of 128 rows, two 64-row Q tiles,
/// NS x 128 positions, 2 NS mbarriers, plus slack to align the tiles to 1024 bytes:
/// 1024 bytes, capped at the 227 KiB a block may have less 1024 (the kernel checks that
/// the slack it needs is there).
fn hopper_smem(d: usize) -> usize {
    let ns = if d == 128 { 3 } else { 4 };
    let tile = 128 * d * 2;
    let need = 2 * ns * tile + 2 * 64 * d * 2 + ns * 128 * 4 + ns * 16;
    (need + 1024).min(226 * 1024)
}

fn kernel(gpu: &Gpu, d: usize, v: Variant) -> GpuResult<CudaFunction> {
    gpu.func_smem(&v.kernel_name(d), v.smem_bytes(d))
}

/// TCA sparse prefill: query i attends to S_G's keys at positions <= i - w (read from
/// the compacted cache) and to its window [max(0, i - w + 1), i].
pub fn run_sparse(
    gpu: &Gpu,
    h: &DevHeads,
    sel: &DevSelection,
    out: &mut DevAttention,
) -> GpuResult<()> {
    run_sparse_with(gpu, h, sel, out, DEFAULT)
}

/// [`run_sparse`] with a chosen kernel.
pub fn run_sparse_with(
    gpu: &Gpu,
    h: &DevHeads,
    sel: &DevSelection,
    out: &mut DevAttention,
    v: Variant,
) -> GpuResult<()> {
    let v = v.for_dim(h.dim);
    let f = kernel(gpu, h.dim, v)?;
    let (gcap, l, hq, hkv, w) = (
        sel.gcap as i32,
        h.len as i32,
        h.hq as i32,
        h.hkv as i32,
        sel.window as i32,
    );
    let sl2 = h.scale_log2();
    unsafe {
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&h.q)
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
            .arg(&sl2);
        b.launch(cfg(
            (h.len.div_ceil(v.bm()) as u32, h.hq as u32, 1),
            v.threads(),
            v.smem_bytes(h.dim) as u32,
        ))
    }
    .ctx("tca_prefill (sparse)")?;
    Ok(())
}

/// Dense causal attention with the same kernel (no global part, w = L).
pub fn run_dense(gpu: &Gpu, h: &DevHeads, out: &mut DevAttention) -> GpuResult<()> {
    run_dense_with(gpu, h, out, DEFAULT)
}

/// [`run_dense`] with a chosen kernel.
pub fn run_dense_with(
    gpu: &Gpu,
    h: &DevHeads,
    out: &mut DevAttention,
    v: Variant,
) -> GpuResult<()> {
    let v = v.for_dim(h.dim);
    let f = kernel(gpu, h.dim, v)?;
    let (l, hq, hkv) = (h.len as i32, h.hq as i32, h.hkv as i32);
    let sl2 = h.scale_log2();
    let null = 0u64;
    let zero = 0i32;
    unsafe {
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&h.q)
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
            .arg(&sl2);
        b.launch(cfg(
            (h.len.div_ceil(v.bm()) as u32, h.hq as u32, 1),
            v.threads(),
            v.smem_bytes(h.dim) as u32,
        ))
    }
    .ctx("tca_prefill (dense)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dim_has_a_prefill_kernel_and_hopper_falls_back_at_d96() {
        let src = [
            include_str!("../../kernels/attention_bf16.cu"),
            include_str!("../../kernels/attention_hopper.cu"),
        ];
        assert_eq!(DEFAULT, Variant::Hopper);
        for &d in super::super::DIMS {
            for v in Variant::ALL {
                let run = v.for_dim(d);
                let expect = match v {
                    Variant::Hopper if d == 96 => Variant::Mt1,
                    v => v,
                };
                assert_eq!(run, expect, "{v:?} at d {d}");
                // The instantiation macro line of the chosen kernel is in its source.
                let line = match run {
                    Variant::Mt1 => (0, format!("PREFILL({d})")),
                    Variant::Hopper => (1, format!("PREFILL_HOPPER({d},")),
                };
                assert!(src[line.0].contains(&line.1), "{}", line.1);
            }
        }
    }

    #[test]
    fn hopper_shared_memory_fits_the_h200_and_matches_the_kernel_layout() {
        // The opt-in limit per block on sm_90 is 227 KiB.
        for &d in HOPPER_DIMS {
            assert!(hopper_smem(d) <= 227 * 1024, "d {d}: {}", hopper_smem(d));
        }
        // HopperSmem<128, 2, 3>: 6 tiles of 32 KiB, 2 Q tiles of 16 KiB, 3 x 128
        // positions, 6 mbarriers, and at least 464 bytes of alignment slack.
        assert_eq!(hopper_smem(128), 226 * 1024);
        assert!(hopper_smem(128) >= 6 * 32768 + 2 * 16384 + 1536 + 48 + 464);
        assert_eq!(hopper_smem(64), 8 * 16384 + 2 * 8192 + 2048 + 64 + 1024);
        let src = include_str!("../../kernels/attention_hopper.cu");
        assert!(src.contains("PREFILL_HOPPER(64, 2, 4,"));
        assert!(src.contains("PREFILL_HOPPER(128, 2, 3,"));
    }
}
