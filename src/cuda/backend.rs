//! The GPU backend as the CLI sees it: f64 [`Heads`] in (rounded to bf16 on upload),
//! host results out, in the oracle's own types where they exist.

use super::decode::{self, DevDecode};
use super::prefill::{self, DevAttention};
use super::selection::{download_selection, run_select, DevSelection, HostSelection, SelectParams};
use super::{bf16_to_f32, DevHeads, Gpu, GpuError, GpuResult};
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
