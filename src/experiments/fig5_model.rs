//! Fig. 5 on the real model: SmolLM2's perplexity change and top-1 agreement with exact
//! attention across tau at 2K, 4K and 8K tokens, with the keep fraction each tau gives,
//! and needle-in-a-haystack accuracy per policy. Drawn from the tables that
//! `tca quality-ppl` and `tca quality-niah` measured (docs/quality/*.csv; the commands
//! are in docs/quality.md): a TCA forward pass in the f64 reference costs minutes per
//! configuration at 8K, too long to rerun inside `tca reproduce`.

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
}

impl Figure for Fig {
    fn size(&self) -> (u32, u32) {
        (1900, 560)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(16)).map_err(de)?;
        let p = root.split_evenly((1, 4));
        for (n, (area, (t, y, s))) in p.iter().zip(&self.lines).enumerate() {
            let axes = Axes {
                legend: (n == 0).then_some(SeriesLabelPosition::UpperRight),
                ..Axes::default()
            };
            line_panel(area, t, "tau", y, s, &axes)?;
        }
        bar_panel(
            &p[3],
            "needle in a haystack: accuracy",
            "fraction of depths answered",
            &self.niah.0,
            &self.niah.1,
            (0.0, 1.05),
            Some(SeriesLabelPosition::UpperRight),
        )
    }
}

/// Writes `fig5_model` (figure and the combined perplexity table).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let dir = Path::new(QUALITY_DIR);
    let mut frames = Vec::new();
    for f in [
        "ppl_2048.csv",
        "ppl_4096.csv",
        "ppl_8192.csv",
        "ppl_8192_more_taus.csv",
    ] {
        frames.push(read(&dir.join(f))?.lazy());
    }
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
    // Every measured NIAH table (niah.csv: 1K and 2K; niah_4096.csv: 4K), stacked.
    let mut niah = read(&dir.join("niah.csv"))?;
    let extra = dir.join("niah_4096.csv");
    if extra.exists() {
        let more = read(&extra)?;
        niah = niah
            .vstack(
                &more
                    .select(niah.get_column_names_owned())
                    .map_err(pe(&extra))?,
            )
            .map_err(pe(&extra))?;
    }
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
        },
    )?);
    Ok(files)
}
