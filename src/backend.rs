//! Where a layer is computed: the f64 CPU oracle or the CUDA fast path (feature `cuda`).
//!
//! [`Backend::audit_layer`] is the one entry the CLI uses: select S_G, run sparse and
//! exact attention and audit Theorem 1. On the CPU that is [`crate::bound::audit`] over
//! [`crate::selection::select`], with the certificate's gamma_hat beside every gamma
//! ([`crate::certificate`]). On the GPU the selection, the sparse prefill and the
//! dense prefill (bf16 with f32 accumulation, with their log-sum-exps) run on the
//! device on the inputs rounded to bf16, and two audits are made: the verdict, against
//! the f64 oracle on the same rounded inputs (the exact row P_i, gamma_i from the GPU's
//! claimed S_i, the GPU's sparse output with the derived bf16 allowance of
//! [`crate::bound::precision`]) on all rows or a seeded sample, and the GPU's own audit
//! (its dense output and log-sum-exps against its sparse ones) on every row, which an
//! error common to both kernels could not fail.

use crate::bound::{attach_certificates, audit, AuditContext, QueryAudit};
use crate::certificate::{certify, BoundKind, CertifiedTau, Certifier};
use crate::error::{Result, TcaError};
use crate::selection::{select, Budget};
use crate::{Config, Heads};

/// Which rows the oracle audits on the GPU path: all when Hq L <= `limit` (or
/// `limit` = 0), else a sample of `limit` drawn with `seed`. `fault_v_scale` tests the
/// audit itself: the device computes both passes with V scaled by it (an error common
/// to both kernels), which the GPU's own audit cannot see and the oracle's must.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OracleRows {
    pub limit: usize,
    pub seed: u64,
    pub fault_v_scale: Option<f64>,
}

impl Default for OracleRows {
    fn default() -> Self {
        OracleRows {
            limit: 20_000,
            seed: 0,
            fault_v_scale: None,
        }
    }
}

/// A layer's audits.
#[derive(Clone, Debug)]
pub struct LayerAudit {
    /// S_G per KV head, as the backend selected it.
    pub global: Vec<Vec<usize>>,
    /// The verdict's audits, against the f64 oracle.
    pub audits: Vec<QueryAudit>,
    pub context: AuditContext,
    /// GPU only: the device's dense outputs against its sparse ones, every row.
    pub self_audits: Option<Vec<QueryAudit>>,
    /// GPU only: positions where the device's S_G differs from the oracle's selection
    /// on the same rounded inputs (near-ties of f32 importance).
    pub selection_differences: Option<usize>,
}
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

    /// S_G per KV head (docs/algorithm.md §1), then the Theorem 1 audits of the
    /// layer (see the module documentation).
    pub fn audit_layer(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
        rows: OracleRows,
    ) -> Result<LayerAudit> {
        match self {
            Backend::Cpu => {
                // The oracle audits every row; `rows` only thins the GPU's oracle audit.
                let _ = rows;
                let sel = select(heads, cfg, budgets)?;
                let kind = BoundKind::PcaMin;
                let (mut audits, certs) = if cfg.certified_tau {
                    // Certified-tau mode: TCA's sets widened per query until
                    // gamma_hat <= 1 - tau (docs/theorem.md, "Certified-tau mode").
                    let c = Certifier::for_key_sets(
                        heads,
                        BoundKind::Min,
                        cfg.certificate_block,
                        &sel,
                    )?;
                    let wide = CertifiedTau::new(&c, &sel, cfg.tau)?;
                    (
                        audit(heads, &wide)?,
                        certify(heads, &wide, kind, cfg.certificate_block)?,
                    )
                } else {
                    (
                        audit(heads, &sel)?,
                        certify(heads, &sel, kind, cfg.certificate_block)?,
                    )
                };
                attach_certificates(&mut audits, &certs)?;
                Ok(LayerAudit {
                    global: sel.heads.into_iter().map(|h| h.global).collect(),
                    audits,
                    context: AuditContext::default(),
                    self_audits: None,
                    selection_differences: None,
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => {
                use crate::bound::{audit_outputs, audit_rows, sample_rows, Precision};
                let gpu_err = |e: crate::cuda::GpuError| TcaError::Backend(e.to_string());
                let seen = heads.rounded_to_bf16()?;
                let device_input = match rows.fault_v_scale {
                    Some(f) => {
                        let (q, k, v) = seen.tensors();
                        Heads::new(q.clone(), k.clone(), v.mapv(|x| x * f))?
                    }
                    None => seen.clone(),
                };
                let (gsel, sparse) = g
                    .sparse_prefill(&device_input, cfg, budgets)
                    .map_err(gpu_err)?;
                let full = g.dense_prefill(&device_input).map_err(gpu_err)?;
                // The GPU's claimed key sets: its S_G with the window rule.
                let mut claimed = select(&seen, cfg, budgets)?;
                let mut differences = 0;
                for (h, gg) in claimed.heads.iter_mut().zip(&gsel.global) {
                    differences += symmetric_difference(&h.global, gg);
                    h.global = gg.clone();
                }
                let kept = |h: usize, i: usize| claimed.kept(h / claimed.group, i);
                let self_audits = audit_outputs(&seen, &full, &sparse, &kept, Precision::Bf16)?;
                let (hq, l) = (seen.num_q_heads(), seen.len());
                let picked = sample_rows(hq, l, rows.limit, rows.seed);
                let audits = audit_rows(&seen, &claimed, &sparse, Precision::Bf16, &picked)?;
                Ok(LayerAudit {
                    global: gsel.global,
                    audits,
                    context: AuditContext {
                        backend: self.name(),
                        reference: match rows.fault_v_scale {
                            Some(f) => format!("f64 oracle on the bf16-rounded inputs (dense row, gamma from the GPU's S_i); FAULT INJECTED: the device computed with V x {f}"),
                            None => "f64 oracle on the bf16-rounded inputs (dense row, gamma from the GPU's S_i)".into(),
                        },
                        rows: if picked.len() == hq * l {
                            format!("all {}", hq * l)
                        } else {
                            format!(
                                "{} of {} (seeded sample, seed {}, last query of every head included)",
                                picked.len(),
                                hq * l,
                                rows.seed
                            )
                        },
                        ..AuditContext::default()
                    },
                    self_audits: Some(self_audits),
                    selection_differences: Some(differences),
                })
            }
        }
    }

    /// TCA's prefill on the first `prefill_len` tokens, then the rest decoded one at a
    /// time over the compacted cache (docs/algorithm.md §3), every step audited against
    /// the f64 oracle with S_i = what the cache held. On the CPU that is
    /// [`crate::decode::decode`]; on the GPU the cache and its compactions run on the
    /// device over the bf16-rounded inputs, the oracle sees the same rounded values and
    /// the outputs are audited with the bf16 allowance.
    pub fn decode(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
        prefill_len: usize,
    ) -> Result<crate::decode::DecodeReport> {
        match self {
            Backend::Cpu => crate::decode::decode(heads, cfg, budgets, prefill_len),
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => {
                use crate::bound::{audit_row, Precision, PrefixStats};
                use crate::decode::{DecodeReport, HeadCacheReport};
                let seen = heads.rounded_to_bf16()?;
                let run = g
                    .decode_steps(&seen, cfg, budgets, prefill_len)
                    .map_err(|e| TcaError::Backend(e.to_string()))?;
                let stats = PrefixStats::of(&seen);
                let mut audits = Vec::with_capacity(run.steps.len() * seen.num_q_heads());
                for (t, held, o) in &run.steps {
                    for h in 0..seen.num_q_heads() {
                        let kv = seen.kv_of(h);
                        audits.push(audit_row(
                            &seen,
                            &stats[kv],
                            (h, *t),
                            &held[kv],
                            o.row(h),
                            Precision::Bf16,
                        )?);
                    }
                }
                let (ix, d) = (&run.index, seen.dim());
                let caches = (0..seen.num_kv_heads())
                    .map(|kv| {
                        let (global, window) = (ix.global[kv].len(), seen.len() - ix.lo);
                        HeadCacheReport {
                            kv_head: kv,
                            global_tokens: global,
                            window_tokens: window,
                            peak_tokens: run.peak[kv],
                            ceiling_tokens: global + ix.window + ix.block,
                            kv_bytes: (global + window) * 2 * d * 2,
                            index_bytes: (global + window) * std::mem::size_of::<usize>(),
                            compactions: ix.compactions,
                            block_keep: ix.block_keep[kv],
                        }
                    })
                    .collect();
                Ok(DecodeReport::from_parts(
                    &seen,
                    prefill_len,
                    caches,
                    audits,
                    run.seconds_per_step,
                    2,
                ))
            }
        }
    }
}

/// |a symmetric-difference b| of two ascending position lists.
pub fn symmetric_difference(a: &[usize], b: &[usize]) -> usize {
    let (mut i, mut j, mut n) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                n += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                n += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    n + (a.len() - i) + (b.len() - j)
}
