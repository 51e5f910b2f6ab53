//! Fig. 5 on the real model: SmolLM2's perplexity change and top-1 agreement with exact
//! attention across tau at 2K, 4K and 8K tokens, with the keep fraction each tau gives,
//! needle-in-a-haystack accuracy per policy at tau = 0.9, and NIAH accuracy of TCA
//! against tau. Drawn from the tables that `tca quality-ppl` and `tca quality-niah`
//! measured (docs/quality/ppl.csv and niah.csv; the commands are in docs/quality.md):
//! the whole grid takes almost two hours on two cores, too long for
//! `tca reproduce`.

use super::plot::{bar_panel, de, font, line_panel, render, Axes, DrawResult, Figure, Series};
use super::table::{f64s, pe, strs, write};
use super::Context;
use crate::error::{Result, TcaError};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// Where the measured quality tables live, relative to the repository root.
pub const QUALITY_DIR: &str = "docs/quality";

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

struct Fig {
    title: String,
    lines: Vec<(String, String, Vec<Series>)>,
    niah: (Vec<String>, Vec<(String, Vec<f64>)>),
    niah_tau: Vec<Series>,
}

impl Figure for Fig {
    fn size(&self) -> (u32, u32) {
        (2300, 560)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(16)).map_err(de)?;
        let p = root.split_evenly((1, 5));
        for (n, (area, (t, y, s))) in p.iter().zip(&self.lines).enumerate() {
            let axes = Axes {
                legend: (n == 0).then_some(SeriesLabelPosition::UpperRight),
                ..Axes::default()
            };
            line_panel(area, t, "tau", y, s, &axes)?;
        }
        bar_panel(
            &p[3],
            "needle in a haystack at tau 0.9",
            "fraction of depths answered",
            &self.niah.0,
            &self.niah.1,
            (0.0, 1.5),
            Some(SeriesLabelPosition::UpperRight),
        )?;
        let axes = Axes {
            legend: Some(SeriesLabelPosition::MiddleLeft),
            ..Axes::default()
        };
        line_panel(
            &p[4],
            "NIAH vs tau: TCA prefill + full decode (solid), TCA cache (dashed)",
            "tau",
            "fraction of depths answered",
            &self.niah_tau,
            &axes,
        )
    }
}

/// Writes `fig5_model` (figure and the combined perplexity table).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let dir = Path::new(QUALITY_DIR);
    let frames = vec![read(&dir.join("ppl.csv"))?.lazy()];
    let stem = ctx.stem("fig5_model");
    // Exact rows give the reference perplexity per length; TCA rows vs tau.
    let all = concat(frames, UnionArgs::default())
        .and_then(|df| df.unique_stable(None, UniqueKeepStrategy::First).collect())
        .map_err(pe(&stem))?;
    let exact = all
        .clone()
        .lazy()
        .filter(col("attention").eq(lit("exact")))
        .group_by_stable([col("length")])
        .agg([col("perplexity").first().alias("exact_perplexity")])
        .collect()
        .map_err(pe(&stem))?;
    let mut tca = all
        .lazy()
        .filter(col("attention").eq(lit("tca")))
        .join(
            exact.lazy(),
            [col("length")],
            [col("length")],
            JoinArgs::new(JoinType::Inner),
        )
        .with_column(
            ((col("perplexity") / col("exact_perplexity") - lit(1.0)) * lit(100.0))
                .alias("ppl_change_pct"),
        )
        .sort(["length", "tau"], SortMultipleOptions::default())
        .collect()
        .map_err(pe(&stem))?;
    let mut files = write(&stem, &mut tca)?;
    let (len, tau) = (f64s(&tca, "length")?, f64s(&tca, "tau")?);
    let series = |metric: &str| -> Result<Vec<Series>> {
        let y = f64s(&tca, metric)?;
        let mut ls: Vec<f64> = len.clone();
        ls.dedup();
        Ok(ls
            .iter()
            .map(|&l| Series {
                name: format!("{} tokens", l as usize),
                points: (0..len.len())
                    .filter(|&i| len[i] == l)
                    .map(|i| (tau[i], y[i]))
                    .collect(),
                dashed: false,
            })
            .collect())
    };
    // NIAH: every policy at tau 0.9 (exact has no tau), and TCA across tau.
    let niah_path = dir.join("niah.csv");
    let niah_all = read(&niah_path)?;
    let niah = niah_all
        .clone()
        .lazy()
        .filter(col("tau").is_nan().or(col("tau").eq(lit(0.9))))
        .collect()
        .map_err(pe(&niah_path))?;
    let by_tau = super::table::mean_by(
        niah_all
            .lazy()
            .filter(
                col("attention")
                    .eq(lit("tca"))
                    .or(col("attention").eq(lit("tca_prefill_full_decode"))),
            )
            .collect()
            .map_err(pe(&niah_path))?,
        &["length", "attention", "tau"],
        &["correct"],
    )
    .map_err(pe(&niah_path))?;
    let (tl, ta, tt, tc) = (
        f64s(&by_tau, "length")?,
        strs(&by_tau, "attention")?,
        f64s(&by_tau, "tau")?,
        f64s(&by_tau, "correct")?,
    );
    // Solid: TCA prefill + full-cache decode, one line per length. Dashed: TCA with its
    // compacted cache, averaged over the lengths (1-3 of 5 everywhere; one line keeps
    // the panel readable).
    let mut niah_tau = Vec::new();
    let mut tls = tl.clone();
    tls.sort_by(f64::total_cmp);
    tls.dedup();
    for &l in &tls {
        let mut points: Vec<(f64, f64)> = (0..tl.len())
            .filter(|&i| tl[i] == l && ta[i] == "tca_prefill_full_decode")
            .map(|i| (tt[i], tc[i]))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if points.len() > 1 {
            niah_tau.push(Series {
                name: format!("{} tokens", l as usize),
                points,
                dashed: false,
            });
        }
    }
    let mut taus: Vec<f64> = tt.clone();
    taus.sort_by(f64::total_cmp);
    taus.dedup();
    let cache: Vec<(f64, f64)> = taus
        .iter()
        .map(|&t| {
            let v: Vec<f64> = (0..tl.len())
                .filter(|&i| tt[i] == t && ta[i] == "tca")
                .map(|i| tc[i])
                .collect();
            (t, v.iter().sum::<f64>() / v.len().max(1) as f64)
        })
        .collect();
    niah_tau.push(Series {
        name: "TCA cache, mean over lengths".into(),
        points: cache,
        dashed: true,
    });
    let agg =
        super::table::mean_by(niah, &["length", "attention"], &["correct"]).map_err(pe(&stem))?;
    let (nl, na, nc) = (
        f64s(&agg, "length")?,
        strs(&agg, "attention")?,
        f64s(&agg, "correct")?,
    );
    let mut lengths: Vec<f64> = nl.clone();
    lengths.sort_by(f64::total_cmp);
    lengths.dedup();
    let mut policies: Vec<String> = Vec::new();
    for a in &na {
        if !policies.contains(a) {
            policies.push(a.clone());
        }
    }
    let bars = policies
        .iter()
        .map(|p| {
            let v = lengths
                .iter()
                .map(|&l| {
                    (0..nl.len())
                        .find(|&i| nl[i] == l && &na[i] == p)
                        .map_or(f64::NAN, |i| nc[i])
                })
                .collect();
            (p.clone(), v)
        })
        .collect();
    files.extend(render(
        &stem,
        &Fig {
            title: "Fig. 5 on SmolLM2-135M-Instruct (Pride and Prejudice; b 64, w 256, column criterion, calibrated on another passage), measured by tca quality-ppl / quality-niah".into(),
            lines: vec![
                ("perplexity change vs exact".into(), "perplexity change (%)".into(), series("ppl_change_pct")?),
                ("top-1 agreement with exact".into(), "fraction of positions".into(), series("top1_agreement_exact")?),
                ("keep fraction".into(), "mean |S_i| / (i + 1)".into(), series("keep_fraction")?),
            ],
            niah: (lengths.iter().map(|l| format!("{} tokens", *l as usize)).collect(), bars),
            niah_tau,
        },
    )?);
    Ok(files)
}
