//! Beyond the paper: observed error against each reading of Theorem 1 (log-log, y = x
//! drawn, so the literal reading's violations stand above the line), the distribution
//! of gamma against 1 - tau, and the per-head calibrated budgets.

use super::plot::{
    color, de, font, heatmap_panel, line_panel, render, Axes, DrawResult, Figure, Series,
};
use super::table::write;
use super::{config_label, Context, Evaluation, Layer};
use crate::bound::{QueryAudit, Reading};
use crate::error::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use std::path::PathBuf;

/// Queries drawn per synthetic layer, and for all real layers together, at most (all
/// are counted in the titles and bound_summary).
const MAX_POINTS: usize = 1500;
const READINGS: [Reading; 4] = [
    Reading::LinfEntrymax,
    Reading::L1Entrymax,
    Reading::L1Induced,
    Reading::L2Diameter,
];

/// (bound, error) of one reading at one query.
fn sides(r: Reading, a: &QueryAudit, tau: f64) -> (f64, f64) {
    let (lhs, rhs, _) = r.sides(a, tau);
    (rhs, lhs)
}

/// Every k-th query with gamma > 0, at most `cap` of them.
fn subsample(audits: &[QueryAudit], cap: usize) -> Vec<&QueryAudit> {
    let nz: Vec<&QueryAudit> = audits.iter().filter(|a| a.gamma > 0.0).collect();
    let stride = nz.len().div_ceil(cap.max(1)).max(1);
    nz.into_iter().step_by(stride).collect()
}

/// Points drawn for layer `l`: MAX_POINTS for a synthetic layer, an equal share of
/// MAX_POINTS for each of `n_real` real layers.
fn cap(l: &Layer, n_real: usize) -> usize {
    match l.kind {
        Some(_) => MAX_POINTS,
        None => MAX_POINTS / n_real.max(1),
    }
}

struct Scatter<'a> {
    title: String,
    real_layers: usize,
    layers: Vec<(&'a Layer, &'a Evaluation)>,
    tau: f64,
}

impl Figure for Scatter<'_> {
    fn size(&self) -> (u32, u32) {
        (1500, 1250)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(18)).map_err(de)?;
        for (area, r) in root.split_evenly((2, 2)).iter().zip(READINGS) {
            let mut lo = f64::INFINITY;
            let mut hi: f64 = 0.0;
            let mut violations = 0;
            let mut total = 0;
            for (_, e) in &self.layers {
                for a in &e.audits {
                    let (b, err) = sides(r, a, self.tau);
                    if b > 0.0 && err > 0.0 {
                        lo = lo.min(b.min(err));
                        hi = hi.max(b.max(err));
                    }
                    total += 1;
                    violations += usize::from(!r.holds_at(a, self.tau));
                }
            }
            if !lo.is_finite() {
                lo = 1e-6;
                hi = 1.0;
            }
            let (lo, hi) = (lo / 2.0, hi * 2.0);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "{}: {violations} of {total} queries above y = x",
                        r.statement()
                    ),
                    font(14),
                )
                .margin(8)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
                .map_err(de)?;
            chart
                .configure_mesh()
                .x_label_formatter(&|v| super::plot::fmt_num(v))
                .y_label_formatter(&|v| super::plot::fmt_num(v))
                .light_line_style(WHITE.mix(0.0))
                .x_desc("bound (right-hand side)")
                .y_desc("observed error (left-hand side)")
                .label_style(font(12))
                .axis_desc_style(font(13))
                .draw()
                .map_err(de)?;
            // Synthetic head types one colour each; all real layers share one.
            let mut groups: Vec<(String, Vec<&QueryAudit>)> = Vec::new();
            for (l, e) in &self.layers {
                let name = match l.kind {
                    Some(_) => l.label.clone(),
                    None => format!("{} ({} layers)", l.source, self.real_layers),
                };
                let pts = subsample(&e.audits, cap(l, self.real_layers));
                match groups.iter_mut().find(|g| g.0 == name) {
                    Some(g) => g.1.extend(pts),
                    None => groups.push((name, pts)),
                }
            }
            // Real layers first, so the synthetic points stay visible on top.
            for (i, (name, pts)) in groups.iter().enumerate().rev() {
                let c = color(i);
                chart
                    .draw_series(pts.iter().filter_map(|a| {
                        let (b, err) = sides(r, a, self.tau);
                        (b > 0.0 && err > 0.0)
                            .then(|| Circle::new((b, err), 2, c.mix(0.5).filled()))
                    }))
                    .map_err(de)?
                    .label(name.clone())
                    .legend(move |(x, y)| Circle::new((x + 6, y), 4, c.filled()));
            }
            chart
                .draw_series(LineSeries::new(
                    vec![(lo, lo), (hi, hi)],
                    BLACK.stroke_width(2),
                ))
                .map_err(de)?
                .label("y = x")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], BLACK.stroke_width(2))
                });
            super::plot::legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        Ok(())
    }
}

struct GammaCdf {
    title: String,
    series: Vec<Series>,
    tau: f64,
}

impl Figure for GammaCdf {
    fn size(&self) -> (u32, u32) {
        (1100, 700)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let mut s = self.series.clone();
        s.push(Series {
            name: format!("1 - tau = {:.2}", 1.0 - self.tau),
            points: vec![(1.0 - self.tau, 0.0), (1.0 - self.tau, 1.0)],
            dashed: true,
        });
        line_panel(
            root,
            &self.title,
            "omitted softmax mass gamma_i (log scale)",
            "fraction of queries with gamma <= x",
            &s,
            &Axes {
                logx: true,
                ylim: Some((0.0, 1.02)),
                legend: Some(SeriesLabelPosition::UpperLeft),
                ..Axes::default()
            },
        )
    }
}

/// (title, row labels, column labels, values by row, cell texts by row).
type HeatPanel = (
    String,
    Vec<String>,
    Vec<String>,
    Vec<Vec<f64>>,
    Vec<Vec<String>>,
);

struct Budgets {
    title: String,
    panels: Vec<HeatPanel>,
    max: f64,
}

impl Figure for Budgets {
    fn size(&self) -> (u32, u32) {
        let rows = self.panels.iter().map(|p| p.1.len()).max().unwrap_or(1) as u32;
        (560 * self.panels.len() as u32, (160 + 26 * rows).max(420))
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(16)).map_err(de)?;
        for (area, (t, rows, cols, v, txt)) in root
            .split_evenly((1, self.panels.len()))
            .iter()
            .zip(&self.panels)
        {
            heatmap_panel(area, t, rows, cols, v, txt, (0.0, self.max))?;
        }
        Ok(())
    }
}

/// Writes `bound_scatter`, `gamma_distribution` and `head_budgets` (+ their tables).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let evals = ctx.base_evals()?;
    let pairs: Vec<(&Layer, &Evaluation)> = ctx.layers().zip(evals).collect();
    let cfg = &ctx.base;
    let mut files = Vec::new();

    // Bound scatter and its per-reading summary.
    let stem = ctx.stem("bound_scatter");
    let (mut lab, mut head, mut query, mut reading, mut bound, mut err) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (l, e) in &pairs {
        for a in subsample(&e.audits, cap(l, ctx.real.len())) {
            for r in READINGS {
                let (b, x) = sides(r, a, cfg.tau);
                lab.push(l.describe());
                head.push(a.head as u32);
                query.push(a.query as u32);
                reading.push(r.key());
                bound.push(b);
                err.push(x);
            }
        }
    }
    let mut df = df!("layer" => lab, "q_head" => head, "query" => query, "reading" => reading,
        "bound" => bound, "error" => err)
    .map_err(super::table::pe(&stem))?;
    files.extend(write(&stem, &mut df)?);
    let (mut lab, mut key, mut holds, mut viol, mut worst) =
        (vec![], vec![], vec![], vec![], vec![]);
    for (l, e) in &pairs {
        // Readings this audit does not measure (the certificate's gamma_le_gamma_hat:
        // its own experiment, certificate_tightness) are left out, not reported as
        // failing.
        for (k, r) in e.summary.readings.iter().filter(|(_, r)| r.measured > 0) {
            lab.push(l.describe());
            key.push(k.to_string());
            holds.push(r.holds);
            viol.push(r.violations as u32);
            worst.push(r.worst_ratio);
        }
    }
    let sstem = ctx.stem("bound_summary");
    let mut df = df!("layer" => lab, "reading" => key, "holds" => holds, "violations" => viol,
        "worst_ratio" => worst)
    .map_err(super::table::pe(&sstem))?;
    files.extend(write(&sstem, &mut df)?);
    let src = if ctx.real.is_empty() {
        "synthetic heads".to_string()
    } else {
        format!("synthetic heads and {}", ctx.real[0].source)
    };
    files.extend(render(
        &stem,
        &Scatter {
            real_layers: ctx.real.len(),
            title: format!(
                "Theorem 1 readings on {src}: observed error vs bound per query ({})",
                config_label(cfg)
            ),
            layers: pairs.clone(),
            tau: cfg.tau,
        },
    )?);

    // Gamma distribution.
    let stem = ctx.stem("gamma_distribution");
    let mut series = Vec::new();
    let (mut lab, mut q50, mut q90, mut q99, mut gmax, mut above) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (l, e) in &pairs {
        let mut g: Vec<f64> = e.audits.iter().map(|a| a.gamma.max(1e-12)).collect();
        g.sort_by(f64::total_cmp);
        let n = g.len();
        let q = |f: f64| g[((n as f64 * f) as usize).min(n - 1)];
        lab.push(l.describe());
        q50.push(q(0.5));
        q90.push(q(0.9));
        q99.push(q(0.99));
        gmax.push(g[n - 1]);
        above.push(e.summary.frac_gamma_above_1_minus_tau);
        if l.kind.is_some() || ctx.real.len() <= 6 {
            let stride = n.div_ceil(400).max(1);
            series.push(Series {
                name: l.label.clone(),
                points: (0..n)
                    .step_by(stride)
                    .chain(std::iter::once(n - 1))
                    .map(|i| (g[i], (i + 1) as f64 / n as f64))
                    .collect(),
                dashed: false,
            });
        }
    }
    let mut df = df!("layer" => lab, "gamma_p50" => q50, "gamma_p90" => q90, "gamma_p99" => q99,
        "gamma_max" => gmax, "frac_gamma_above_1_minus_tau" => above)
    .map_err(super::table::pe(&stem))?;
    files.extend(write(&stem, &mut df)?);
    files.extend(render(
        &stem,
        &GammaCdf {
            title: format!("Omitted mass gamma_i per query vs 1 - tau, {src} ({}; gamma < 1e-12 drawn at 1e-12)", config_label(cfg)),
            series,
            tau: cfg.tau,
        },
    )?);

    // Calibrated budgets per layer and KV head.
    let stem = ctx.stem("head_budgets");
    let (mut src_c, mut lab, mut kvh, mut m, mut ek, mut ret, mut reached) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut panels = Vec::new();
    for (group, name) in [(true, "synthetic"), (false, "real")] {
        let sel: Vec<&(&Layer, &Evaluation)> = pairs
            .iter()
            .filter(|(l, _)| l.kind.is_some() == group)
            .collect();
        if sel.is_empty() {
            continue;
        }
        let rows: Vec<String> = sel.iter().map(|(l, _)| l.label.clone()).collect();
        let nkv = sel
            .iter()
            .map(|(l, _)| l.heads.num_kv_heads())
            .max()
            .unwrap_or(1);
        let cols: Vec<String> = (0..nkv).map(|k| format!("kv {k}")).collect();
        let vals: Vec<Vec<f64>> = sel
            .iter()
            .map(|(_, e)| {
                e.profile.layers[0]
                    .heads
                    .iter()
                    .map(|h| h.expected_budget)
                    .collect()
            })
            .collect();
        let texts: Vec<Vec<String>> = sel
            .iter()
            .map(|(_, e)| {
                e.profile.layers[0]
                    .heads
                    .iter()
                    .map(|h| {
                        format!(
                            "{:.1}{}",
                            h.expected_budget,
                            if h.reached_tau { "" } else { "*" }
                        )
                    })
                    .collect()
            })
            .collect();
        for (l, e) in &sel {
            for h in &e.profile.layers[0].heads {
                src_c.push(l.source.clone());
                lab.push(l.label.clone());
                kvh.push(h.kv_head as u32);
                m.push(h.m as u32);
                ek.push(h.expected_budget);
                ret.push(h.retained);
                reached.push(h.reached_tau);
            }
        }
        panels.push((
            format!(
                "{name}: E_p[k] per block (b = {}); * = tau not reached",
                cfg.block_size
            ),
            rows,
            cols,
            vals,
            texts,
        ));
    }
    let mut df = df!("source" => src_c, "layer" => lab, "kv_head" => kvh, "m" => m,
        "expected_budget" => ek, "retained" => ret, "reached_tau" => reached)
    .map_err(super::table::pe(&stem))?;
    files.extend(write(&stem, &mut df)?);
    files.extend(render(
        &stem,
        &Budgets {
            title: format!("Calibrated per-head budgets ({})", config_label(cfg)),
            panels,
            max: cfg.block_size as f64,
        },
    )?);
    Ok(files)
}
