//! Beyond the paper: how tight the per-query certificate is (docs/theorem.md, "The
//! certificate"). For every layer under its base configuration (TCA's calibrated
//! selection), each bound and chunk size s: the distribution of gamma_hat / gamma and of
//! the certified error bound 2 gamma_hat max|V| over the observed ||e_i||_inf (where
//! that error is above 1e-12 max|V|, i.e. not f64 rounding), the
//! violations of gamma <= gamma_hat (must be 0), and the cost (multiply-adds of the bounds
//! against those of the sparse pass, and measured CPU time).
//!
//! Cost columns: `bound_ms` builds the summaries and bounds every omitted chunk of every
//! query (the certificate's cost beyond the sparse pass, which has m_i and lse_in);
//! `certify_ms` adds the kept logits' log-sum-exp (computed once per layer);
//! `sparse_ms` is the f64 sparse pass (`selection::sparse_attention`); all with rayon
//! on the machine's cores. `*_macs_per_query` count multiply-adds.
//!
//! Writes `certificate_tightness` (table), `certificate_points` (the drawn points) and
//! the figure `certificate_gamma`: certified against actual gamma, log-log, one panel per
//! synthetic head type and one for all real layers.

use super::plot::{color, de, fmt_num, font, legend, render, DrawResult, Figure};
use super::table::{pe, write};
use super::{progress, Context, Evaluation, Layer};
use crate::bound::QueryAudit;
use crate::certificate::certify::log_sum_exp;
use crate::certificate::{BoundKind, Certificate, Certifier};
use crate::error::{Result, TcaError};
use crate::selection::{sparse_attention, KeySets};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use rayon::prelude::*;
use std::path::PathBuf;
use std::time::Instant;

/// Points drawn per panel and chunk size, at most.
const MAX_POINTS: usize = 600;

/// The bound drawn in the figure: the minimum in principal axes on synthetic heads, the
/// minimum on real layers (see [`variants`]).
fn drawn(l: &Layer) -> BoundKind {
    match l.kind {
        Some(_) => BoundKind::PcaMin,
        None => BoundKind::Min,
    }
}

/// (bound, chunk size) pairs measured: the minimum and the minimum in principal axes at
/// s = b, 32, 16, and the box, the ball and the principal-axes box alone at s = b. On
/// real layers (30 of them, to keep `tca reproduce` short) the minimum at each s only:
/// there the others change nothing (docs/theorem.md; `docs/certificate/` holds a run
/// with every variant on every layer).
fn variants(b: usize, real: bool) -> Vec<(BoundKind, usize)> {
    let sizes: Vec<usize> = std::iter::once(b)
        .chain([32, 16].into_iter().filter(|&s| s < b))
        .collect();
    let mut v: Vec<(BoundKind, usize)> = sizes.iter().map(|&s| (BoundKind::Min, s)).collect();
    if !real {
        v.extend(sizes.iter().map(|&s| (BoundKind::PcaMin, s)));
        v.extend([BoundKind::Box, BoundKind::Ball, BoundKind::PcaBox].map(|k| (k, b)));
    }
    v
}

/// The head type a layer's queries are pooled under: the synthetic kind, or "real".
fn head_type(l: &Layer) -> String {
    match l.kind {
        Some(k) => k.name().to_string(),
        None => format!("{} (all layers)", l.source),
    }
}

/// q-quantile of sorted finite values (NaN when empty).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// What one (layer or pool, bound, s) measured.
#[derive(Default)]
struct Stats {
    queries: usize,
    violations: usize,
    /// gamma_hat / gamma over queries with gamma > 0.
    ratio: Vec<f64>,
    /// 2 gamma_hat max|V| / ||e||_inf over queries with ||e||_inf > 1e-12 max|V|.
    err_ratio: Vec<f64>,
    /// 2 gamma max|V| / ||e||_inf on the same queries (Theorem 1's own slack).
    thm_ratio: Vec<f64>,
    gamma_sum: f64,
    gamma_hat_sum: f64,
    bound_macs: f64,
    sparse_macs: f64,
    bound_s: f64,
    certify_s: f64,
    sparse_s: f64,
}

impl Stats {
    fn add(&mut self, audits: &[QueryAudit], certs: &[Certificate], kind: BoundKind, d: usize) {
        for (a, c) in audits.iter().zip(certs) {
            self.queries += 1;
            self.violations += usize::from(a.gamma > c.gamma_hat || c.gamma_hat.is_nan());
            if a.gamma > 0.0 {
                self.ratio.push(c.gamma_hat / a.gamma);
            }
            // Errors at the level of f64 rounding say nothing about the bound.
            if a.err_linf > 1e-12 * a.vmax_abs {
                self.err_ratio
                    .push(2.0 * c.gamma_hat * a.vmax_abs / a.err_linf);
                self.thm_ratio.push(2.0 * a.gamma * a.vmax_abs / a.err_linf);
            }
            self.gamma_sum += a.gamma;
            self.gamma_hat_sum += c.gamma_hat;
            // Per query (||q||, V^T q), then every bounded chunk; the sparse pass: q.k
            // and p v per kept key.
            self.bound_macs += (kind.query_macs(d) + c.bounded_blocks * kind.macs(d)) as f64;
            self.sparse_macs += (2 * d * c.kept) as f64;
        }
    }

    fn merge(&mut self, o: &Stats) {
        self.queries += o.queries;
        self.violations += o.violations;
        self.ratio.extend(&o.ratio);
        self.err_ratio.extend(&o.err_ratio);
        self.thm_ratio.extend(&o.thm_ratio);
        self.gamma_sum += o.gamma_sum;
        self.gamma_hat_sum += o.gamma_hat_sum;
        self.bound_macs += o.bound_macs;
        self.sparse_macs += o.sparse_macs;
        self.bound_s += o.bound_s;
        self.certify_s += o.certify_s;
        self.sparse_s += o.sparse_s;
    }
}

/// Table rows, one per (layer or pool, bound, s).
#[derive(Default)]
struct Rows {
    source: Vec<String>,
    layer: Vec<String>,
    head_type: Vec<String>,
    bound: Vec<&'static str>,
    s: Vec<u32>,
    f: [Vec<f64>; 17],
    n: [Vec<u64>; 3],
}

const F_NAMES: [&str; 17] = [
    "ratio_p10",
    "ratio_p50",
    "ratio_p90",
    "ratio_p99",
    "ratio_max",
    "err_ratio_p50",
    "err_ratio_p90",
    "thm_ratio_p50",
    "mean_gamma",
    "mean_gamma_hat",
    "bound_macs_per_query",
    "sparse_macs_per_query",
    "macs_ratio",
    "bound_ms",
    "certify_ms",
    "sparse_ms",
    "bound_time_ratio",
];

impl Rows {
    fn push(
        &mut self,
        (source, layer, ty): (&str, &str, &str),
        kind: BoundKind,
        s: usize,
        st: &mut Stats,
    ) {
        for v in [&mut st.ratio, &mut st.err_ratio, &mut st.thm_ratio] {
            v.retain(|x| x.is_finite());
            v.sort_by(f64::total_cmp);
        }
        let n = st.queries.max(1) as f64;
        let vals = [
            quantile(&st.ratio, 0.1),
            quantile(&st.ratio, 0.5),
            quantile(&st.ratio, 0.9),
            quantile(&st.ratio, 0.99),
            st.ratio.last().copied().unwrap_or(f64::NAN),
            quantile(&st.err_ratio, 0.5),
            quantile(&st.err_ratio, 0.9),
            quantile(&st.thm_ratio, 0.5),
            st.gamma_sum / n,
            st.gamma_hat_sum / n,
            st.bound_macs / n,
            st.sparse_macs / n,
            st.bound_macs / st.sparse_macs.max(1.0),
            1e3 * st.bound_s,
            1e3 * st.certify_s,
            1e3 * st.sparse_s,
            st.bound_s / st.sparse_s.max(1e-12),
        ];
        self.source.push(source.into());
        self.layer.push(layer.into());
        self.head_type.push(ty.into());
        self.bound.push(kind.name());
        self.s.push(s as u32);
        for (c, v) in self.f.iter_mut().zip(vals) {
            c.push(v);
        }
        for (c, v) in self
            .n
            .iter_mut()
            .zip([st.queries, st.ratio.len(), st.violations])
        {
            c.push(v as u64);
        }
    }

    fn frame(self, stem: &std::path::Path) -> Result<DataFrame> {
        let mut cols = vec![
            Column::new("source".into(), self.source),
            Column::new("layer".into(), self.layer),
            Column::new("head_type".into(), self.head_type),
            Column::new("bound".into(), self.bound),
            Column::new("s".into(), self.s),
        ];
        for (name, c) in ["queries", "queries_gamma_pos", "violations"]
            .iter()
            .zip(self.n)
        {
            cols.push(Column::new((*name).into(), c));
        }
        for (name, c) in F_NAMES.iter().zip(self.f) {
            cols.push(Column::new((*name).into(), c));
        }
        let h = cols[0].len();
        DataFrame::new(h, cols).map_err(pe(stem))
    }
}

/// Per (query head, query) in the order h L + i: S_i, the running max m_i and the
/// log-sum-exp lse_in of the kept logits (what the sparse pass has), computed once per
/// layer and shared by every bound.
type SparseState = Vec<(Vec<usize>, f64, f64)>;

fn sparse_state(heads: &crate::data::Heads, sel: &dyn KeySets) -> SparseState {
    let l = heads.len();
    (0..heads.num_q_heads() * l)
        .into_par_iter()
        .map(|n| {
            let (h, i) = (n / l, n % l);
            let keys = sel.keys(h, i);
            let a = crate::reference::softmax::scores(
                heads.q(h).row(i),
                heads.k(heads.kv_of(h)),
                keys.iter().copied(),
                heads.scale(),
            );
            let m = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (keys, m, log_sum_exp(a.into_iter()))
        })
        .collect()
}

/// One panel's points: (s, gamma, gamma_hat).
type Points = Vec<(usize, f64, f64)>;

struct Scatter {
    title: String,
    panels: Vec<(String, BoundKind, Points, usize, usize)>,
    sizes: Vec<usize>,
}

impl Figure for Scatter {
    fn size(&self) -> (u32, u32) {
        (1500, 1000)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(17)).map_err(de)?;
        let cols = 3;
        let rows = self.panels.len().div_ceil(cols).max(1);
        for (area, (name, kind, pts, viol, total)) in
            root.split_evenly((rows, cols)).iter().zip(&self.panels)
        {
            let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
            for &(_, g, gh) in pts.iter().filter(|p| p.1 > 0.0) {
                lo = lo.min(g.min(gh));
                hi = hi.max(g.max(gh));
            }
            if !lo.is_finite() {
                (lo, hi) = (1e-6, 1.0);
            }
            let (lo, hi) = ((lo / 2.0).max(1e-300), hi * 2.0);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{name}: gamma > gamma_hat at {viol} of {total}"),
                    font(14),
                )
                .margin(8)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
                .map_err(de)?;
            chart
                .configure_mesh()
                .x_label_formatter(&|v| fmt_num(v))
                .y_label_formatter(&|v| fmt_num(v))
                .light_line_style(WHITE.mix(0.0))
                .x_desc("actual gamma_i (dense pass)")
                .y_desc("certified gamma_hat_i")
                .label_style(font(12))
                .axis_desc_style(font(13))
                .draw()
                .map_err(de)?;
            for (ci, &s) in self.sizes.iter().enumerate() {
                let c = color(ci);
                chart
                    .draw_series(
                        pts.iter()
                            .filter(|p| p.0 == s && p.1 > 0.0)
                            .map(|p| Circle::new((p.1, p.2.max(lo)), 2, c.mix(0.5).filled())),
                    )
                    .map_err(de)?
                    .label(format!("{} bound, s = {s}", kind.name()))
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
            legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        Ok(())
    }
}

/// Every k-th (gamma, gamma_hat) with gamma > 0, at most `cap`.
fn sample(audits: &[QueryAudit], certs: &[Certificate], cap: usize) -> Vec<(f64, f64)> {
    let nz: Vec<(f64, f64)> = audits
        .iter()
        .zip(certs)
        .filter(|(a, _)| a.gamma > 0.0)
        .map(|(a, c)| (a.gamma, c.gamma_hat))
        .collect();
    let stride = nz.len().div_ceil(cap.max(1)).max(1);
    nz.into_iter().step_by(stride).collect()
}

/// Writes `certificate_tightness`, `certificate_points` and `certificate_gamma`.
/// Errors (after writing) if gamma > gamma_hat anywhere.
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let evals = ctx.base_evals()?;
    let pairs: Vec<(&Layer, &Evaluation)> = ctx.layers().zip(evals).collect();
    let n_real = ctx.real.len().max(1);
    let mut rows = Rows::default();
    let mut pools: Vec<(String, BoundKind, usize, Stats)> = Vec::new();
    let mut panels: Vec<(String, BoundKind, Points)> = Vec::new();
    let mut all_sizes: Vec<usize> = Vec::new();
    let pb = progress(pairs.len(), "certificate tightness");
    for (l, e) in &pairs {
        pb.inc(1);
        let cfg = ctx.config_for(l);
        let heads = &l.heads;
        let t = Instant::now();
        sparse_attention(heads, &e.selection)?;
        let sparse_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let state = sparse_state(heads, &e.selection);
        let lse_s = t.elapsed().as_secs_f64();
        let ty = head_type(l);
        let ln = heads.len();
        for (kind, s) in variants(cfg.block_size, l.kind.is_none()) {
            // The bounds' own cost: summaries, then every omitted chunk of every query.
            let t = Instant::now();
            let c = Certifier::for_key_sets(heads, kind, s, &e.selection)?;
            let certs: Vec<Certificate> = state
                .par_iter()
                .enumerate()
                .map(|(n, (keys, m, lse))| {
                    c.from_sparse_pass(n / ln, n % ln, keys, *m, *lse)
                        .map(|x| x.0)
                })
                .collect::<Result<_>>()?;
            let bound_s = t.elapsed().as_secs_f64();
            let mut st = Stats {
                bound_s,
                certify_s: bound_s + lse_s,
                sparse_s,
                ..Stats::default()
            };
            st.add(&e.audits, &certs, kind, heads.dim());
            match pools
                .iter_mut()
                .find(|p| p.0 == ty && p.1 == kind && p.2 == s)
            {
                Some(p) => p.3.merge(&st),
                None => {
                    let mut p = Stats::default();
                    p.merge(&st);
                    pools.push((ty.clone(), kind, s, p));
                }
            }
            if kind == drawn(l) {
                if !all_sizes.contains(&s) {
                    all_sizes.push(s);
                }
                let cap = if l.kind.is_some() {
                    MAX_POINTS
                } else {
                    MAX_POINTS / n_real
                };
                let pts = sample(&e.audits, &certs, cap)
                    .into_iter()
                    .map(|(g, gh)| (s, g, gh));
                match panels.iter_mut().find(|p| p.0 == ty) {
                    Some(p) => p.2.extend(pts),
                    None => panels.push((ty.clone(), kind, pts.collect())),
                }
            }
            rows.push((&l.source, &l.label, &ty), kind, s, &mut st);
        }
    }
    pb.finish_and_clear();
    let violations: usize = pools.iter().map(|p| p.3.violations).sum();
    // Per panel: violations and (query, s) pairs of the minimum bound.
    let totals: Vec<(usize, usize)> = panels
        .iter()
        .map(|(name, kind, _)| {
            pools
                .iter()
                .filter(|p| &p.0 == name && p.1 == *kind)
                .fold((0, 0), |(v, n), p| (v + p.3.violations, n + p.3.queries))
        })
        .collect();
    for (ty, kind, s, st) in &mut pools {
        let src = if ty.ends_with("(all layers)") {
            "pooled real"
        } else {
            "pooled synthetic"
        };
        rows.push((src, "all", ty.as_str()), *kind, *s, st);
    }
    let mut files = Vec::new();
    let stem = ctx.stem("certificate_tightness");
    let mut df = rows.frame(&stem)?;
    files.extend(write(&stem, &mut df)?);

    let pstem = ctx.stem("certificate_points");
    let (mut ty, mut ss, mut g, mut gh) = (vec![], vec![], vec![], vec![]);
    for (name, _, pts) in &panels {
        for &(s, a, b) in pts {
            ty.push(name.clone());
            ss.push(s as u32);
            g.push(a);
            gh.push(b);
        }
    }
    let mut df =
        df!("head_type" => ty, "s" => ss, "gamma" => g, "gamma_hat" => gh).map_err(pe(&pstem))?;
    files.extend(write(&pstem, &mut df)?);

    let n_queries: usize = pairs.iter().map(|(_, e)| e.audits.len()).sum();
    let fig = Scatter {
        title: format!(
            "Certified gamma_hat (no dense pass) against actual gamma per query, {} ({} queries, TCA at {})",
            ctx.data_label(),
            n_queries,
            super::config_label(&ctx.base)
        ),
        panels: panels
            .into_iter()
            .zip(totals)
            .map(|((n, k, p), (v, t))| (n, k, p, v, t))
            .collect(),
        sizes: all_sizes,
    };
    files.extend(render(&ctx.stem("certificate_gamma"), &fig)?);
    if violations > 0 {
        return Err(TcaError::Invalid(format!(
            "the certificate failed: gamma > gamma_hat at {violations} (query, bound, s) cases; see {}",
            stem.with_extension("csv").display()
        )));
    }
    Ok(files)
}
