//! Fig. 5: quality across tau, with the sparsity each tau gives, for both calibration
//! criteria. Quality is the mean omitted mass gamma and the relative output error
//! ||O - O~||_2 / ||O||_2; sparsity is 1 - mean |S_i| / (i + 1).

use super::plot::{de, font, line_panel, render, Axes, DrawResult, Figure, Series};
use super::sweep::{self, Point};
use super::table::write;
use super::Context;
use crate::config::{Config, Criterion};
use crate::error::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::PathBuf;

/// The tau values swept.
pub const TAUS: [f64; 7] = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99];

struct Fig5 {
    title: String,
    /// (panel title, y label, log y, series) in a 2 x 3 grid.
    panels: Vec<(String, String, bool, Vec<Series>)>,
}

impl Figure for Fig5 {
    fn size(&self) -> (u32, u32) {
        (1650, 1000)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(17)).map_err(de)?;
        for (n, (area, (t, y, logy, s))) in root
            .split_evenly((2, 3))
            .iter()
            .zip(&self.panels)
            .enumerate()
        {
            let axes = Axes {
                logy: *logy,
                ylim: (!*logy).then_some((0.0, 1.0)),
                floor: Some(1e-8),
                legend: (n % 3 == 0).then_some(SeriesLabelPosition::LowerLeft),
                ..Axes::default()
            };
            line_panel(area, t, "tau", y, s, &axes)?;
        }
        Ok(())
    }
}

/// Writes `fig5_tau` (figure and table).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let stem = ctx.stem("fig5_tau");
    let taus: Vec<f64> = if ctx.quick {
        vec![0.5, 0.8, 0.9, 0.95]
    } else {
        TAUS.to_vec()
    };
    let base = &ctx.base;
    let points: Vec<Point> = [Criterion::Column, Criterion::Mass]
        .iter()
        .flat_map(|&criterion| {
            taus.iter().map(move |&tau| Point {
                param: "tau",
                value: tau,
                config: Config {
                    tau,
                    criterion,
                    ..base.clone()
                },
            })
        })
        .collect();
    let layers = ctx.sweep_layers();
    let df = sweep::run(&layers, &points, None, "fig5: tau sweep", &stem)?;
    let mut df = sweep::with_layer_mean(df, &stem)?;
    let mut files = write(&stem, &mut df)?;
    let mut names: Vec<String> = layers.iter().map(|l| l.label.clone()).collect();
    names.push("mean over layers".into());
    let mut panels = Vec::new();
    for crit in ["column", "mass"] {
        for (metric, ylabel, logy, f) in [
            ("mean_gamma", "mean omitted mass gamma", true, None),
            ("rel_err", "mean relative output error", true, None),
            (
                "kept_fraction",
                "sparsity 1 - kept fraction",
                false,
                Some(1.0),
            ),
        ] {
            let series = names
                .iter()
                .map(|n| {
                    let pts = sweep::points_of(&df, "tau", crit, n, metric)?;
                    Ok(Series {
                        name: n.clone(),
                        points: pts
                            .into_iter()
                            .map(|(x, y)| (x, f.map_or(y, |one: f64| one - y)))
                            .collect(),
                        dashed: n == "mean over layers",
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let floor = if logy { " (floor 1e-8)" } else { "" };
            panels.push((
                format!("{crit} criterion: {ylabel}{floor}"),
                ylabel.to_string(),
                logy,
                series,
            ));
        }
    }
    let l0 = &ctx.synthetic[0].heads;
    files.extend(render(
        &stem,
        &Fig5 {
            title: format!(
                "Fig. 5: quality and sparsity across tau, {} (Hq {}, Hkv {}, d {}, L {}); b {}, w {}, alpha {}",
                ctx.data_label(), l0.num_q_heads(), l0.num_kv_heads(), l0.dim(), l0.len(), ctx.base.block_size, ctx.base.window, ctx.base.alpha
            ),
            panels,
        },
    )?);
    Ok(files)
}
