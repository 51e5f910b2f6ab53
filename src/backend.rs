//! Where a layer is computed: the f64 CPU oracle or the CUDA fast path (feature `cuda`).
//!
//! [`Backend::audit_layer`] is the one entry the CLI uses: select S_G, run sparse and
//! exact attention and audit Theorem 1. On the CPU that is [`crate::bound::audit`] over
//! [`crate::selection::select`]; on the GPU the selection, the sparse prefill and the
//! dense prefill (both bf16 with f32 accumulation, with their log-sum-exps) run on the
//! device and [`crate::bound::audit_outputs`] audits their outputs against the inputs
//! rounded to bf16 (the values the device saw), with [`Allowance::BF16`].

use crate::bound::{audit, QueryAudit};
use crate::error::{Result, TcaError};
use crate::selection::{select, Budget};
use crate::{Config, Heads};

/// The backends a command can be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The f64 reference (the oracle).
    Cpu,
    /// The CUDA kernels (needs a build with `--features cuda` and a GPU).
    Cuda,
}

/// A ready backend.
pub enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::cuda::GpuBackend>),
}

impl Backend {
    /// Opens `kind`: the CPU always; CUDA where built in and a device is present.
    pub fn open(kind: BackendKind) -> Result<Self> {
        match kind {
            BackendKind::Cpu => Ok(Backend::Cpu),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => crate::cuda::GpuBackend::new()
                .map(|g| Backend::Cuda(Box::new(g)))
                .map_err(|e| TcaError::Backend(e.to_string())),
            #[cfg(not(feature = "cuda"))]
            BackendKind::Cuda => Err(TcaError::Backend(
                "this tca was built without CUDA; rebuild with `cargo build --release --features cuda`"
                    .into(),
            )),
        }
    }

    /// Name for reports.
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu (f64)".into(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => format!("cuda (bf16, {})", g.gpu.name()),
        }
    }

    /// S_G per KV head (docs/algorithm.md §1), then the Theorem 1 audit of every (query head,
    /// query) of the layer. Returns (S_G per KV head, the audits).
    pub fn audit_layer(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
    ) -> Result<(Vec<Vec<usize>>, Vec<QueryAudit>)> {
        match self {
            Backend::Cpu => {
                let sel = select(heads, cfg, budgets)?;
                let audits = audit(heads, &sel)?;
                Ok((sel.heads.into_iter().map(|h| h.global).collect(), audits))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => {
                use crate::bound::{audit_outputs, Allowance};
                use crate::selection::window_start;
                let gpu_err = |e: crate::cuda::GpuError| TcaError::Backend(e.to_string());
                let seen = heads.rounded_to_bf16()?;
                let (sel, sparse) = g.sparse_prefill(&seen, cfg, budgets).map_err(gpu_err)?;
                let full = g.dense_prefill(&seen).map_err(gpu_err)?;
                let group = seen.group();
                let kept = |h: usize, i: usize| {
                    let lo = window_start(cfg.window, i);
                    sel.global[h / group].partition_point(|&j| j < lo) + (i + 1 - lo)
                };
                let audits = audit_outputs(&seen, &full, &sparse, &kept, Allowance::BF16)?;
                Ok((sel.global, audits))
            }
        }
    }
}
