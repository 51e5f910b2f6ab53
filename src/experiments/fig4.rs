//! Fig. 4: ablations over b, w, alpha and tau around the base configuration. Quality:
//! the relative output error ||O - O~||_2 / ||O||_2 per layer (and mean omitted mass in
//! the table); decoding cost: the KV tokens the compacted cache holds after decoding the
//! last steps, as a fraction of the full cache, and the measured CPU decode time per
//! token (one thread, all KV heads; the dense cache's time drawn for reference).

use super::plot::{de, font, line_panel, render, Axes, DrawResult, Figure, Series};

/// Log axes draw values below this at it (said in the titles).
const FLOOR: f64 = 1e-8;
use super::sweep::{self, Point};
use super::table::write;
use super::{config_label, Context};
use crate::config::Config;
use crate::error::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::PathBuf;

struct Fig4 {
    title: String,
    /// 3 rows x 4 columns: (title, x label, y label, log y, series).
    panels: Vec<(String, String, String, bool, Vec<Series>)>,
}

impl Figure for Fig4 {
    fn size(&self) -> (u32, u32) {
        (1900, 1250)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(17)).map_err(de)?;
        for (n, (area, (t, x, y, logy, s))) in root
            .split_evenly((3, 4))
            .iter()
            .zip(&self.panels)
            .enumerate()
        {
            let axes = Axes {
                logx: x.starts_with("block") || x.starts_with("window"),
                logy: *logy,
                floor: Some(FLOOR),
                legend: (n % 4 == 0).then_some(SeriesLabelPosition::LowerLeft),
                ..Axes::default()
            };
            line_panel(area, t, x, y, s, &axes)?;
        }
        Ok(())
    }
}

/// The values swept per parameter.
fn grid(quick: bool) -> Vec<(&'static str, Vec<f64>)> {
    if quick {
        vec![
            ("b", vec![16.0, 64.0]),
            ("w", vec![64.0, 256.0]),
            ("alpha", vec![0.0, 0.5, 1.0]),
            ("tau", vec![0.7, 0.9]),
        ]
    } else {
        vec![
            ("b", vec![16.0, 32.0, 64.0, 128.0]),
            ("w", vec![64.0, 128.0, 256.0, 512.0]),
            ("alpha", vec![0.0, 0.25, 0.5, 0.75, 1.0]),
            ("tau", vec![0.5, 0.7, 0.8, 0.9, 0.95]),
        ]
    }
}

fn with(base: &Config, param: &str, v: f64) -> Config {
    let mut c = base.clone();
    match param {
        "b" => c.block_size = v as usize,
        "w" => c.window = v as usize,
        "alpha" => c.alpha = v,
        _ => c.tau = v,
    }
    c
}

/// Writes `fig4_ablations` (figure and table).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let stem = ctx.stem("fig4_ablations");
    let steps = if ctx.quick { 32 } else { 256 };
    let points: Vec<Point> = grid(ctx.quick)
        .into_iter()
        .flat_map(|(p, vals)| {
            let base = ctx.base.clone();
            vals.into_iter().map(move |v| Point {
                param: p,
                value: v,
                config: with(&base, p, v),
            })
        })
        .collect();
    let layers = ctx.sweep_layers();
    let df = sweep::run(&layers, &points, Some(steps), "fig4: ablations", &stem)?;
    let mut df = sweep::with_layer_mean(df, &stem)?;
    let mut files = write(&stem, &mut df)?;
    let names: Vec<String> = layers.iter().map(|l| l.label.clone()).collect();
    let mean = "mean over layers".to_string();
    let xlabel = |p: &str| match p {
        "b" => "block size b",
        "w" => "window w",
        "alpha" => "alpha",
        _ => "tau",
    };
    let crit = match ctx.base.criterion {
        crate::config::Criterion::Column => "column",
        crate::config::Criterion::Mass => "mass",
    };
    let mut panels = Vec::new();
    for (metric, ylabel, logy, who) in [
        ("rel_err", "relative output error", true, &names),
        (
            "kv_fraction",
            "KV tokens held / full cache",
            false,
            &vec![mean.clone()],
        ),
        (
            "ms_per_token",
            "decode ms per token (CPU)",
            false,
            &vec![mean.clone()],
        ),
    ] {
        for (p, _) in grid(ctx.quick) {
            let mut series = who
                .iter()
                .map(|n| {
                    Ok(Series {
                        name: if metric == "ms_per_token" {
                            "TCA cache".to_string()
                        } else {
                            n.clone()
                        },
                        points: sweep::points_of(&df, p, crit, n, metric)?,
                        dashed: false,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if metric == "ms_per_token" {
                series.push(Series {
                    name: "dense cache".into(),
                    points: sweep::points_of(&df, p, crit, &mean, "dense_ms_per_token")?,
                    dashed: true,
                });
            }
            let floor = if logy { " (floor 1e-8)" } else { "" };
            panels.push((
                format!("{ylabel} vs {p}{floor}"),
                xlabel(p).to_string(),
                ylabel.to_string(),
                logy,
                series,
            ));
        }
    }
    let l0 = &ctx.synthetic[0].heads;
    files.extend(render(
        &stem,
        &Fig4 {
            title: format!(
                "Fig. 4: ablations on {} (synthetic: Hq {}, Hkv {}, d {}, L {}; decode of the last {steps} tokens); base {}",
                ctx.data_label(), l0.num_q_heads(), l0.num_kv_heads(), l0.dim(), l0.len(), config_label(&ctx.base)
            ),
            panels,
        },
    )?);
    Ok(files)
}
