//! The model on the GPU as the CLI's commands use it (`--backend cuda`): one [`Engine`]
//! per command, opened once (kernels compiled, weights uploaded) and asked for scores,
//! greedy generations and audited forwards in host types. Without the `cuda` feature
//! every entry answers with an error saying how to build it.

use crate::bound::layers::HeadAuditRow;
use crate::calibration::Profile;
use crate::config::Config;
use crate::error::{Result, TcaError};
use crate::model::{Model, Score};
use crate::selection::policies::Policy;

/// A sparse attention: its policy (TCA or any peer: the GPU runs them all from TCA's
/// selection), TCA's configuration and profile; or exact attention (`None`).
pub type Tca<'a> = Option<(Policy, &'a Config, &'a Profile)>;

/// What a GPU generation returns.
#[derive(Debug, Clone)]
pub struct GenOut {
    pub tokens: Vec<u32>,
    /// Mean |S_i| / (i + 1) of the prefill over layers (1 for exact attention).
    pub keep_fraction: f64,
    /// Compact decoding: per step, layer and query head, the eviction regret.
    pub regret: Vec<Vec<Vec<f64>>>,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl GenOut {
    /// Mean regret over steps, layers and heads (NaN without compact decoding).
    pub fn mean_regret(&self) -> f64 {
        let v: Vec<f64> = self.regret.iter().flatten().flatten().copied().collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    }
}

/// An error when the model uses what the GPU forward does not apply yet: q/k/v/o
/// biases (qwen2), or a head dim other than hidden / heads.
pub fn cuda_supports(model: &Model) -> Result<()> {
    let c = &model.llama.config;
    let mut uses = Vec::new();
    if model
        .llama
        .layer_weights(0)
        .is_some_and(|w| w.bq.is_some() || w.bk.is_some() || w.bv.is_some() || w.bo.is_some())
    {
        uses.push("attention biases".to_string());
    }
    if c.head_dim * c.n_heads != c.hidden {
        uses.push(format!(
            "head dim {} with {} heads and hidden {}",
            c.head_dim, c.n_heads, c.hidden
        ));
    }
    if uses.is_empty() {
        Ok(())
    } else {
        Err(TcaError::Backend(format!(
            "the CUDA forward does not apply {} yet (model {}); use --backend cpu",
            uses.join(", "),
            model.name
        )))
    }
}

/// Mean keep fraction over the layers a forward selected at (1 when none did).
#[cfg(feature = "cuda")]
fn mean_keep(stats: &crate::cuda::model::ForwardStats) -> f64 {
    if stats.keep.is_empty() {
        1.0
    } else {
        stats.keep.iter().map(|k| k.keep_fraction).sum::<f64>() / stats.keep.len() as f64
    }
}

/// The model on the GPU.
pub struct Engine {
    #[cfg(feature = "cuda")]
    gpu: crate::cuda::model::GpuModel,
    /// Seconds to open the device, compile the kernels and upload the weights.
    pub open_s: f64,
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::cuda::model::audit::{AuditOptions, LayerAuditor};
    use crate::cuda::model::generate::DecodeCache;
    use crate::cuda::model::{GpuAttn, GpuModel, GpuPeer};

    fn err(e: crate::cuda::GpuError) -> TcaError {
        TcaError::Backend(e.to_string())
    }

    fn attn<'a>(tca: Tca<'a>) -> Result<GpuAttn<'a>> {
        Ok(match tca {
            None => GpuAttn::Exact,
            Some((Policy::Tca, config, profile)) => GpuAttn::Tca { config, profile },
            Some((p, config, profile)) => GpuAttn::Peer {
                peer: GpuPeer::from_policy(p).ok_or_else(|| {
                    TcaError::Invalid(format!("policy {} is not a peer", p.name()))
                })?,
                config,
                profile,
            },
        })
    }

    impl Engine {
        /// Opens the device and uploads `model`.
        pub fn open(model: &Model) -> Result<Engine> {
            cuda_supports(model)?;
            let t = std::time::Instant::now();
            let gpu = GpuModel::new(&model.llama).map_err(err)?;
            Ok(Engine {
                gpu,
                open_s: t.elapsed().as_secs_f64(),
            })
        }

        /// The device's name.
        pub fn device(&self) -> String {
            self.gpu.gpu.name()
        }

        /// Scores `tokens[max(from, 1)..]`; returns the score and the keep fraction.
        pub fn score(&self, tokens: &[u32], tca: Tca, from: usize) -> Result<(Score, f64)> {
            let (s, st) = self
                .gpu
                .score(tokens, attn(tca)?, from, false, None)
                .map_err(err)?;
            Ok((s, mean_keep(&st)))
        }

        /// Post-RoPE Q, K, V of `layers` (exact forward).
        pub fn capture(&self, tokens: &[u32], layers: &[usize]) -> Result<crate::model::Capture> {
            self.gpu.capture(tokens, layers).map_err(err)
        }

        /// A TCA forward over `tokens` with every layer audited: the score, one row per
        /// (layer, query head), the keep fraction and the audit's seconds.
        pub fn audited(
            &self,
            tokens: &[u32],
            cfg: &Config,
            profile: &Profile,
            oracle_rows: usize,
            seed: u64,
        ) -> Result<(Score, Vec<HeadAuditRow>, f64, f64)> {
            let mut a = LayerAuditor::new(AuditOptions {
                tau: cfg.tau,
                oracle_rows,
                seed,
            });
            let (s, st) = self
                .gpu
                .score(
                    tokens,
                    attn(Some((Policy::Tca, cfg, profile)))?,
                    1,
                    false,
                    Some(&mut a),
                )
                .map_err(err)?;
            Ok((s, a.rows, mean_keep(&st), a.seconds))
        }

        /// Greedy generation; `compact`: TCA's compacted cache (else the full one).
        pub fn generate(
            &self,
            prompt: &[u32],
            max_new: usize,
            tca: Tca,
            compact: bool,
            eos: Option<u32>,
        ) -> Result<GenOut> {
            let cache = if compact {
                DecodeCache::Compact { shadow: true }
            } else {
                DecodeCache::Full
            };
            let g = self
                .gpu
                .generate(prompt, max_new, attn(tca)?, cache, eos)
                .map_err(err)?;
            Ok(GenOut {
                keep_fraction: mean_keep(&g.stats),
                tokens: g.tokens,
                regret: g.regret,
                prefill_s: g.prefill_s,
                decode_s: g.decode_s,
            })
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    /// The error of every GPU entry in a build without CUDA.
    pub fn no_cuda() -> TcaError {
        TcaError::Backend(
            "this tca was built without CUDA; rebuild with `cargo build --release --features cuda`"
                .into(),
        )
    }

    impl Engine {
        pub fn open(model: &Model) -> Result<Engine> {
            cuda_supports(model)?;
            Err(no_cuda())
        }
        pub fn device(&self) -> String {
            String::new()
        }
        pub fn score(&self, _: &[u32], _: Tca, _: usize) -> Result<(Score, f64)> {
            Err(no_cuda())
        }
        pub fn capture(&self, _: &[u32], _: &[usize]) -> Result<crate::model::Capture> {
            Err(no_cuda())
        }
        pub fn audited(
            &self,
            _: &[u32],
            _: &Config,
            _: &Profile,
            _: usize,
            _: u64,
        ) -> Result<(Score, Vec<HeadAuditRow>, f64, f64)> {
            Err(no_cuda())
        }
        pub fn generate(
            &self,
            _: &[u32],
            _: usize,
            _: Tca,
            _: bool,
            _: Option<u32>,
        ) -> Result<GenOut> {
            Err(no_cuda())
        }
    }
}

#[cfg(not(feature = "cuda"))]
pub use imp::no_cuda;

#[cfg(test)]
mod tests {
    use super::GenOut;
    use crate::cli::model::AttentionKind;

    #[test]
    fn the_gpu_runs_every_attention_but_certified_tau() {
        let on_gpu = AttentionKind::ALL.iter().filter(|k| k.on_gpu()).count();
        assert_eq!(on_gpu, AttentionKind::ALL.len() - 1);
        assert!(!AttentionKind::TcaCertified.on_gpu());
        let e = AttentionKind::TcaCertified.gpu_refusal().to_string();
        assert!(
            e.contains("tca_certified") && e.contains("--backend cpu"),
            "{e}"
        );
    }

    #[test]
    fn mean_regret_averages_steps_layers_and_heads() {
        let mut g = GenOut {
            tokens: vec![1, 2, 3],
            keep_fraction: 1.0,
            regret: vec![],
            prefill_s: 0.0,
            decode_s: 0.0,
        };
        assert!(g.mean_regret().is_nan());
        g.regret = vec![
            vec![vec![0.1, 0.3], vec![0.0, 0.0]],
            vec![vec![0.4, 0.0], vec![0.2, 0.2]],
        ];
        assert!((g.mean_regret() - 1.2 / 8.0).abs() < 1e-12);
    }
}
