//! Theorem 1 at every layer of a GPU forward with TCA (`tca quality-heads --backend
//! cuda`): after a layer's sparse prefill the dense prefill runs on the same Q, K, V,
//! and the layer is audited on the host two ways:
//! - every query, from the two outputs and log-sum-exps (gamma_i = 1 - exp(lse~ - lse),
//!   the readings with the bf16 allowance, [`audit_outputs_with`]);
//! - a seeded sample of queries against the f64 oracle on the same bf16 inputs (exact
//!   rows, gamma from the GPU's claimed S_i, [`audit_rows_with`]).
//!
//! The prefix diameters of V come from the device ([`prefix_diameters`]): the host's
//! O(L^2 d) loop does not fit 128K tokens.

use super::super::audit::prefix_diameters;
use super::super::backend::attention_to_host;
use super::super::prefill::{self, DevAttention};
use super::super::selection::HostSelection;
use super::super::{DevHeads, Gpu, GpuError, GpuResult};
use super::forward::download_heads;
use crate::bound::layers::{head_rows, HeadAuditRow};
use crate::bound::{audit_outputs_with, audit_rows_with, sample_rows, Precision, PrefixStats};
use crate::selection::{kept_count, key_set, KeySets};

/// S_i as the GPU claims it: its S_G per KV head with the window rule (docs/algorithm.md
/// §1.7).
pub struct ClaimedSets {
    pub global: Vec<Vec<usize>>,
    pub window: usize,
    pub len: usize,
    pub group: usize,
}

impl ClaimedSets {
    /// |S_i| of KV head `kv`.
    pub fn kept(&self, kv: usize, i: usize) -> usize {
        kept_count(&self.global[kv], self.window, i)
    }
}

impl KeySets for ClaimedSets {
    fn shape(&self) -> (usize, usize) {
        (self.global.len() * self.group, self.len)
    }
    fn keys(&self, h: usize, i: usize) -> Vec<usize> {
        key_set(&self.global[h / self.group], self.window, i).collect()
    }
}

/// What to audit at each layer.
#[derive(Clone, Copy, Debug)]
pub struct AuditOptions {
    pub tau: f64,
    /// Rows of the oracle's sample per layer (all rows when Hq L is smaller).
    pub oracle_rows: usize,
    pub seed: u64,
}

/// Collects the per-layer audit rows of one forward.
pub struct LayerAuditor {
    pub opts: AuditOptions,
    dense: Option<DevAttention>,
    pub rows: Vec<HeadAuditRow>,
    /// Seconds spent in the audits (dense pass, transfers, host checks).
    pub seconds: f64,
}

impl LayerAuditor {
    pub fn new(opts: AuditOptions) -> Self {
        LayerAuditor {
            opts,
            dense: None,
            rows: Vec::new(),
            seconds: 0.0,
        }
    }

    /// Audits layer `li`: `sparse` is the layer's TCA output over `h` with the
    /// selection `sel` (downloaded) and window `window`.
    pub fn layer(
        &mut self,
        g: &Gpu,
        li: usize,
        h: &DevHeads,
        sel: &HostSelection,
        window: usize,
        sparse: &DevAttention,
    ) -> GpuResult<()> {
        let t0 = std::time::Instant::now();
        let err = |e: crate::TcaError| GpuError::Invalid(e.to_string());
        if self.dense.is_none() {
            self.dense = Some(DevAttention::new(g, h)?);
        }
        let dense = self.dense.as_mut().expect("allocated above");
        dense.poison(g)?;
        prefill::run_dense(g, h, dense)?;
        g.sync()?;
        let heads = download_heads(g, h)?.to_heads().map_err(err)?;
        let full = attention_to_host(g, h, dense)?;
        let sparse = attention_to_host(g, h, sparse)?;
        let (hq, hkv, l, d) = (h.hq, h.hkv, h.len, h.dim);
        let diam = prefix_diameters(g, &h.v, (hkv, l, d))?;
        let stats: Vec<PrefixStats> = diam
            .into_iter()
            .enumerate()
            .map(|(kv, dm)| PrefixStats::with_diameters(heads.k(kv), heads.v(kv), dm))
            .collect();
        let claimed = ClaimedSets {
            global: sel.global.clone(),
            window,
            len: l,
            group: h.group(),
        };
        let kept = |q: usize, i: usize| claimed.kept(q / claimed.group, i);
        let me = audit_outputs_with(&heads, &stats, &full, &sparse, &kept, Precision::Bf16)
            .map_err(err)?;
        let picked = sample_rows(hq, l, self.opts.oracle_rows, self.opts.seed ^ li as u64);
        let orc = audit_rows_with(&heads, &stats, &claimed, &sparse, Precision::Bf16, &picked)
            .map_err(err)?;
        let group = h.group();
        self.rows
            .extend(head_rows(li, hq, |q| q / group, &me, &orc, self.opts.tau));
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }
}

/// The device's prefix diameters of each KV head of `heads` (rounded to bf16 and
/// uploaded): the check of [`prefix_diameters`] against the host's.
pub fn device_diameters(m: &super::GpuModel, heads: &crate::Heads) -> GpuResult<Vec<Vec<f64>>> {
    let h = DevHeads::from_heads(&m.gpu, heads)?;
    prefix_diameters(&m.gpu, &h.v, (h.hkv, h.len, h.dim))
}
