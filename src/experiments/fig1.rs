//! Fig. 1: attention distributions of heads of each type. Row 1: the mean attention a
//! key receives, c_j = (1 / (L - j)) sum_{i >= j} P_ij. Row 2: the (query, key) pairs
//! where P_ij exceeds the row mean 1 / (i + 1) (subsampled for drawing, all counted).
//!
//! Real heads are picked automatically from the captured layers by scores over the
//! rows of the second half of the sequence (every 8th query):
//! sink = mean mass on the first 4 keys, recent = mean mass on the last 32 keys up to
//! the query, entropy = mean H(P_i) / ln(i + 1). Attention sink: max sink - recent;
//! terminal-biased: max recent - sink; bipolar: max min(sink, recent); uniform: max
//! entropy. A head is picked for one type at most.

use super::plot::{de, font, line_panel, render, Axes, DrawResult, Figure, Series};
use super::table::write;
use super::{progress, Context, Layer};
use crate::data::Heads;
use crate::error::Result;
use crate::reference::causal_row;
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;
use rayon::prelude::*;
use std::path::PathBuf;

/// Points drawn per scatter panel at most.
const MAX_POINTS: usize = 6000;

/// One head shown in the figure.
pub struct HeadView {
    pub title: String,
    pub head_type: String,
    pub source: String,
    pub layer: usize,
    pub q_head: usize,
    /// c_j per key position.
    pub mean_attention: Vec<f64>,
    /// (query, key, P) with P above the row mean, subsampled to at most MAX_POINTS.
    pub points: Vec<(usize, usize, f64)>,
    /// How many pairs are above the row mean before subsampling.
    pub points_total: usize,
}

/// Row statistics of query head h: c_j and the pairs above the row mean.
pub fn head_view(heads: &Heads, h: usize) -> (Vec<f64>, Vec<(usize, usize, f64)>, usize) {
    let l = heads.len();
    let rows: Vec<Vec<f64>> = (0..l)
        .into_par_iter()
        .map(|i| causal_row(heads, h, i).0)
        .collect();
    let mut col = vec![0.0; l];
    let mut above = Vec::new();
    for (i, p) in rows.iter().enumerate() {
        for (j, &x) in p.iter().enumerate() {
            col[j] += x;
            if x > 1.0 / (i + 1) as f64 {
                above.push((i, j, x));
            }
        }
    }
    let mean: Vec<f64> = col
        .iter()
        .enumerate()
        .map(|(j, s)| s / (l - j) as f64)
        .collect();
    let total = above.len();
    let stride = total.div_ceil(MAX_POINTS).max(1);
    let points = above.into_iter().step_by(stride).collect();
    (mean, points, total)
}

/// Type scores (sink, recent, entropy) of query head h over every 8th query of the
/// second half.
pub fn type_scores(heads: &Heads, h: usize) -> (f64, f64, f64) {
    let l = heads.len();
    let qs: Vec<usize> = (l / 2..l).step_by(8).collect();
    let per: Vec<(f64, f64, f64)> = qs
        .par_iter()
        .map(|&i| {
            let p = causal_row(heads, h, i).0;
            let sink: f64 = p[..4.min(i + 1)].iter().sum();
            let recent: f64 = p[(i + 1).saturating_sub(32)..].iter().sum();
            let ent: f64 = -p
                .iter()
                .filter(|x| **x > 0.0)
                .map(|x| x * x.ln())
                .sum::<f64>();
            (
                sink,
                recent,
                if i > 0 {
                    ent / ((i + 1) as f64).ln()
                } else {
                    1.0
                },
            )
        })
        .collect();
    let n = per.len().max(1) as f64;
    per.iter().fold((0.0, 0.0, 0.0), |a, b| {
        (a.0 + b.0 / n, a.1 + b.1 / n, a.2 + b.2 / n)
    })
}

/// Picks (layer index into `layers`, query head) for sink, terminal, bipolar, uniform.
pub fn pick_real_heads(layers: &[Layer]) -> Vec<(&'static str, usize, usize)> {
    let cands: Vec<(usize, usize)> = layers
        .iter()
        .enumerate()
        .flat_map(|(li, l)| (0..l.heads.num_q_heads()).map(move |h| (li, h)))
        .collect();
    let pb = progress(cands.len(), "fig1: scoring real heads");
    let scores: Vec<(f64, f64, f64)> = cands
        .iter()
        .map(|&(li, h)| {
            pb.inc(1);
            type_scores(&layers[li].heads, h)
        })
        .collect();
    pb.finish_and_clear();
    type Rule = (&'static str, fn(&(f64, f64, f64)) -> f64);
    let rules: [Rule; 4] = [
        ("attention sink", |s| s.0 - s.1),
        ("terminal-biased", |s| s.1 - s.0),
        ("bipolar", |s| s.0.min(s.1)),
        ("uniform", |s| s.2),
    ];
    let mut taken = vec![false; cands.len()];
    let mut out = Vec::new();
    for (name, rule) in rules {
        if let Some(best) = (0..cands.len())
            .filter(|&c| !taken[c])
            .max_by(|&a, &b| rule(&scores[a]).total_cmp(&rule(&scores[b])))
        {
            taken[best] = true;
            out.push((name, cands[best].0, cands[best].1));
        }
    }
    out
}

struct Fig1 {
    title: String,
    views: Vec<HeadView>,
}

impl Figure for Fig1 {
    fn size(&self) -> (u32, u32) {
        (340 * self.views.len() as u32, 760)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult {
        let root = root.titled(&self.title, font(18)).map_err(de)?;
        let cols = self.views.len();
        let panels = root.split_evenly((2, cols));
        for (c, v) in self.views.iter().enumerate() {
            let pts: Vec<(f64, f64)> = v
                .mean_attention
                .iter()
                .enumerate()
                .map(|(j, &x)| (j as f64, x))
                .collect();
            line_panel(
                &panels[c],
                &v.title,
                "key position j",
                "mean attention c_j",
                &[Series {
                    name: format!("{} (head {})", v.head_type, v.q_head),
                    points: pts,
                    dashed: false,
                }],
                &Axes {
                    logy: true,
                    ..Axes::default()
                },
            )?;
            scatter(&panels[cols + c], v)?;
        }
        Ok(())
    }
}

fn scatter<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, v: &HeadView) -> DrawResult {
    let l = v.mean_attention.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "P_ij > 1/(i+1): {} pairs ({} drawn)",
                v.points_total,
                v.points.len()
            ),
            font(13),
        )
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..l, l..0.0)
        .map_err(de)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| super::plot::fmt_num(v))
        .y_label_formatter(&|v| super::plot::fmt_num(v))
        .light_line_style(WHITE.mix(0.0))
        .x_desc("key position j")
        .y_desc("query position i")
        .label_style(font(12))
        .axis_desc_style(font(13))
        .draw()
        .map_err(de)?;
    chart
        .draw_series(
            v.points.iter().map(|&(i, j, _)| {
                Circle::new((j as f64, i as f64), 1, super::plot::color(0).filled())
            }),
        )
        .map_err(de)?;
    Ok(())
}

fn views_table(views: &[HeadView]) -> PolarsResult<(DataFrame, DataFrame)> {
    let mut m = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut p = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for v in views {
        for (j, &x) in v.mean_attention.iter().enumerate() {
            m.0.push(v.source.clone());
            m.1.push(v.head_type.clone());
            m.2.push(v.layer as u32);
            m.3.push(v.q_head as u32);
            m.4.push(j as u32);
            m.5.push(x);
        }
        for &(i, j, x) in &v.points {
            p.0.push(v.source.clone());
            p.1.push(v.head_type.clone());
            p.2.push(v.layer as u32);
            p.3.push(v.q_head as u32);
            p.4.push((i as u32, j as u32));
            p.5.push(x);
        }
    }
    let mean = df!(
        "source" => m.0, "head_type" => m.1, "layer" => m.2, "q_head" => m.3,
        "key" => m.4, "mean_attention" => m.5
    )?;
    let points = df!(
        "source" => p.0, "head_type" => p.1, "layer" => p.2, "q_head" => p.3,
        "query" => p.4.iter().map(|x| x.0).collect::<Vec<_>>(),
        "key" => p.4.iter().map(|x| x.1).collect::<Vec<_>>(),
        "p" => p.5
    )?;
    Ok((mean, points))
}

fn write_figure(
    ctx: &Context,
    name: &str,
    title: String,
    views: Vec<HeadView>,
) -> Result<Vec<PathBuf>> {
    let stem = ctx.stem(name);
    let (mut mean, mut points) = views_table(&views).map_err(super::table::pe(&stem))?;
    let mut files = render(&stem, &Fig1 { title, views })?;
    files.extend(write(&ctx.stem(&format!("{name}_mean")), &mut mean)?);
    files.extend(write(&ctx.stem(&format!("{name}_points")), &mut points)?);
    Ok(files)
}

/// Writes `fig1_attention_synthetic` and, with real layers, `fig1_attention_real`.
pub fn run(ctx: &Context) -> Result<Vec<PathBuf>> {
    let pb = progress(ctx.synthetic.len(), "fig1: synthetic heads");
    let views: Vec<HeadView> = ctx
        .synthetic
        .iter()
        .map(|l| {
            pb.inc(1);
            let (mean, points, total) = head_view(&l.heads, 0);
            HeadView {
                title: format!("{} head", l.label),
                head_type: l.label.clone(),
                source: l.source.clone(),
                layer: l.layer,
                q_head: 0,
                mean_attention: mean,
                points,
                points_total: total,
            }
        })
        .collect();
    pb.finish_and_clear();
    let s = &ctx.synthetic[0].heads;
    let mut files = write_figure(
        ctx,
        "fig1_attention_synthetic",
        format!(
            "Fig. 1 (synthetic, seeded): attention of each head type, query head 0; Hq {}, Hkv {}, d {}, L {}",
            s.num_q_heads(),
            s.num_kv_heads(),
            s.dim(),
            s.len()
        ),
        views,
    )?;
    if !ctx.real.is_empty() {
        let picks = pick_real_heads(&ctx.real);
        let views = picks
            .iter()
            .map(|&(ty, li, h)| {
                let l = &ctx.real[li];
                let (mean, points, total) = head_view(&l.heads, h);
                HeadView {
                    title: format!("{ty}: layer {}, head {h}", l.layer),
                    head_type: ty.into(),
                    source: l.source.clone(),
                    layer: l.layer,
                    q_head: h,
                    mean_attention: mean,
                    points,
                    points_total: total,
                }
            })
            .collect();
        let r = &ctx.real[0];
        files.extend(write_figure(
            ctx,
            "fig1_attention_real",
            format!(
                "Fig. 1 ({}): heads picked by type score; L {}",
                r.source,
                r.heads.len()
            ),
            views,
        )?);
    }
    Ok(files)
}
