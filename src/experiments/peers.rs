//! Peer policies at equal budget (docs/algorithm.md §5): retained mass, gamma and output error
//! of TCA, the oracle top-k (the upper limit), StreamingLLM, uniform block top-k and the
//! cumulative threshold, per layer. Per-query results are aggregated with polars.

use super::plot::{bar_panel, de, font, render, DrawResult, Figure};
use super::table::{f64s, mean_by, pe, strs, write};
use super::{config_label, progress, Context};
use crate::bound::audit;
use crate::error::Result;
use crate::selection::policies::{key_sets, Policy};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use std::path::PathBuf;

/// Attention sinks kept by StreamingLLM.
pub const N_SINK: usize = 4;

/// One policy's means per layer: (name, retained mass, relative error, kept fraction).
type PolicyRow = (String, Vec<f64>, Vec<f64>, Vec<f64>);

struct Peers {
    title: String,
    layers: Vec<String>,
    /// (policy, retained, rel err, kept) per layer.
    rows: Vec<PolicyRow>,
}

impl Figure for Peers {
    fn size(&self) -> (u32, u32) {
        (1500, 1150)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(17)).map_err(de)?;
        let p = root.split_evenly((3, 1));
        let pick = |f: fn(&PolicyRow) -> Vec<f64>| -> Vec<(String, Vec<f64>)> {
            self.rows.iter().map(|r| (r.0.clone(), f(r))).collect()
        };
        let ret = pick(|r| r.1.clone());
        let lo = ret
            .iter()
            .flat_map(|r| r.1.iter().copied())
            .fold(1.0, f64::min);
        bar_panel(
            &p[0],
            "retained softmax mass 1 - mean gamma_i (higher is better)",
            "retained mass",
            &self.layers,
            &ret,
            ((lo - 0.05).clamp(0.0, 0.9), 1.0),
            None,
        )?;
        let err = pick(|r| r.2.clone());
        let hi = err
            .iter()
            .flat_map(|r| r.1.iter().copied())
            .fold(0.0, f64::max);
        bar_panel(
            &p[1],
            "relative output error mean ||O - O~||_2 / ||O||_2 (lower is better)",
            "relative error",
            &self.layers,
            &err,
            (0.0, hi * 1.1 + 1e-12),
            Some(SeriesLabelPosition::UpperMiddle),
        )?;
        bar_panel(
            &p[2],
            "kept keys mean |S_i| / (i + 1)",
            "kept fraction",
            &self.layers,
            &pick(|r| r.3.clone()),
            (0.0, 1.0),
            None,
        )
    }
}

/// Writes `peer_policies` (figure and the aggregated table).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    // The synthetic layers and at most 4 real ones (as in the sweeps), with their
    // base evaluations.
    let shown = ctx.sweep_layers();
    let pairs: Vec<_> = ctx
        .layers()
        .zip(ctx.base_evals()?)
        .filter(|(l, _)| shown.iter().any(|s| std::ptr::eq(*s, *l)))
        .collect();
    let layers: Vec<_> = pairs.iter().map(|(l, _)| *l).collect();
    let stem = ctx.stem("peer_policies");
    let (mut lab, mut pol, mut gamma, mut rel, mut kept) = (vec![], vec![], vec![], vec![], vec![]);
    let pb = progress(layers.len() * Policy::ALL.len(), "peer policies");
    for (l, e) in pairs {
        let cfg = ctx.config_for(l);
        for p in Policy::ALL {
            pb.inc(1);
            let ks = key_sets(p, &l.heads, &cfg, &e.selection, N_SINK)?;
            for a in audit(&l.heads, ks.as_ref())? {
                lab.push(l.label.clone());
                pol.push(p.name());
                gamma.push(a.gamma);
                rel.push(a.rel_err());
                kept.push(a.kept as f64 / (a.query + 1) as f64);
            }
        }
    }
    pb.finish_and_clear();
    let per_query = df!("layer" => lab, "policy" => pol, "gamma" => gamma, "rel_err" => rel,
        "kept_fraction" => kept)
    .map_err(pe(&stem))?;
    let mut agg = mean_by(
        per_query,
        &["layer", "policy"],
        &["gamma", "rel_err", "kept_fraction"],
    )
    .and_then(|df| {
        df.lazy()
            .with_column((lit(1.0) - col("gamma")).alias("retained_mass"))
            .collect()
    })
    .map_err(pe(&stem))?;
    let mut files = write(&stem, &mut agg)?;
    let (l_col, p_col) = (strs(&agg, "layer")?, strs(&agg, "policy")?);
    let (ret, err, kf) = (
        f64s(&agg, "retained_mass")?,
        f64s(&agg, "rel_err")?,
        f64s(&agg, "kept_fraction")?,
    );
    let names: Vec<String> = layers.iter().map(|l| l.label.clone()).collect();
    let rows = Policy::ALL
        .iter()
        .map(|p| {
            let get = |v: &[f64]| -> Vec<f64> {
                names
                    .iter()
                    .map(|n| {
                        (0..l_col.len())
                            .find(|&i| &l_col[i] == n && p_col[i] == p.name())
                            .map(|i| v[i])
                            .unwrap_or(f64::NAN)
                    })
                    .collect()
            };
            (p.name().to_string(), get(&ret), get(&err), get(&kf))
        })
        .collect();
    let src = ctx.data_label();
    files.extend(render(
        &stem,
        &Peers {
            title: format!("Peer selection policies at TCA's per-query budget on {src} ({}; StreamingLLM with {N_SINK} sinks)", config_label(&ctx.base)),
            layers: names,
            rows,
        },
    )?);
    Ok(files)
}
