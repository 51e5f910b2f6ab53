//! What `tca perplexity --backend cuda` and `tca capture --backend cuda` run: the
//! [`GpuModel`] forward with exact or TCA attention, its errors as the CLI's.

use super::forward::{ForwardStats, GpuAttn, GpuModel};
use super::peers::GpuPeer;
use crate::cli::model::{AttentionKind, CalibrationArgs};
use crate::config::Config;
use crate::cuda::GpuError;
use crate::error::{Result, TcaError};
use crate::model::llama::{Capture, Llama, Score};
use crate::model::Model;

/// A GPU error as the CLI's backend error.
pub fn gpu_err(e: GpuError) -> TcaError {
    TcaError::Backend(e.to_string())
}

/// Opens the device and uploads the model.
pub fn open(llama: &Llama) -> Result<GpuModel> {
    GpuModel::new(llama).map_err(gpu_err)
}

/// The outcome of a GPU scoring run.
pub struct GpuScore {
    pub score: Score,
    /// Mean keep fraction over layers (1 for exact attention).
    pub keep_fraction: f64,
    /// Seconds spent calibrating (on the CPU; 0 with a loaded profile or exact).
    pub calibrate_s: f64,
    /// Seconds to open the device, compile the kernels and upload the weights.
    pub open_s: f64,
    /// Seconds of the forward and scoring (to the NLLs on the host).
    pub forward_s: f64,
    pub stats: ForwardStats,
    pub device: String,
}

/// Scores `tokens[max(from, 1)..]` on the GPU with exact attention or TCA (the profile
/// loaded or calibrated on the CPU as for the CPU backend). Block top-k and the cumulative threshold run as key sets
/// from TCA's GPU selection; the other policies are CPU-only.
pub fn score(
    model: &Model,
    tokens: &[u32],
    kind: AttentionKind,
    calibration: &CalibrationArgs,
    cfg: &Config,
    from: usize,
) -> Result<GpuScore> {
    let t0 = std::time::Instant::now();
    if !kind.on_gpu() {
        return Err(kind.gpu_refusal());
    }
    let profile = match kind.policy() {
        None => None,
        Some(_) => Some(
            calibration
                .profiles(model, cfg, &[cfg.tau])?
                .pop()
                .ok_or_else(|| TcaError::Invalid("no profile".into()))?,
        ),
    };
    let calibrate_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let gpu = open(&model.llama)?;
    let t2 = std::time::Instant::now();
    let attn = match (&profile, kind.policy().and_then(GpuPeer::from_policy)) {
        (None, _) => GpuAttn::Exact,
        (Some(p), None) => GpuAttn::Tca {
            config: cfg,
            profile: p,
        },
        (Some(p), Some(peer)) => GpuAttn::Peer {
            peer,
            config: cfg,
            profile: p,
        },
    };
    let (score, stats) = gpu
        .score(tokens, attn, from, false, None)
        .map_err(gpu_err)?;
    let forward_s = t2.elapsed().as_secs_f64();
    let keep_fraction = if stats.keep.is_empty() {
        1.0
    } else {
        stats.keep.iter().map(|k| k.keep_fraction).sum::<f64>() / stats.keep.len() as f64
    };
    Ok(GpuScore {
        score,
        keep_fraction,
        calibrate_s: if profile.is_some() { calibrate_s } else { 0.0 },
        open_s: (t2 - t1).as_secs_f64(),
        forward_s,
        stats,
        device: gpu.gpu.name(),
    })
}

/// Post-RoPE Q, K, V of `layers` from the GPU forward (bf16 values as f32).
pub fn capture(llama: &Llama, tokens: &[u32], layers: &[usize]) -> Result<Capture> {
    open(llama)?.capture(tokens, layers).map_err(gpu_err)
}
