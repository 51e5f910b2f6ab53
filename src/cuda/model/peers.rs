//! The peer policies of docs/algorithm.md §5 that the GPU forward runs, all built from
//! TCA's GPU selection of the same layer:
//! - block top-k: k = round(|S_G of TCA| / nb) clamped to [1, b] per KV head
//!   ([`block_topk_k`], on the host from TCA's |S_G|), then the GPU selection again
//!   with the point budget k in every block (the device-verified kernels only);
//! - cumulative threshold: TCA's importance s downloaded, the key set chosen on the
//!   host by the CPU policy's own [`cumulative_keep`], then compacted on the device by
//!   the per-block top-t kernel over 0/1 marks ([`select_key_sets`]);
//!   these two give an S_G + window that the sparse prefill and the compacted decode
//!   cache take;
//! - oracle top-k and StreamingLLM choose keys per query: TCA's S_G is downloaded, the
//!   budgets k_i = |S_i| computed on the host ([`budgets_table`], i.e.
//!   [`crate::selection::kept_count`]) and the per-query key-set kernel runs
//!   ([`run_key_rows`]).
//!
//! Each synchronises the stream once per layer (the host decides).

use super::super::backend::select_params;
use super::super::keysets::{budgets_table, run_key_rows, RowRule};
use super::super::prefill::DevAttention;
use super::super::selection::{run_select, select_key_sets, DevSelection};
use super::super::{DevHeads, Gpu, GpuError, GpuResult};
use crate::config::Config;
use crate::model::sparse::DEFAULT_SINKS;
use crate::selection::policies::{block_topk_k, cumulative_keep, BlockMarks, Policy};
use crate::selection::Budget;

/// A peer policy the GPU forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPeer {
    BlockTopK,
    CumulativeThreshold,
    OracleTopK,
    /// With this many attention sinks (the CPU's [`DEFAULT_SINKS`] from the CLI).
    StreamingLlm {
        sinks: usize,
    },
}

impl GpuPeer {
    /// The GPU form of `policy`, where there is one.
    pub fn from_policy(policy: Policy) -> Option<Self> {
        match policy {
            Policy::BlockTopK => Some(GpuPeer::BlockTopK),
            Policy::CumulativeThreshold => Some(GpuPeer::CumulativeThreshold),
            Policy::OracleTopK => Some(GpuPeer::OracleTopK),
            Policy::StreamingLlm => Some(GpuPeer::StreamingLlm {
                sinks: DEFAULT_SINKS,
            }),
            Policy::Tca => None,
        }
    }

    /// The per-query rule of a peer that chooses keys per query (`None`: the peer's
    /// key set is an S_G + window, see [`peer_selection`]).
    pub fn rows(self) -> Option<RowRule> {
        match self {
            GpuPeer::OracleTopK => Some(RowRule::OracleTopK),
            GpuPeer::StreamingLlm { sinks } => Some(RowRule::StreamingLlm { sinks }),
            _ => None,
        }
    }

    pub fn policy(self) -> Policy {
        match self {
            GpuPeer::BlockTopK => Policy::BlockTopK,
            GpuPeer::CumulativeThreshold => Policy::CumulativeThreshold,
            GpuPeer::OracleTopK => Policy::OracleTopK,
            GpuPeer::StreamingLlm { .. } => Policy::StreamingLlm,
        }
    }
}

fn invalid(e: crate::TcaError) -> GpuError {
    GpuError::Invalid(e.to_string())
}

/// TCA's S_G per KV head (ascending positions) from its device selection.
pub fn download_global(gpu: &Gpu, h: &DevHeads, tca: &DevSelection) -> GpuResult<Vec<Vec<usize>>> {
    let counts = gpu.download(&tca.gcount)?;
    let gpos = gpu.download(&tca.gpos)?;
    (0..h.hkv)
        .map(|kv| {
            let n = counts[kv].max(0) as usize;
            if n > tca.gcap {
                return Err(GpuError::Invalid(format!(
                    "|S_G| = {n} exceeds the capacity {}",
                    tca.gcap
                )));
            }
            Ok(gpos[kv * tca.gcap..kv * tca.gcap + n]
                .iter()
                .map(|&p| p as usize)
                .collect())
        })
        .collect()
}

/// The attention of a per-query peer (`rule`, see [`GpuPeer::rows`]) at TCA's budgets,
/// once TCA's selection `tca` has been queued over the same heads `h`: k_i from TCA's
/// S_G ([`budgets_table`]), then [`run_key_rows`] into `out` (synchronises the stream).
/// With `mask`, the kept keys of every row as bits (see [`run_key_rows`]).
pub fn peer_rows(
    gpu: &Gpu,
    h: &DevHeads,
    tca: &DevSelection,
    rule: RowRule,
    out: &mut DevAttention,
    mask: Option<&mut cudarc::driver::CudaSlice<u32>>,
) -> GpuResult<()> {
    let global = download_global(gpu, h, tca)?;
    let ks = budgets_table(&global, tca.window, h.len);
    run_key_rows(gpu, h, &ks, rule, out, mask)
}

/// The peer's selection of a layer, once TCA's selection `tca` has been queued on the
/// stream over the same heads `h` (synchronises the stream).
pub fn peer_selection(
    gpu: &Gpu,
    h: &DevHeads,
    tca: &DevSelection,
    peer: GpuPeer,
    cfg: &Config,
) -> GpuResult<DevSelection> {
    match peer {
        GpuPeer::OracleTopK | GpuPeer::StreamingLlm { .. } => Err(GpuError::Invalid(format!(
            "{} chooses keys per query: no S_G of its own (peer_rows runs it)",
            peer.policy().name()
        ))),
        GpuPeer::BlockTopK => {
            let counts = gpu.download(&tca.gcount)?;
            let budgets = counts
                .iter()
                .take(h.hkv)
                .map(|&n| {
                    let k = block_topk_k(n.max(0) as usize, tca.nb, cfg.block_size);
                    Budget::point(k, cfg.block_size).map_err(invalid)
                })
                .collect::<GpuResult<Vec<_>>>()?;
            let p = select_params(h.len, cfg, &budgets)?;
            let mut sel = DevSelection::new(gpu, h, &p)?;
            run_select(gpu, h, &mut sel, None)?;
            Ok(sel)
        }
        GpuPeer::CumulativeThreshold => {
            let s = gpu.download(&tca.s)?;
            let lc = tca.lc;
            let marks = (0..h.hkv)
                .map(|kv| {
                    let sk: Vec<f64> = s[kv * lc..(kv + 1) * lc]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    BlockMarks::new(&cumulative_keep(&sk, cfg.tau), lc, cfg.block_size)
                        .map_err(invalid)
                })
                .collect::<GpuResult<Vec<_>>>()?;
            select_key_sets(gpu, h, cfg.window, cfg.block_size, &marks, &s[..h.hkv * lc])
        }
    }
}
