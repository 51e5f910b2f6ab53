//! The GPU backend as the CLI sees it: f64 [`Heads`] in (rounded to bf16 on upload),
//! host results out, in the oracle's own types where they exist.

use super::decode::{self, DevDecode};
use super::prefill::{self, DevAttention};
use super::selection::{download_selection, run_select, DevSelection, HostSelection, SelectParams};
use super::{bf16_to_f32, Ctx, DevHeads, Gpu, GpuError, GpuResult};
use crate::config::{GqaReduce, MassNorm};
use crate::reference::Attention;
use crate::selection::Budget;
use crate::{Config, Heads};
use ndarray::{Array2, Array3};

/// The selection the GPU made, on the host (S_G per KV head and the intermediates).
pub type GpuSelectionResult = HostSelection;
/// Prefill or decode outputs converted to f64 (O [Hq, L or 1, d], lse [Hq, L or 1]).
pub type GpuAttention = Attention;

/// Budget table of docs/algorithm.md §1.5 for every KV head: `table[kv * nb + r]` = t_r
/// (before clipping), from the oracle's [`Budget::block_budgets`].
pub fn budget_table(budgets: &[Budget], nb: usize) -> Vec<i32> {
    budgets
        .iter()
        .flat_map(|b| b.block_budgets(nb).into_iter().map(|t| t as i32))
        .collect()
}

/// The kernels' parameters for `cfg` and one budget per KV head. The GPU path supports
/// `importance_queries = 1` (the paper's setting) only.
pub fn select_params(len: usize, cfg: &Config, budgets: &[Budget]) -> GpuResult<SelectParams> {
    cfg.validate()
        .map_err(|e| GpuError::Invalid(e.to_string()))?;
    if cfg.importance_queries != 1 {
        return Err(GpuError::Invalid(
            "the GPU selection implements importance_queries = 1 only".into(),
        ));
    }
    if budgets.iter().any(|b| b.block_size() != cfg.block_size) {
        return Err(GpuError::Invalid(
            "a budget's b differs from block_size".into(),
        ));
    }
    let nb = SelectParams::num_blocks(len, cfg.window, cfg.block_size);
    Ok(SelectParams {
        window: cfg.window,
        block: cfg.block_size,
        alpha: cfg.alpha as f32,
        mass_norm_max: cfg.mass_norm == MassNorm::Max,
        reduce_max: cfg.gqa_reduce == GqaReduce::Max,
        table: budget_table(budgets, nb),
    })
}

/// Converts device prefill outputs to f64 arrays.
pub fn attention_to_host(gpu: &Gpu, h: &DevHeads, a: &DevAttention) -> GpuResult<Attention> {
    let o = gpu.download(&a.o)?;
    let lse = gpu.download(&a.lse)?;
    Ok(Attention {
        o: Array3::from_shape_vec(
            (h.hq, h.len, h.dim),
            o.iter().map(|&x| bf16_to_f32(x) as f64).collect(),
        )
        .map_err(|e| GpuError::Invalid(e.to_string()))?,
        lse: Array2::from_shape_vec((h.hq, h.len), lse.iter().map(|&x| x as f64).collect())
            .map_err(|e| GpuError::Invalid(e.to_string()))?,
    })
}

/// One device and its kernels.
pub struct GpuBackend {
    pub gpu: Gpu,
}

impl GpuBackend {
    /// Fails with [`GpuError::NoDevice`] where no GPU is present.
    pub fn new() -> GpuResult<Self> {
        Ok(GpuBackend { gpu: Gpu::new()? })
    }

    fn prepare(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
    ) -> GpuResult<(DevHeads, DevSelection)> {
        let h = DevHeads::from_heads(&self.gpu, heads)?;
        let p = select_params(heads.len(), cfg, budgets)?;
        let mut sel = DevSelection::new(&self.gpu, &h, &p)?;
        run_select(&self.gpu, &h, &mut sel, None)?;
        Ok((h, sel))
    }

    /// docs/algorithm.md §1.1-1.6 on the GPU: S_G per KV head.
    pub fn select(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
    ) -> GpuResult<HostSelection> {
        let (h, sel) = self.prepare(heads, cfg, budgets)?;
        self.gpu.sync()?;
        download_selection(&self.gpu, &h, &sel)
    }

    /// Selection then sparse prefill attention (bf16, f32 accumulation).
    pub fn sparse_prefill(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
    ) -> GpuResult<(HostSelection, Attention)> {
        let (h, sel) = self.prepare(heads, cfg, budgets)?;
        let mut out = DevAttention::new(&self.gpu, &h)?;
        out.poison(&self.gpu)?;
        prefill::run_sparse(&self.gpu, &h, &sel, &mut out)?;
        self.gpu.sync()?;
        Ok((
            download_selection(&self.gpu, &h, &sel)?,
            attention_to_host(&self.gpu, &h, &out)?,
        ))
    }

    /// Dense causal attention (bf16, f32 accumulation) with its log-sum-exp.
    pub fn dense_prefill(&self, heads: &Heads) -> GpuResult<Attention> {
        let h = DevHeads::from_heads(&self.gpu, heads)?;
        let mut out = DevAttention::new(&self.gpu, &h)?;
        out.poison(&self.gpu)?;
        prefill::run_dense(&self.gpu, &h, &mut out)?;
        self.gpu.sync()?;
        attention_to_host(&self.gpu, &h, &out)
    }

    /// Decode of the last query q_{L-1} over the compacted cache (S_G and the last w
    /// tokens): O [Hq, 1, d] and lse [Hq, 1]. With `dense`, over all L keys instead.
    pub fn decode(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
        dense: bool,
    ) -> GpuResult<Attention> {
        let (h, sel) = self.prepare(heads, cfg, budgets)?;
        let mut out = DevDecode::new(
            &self.gpu,
            &h,
            if dense { h.len } else { sel.gcap + sel.window },
        )?;
        out.poison(&self.gpu)?;
        if dense {
            decode::run_dense(&self.gpu, &h, &mut out)?;
        } else {
            decode::run_sparse(&self.gpu, &h, &sel, &mut out)?;
        }
        self.gpu.sync()?;
        let o = self.gpu.download(&out.o)?;
        let lse = self.gpu.download(&out.lse)?;
        Ok(Attention {
            o: Array3::from_shape_vec((h.hq, 1, h.dim), o.iter().map(|&x| x as f64).collect())
                .map_err(|e| GpuError::Invalid(e.to_string()))?,
            lse: Array2::from_shape_vec((h.hq, 1), lse.iter().map(|&x| x as f64).collect())
                .map_err(|e| GpuError::Invalid(e.to_string()))?,
        })
    }
}

/// A TCA decoding run on the GPU over a captured layer ([`GpuBackend::decode_steps`]).
pub struct GpuDecodeRun {
    /// Per decode step t (ascending): the positions each KV head's cache held and the
    /// output of every query head `[Hq, d]`.
    pub steps: Vec<(usize, Vec<Vec<usize>>, Array2<f64>)>,
    /// The cache's positions at the end, and its peak tokens per KV head.
    pub index: crate::decode::CacheIndex,
    pub peak: Vec<usize>,
    /// Wall time of the decode loop per step (each step downloads its output).
    pub seconds_per_step: f64,
}

impl GpuBackend {
    /// docs/algorithm.md §3 on the GPU: TCA's selection on the first `prefill_len`
    /// tokens (none when prefill_len <= w), then tokens prefill_len .. L one at a time
    /// over the compacted cache with its compactions
    /// ([`super::compact_cache::DevCompactCache`]); the keys and values of a step come
    /// from `heads` (rounded to bf16 on upload). The caller audits the outputs.
    pub fn decode_steps(
        &self,
        heads: &Heads,
        cfg: &Config,
        budgets: &[Budget],
        prefill_len: usize,
    ) -> GpuResult<GpuDecodeRun> {
        let l = heads.len();
        if prefill_len == 0 || prefill_len >= l || budgets.len() != heads.num_kv_heads() {
            return Err(GpuError::Invalid(format!(
                "decode needs 1 <= prefill length < L and one budget per KV head: prefill \
                 {prefill_len}, L = {l}, {} budgets",
                budgets.len()
            )));
        }
        let g = &self.gpu;
        let full = DevHeads::from_heads(g, heads)?;
        let d = full.dim;
        let prefix = heads
            .prefix(prefill_len)
            .map_err(|e| GpuError::Invalid(e.to_string()))?;
        let (global, sel) = if prefill_len > cfg.window {
            let (h, sel) = self.prepare(&prefix, cfg, budgets)?;
            g.sync()?;
            (download_selection(g, &h, &sel)?.global, Some(sel))
        } else {
            (vec![Vec::new(); heads.num_kv_heads()], None)
        };
        let keep = budgets.iter().map(Budget::decode_budget).collect();
        let index = crate::decode::CacheIndex::new(global, prefill_len, cfg, keep)
            .map_err(|e| GpuError::Invalid(e.to_string()))?;
        let mut cc =
            super::compact_cache::DevCompactCache::new(g, index, sel.as_ref(), d, l - prefill_len)?;
        let mut dec = DevDecode::new(g, &full, cc.gcap + cfg.window + cfg.block_size)?;
        let t0 = std::time::Instant::now();
        let mut steps = Vec::with_capacity(l - prefill_len);
        for t in prefill_len..l {
            dec.poison(g)?;
            {
                let (a, b) = cc.segments(&full.k, &full.v, l, t);
                let q = full.q.slice(t * d..);
                decode::run_segments(g, &full, q, l * d, &a, Some(&b), &mut dec)?;
            }
            let o = g.download(&dec.o)?;
            if let Some(i) = o.iter().position(|x| !x.is_finite()) {
                return Err(GpuError::Invalid(format!(
                    "decode step {t}: non-finite output of query head {}",
                    i / d
                )));
            }
            let held = (0..full.hkv).map(|kv| cc.index.positions(kv, t)).collect();
            let o = Array2::from_shape_vec((full.hq, d), o.iter().map(|&x| x as f64).collect())
                .map_err(|e| GpuError::Invalid(e.to_string()))?;
            steps.push((t, held, o));
            if cc.index.due(t) {
                let lse = g.download(&dec.lse)?;
                let mut q = Vec::with_capacity(full.hq * d);
                for h in 0..full.hq {
                    let at = (h * l + t) * d;
                    q.extend(
                        g.stream
                            .clone_dtoh(&full.q.slice(at..at + d))
                            .ctx("download q")?,
                    );
                }
                cc.after_step(g, t, &q, &lse, (&full.k, &full.v, l), cfg.gqa_reduce)?;
            }
        }
        Ok(GpuDecodeRun {
            seconds_per_step: t0.elapsed().as_secs_f64() / (l - prefill_len) as f64,
            peak: cc.peak.clone(),
            index: cc.index,
            steps,
        })
    }
}
