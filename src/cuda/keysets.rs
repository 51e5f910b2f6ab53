//! Per-query key-set attention (kernels/peers.cu) for the two peers of
//! docs/algorithm.md §5 that choose keys per query at TCA's budget k_i: oracle top-k
//! (the k_i keys of largest score, by a radix select on the device) and StreamingLLM
//! (sinks and the most recent keys). Writes what the prefill kernels write: O
//! `[Hq, L, d]` bf16 and the natural log-sum-exp `[Hq, L]`.
//!
//! One CTA per (query row, query head) holds the row's f32 scores in shared memory, so
//! L is limited by the device's shared memory per block (about 55,000 on an H100/H200);
//! a longer L is refused with an error naming the limit. Rows are launched in bands
//! ([`row_bands`]) so short rows ask for less shared memory.

use super::prefill::DevAttention;
use super::{cfg, Ctx, DevHeads, Gpu, GpuError, GpuResult, DIMS};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// Threads per CTA (`PT` in kernels/peers.cu).
pub const THREADS: usize = 512;

/// Which keys a row keeps, given its budget k_i.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowRule {
    /// The k_i keys j <= i of largest q_i.k_j (ties: lower index).
    OracleTopK,
    /// Keys [0, s) and [r, i] ([`crate::selection::policies::streaming_span`]).
    StreamingLlm { sinks: usize },
}

/// Row ranges [r0, r1) of one launch each: [0, 1024), then doubling ([1024, 2048),
/// [2048, 4096), ...), the last ending at L. A band asks for r1 scores of shared memory.
pub fn row_bands(len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut r0, mut r1) = (0, 1024);
    while r0 < len {
        out.push((r0, r1.min(len)));
        r0 = r1;
        r1 *= 2;
    }
    out
}

/// Static shared memory of the kernel for head dim d (bytes; kernels/peers.cu).
pub fn static_smem(d: usize) -> usize {
    let nw = THREADS / 32;
    256 * 4 + THREADS * 4 + nw * 4 + nw * d * 4 + nw * 4 + 4 * 4
}

/// The longest row (L) whose scores fit next to the static shared memory in `optin`
/// bytes (the device's opt-in shared memory per block).
pub fn max_len(optin: usize, d: usize) -> usize {
    optin.saturating_sub(static_smem(d) + 256) / 4
}

/// Checks the inputs of [`run_key_rows`] (host only): d has a kernel, the budgets
/// cover `[Hkv, L]` with 1 <= k_i <= i + 1, L fits `limit`, the sinks fit an i32.
pub fn check_rows(
    (hkv, len, dim): (usize, usize, usize),
    ks: &[i32],
    rule: RowRule,
    limit: usize,
) -> GpuResult<()> {
    if !DIMS.contains(&dim) {
        return Err(GpuError::Invalid(format!(
            "per-query key-set attention: no kernel for head dim {dim} (have {DIMS:?})"
        )));
    }
    if len == 0 || len > limit || len > i32::MAX as usize {
        return Err(GpuError::Invalid(format!(
            "per-query key-set attention (oracle_topk, streaming_llm) holds a row's scores in \
             shared memory: L = {len} must be in 1..={limit} on this device"
        )));
    }
    if ks.len() != hkv * len {
        return Err(GpuError::Invalid(format!(
            "{} per-query budgets for {hkv} KV heads x {len} queries",
            ks.len()
        )));
    }
    if let Some((n, &k)) = ks
        .iter()
        .enumerate()
        .find(|&(n, &k)| k < 1 || k as usize > n % len + 1)
    {
        return Err(GpuError::Invalid(format!(
            "budget k = {k} of KV head {}, query {} outside 1..={}",
            n / len,
            n % len,
            n % len + 1
        )));
    }
    if let RowRule::StreamingLlm { sinks } = rule {
        if sinks > i32::MAX as usize {
            return Err(GpuError::Invalid(format!(
                "{sinks} sinks do not fit an i32"
            )));
        }
    }
    Ok(())
}

/// The k_i table `[Hkv, L]` (i32) of TCA's S_G per KV head:
/// [`crate::selection::kept_counts`].
pub fn budgets_table(global: &[Vec<usize>], window: usize, len: usize) -> Vec<i32> {
    global
        .iter()
        .flat_map(|g| crate::selection::kept_counts(g, window, len))
        .map(|k| k.min(i32::MAX as usize) as i32)
        .collect()
}

/// The device's opt-in shared memory per block (bytes).
pub fn optin_smem(gpu: &Gpu) -> GpuResult<usize> {
    use cudarc::driver::sys::CUdevice_attribute_enum as A;
    let v = gpu
        .ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .ctx("cuDeviceGetAttribute(max shared memory per block, opt-in)")?;
    Ok(v.max(0) as usize)
}

/// Attention of every query over its key set under `rule` with budgets `ks` (`[Hkv, L]`,
/// checked by [`check_rows`]) into `out`. With `mask` (`[Hq, L, ceil(L / 32)]` u32, zeroed
/// here) the kept keys of every row are also written as bits (checks).
pub fn run_key_rows(
    gpu: &Gpu,
    h: &DevHeads,
    ks_host: &[i32],
    rule: RowRule,
    out: &mut DevAttention,
    mask: Option<&mut CudaSlice<u32>>,
) -> GpuResult<()> {
    let limit = max_len(optin_smem(gpu)?, h.dim);
    check_rows((h.hkv, h.len, h.dim), ks_host, rule, limit)?;
    let ks = gpu.upload(ks_host)?;
    let sinks: i32 = match rule {
        RowRule::OracleTopK => -1,
        RowRule::StreamingLlm { sinks } => sinks as i32,
    };
    let null = 0u64;
    let mask = match mask {
        Some(m) => {
            let need = h.hq * h.len * h.len.div_ceil(32);
            if m.len() < need {
                return Err(GpuError::Invalid(format!(
                    "key mask of {} words, need {need}",
                    m.len()
                )));
            }
            gpu.stream.memset_zeros(m).ctx("clear the key mask")?;
            Some(m)
        }
        None => None,
    };
    let (l, hq, hkv) = (h.len as i32, h.hq as i32, h.hkv as i32);
    let sl2 = h.scale_log2();
    let name = format!("tca_peer_rows_d{}", h.dim);
    let bands = row_bands(h.len);
    let top = bands.last().map_or(0, |b| b.1);
    let f = gpu.func_smem(&name, top * 4)?;
    for (r0, r1) in bands {
        let (a, b) = (r0 as i32, r1 as i32);
        unsafe {
            let mut lb = gpu.stream.launch_builder(&f);
            lb.arg(&h.q)
                .arg(&h.k)
                .arg(&h.v)
                .arg(&ks)
                .arg(&mut out.o)
                .arg(&mut out.lse);
            match mask.as_deref() {
                Some(m) => lb.arg(m),
                None => lb.arg(&null),
            };
            lb.arg(&l)
                .arg(&hq)
                .arg(&hkv)
                .arg(&a)
                .arg(&b)
                .arg(&sinks)
                .arg(&sl2)
                .launch(cfg(
                    ((r1 - r0) as u32, h.hq as u32, 1),
                    THREADS as u32,
                    (r1 * 4) as u32,
                ))
        }
        .ctx(&name)?;
    }
    // The budgets buffer is freed when the work queued on the stream no longer needs it.
    gpu.sync()?;
    drop(ks);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dim_has_a_kernel_with_the_launchers_block_size() {
        let src = include_str!("../../kernels/peers.cu");
        for &d in DIMS {
            assert!(src.contains(&format!("PEERS({d})")), "d {d}");
        }
        assert!(src.contains(&format!("#define PT {THREADS}")));
    }

    #[test]
    fn bands_cover_every_row_once() {
        for len in [1, 5, 1023, 1024, 1025, 2048, 5000, 32_768, 55_000] {
            let b = row_bands(len);
            assert_eq!(b[0].0, 0);
            assert_eq!(b.last().unwrap().1, len);
            assert!(b.windows(2).all(|w| w[0].1 == w[1].0));
            assert!(b.iter().all(|&(a, c)| a < c && c - a <= a.max(1024)));
        }
        assert_eq!(row_bands(3000), vec![(0, 1024), (1024, 2048), (2048, 3000)]);
        assert!(row_bands(0).is_empty());
    }

    #[test]
    fn the_row_limit_leaves_room_for_the_static_memory() {
        // 227 KiB opt-in (H100, H200).
        for d in [64, 96, 128] {
            let n = max_len(227 * 1024, d);
            assert!(n * 4 + static_smem(d) <= 227 * 1024);
            assert!(n > 50_000, "d {d}: {n}");
        }
        assert_eq!(max_len(1000, 64), 0);
    }

    #[test]
    fn bad_budgets_and_shapes_are_refused() {
        let ok = vec![1, 2, 3, 1, 1, 3];
        let rule = RowRule::OracleTopK;
        check_rows((2, 3, 64), &ok, rule, 100).unwrap();
        check_rows((2, 3, 64), &ok, RowRule::StreamingLlm { sinks: 1000 }, 100).unwrap();
        let e = |r: GpuResult<()>| r.unwrap_err().to_string();
        assert!(e(check_rows((2, 3, 63), &ok, rule, 100)).contains("head dim 63"));
        assert!(e(check_rows((2, 3, 64), &ok, rule, 2)).contains("L = 3"));
        assert!(e(check_rows((2, 3, 64), &ok[..5], rule, 100)).contains("5 per-query"));
        let mut bad = ok.clone();
        bad[1] = 3; // query 1 has 2 keys
        assert!(e(check_rows((2, 3, 64), &bad, rule, 100)).contains("query 1"));
        bad[1] = 0;
        assert!(e(check_rows((2, 3, 64), &bad, rule, 100)).contains("k = 0"));
    }

    #[test]
    fn the_budgets_table_is_kept_count_per_head() {
        let global = vec![vec![0, 2], vec![]];
        let t = budgets_table(&global, 2, 6);
        // Head 0: S_i = S_G below i - 1, then [i - 1, i].
        assert_eq!(&t[..6], &[1, 2, 3, 3, 4, 4]);
        assert_eq!(&t[6..], &[1, 2, 2, 2, 2, 2]);
    }
}
