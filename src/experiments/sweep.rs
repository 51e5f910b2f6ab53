//! Configuration sweeps shared by Fig. 4 and Fig. 5: every (configuration, layer) pair
//! calibrated, selected and audited, optionally decoded; one row per pair, aggregated
//! over layers with polars.

use super::table::pe;
use super::{evaluate, progress, Layer};
use crate::config::{Config, Criterion};
use crate::decode::decode;
use crate::error::Result;
use crate::selection::Budget;
use polars::prelude::*;
use std::path::Path;

/// One point of a sweep: the parameter it varies, its value and the configuration.
pub struct Point {
    pub param: &'static str,
    pub value: f64,
    pub config: Config,
}

/// Decode cost of one layer: tokens held at the end as a fraction of the full cache,
/// and milliseconds per decoded token (one thread, all KV heads).
pub fn decode_cost(
    layer: &Layer,
    cfg: &Config,
    budgets: &[Budget],
    steps: usize,
) -> Result<(f64, f64)> {
    let l = layer.heads.len();
    let r = decode(&layer.heads, cfg, budgets, l - steps.min(l - 1))?;
    let held: usize = r
        .heads
        .iter()
        .map(|h| h.global_tokens + h.window_tokens)
        .sum();
    Ok((
        held as f64 / (r.heads.len() * l) as f64,
        1e3 * r.seconds_per_step,
    ))
}

/// Dense decode of the same steps (everything cached, nothing compacted), in ms/token.
pub fn dense_decode_ms(layer: &Layer, cfg: &Config, steps: usize) -> Result<f64> {
    let l = layer.heads.len();
    let dense = Config {
        window: l + cfg.block_size,
        ..cfg.clone()
    };
    let full = vec![Budget::full(cfg.block_size)?; layer.heads.num_kv_heads()];
    Ok(1e3 * decode(&layer.heads, &dense, &full, l - steps.min(l - 1))?.seconds_per_step)
}

/// Runs every point on every layer. Columns: param, value, criterion, layer, mean_gamma,
/// rel_err, kept_fraction, frac_gamma_above, reached_fraction, and with `decode_steps`
/// kv_fraction, ms_per_token, dense_ms_per_token.
pub fn run(
    layers: &[&Layer],
    points: &[Point],
    decode_steps: Option<usize>,
    what: &str,
    stem: &Path,
) -> Result<DataFrame> {
    let mut c: (Vec<&str>, Vec<f64>, Vec<&str>, Vec<String>) = Default::default();
    let mut m: [Vec<f64>; 8] = Default::default();
    let dense: Vec<f64> = match decode_steps {
        Some(s) => layers
            .iter()
            .map(|l| dense_decode_ms(l, &points[0].config, s))
            .collect::<Result<_>>()?,
        None => vec![f64::NAN; layers.len()],
    };
    let pb = progress(points.len() * layers.len(), what);
    for p in points {
        for (li, l) in layers.iter().enumerate() {
            pb.inc(1);
            let mut cfg = p.config.clone();
            if l.kind.is_none() {
                cfg.window = cfg.window.min((l.heads.len() / 4).max(1));
            }
            let e = evaluate(&l.heads, &cfg)?;
            let (kvf, ms) = match decode_steps {
                Some(s) => decode_cost(l, &cfg, &e.profile.budgets(0)?, s)?,
                None => (f64::NAN, f64::NAN),
            };
            c.0.push(p.param);
            c.1.push(p.value);
            c.2.push(match cfg.criterion {
                Criterion::Column => "column",
                Criterion::Mass => "mass",
            });
            c.3.push(l.label.clone());
            for (v, x) in m.iter_mut().zip([
                e.summary.mean_gamma,
                e.mean_rel_err(),
                e.summary.mean_kept_fraction,
                e.summary.frac_gamma_above_1_minus_tau,
                e.reached() as f64 / l.heads.num_kv_heads() as f64,
                kvf,
                ms,
                dense[li],
            ]) {
                v.push(x);
            }
        }
    }
    pb.finish_and_clear();
    let [g, r, k, f, re, kv, ms, dms] = m;
    df!("param" => c.0, "value" => c.1, "criterion" => c.2, "layer" => c.3,
        "mean_gamma" => g, "rel_err" => r, "kept_fraction" => k, "frac_gamma_above" => f,
        "reached_fraction" => re, "kv_fraction" => kv, "ms_per_token" => ms,
        "dense_ms_per_token" => dms)
    .map_err(pe(stem))
}

/// Per (param, value, criterion): the mean over layers of every metric, labelled
/// layer = "mean over layers", appended to `df`.
pub fn with_layer_mean(df: DataFrame, stem: &Path) -> Result<DataFrame> {
    let metrics = [
        "mean_gamma",
        "rel_err",
        "kept_fraction",
        "frac_gamma_above",
        "reached_fraction",
        "kv_fraction",
        "ms_per_token",
        "dense_ms_per_token",
    ];
    let mean = super::table::mean_by(df.clone(), &["param", "value", "criterion"], &metrics)
        .and_then(|m| {
            m.lazy()
                .with_column(lit("mean over layers").alias("layer"))
                .collect()
        })
        .and_then(|m| m.select(df.get_column_names_owned()))
        .map_err(pe(stem))?;
    df.vstack(&mean).map_err(pe(stem))
}

/// The (value, metric) points of one layer, parameter and criterion in `df`.
pub fn points_of(
    df: &DataFrame,
    param: &str,
    criterion: &str,
    layer: &str,
    metric: &str,
) -> Result<Vec<(f64, f64)>> {
    let (p, c, l) = (
        super::table::strs(df, "param")?,
        super::table::strs(df, "criterion")?,
        super::table::strs(df, "layer")?,
    );
    let (v, y) = (
        super::table::f64s(df, "value")?,
        super::table::f64s(df, metric)?,
    );
    Ok((0..p.len())
        .filter(|&i| p[i] == param && c[i] == criterion && l[i] == layer)
        .map(|i| (v[i], y[i]))
        .collect())
}
