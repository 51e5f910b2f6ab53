//! The peer policies of docs/algorithm.md §5 that the GPU forward runs, as key sets
//! S_G + window from TCA's GPU selection of the same layer (the sparse prefill and the
//! compacted decode cache take any S_G):
//! - block top-k: k = round(|S_G of TCA| / nb) clamped to [1, b] per KV head
//!   ([`block_topk_k`], on the host from TCA's |S_G|), then the GPU selection again
//!   with the point budget k in every block (the device-verified kernels only);
//! - cumulative threshold: TCA's importance s downloaded, the key set chosen on the
//!   host by the CPU policy's own [`cumulative_keep`], then compacted on the device by
//!   the per-block top-t kernel over 0/1 marks ([`select_key_sets`]).
//!
//! Both synchronise the stream once per layer (the host decides).

use super::super::backend::select_params;
use super::super::selection::{run_select, select_key_sets, DevSelection};
use super::super::{DevHeads, Gpu, GpuError, GpuResult};
use crate::config::Config;
use crate::selection::policies::{block_topk_k, cumulative_keep, BlockMarks, Policy};
use crate::selection::Budget;

/// A peer policy the GPU forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuPeer {
    BlockTopK,
    CumulativeThreshold,
}

impl GpuPeer {
    /// The GPU form of `policy`, where there is one.
    pub fn from_policy(policy: Policy) -> Option<Self> {
        match policy {
            Policy::BlockTopK => Some(GpuPeer::BlockTopK),
            Policy::CumulativeThreshold => Some(GpuPeer::CumulativeThreshold),
            _ => None,
        }
    }

    pub fn policy(self) -> Policy {
        match self {
            GpuPeer::BlockTopK => Policy::BlockTopK,
            GpuPeer::CumulativeThreshold => Policy::CumulativeThreshold,
        }
    }
}

fn invalid(e: crate::TcaError) -> GpuError {
    GpuError::Invalid(e.to_string())
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
