//! The plotting shared by every figure: an embedded font, PNG and SVG output of the same
//! drawing, a palette, and the panel kinds the figures use (lines, log-log scatter,
//! grouped bars, heat map).

use crate::error::{Result, TcaError};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Result of drawing: plotters' errors as text.
pub type DrawResult = std::result::Result<(), String>;

/// Font family every text uses (DejaVu Sans, embedded: no system fonts needed).
pub const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

/// Converts any plotters error into text.
pub fn de<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult;
}

/// Draws `fig` to `stem.png` and `stem.svg`; returns both paths.
pub fn render(stem: &Path, fig: &impl Figure) -> Result<Vec<PathBuf>> {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TcaError::io(dir, e))?;
    }
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let fail = |p: &Path, e: String| TcaError::Format {
        path: p.into(),
        msg: format!("drawing failed: {e}"),
    };
    {
        let root = BitMapBackend::new(&png, fig.size()).into_drawing_area();
        root.fill(&WHITE).map_err(de).map_err(|e| fail(&png, e))?;
        fig.draw(&root).map_err(|e| fail(&png, e))?;
        root.present().map_err(de).map_err(|e| fail(&png, e))?;
    }
    {
        let root = SVGBackend::new(&svg, fig.size()).into_drawing_area();
        root.fill(&WHITE).map_err(de).map_err(|e| fail(&svg, e))?;
        fig.draw(&root).map_err(|e| fail(&svg, e))?;
        root.present().map_err(de).map_err(|e| fail(&svg, e))?;
    }
    Ok(vec![png, svg])
}

/// Distinct colours for series (colour-blind-friendly order first).
pub fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 12] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(120, 120, 120),
        RGBColor(0, 0, 0),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(188, 189, 34),
        RGBColor(214, 39, 40),
    ];
    P[i % P.len()]
}

/// Draws the legend of `chart` at `pos` in the figures' one style.
pub fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> DrawResult {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(font(12))
        .position(pos)
        .draw()
        .map_err(de)
}

/// Text style of a given size.
pub fn font(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().into()
}

/// Compact tick label: integers plainly, small values in scientific notation.
pub fn fmt_num(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (v.fract() == 0.0 && a < 1e6) || a >= 100.0 {
        format!("{v:.0}")
    } else if a < 0.01 {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Dashed look (drawn with small markers only) for a second family of lines.
    pub dashed: bool,
}

/// Axis range padded a little, from data (safe for empty or constant data).
pub fn range(vals: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1e-3, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 2.0, hi * 2.0)
    } else if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    }
}

/// Axis options of a line panel.
#[derive(Clone, Default)]
pub struct Axes {
    pub logx: bool,
    pub logy: bool,
    /// Fixed y range; from the data when None.
    pub ylim: Option<(f64, f64)>,
    /// Where the legend goes; no legend when None.
    pub legend: Option<SeriesLabelPosition>,
    /// With a log y axis, values below this are drawn at it (say so in the title).
    pub floor: Option<f64>,
    /// Per series (by index), vertical intervals (x, lo, hi) drawn in its colour.
    pub intervals: Vec<Vec<(f64, f64, f64)>>,
}

/// A line chart panel with markers (for short series), legend and axis labels.
pub fn line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series],
    axes: &Axes,
) -> DrawResult {
    let (logx, logy, ylim) = (axes.logx, axes.logy, axes.ylim);
    let floored: Vec<Series>;
    let series = match (logy, axes.floor) {
        (true, Some(f)) => {
            floored = series
                .iter()
                .map(|s| Series {
                    points: s.points.iter().map(|&(x, y)| (x, y.max(f))).collect(),
                    ..s.clone()
                })
                .collect();
            &floored[..]
        }
        _ => series,
    };
    let xs = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        logx,
    );
    let ys = ylim.unwrap_or_else(|| {
        range(
            series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
            logy,
        )
    });
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(xlabel)
                .y_desc(ylabel)
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&|v| fmt_num(v))
                .y_label_formatter(&|v| fmt_num(v))
                .light_line_style(WHITE.mix(0.0))
                .label_style(font(13))
                .axis_desc_style(font(14))
                .draw()
                .map_err(de)?;
            for (i, s) in series.iter().enumerate() {
                let c = color(i);
                let style =
                    ShapeStyle::from(&c).stroke_width(if s.dashed || s.points.len() > 100 {
                        1
                    } else {
                        2
                    });
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| (!logx || p.0 > 0.0) && (!logy || p.1 > 0.0))
                    .map(|(x, y)| (x.clamp(xs.0, xs.1), y.clamp(ys.0, ys.1)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(de)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                if let Some(iv) = axes.intervals.get(i) {
                    let thin = ShapeStyle::from(&c).stroke_width(1);
                    chart
                        .draw_series(iv.iter().filter(|p| !logx || p.0 > 0.0).map(
                            |&(x, lo, hi)| {
                                let x = x.clamp(xs.0, xs.1);
                                PathElement::new(
                                    vec![(x, lo.clamp(ys.0, ys.1)), (x, hi.clamp(ys.0, ys.1))],
                                    thin,
                                )
                            },
                        ))
                        .map_err(de)?;
                }
                if pts.len() > 40 {
                    continue;
                }
                if s.dashed {
                    chart
                        .draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 4, c.filled())))
                        .map_err(de)?;
                } else {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                        .map_err(de)?;
                }
            }
            if let Some(pos) = axes.legend.clone() {
                legend(&mut chart, pos)?;
            }
        }};
    }
    let mut b = ChartBuilder::on(area);
    b.caption(title, font(15))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(60);
    match (logx, logy) {
        (false, false) => body!(b.build_cartesian_2d(xs.0..xs.1, ys.0..ys.1).map_err(de)?),
        (true, false) => body!(b
            .build_cartesian_2d((xs.0..xs.1).log_scale(), ys.0..ys.1)
            .map_err(de)?),
        (false, true) => body!(b
            .build_cartesian_2d(xs.0..xs.1, (ys.0..ys.1).log_scale())
            .map_err(de)?),
        (true, true) => body!(b
            .build_cartesian_2d((xs.0..xs.1).log_scale(), (ys.0..ys.1).log_scale())
            .map_err(de)?),
    }
    Ok(())
}

/// Grouped bars: one group per category, one bar per series (values per category).
pub fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    ylabel: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    ylim: (f64, f64),
    legend_at: Option<SeriesLabelPosition>,
) -> DrawResult {
    let n = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, font(15))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..categories.len() as f64, ylim.0..ylim.1)
        .map_err(de)?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(categories.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            let f = x.fract();
            if (f - 0.5).abs() < 1e-6 {
                cats.get(x.floor() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(ylabel)
        .y_label_formatter(&|v| fmt_num(v))
        .light_line_style(WHITE.mix(0.0))
        .label_style(font(13))
        .axis_desc_style(font(14))
        .draw()
        .map_err(de)?;
    for (si, (name, vals)) in series.iter().enumerate() {
        let c = color(si);
        chart
            .draw_series(vals.iter().enumerate().map(|(ci, &v)| {
                let x0 = ci as f64 + 0.1 + 0.8 * si as f64 / n;
                let x1 = x0 + 0.8 / n * 0.9;
                Rectangle::new([(x0, ylim.0), (x1, v.clamp(ylim.0, ylim.1))], c.filled())
            }))
            .map_err(de)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    if let Some(pos) = legend_at {
        legend(&mut chart, pos)?;
    }
    Ok(())
}

/// A heat map of `values[row][col]` coloured over [lo, hi] (viridis), with `texts` written
/// in the cells.
pub fn heatmap_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    row_labels: &[String],
    col_labels: &[String],
    values: &[Vec<f64>],
    texts: &[Vec<String>],
    (lo, hi): (f64, f64),
) -> DrawResult {
    let (rows, cols) = (row_labels.len(), col_labels.len());
    let mut chart = ChartBuilder::on(area)
        .caption(title, font(15))
        .margin(8)
        .x_label_area_size(38)
        .y_label_area_size(110)
        .build_cartesian_2d(0.0..cols as f64, 0.0..rows as f64)
        .map_err(de)?;
    let (rl, cl) = (row_labels.to_vec(), col_labels.to_vec());
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols * 2 + 1)
        .y_labels((rows * 2 + 1).min(121))
        .x_label_formatter(&move |x| {
            if (x.fract() - 0.5).abs() < 1e-6 {
                cl.get(x.floor() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&move |y| {
            if (y.fract() - 0.5).abs() < 1e-6 {
                rl.get(y.floor() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(font(12))
        .draw()
        .map_err(de)?;
    let map = ViridisRGB;
    for (r, row) in values.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let t = if hi > lo {
                ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
            } else {
                0.5
            };
            let fill = map.get_color(t);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(c as f64, r as f64), (c as f64 + 1.0, r as f64 + 1.0)],
                    fill.filled(),
                )))
                .map_err(de)?;
            if rows <= 40 {
                let txt = if t > 0.6 { BLACK } else { WHITE };
                chart
                    .draw_series(std::iter::once(Text::new(
                        texts[r][c].clone(),
                        (c as f64 + 0.4, r as f64 + 0.6),
                        font(11).color(&txt),
                    )))
                    .map_err(de)?;
            }
        }
    }
    Ok(())
}
