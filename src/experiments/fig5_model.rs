//! Fig. 5 on the real model, measured on the H200 (`--backend cuda`): SmolLM2's
//! perplexity change, top-1 agreement with exact attention and keep fraction across tau
//! at 2K-32K tokens (16K with YaRN x2, 32K with YaRN x4, needles also at 64K with x8), and needle-in-a-haystack
//! accuracy (single needle and RULER's multi-key variant) against length with Wilson
//! 95 % intervals, for exact attention and TCA with its compacted cache and with full
//! decoding, and the peer policies at TCA's tau = 0.9 budget (needles and perplexity
//! against length); and the per-layer audit (`layer_audit`): mean gamma, the share of queries
//! with gamma > 1 - tau and the eviction regret of each layer at 8K-128K. Drawn from the
//! tables the commands wrote (docs/quality/gpu; commands and device time in
//! docs/quality.md): the grid needs the GPU, so `tca reproduce` redraws, it does not
//! re-measure.

use super::plot::{font, line_panel, render, Axes, DrawResult, Figure, Series};
use super::table::{f64s, pe, strs, Table, Val};
use super::Context;
use crate::error::{Result, TcaError};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// Where the measured quality tables live, relative to the repository root.
pub const QUALITY_DIR: &str = "docs/quality";
/// The GPU grid's tables under it.
pub const GPU_DIR: &str = "docs/quality/gpu";

fn read(path: &Path) -> Result<DataFrame> {
    if !path.exists() {
        return Err(TcaError::Format {
            path: path.into(),
            msg: "no measured quality table here (see docs/quality.md)".into(),
        });
    }
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.into()))
        .and_then(|r| r.finish())
        .map_err(pe(path))
}

/// Rows of several tables of one schema, as columns by name.
struct Rows {
    f: std::collections::HashMap<String, Vec<f64>>,
    s: std::collections::HashMap<String, Vec<String>>,
}

impl Rows {
    fn read(paths: &[PathBuf], fcols: &[&str], scols: &[&str]) -> Result<Rows> {
        let mut r = Rows {
            f: Default::default(),
            s: Default::default(),
        };
        for p in paths {
            let df = read(p)?;
            for c in fcols {
                r.f.entry(c.to_string()).or_default().extend(f64s(&df, c)?);
            }
            for c in scols {
                r.s.entry(c.to_string()).or_default().extend(strs(&df, c)?);
            }
        }
        Ok(r)
    }
    fn f(&self, c: &str) -> &[f64] {
        self.f.get(c).map_or(&[], |v| v)
    }
    fn s(&self, c: &str) -> &[String] {
        self.s.get(c).map_or(&[], |v| v)
    }
    fn len(&self) -> usize {
        self.f.values().next().map_or(0, |v| v.len())
    }
}

/// `dir/*/name` for every subdirectory whose name starts with `prefix` and holds `name`,
/// in name order (each device run writes its own folder).
fn tables(dir: &Path, prefix: &str, name: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| TcaError::Format {
        path: dir.into(),
        msg: format!("cannot list the measured quality tables: {e}"),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(name))
        .filter(|p| p.exists())
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(TcaError::Format {
            path: dir.into(),
            msg: format!("no {prefix}*/{name} here (see docs/quality.md)"),
        });
    }
    Ok(paths)
}

/// `tca quality-ppl` tables (one schema) as rows.
fn read_ppl(paths: &[PathBuf]) -> Result<Rows> {
    Rows::read(
        paths,
        &[
            "length",
            "tau",
            "keep_fraction",
            "perplexity",
            "top1_agreement_exact",
        ],
        &["attention", "rope_scaling"],
    )
}

impl Rows {
    /// Exact attention's perplexity at length `l` (NaN where the table has none).
    fn exact_ppl(&self, l: f64) -> f64 {
        (0..self.len())
            .find(|&i| self.f("length")[i] == l && self.s("attention")[i] == "exact")
            .map_or(f64::NAN, |i| self.f("perplexity")[i])
    }
}

fn sorted_unique(v: &[f64]) -> Vec<f64> {
    let mut u: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    u.sort_by(f64::total_cmp);
    u.dedup();
    u
}

struct Panel {
    title: String,
    x: String,
    y: String,
    series: Vec<Series>,
    axes: Axes,
}

struct Fig {
    title: String,
    grid: (usize, usize),
    panels: Vec<Panel>,
}

impl Figure for Fig {
    fn size(&self) -> (u32, u32) {
        (460 * self.grid.1 as u32, 470 * self.grid.0 as u32 + 40)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root
            .titled(&self.title, font(16))
            .map_err(super::plot::de)?;
        for (area, p) in root.split_evenly(self.grid).iter().zip(&self.panels) {
            line_panel(area, &p.title, &p.x, &p.y, &p.series, &p.axes)?;
        }
        Ok(())
    }
}

fn lens_label(l: f64) -> String {
    format!("{}K", (l / 1024.0).round() as usize)
}

/// `fig5_model` (perplexity and NIAH grid) and `layer_audit`, with their tables.
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let dir = Path::new(GPU_DIR);
    let mut files = Vec::new();
    // Perplexity: exact per length, TCA per (length, tau).
    let ppl =
        read_ppl(&["ppl_none", "ppl_yarn2", "ppl_yarn4"].map(|d| dir.join(d).join("ppl.csv")))?;
    let (len, tau, att) = (ppl.f("length"), ppl.f("tau"), ppl.s("attention"));
    let lengths = sorted_unique(len);
    let exact_ppl = |l: f64| ppl.exact_ppl(l);
    let mut table = Table::default();
    let per_len = |f: &dyn Fn(usize) -> f64| -> Vec<Series> {
        lengths
            .iter()
            .map(|&l| Series {
                name: lens_label(l),
                points: (0..ppl.len())
                    .filter(|&i| len[i] == l && att[i] == "tca")
                    .map(|i| (tau[i], f(i)))
                    .collect(),
                dashed: false,
            })
            .collect()
    };
    let change = |i: usize| 100.0 * (ppl.f("perplexity")[i] / exact_ppl(len[i]) - 1.0);
    let s_change = per_len(&change);
    let s_agree = per_len(&|i| ppl.f("top1_agreement_exact")[i]);
    let s_keep = per_len(&|i| ppl.f("keep_fraction")[i]);
    for i in (0..ppl.len()).filter(|&i| att[i] == "tca") {
        table.push(vec![
            ("length", Val::U(len[i] as u64)),
            ("rope_scaling", Val::S(ppl.s("rope_scaling")[i].clone())),
            ("tau", Val::F(tau[i])),
            ("keep_fraction", Val::F(ppl.f("keep_fraction")[i])),
            ("exact_perplexity", Val::F(exact_ppl(len[i]))),
            ("perplexity", Val::F(ppl.f("perplexity")[i])),
            ("ppl_change_pct", Val::F(change(i))),
            (
                "top1_agreement_exact",
                Val::F(ppl.f("top1_agreement_exact")[i]),
            ),
        ])?;
    }
    let stem = ctx.stem("fig5_model");
    table.write(&stem)?;
    files.extend([stem.with_extension("parquet"), stem.with_extension("csv")]);
    // NIAH: accuracy with Wilson intervals per (task, length, attention) at tau 0.9.
    let mut summaries = tables(dir, "niah_", "niah_summary.csv")?;
    summaries.extend(tables(dir, "mk_niah_", "niah_summary.csv")?);
    summaries.extend(tables(dir, "peers_", "niah_summary.csv")?);
    let niah = Rows::read(
        &summaries,
        &[
            "length",
            "tau",
            "cases",
            "correct",
            "accuracy",
            "wilson95_lo",
            "wilson95_hi",
            "mean_decode_regret",
        ],
        &["task", "attention"],
    )?;
    let mut ntab = Table::default();
    for i in 0..niah.len() {
        ntab.push(vec![
            ("task", Val::S(niah.s("task")[i].clone())),
            ("length", Val::U(niah.f("length")[i] as u64)),
            ("attention", Val::S(niah.s("attention")[i].clone())),
            ("tau", Val::F(niah.f("tau")[i])),
            ("cases", Val::U(niah.f("cases")[i] as u64)),
            ("correct", Val::U(niah.f("correct")[i] as u64)),
            ("accuracy", Val::F(niah.f("accuracy")[i])),
            ("wilson95_lo", Val::F(niah.f("wilson95_lo")[i])),
            ("wilson95_hi", Val::F(niah.f("wilson95_hi")[i])),
            (
                "mean_decode_regret",
                Val::F(niah.f("mean_decode_regret")[i]),
            ),
        ])?;
    }
    let nstem = ctx.stem("fig5_model_niah");
    ntab.write(&nstem)?;
    files.extend([nstem.with_extension("parquet"), nstem.with_extension("csv")]);
    // Accuracy against length with Wilson intervals for the attentions `atts` (name,
    // label) of `task` at tau `t` (exact has no tau).
    let niah_panel = |task: &str, t: f64, atts: &[(&str, &str)], title: &str| -> Panel {
        let mut series = Vec::new();
        let mut intervals = Vec::new();
        let (mut nmin, mut nmax) = (f64::INFINITY, 0.0f64);
        for &(a, name) in atts {
            let mut rows: Vec<usize> = (0..niah.len())
                .filter(|&i| {
                    niah.s("task")[i] == task
                        && niah.s("attention")[i] == a
                        && (a == "exact" || niah.f("tau")[i] == t)
                })
                .collect();
            if rows.is_empty() {
                continue;
            }
            rows.sort_by(|&i, &j| niah.f("length")[i].total_cmp(&niah.f("length")[j]));
            for &i in &rows {
                nmin = nmin.min(niah.f("cases")[i]);
                nmax = nmax.max(niah.f("cases")[i]);
            }
            series.push(Series {
                name: name.into(),
                points: rows
                    .iter()
                    .map(|&i| (niah.f("length")[i], niah.f("accuracy")[i]))
                    .collect(),
                dashed: a == "tca",
            });
            intervals.push(
                rows.iter()
                    .map(|&i| {
                        (
                            niah.f("length")[i],
                            niah.f("wilson95_lo")[i],
                            niah.f("wilson95_hi")[i],
                        )
                    })
                    .collect(),
            );
        }
        // Cases per point: one number, or the range when runs differ (a point of one seed).
        let n = if nmin >= nmax {
            format!("{nmax}")
        } else {
            format!("{nmin}-{nmax}")
        };
        Panel {
            title: format!("{task}{title} at tau {t} ({n} per point, Wilson 95 %)"),
            x: "tokens".into(),
            y: "accuracy".into(),
            series,
            axes: Axes {
                logx: true,
                ylim: Some((0.0, 1.02)),
                legend: Some(SeriesLabelPosition::UpperRight),
                intervals,
                ..Axes::default()
            },
        }
    };
    let tca_modes = [
        ("exact", "exact"),
        ("tca_prefill_full_decode", "TCA prefill, full decode"),
        ("tca", "TCA, compacted cache"),
    ];
    let peers = [
        ("exact", "exact"),
        ("tca_prefill_full_decode", "TCA (full decode)"),
        ("oracle_topk", "oracle top-k"),
        ("streaming_llm", "StreamingLLM"),
        ("block_topk", "block top-k"),
        ("cumulative_threshold", "cumulative threshold"),
    ];
    let peer_ppl = peer_perplexity(ctx, dir, &mut files)?;
    let fig = Fig {
        title: "Fig. 5 on SmolLM2-135M-Instruct, measured on the H200 (b 64, w 256, column criterion; 16K with YaRN x2, 32K x4, 64K x8; tca quality-ppl / quality-niah --backend cuda)".into(),
        grid: (3, 3),
        panels: vec![
            Panel { title: "perplexity change vs exact".into(), x: "tau".into(), y: "%".into(), series: s_change, axes: Axes { legend: Some(SeriesLabelPosition::UpperRight), ..Axes::default() } },
            Panel { title: "top-1 agreement with exact".into(), x: "tau".into(), y: "fraction of positions".into(), series: s_agree, axes: Axes::default() },
            Panel { title: "keep fraction".into(), x: "tau".into(), y: "mean |S_i| / (i + 1)".into(), series: s_keep, axes: Axes::default() },
            niah_panel("niah", 0.9, &tca_modes, ""),
            niah_panel("niah", 0.95, &tca_modes, ""),
            niah_panel("mk_niah", 0.9, &tca_modes, ""),
            niah_panel("niah", 0.9, &peers, " vs peers"),
            niah_panel("mk_niah", 0.9, &peers, " vs peers"),
            peer_ppl,
        ],
    };
    files.extend(render(&stem, &fig)?);
    files.extend(layer_audit(ctx, dir)?);
    Ok(files)
}

/// The peers' perplexity change against exact attention per length at tau = 0.9
/// (`ppl_peers_*`: `tca quality-ppl --backend cuda --peers ...`), written as the table
/// `fig5_model_peers`, and its panel. Each run is read against its own exact row (runs
/// of different sessions may use different prefill kernels); TCA's row is taken from
/// the first session's runs.
fn peer_perplexity(ctx: &Context, dir: &Path, files: &mut Vec<PathBuf>) -> Result<Panel> {
    let mut table = Table::default();
    let mut names: Vec<String> = Vec::new();
    // (attention, length, change %) for the panel.
    let mut points: Vec<(String, f64, f64)> = Vec::new();
    let mut paths = tables(dir, "ppl_peers_", "ppl.csv")?;
    // The first session's runs (ppl_peers_{none,yarn2,yarn4}) first: TCA's row from them.
    paths.sort_by_key(|p| (p.to_string_lossy().contains("_rows_"), p.clone()));
    for path in paths {
        let ppl = read_ppl(std::slice::from_ref(&path))?;
        let (len, att) = (ppl.f("length"), ppl.s("attention"));
        let exact = |l: f64| ppl.exact_ppl(l);
        for i in (0..ppl.len()).filter(|&i| att[i] != "exact") {
            if points.iter().any(|(a, l, _)| a == &att[i] && *l == len[i]) {
                continue;
            }
            let change = 100.0 * (ppl.f("perplexity")[i] / exact(len[i]) - 1.0);
            table.push(vec![
                ("length", Val::U(len[i] as u64)),
                ("rope_scaling", Val::S(ppl.s("rope_scaling")[i].clone())),
                ("attention", Val::S(att[i].clone())),
                ("tau", Val::F(ppl.f("tau")[i])),
                ("keep_fraction", Val::F(ppl.f("keep_fraction")[i])),
                ("exact_perplexity", Val::F(exact(len[i]))),
                ("perplexity", Val::F(ppl.f("perplexity")[i])),
                ("ppl_change_pct", Val::F(change)),
                (
                    "top1_agreement_exact",
                    Val::F(ppl.f("top1_agreement_exact")[i]),
                ),
            ])?;
            points.push((att[i].clone(), len[i], change));
            if !names.contains(&att[i]) {
                names.push(att[i].clone());
            }
        }
    }
    let stem = ctx.stem("fig5_model_peers");
    table.write(&stem)?;
    files.extend([stem.with_extension("parquet"), stem.with_extension("csv")]);
    let series = names
        .iter()
        .map(|a| {
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|(n, _, _)| n == a)
                .map(|&(_, l, c)| (l, c))
                .collect();
            pts.sort_by(|x, y| x.0.total_cmp(&y.0));
            Series {
                name: a.clone(),
                points: pts,
                dashed: false,
            }
        })
        .collect();
    Ok(Panel {
        title: "perplexity change vs exact at tau 0.9".into(),
        x: "tokens".into(),
        y: "%".into(),
        series,
        axes: Axes {
            logx: true,
            legend: Some(SeriesLabelPosition::UpperLeft),
            ..Axes::default()
        },
    })
}

/// `layer_audit`: per layer, mean gamma, share of queries with gamma > 1 - tau and
/// eviction regret against L (docs/quality/gpu/audit, `tca quality-heads --backend cuda`).
fn layer_audit(ctx: &Context, dir: &Path) -> Result<Vec<PathBuf>> {
    let a = dir.join("audit");
    let mut layers: Vec<PathBuf> = Vec::new();
    let mut regrets: Vec<PathBuf> = Vec::new();
    let entries = std::fs::read_dir(&a).map_err(|e| TcaError::io(&a, e))?;
    for e in entries {
        let p = e.map_err(|e| TcaError::io(&a, e))?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".csv") && name.starts_with("layers_L") {
            layers.push(p);
        } else if name.ends_with(".csv") && name.starts_with("regret_L") {
            regrets.push(p);
        }
    }
    layers.sort();
    regrets.sort();
    if layers.is_empty() {
        return Err(TcaError::Format {
            path: a,
            msg: "no layers_L*.csv (tca quality-heads --backend cuda)".into(),
        });
    }
    let lr = Rows::read(
        &layers,
        &[
            "length",
            "layer",
            "mean_gamma",
            "frac_gamma_above_1_minus_tau",
            "keep_fraction",
            "queries",
            "linf_entrymax_violations",
            "l1_induced_violations",
            "l2_diameter_violations",
            "l1_entrymax_violations",
            "linf_entrymax_measured",
            "oracle_rows",
            "oracle_true_violations",
        ],
        &[],
    )?;
    let rr = Rows::read(&regrets, &["length", "layer", "mean_regret"], &[])?;
    let lens = sorted_unique(lr.f("length"));
    let nl = sorted_unique(lr.f("layer"));
    let mut table = Table::default();
    let mean_of = |rows: &Rows, col: &str, l: f64, layer: f64| -> f64 {
        let (len, lay) = (rows.f("length"), rows.f("layer"));
        let v: Vec<f64> = (0..rows.len())
            .filter(|&i| len[i] == l && lay[i] == layer)
            .map(|i| rows.f(col)[i])
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let sum_of = |col: &str, l: f64, layer: f64| -> f64 {
        (0..lr.len())
            .filter(|&i| lr.f("length")[i] == l && lr.f("layer")[i] == layer)
            .map(|i| lr.f(col)[i])
            .sum()
    };
    // Regret was measured after the first L - 32 tokens: matched to the audit's L.
    let rlens = sorted_unique(rr.f("length"));
    let regret_at = |l: f64, layer: f64| -> f64 {
        match rlens.iter().find(|&&r| r <= l && l - r < 1024.0) {
            Some(&r) => mean_of(&rr, "mean_regret", r, layer),
            None => f64::NAN,
        }
    };
    for &l in &lens {
        for &layer in &nl {
            table.push(vec![
                ("length", Val::U(l as u64)),
                ("layer", Val::U(layer as u64)),
                ("mean_gamma", Val::F(mean_of(&lr, "mean_gamma", l, layer))),
                (
                    "frac_gamma_above_1_minus_tau",
                    Val::F(mean_of(&lr, "frac_gamma_above_1_minus_tau", l, layer)),
                ),
                (
                    "keep_fraction",
                    Val::F(mean_of(&lr, "keep_fraction", l, layer)),
                ),
                ("mean_regret", Val::F(regret_at(l, layer))),
                (
                    "queries_x_heads",
                    Val::U(sum_of("queries", l, layer) as u64),
                ),
                (
                    "true_reading_violations",
                    Val::U(
                        (sum_of("linf_entrymax_violations", l, layer)
                            + sum_of("l1_induced_violations", l, layer)
                            + sum_of("l2_diameter_violations", l, layer))
                            as u64,
                    ),
                ),
                (
                    "l1_entrymax_violations",
                    Val::U(sum_of("l1_entrymax_violations", l, layer) as u64),
                ),
                (
                    "oracle_rows",
                    Val::U(sum_of("oracle_rows", l, layer) as u64),
                ),
                (
                    "oracle_true_violations",
                    Val::U(sum_of("oracle_true_violations", l, layer) as u64),
                ),
            ])?;
        }
    }
    let stem = ctx.stem("layer_audit");
    table.write(&stem)?;
    let mut files = vec![stem.with_extension("parquet"), stem.with_extension("csv")];
    // Every fifth layer, the last, and the layer of the largest regret at the longest L.
    let lmax = lens.last().copied().unwrap_or(0.0);
    let worst = nl
        .iter()
        .copied()
        .max_by(|&a, &b| regret_at(lmax, a).total_cmp(&regret_at(lmax, b)));
    let shown: Vec<f64> = nl
        .iter()
        .copied()
        .filter(|&x| (x as usize) % 5 == 0 || x as usize == nl.len() - 1 || Some(x) == worst)
        .collect();
    let series = |f: &dyn Fn(f64, f64) -> f64| -> Vec<Series> {
        let mut s: Vec<Series> = shown
            .iter()
            .map(|&layer| Series {
                name: format!("layer {}", layer as usize),
                points: lens
                    .iter()
                    .map(|&l| (l, f(l, layer)))
                    .filter(|p| p.1.is_finite())
                    .collect(),
                dashed: false,
            })
            .collect();
        s.push(Series {
            name: "mean over all 30 layers".into(),
            points: lens
                .iter()
                .map(|&l| {
                    (
                        l,
                        nl.iter().map(|&y| f(l, y)).sum::<f64>() / nl.len() as f64,
                    )
                })
                .filter(|p| p.1.is_finite())
                .collect(),
            dashed: true,
        });
        s
    };
    let ax = |legend: bool| Axes {
        logx: true,
        legend: legend.then_some(SeriesLabelPosition::UpperLeft),
        ..Axes::default()
    };
    let fig = Fig {
        title: "Every layer of SmolLM2 audited in a TCA forward on the H200 (tau 0.9, b 64, w 256; 8K native, 32K/64K/128K with YaRN x4/x8/x16; tca quality-heads --backend cuda)".into(),
        grid: (1, 3),
        panels: vec![
            Panel { title: "mean omitted mass gamma per layer".into(), x: "tokens".into(), y: "mean gamma".into(), series: series(&|l, y| mean_of(&lr, "mean_gamma", l, y)), axes: ax(true) },
            Panel { title: "share of queries with gamma > 1 - tau".into(), x: "tokens".into(), y: "fraction of queries".into(), series: series(&|l, y| mean_of(&lr, "frac_gamma_above_1_minus_tau", l, y)), axes: ax(false) },
            Panel { title: "eviction regret of compact decoding (32 steps; 16 at 8K)".into(), x: "tokens".into(), y: "mass on evicted keys".into(), series: series(&regret_at), axes: ax(false) },
        ],
    };
    files.extend(render(&stem, &fig)?);
    Ok(files)
}
