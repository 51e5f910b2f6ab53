//! Fig. 3: compute and storage overhead against context length on the GPU, drawn from
//! the device benchmark's measured output (`bench/h200/final/bench.csv` and `sdpa.csv`,
//! written by `tca-gpu-bench` and `bench/sdpa_baseline.py` in one device run; see
//! bench/RESULTS.md): prefill attention latency of one layer (TCA, our dense kernel,
//! PyTorch SDPA flash and cuDNN), inter-token decode latency (compacted vs dense cache)
//! and KV-cache memory; plus the latency breakdown at the longest context.

use super::plot::{de, font, line_panel, render, Axes, DrawResult, Figure, Series};
use super::table::{f64s, pe, strs, write};
use super::Context;
use crate::error::{Result, TcaError};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use std::path::{Path, PathBuf};

/// Where the measured device results live, relative to the repository root.
pub const BENCH_DIR: &str = "bench/h200/final";

fn read_csv(path: &Path) -> Result<DataFrame> {
    if !path.exists() {
        return Err(TcaError::Format {
            path: path.into(),
            msg: "no device benchmark output here (run bench/device-run.sh on the GPU)".into(),
        });
    }
    CsvReadOptions::default()
        .with_has_header(true)
        .try_into_reader_with_file_path(Some(path.into()))
        .and_then(|r| r.finish())
        .map_err(pe(path))
}

struct Fig3 {
    title: String,
    panels: Vec<(String, String, Vec<Series>)>,
}

impl Figure for Fig3 {
    fn size(&self) -> (u32, u32) {
        (1800, 600)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(17)).map_err(de)?;
        for (area, (t, y, s)) in root.split_evenly((1, 3)).iter().zip(&self.panels) {
            let axes = Axes {
                logx: true,
                logy: true,
                legend: Some(SeriesLabelPosition::UpperLeft),
                ..Axes::default()
            };
            line_panel(area, t, "context length L (tokens)", y, s, &axes)?;
        }
        Ok(())
    }
}

/// (L, value) of rows where `key_col == key` (and `sub_col == sub` if given).
fn pick(
    df: &DataFrame,
    key_col: &str,
    key: &str,
    sub: Option<(&str, &str)>,
    y: &str,
) -> Result<Vec<(f64, f64)>> {
    let keys = strs(df, key_col)?;
    let subs = match sub {
        Some((c, _)) => strs(df, c)?,
        None => vec![String::new(); keys.len()],
    };
    let (l, v) = (f64s(df, "L")?, f64s(df, y)?);
    Ok((0..keys.len())
        .filter(|&i| keys[i] == key && sub.is_none_or(|(_, s)| subs[i] == s))
        .map(|i| (l[i], v[i]))
        .collect())
}

/// Writes `fig3_overhead` and `latency_breakdown` (figures and tables).
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let dir = Path::new(BENCH_DIR);
    let bench = read_csv(&dir.join("bench.csv"))?;
    let sdpa = read_csv(&dir.join("sdpa.csv"))?;
    let models: Vec<String> = {
        let mut m = strs(&bench, "model")?;
        m.dedup();
        m
    };
    let mut lat = Vec::new();
    let mut dec = Vec::new();
    let mut mem = Vec::new();
    for m in &models {
        let name = if m == "smol" { "smollm2" } else { m.as_str() };
        let s = |name: String, points: Vec<(f64, f64)>, dashed: bool| Series {
            name,
            points,
            dashed,
        };
        lat.push(s(
            format!("{name}: TCA"),
            pick(&bench, "model", m, None, "tca_ms")?,
            false,
        ));
        lat.push(s(
            format!("{name}: our dense"),
            pick(&bench, "model", m, None, "dense_ms")?,
            true,
        ));
        for b in ["cudnn", "flash"] {
            lat.push(s(
                format!("{name}: SDPA {b}"),
                pick(&sdpa, "model", m, Some(("backend", b)), "ms")?,
                true,
            ));
        }
        dec.push(s(
            format!("{name}: TCA cache"),
            pick(&bench, "model", m, None, "decode_sparse_us")?,
            false,
        ));
        dec.push(s(
            format!("{name}: dense cache"),
            pick(&bench, "model", m, None, "decode_dense_us")?,
            true,
        ));
        let mb = |v: Vec<(f64, f64)>| v.into_iter().map(|(l, b)| (l, b / 1e6)).collect();
        mem.push(s(
            format!("{name}: TCA"),
            mb(pick(&bench, "model", m, None, "kv_bytes_tca")?),
            false,
        ));
        mem.push(s(
            format!("{name}: full"),
            mb(pick(&bench, "model", m, None, "kv_bytes_full")?),
            true,
        ));
    }
    let stem = ctx.stem("fig3_overhead");
    let mut files = render(
        &stem,
        &Fig3 {
            title: "Fig. 3: one layer on an NVIDIA H200 (bf16; llama = 32/8 heads, d 128; smollm2 = 9/3, d 64; synthetic heads, tau 0.9), measured".into(),
            panels: vec![
                ("prefill attention latency".into(), "ms per layer".into(), lat),
                ("decode latency per token".into(), "us per token".into(), dec),
                ("KV cache of one layer".into(), "MB".into(), mem),
            ],
        },
    )?;
    let mut table = bench
        .clone()
        .lazy()
        .select([
            col("model"),
            col("L"),
            col("keep_frac"),
            col("tca_ms"),
            col("dense_ms"),
            col("decode_sparse_us"),
            col("decode_dense_us"),
            col("kv_bytes_tca"),
            col("kv_bytes_full"),
        ])
        .collect()
        .map_err(pe(&stem))?;
    files.extend(write(&stem, &mut table)?);
    // Latency breakdown at the longest context of each model, as shares of the total.
    let bstem = ctx.stem("latency_breakdown");
    let stages = [
        "attention_ms",
        "importance_ms",
        "redundancy_ms",
        "sorting_ms",
        "selection_ms",
    ];
    let (mcol, lcol) = (strs(&bench, "model")?, f64s(&bench, "L")?);
    let longest_of = |m: &str| {
        (0..mcol.len())
            .filter(|&i| mcol[i] == m)
            .map(|i| lcol[i])
            .fold(0.0, f64::max)
    };
    let at_longest = models
        .iter()
        .map(|m| {
            col("model")
                .eq(lit(m.as_str()))
                .and(col("L").eq(lit(longest_of(m) as i64)))
        })
        .reduce(|a, b| a.or(b))
        .unwrap_or(lit(false));
    let longest = bench
        .clone()
        .lazy()
        .filter(at_longest)
        .with_columns(
            stages
                .iter()
                .map(|s| {
                    (col(*s) / col("tca_ms")).alias(format!("{}_share", s.trim_end_matches("_ms")))
                })
                .collect::<Vec<_>>(),
        )
        .collect()
        .map_err(pe(&bstem))?;
    let mut cols: Vec<Expr> = vec![col("model"), col("L"), col("tca_ms")];
    for s in stages {
        cols.push(col(s));
        cols.push(col(format!("{}_share", s.trim_end_matches("_ms"))));
    }
    let mut br = longest.lazy().select(cols).collect().map_err(pe(&bstem))?;
    files.extend(write(&bstem, &mut br)?);
    Ok(files)
}
