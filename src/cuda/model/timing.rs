//! Per-layer attention timing on real heads: a TCA forward of the model over a text,
//! and at each layer, on that layer's live Q, K, V (the real heads at that length), the
//! TCA stages (importance, redundancy, ranking and budgets, top-t and compaction, sparse
//! prefill) and the project's dense prefill, each timed with CUDA events after warm-up
//! runs, the work queued behind a spin kernel so that host gaps are not timed.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use super::super::backend::select_params;
use super::super::prefill::{self, DevAttention};
use super::super::selection::{download_selection, run_select, DevSelection};
use super::super::{Ctx, DevHeads, GpuError, GpuResult};
use super::forward::{keep_fraction, GpuAttn, GpuModel, Inspect};
use crate::calibration::Profile;
use crate::config::Config;

/// Medians over the timed runs of one layer, in milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerTiming {
    pub layer: usize,
    pub len: usize,
    /// Mean |S_i| / (i + 1) of the layer's selection.
    pub keep_fraction: f64,
    /// Importance, redundancy, ranking/budgets, top-t/compaction, sparse prefill.
    pub stages_ms: [f64; 5],
    /// Minimum over runs of the whole TCA prefill (the five stages).
    pub tca_min_ms: f64,
    pub tca_ms: f64,
    pub dense_ms: f64,
    pub dense_min_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

impl GpuModel {
    /// Times TCA's stages and the dense prefill at every layer of a TCA forward over
    /// `tokens` (`warm` untimed and `iters` timed runs each; `spin_us` of spin before
    /// each run). `tokens` may exceed the model's context (timing only).
    pub fn time_layers(
        &self,
        tokens: &[u32],
        config: &Config,
        profile: &Profile,
        (warm, iters, spin_us): (usize, usize, u64),
    ) -> GpuResult<Vec<LayerTiming>> {
        if iters == 0 {
            return Err(GpuError::Invalid("iters must be at least 1".into()));
        }
        let g = &self.gpu;
        let attn = GpuAttn::Tca { config, profile };
        let mut w = self.work(tokens, attn, true, 0)?;
        let e: Vec<CudaEvent> = (0..7)
            .map(|_| {
                g.ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .ctx("cuEventCreate")
            })
            .collect::<GpuResult<_>>()?;
        let mut out = Vec::new();
        let mut scratch: Option<(DevAttention, DevAttention)> = None;
        let n_layers = self.config().n_layers;
        let mut inspect = |li: usize,
                           h: &DevHeads,
                           sel: Option<&DevSelection>,
                           _: &DevAttention|
         -> GpuResult<()> {
            if sel.is_none() {
                return Ok(());
            }
            let (sp, de) = match &mut scratch {
                Some(s) => s,
                None => scratch.insert((DevAttention::new(g, h)?, DevAttention::new(g, h)?)),
            };
            let budgets = profile
                .budgets(li)
                .map_err(|e| GpuError::Invalid(e.to_string()))?;
            let p = select_params(h.len, config, &budgets)?;
            let mut s = DevSelection::new(g, h, &p)?;
            let ms = |a: &CudaEvent, b: &CudaEvent| -> GpuResult<f64> {
                Ok(a.elapsed_ms(b).ctx("cuEventElapsedTime")? as f64)
            };
            let (mut st, mut tot, mut dense): (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) =
                (vec![vec![]; 5], vec![], vec![]);
            for it in 0..warm + iters {
                sp.poison(g)?;
                g.spin(spin_us)?;
                run_select(g, h, &mut s, Some(&e[0..5]))?;
                prefill::run_sparse(g, h, &s, sp)?;
                e[5].record(&g.stream).ctx("cuEventRecord")?;
                g.sync()?;
                if it >= warm {
                    for k in 0..5 {
                        st[k].push(ms(&e[k], &e[k + 1])?);
                    }
                    tot.push(ms(&e[0], &e[5])?);
                }
            }
            for it in 0..warm + iters {
                de.poison(g)?;
                g.spin(spin_us)?;
                e[5].record(&g.stream).ctx("cuEventRecord")?;
                prefill::run_dense(g, h, de)?;
                e[6].record(&g.stream).ctx("cuEventRecord")?;
                g.sync()?;
                if it >= warm {
                    dense.push(ms(&e[5], &e[6])?);
                }
            }
            let bad = g
                .download(&sp.lse)?
                .iter()
                .chain(g.download(&de.lse)?.iter())
                .filter(|x| !x.is_finite())
                .count();
            if bad > 0 {
                return Err(GpuError::Invalid(format!(
                    "layer {li}: {bad} non-finite log-sum-exps in the timed runs"
                )));
            }
            let hs = download_selection(g, h, &s)?;
            let tca_min = tot.iter().copied().fold(f64::INFINITY, f64::min);
            let dense_min = dense.iter().copied().fold(f64::INFINITY, f64::min);
            out.push(LayerTiming {
                layer: li,
                len: h.len,
                keep_fraction: keep_fraction(&hs.global, config.window, h.len),
                stages_ms: [
                    median(st[0].clone()),
                    median(st[1].clone()),
                    median(st[2].clone()),
                    median(st[3].clone()),
                    median(st[4].clone()),
                ],
                tca_min_ms: tca_min,
                tca_ms: median(tot),
                dense_ms: median(dense),
                dense_min_ms: dense_min,
            });
            Ok(())
        };
        let insp: Inspect<'_> = &mut inspect;
        self.layers(&mut w, n_layers - 1, Some(insp), None)?;
        self.check_finite(&w)?;
        Ok(out)
    }
}
