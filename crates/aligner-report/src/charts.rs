//! The report's charts as SVG text, drawn with plotters' SVG backend: text is written as SVG
//! `<text>` (plotters without its `ttf` feature measures it with a built-in estimate), so no font
//! files, fontconfig or freetype are needed, and the SVG goes inline into the page as it is.

use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Axis labels: at most two decimals, no trailing zeros, like the tables' numbers.
use crate::metric_num as trim_number;

/// Series colours (colour-blind-safe, Okabe and Ito).
const COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

const FONT: &str = "sans-serif";
// plotters' SVG backend writes font sizes at about 0.8 of the size asked for.

/// The coordinates every chart here plots in.
type Plane =
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>;

/// A chart on `area` with the report's caption, margin and label areas.
fn chart_on<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<ChartContext<'a, DB, Plane>> {
    ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(draw_err)
}

/// The grid and axis labels of a chart whose axes are plain numbers.
fn draw_grid<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Plane>,
    x_desc: &str,
    y_desc: &str,
) -> Result<()> {
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| trim_number(*x))
        .y_label_formatter(&|y| trim_number(*y))
        .label_style((FONT, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)
}

fn draw_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("cannot draw a chart: {e}")
}

/// One measured value of a series, with its confidence interval when there is one.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub ci: Option<(f64, f64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

/// The y axis of a line chart.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum YRange {
    /// From the data (and zero).
    Auto,
    /// Fixed bounds, e.g. omega's -100..100.
    Fixed(f64, f64),
}

fn y_bounds(series: &[Series], range: YRange) -> (f64, f64) {
    if let YRange::Fixed(lo, hi) = range {
        return (lo, hi);
    }
    let values = series.iter().flat_map(|s| {
        s.points.iter().flat_map(|p| {
            let (lo, hi) = p.ci.unwrap_or((p.y, p.y));
            [p.y, lo, hi]
        })
    });
    let (mut lo, mut hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-9);
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    (if lo < 0.0 { lo - pad } else { lo }, hi + pad)
}

/// Metrics over rounds: one line per series, points at integer rounds, vertical error bars for
/// intervals. Series sharing a round are spread a little sideways so their bars stay apart.
pub fn over_rounds(title: &str, y_desc: &str, series: &[Series], range: YRange) -> Result<String> {
    let mut rounds: Vec<i64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.x.round() as i64))
        .collect();
    rounds.sort_unstable();
    rounds.dedup();
    let (first, last) = match (rounds.first(), rounds.last()) {
        (Some(a), Some(b)) => (*a as f64, *b as f64),
        _ => (1.0, 1.0),
    };
    let (y_lo, y_hi) = y_bounds(series, range);
    let width = 760u32;
    let height = 380u32 + 18 * series.len().saturating_sub(4) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let legend_w = 230;
        let (plot, legend) = root.split_horizontally(width - legend_w);
        let x_range = (first - 0.5)..(last + 0.5);
        let mut chart = chart_on(&plot, title, x_range, y_lo..y_hi)?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(y_desc)
            // Rounds are whole: label those, leave the ticks between them bare.
            .x_labels((last - first) as usize + 2)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| trim_number(*y))
            .label_style((FONT, 16))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        let spread = 0.06 * (last - first + 1.0).min(4.0);
        let n = series.len() as f64;
        for (i, s) in series.iter().enumerate() {
            let c = color(i);
            let dx = if n > 1.0 {
                (i as f64 - (n - 1.0) / 2.0) * spread / n
            } else {
                0.0
            };
            let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x + dx, p.y)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(draw_err)?;
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
                .map_err(draw_err)?;
            chart
                .draw_series(s.points.iter().filter_map(|p| {
                    p.ci.map(|(lo, hi)| {
                        ErrorBar::new_vertical(p.x + dx, lo, p.y, hi, c.stroke_width(1), 10)
                    })
                }))
                .map_err(draw_err)?;
        }
        draw_legend(&legend, series.iter().map(|s| s.label.as_str()))?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A legend in its own area beside the plot, so it never hides a point.
fn draw_legend<'a, DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    labels: impl Iterator<Item = &'a str>,
) -> Result<()> {
    for (i, label) in labels.enumerate() {
        let y = 48 + 20 * i as i32;
        let c = color(i);
        area.draw(&PathElement::new(vec![(4, y), (26, y)], c.stroke_width(3)))
            .map_err(draw_err)?;
        area.draw(&Circle::new((15, y), 4, c.filled()))
            .map_err(draw_err)?;
        area.draw(&Text::new(
            label.to_string(),
            (32, y - 7),
            (FONT, 16).into_font().color(&BLACK),
        ))
        .map_err(draw_err)?;
    }
    Ok(())
}

/// A point of the helpfulness-vs-harmlessness chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Tradeoff {
    /// Which series (colour) it belongs to, e.g. the comparison.
    pub group: String,
    /// Printed beside the point, e.g. `r2`.
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub x_ci: Option<(f64, f64)>,
    pub y_ci: Option<(f64, f64)>,
}

/// The Aligner paper's trade-off view: omega on helpfulness (x) against omega on harmlessness
/// (y), one point per round and comparison, the rounds of one comparison joined in order.
pub fn tradeoff(
    title: &str,
    (x_desc, y_desc): (&str, &str),
    (lo, hi): (f64, f64),
    points: &[Tradeoff],
) -> Result<String> {
    let mut groups: BTreeMap<&str, Vec<&Tradeoff>> = BTreeMap::new();
    for p in points {
        groups.entry(p.group.as_str()).or_default().push(p);
    }
    let width = 760u32;
    let height = 560u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let legend_w = 200;
        let (plot, legend) = root.split_horizontally(width - legend_w);
        let mut chart = chart_on(&plot, title, lo..hi, lo..hi)?;
        draw_grid(&mut chart, x_desc, y_desc)?;
        let axis = RGBColor(150, 150, 150).stroke_width(1);
        chart
            .draw_series([
                PathElement::new(vec![(lo, 0.0), (hi, 0.0)], axis),
                PathElement::new(vec![(0.0, lo), (0.0, hi)], axis),
            ])
            .map_err(draw_err)?;
        // Labels of points that fall on the same spot are stacked, not printed over each other.
        let mut at_spot: BTreeMap<(i64, i64), i32> = BTreeMap::new();
        for (i, (_, pts)) in groups.iter().enumerate() {
            let c = color(i);
            let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.x, p.y)).collect();
            chart
                .draw_series(LineSeries::new(line, c.mix(0.5).stroke_width(1)))
                .map_err(draw_err)?;
            for p in pts {
                // The intervals: horizontal for x, then vertical for y.
                let style = c.mix(0.6).stroke_width(1);
                if let Some((lo, hi)) = p.x_ci {
                    let bar = ErrorBar::new_horizontal(p.y, lo, p.x, hi, style, 8);
                    chart.draw_series([bar]).map_err(draw_err)?;
                }
                if let Some((lo, hi)) = p.y_ci {
                    let bar = ErrorBar::new_vertical(p.x, lo, p.y, hi, style, 8);
                    chart.draw_series([bar]).map_err(draw_err)?;
                }
                let spot = at_spot
                    .entry(((p.x * 2.0).round() as i64, (p.y * 2.0).round() as i64))
                    .or_insert(0);
                let dy = -16 + 15 * *spot;
                *spot += 1;
                chart
                    .draw_series([EmptyElement::at((p.x, p.y))
                        + Circle::new((0, 0), 5, c.filled())
                        + Text::new(p.label.clone(), (8, dy), (FONT, 16).into_font().color(&c))])
                    .map_err(draw_err)?;
            }
        }
        draw_legend(&legend, groups.keys().copied())?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A value on a training step axis, for the loss curves.
pub fn over_steps(
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<String> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (x_lo, x_hi) = if x_lo.is_finite() && x_hi > x_lo {
        (x_lo, x_hi)
    } else {
        (0.0, 1.0)
    };
    let as_series: Vec<Series> = series
        .iter()
        .map(|(label, pts)| Series {
            label: label.clone(),
            points: pts
                .iter()
                .map(|(x, y)| Point {
                    x: *x,
                    y: *y,
                    ci: None,
                })
                .collect(),
        })
        .collect();
    let (y_lo, y_hi) = y_bounds(&as_series, YRange::Auto);
    let width = 760u32;
    let height = 360u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (plot, legend) = root.split_horizontally(width - 200);
        let mut chart = chart_on(&plot, title, x_lo..x_hi, y_lo..y_hi)?;
        draw_grid(&mut chart, "step", y_desc)?;
        for (i, (_, pts)) in series.iter().enumerate() {
            chart
                .draw_series(LineSeries::new(pts.clone(), color(i).stroke_width(2)))
                .map_err(draw_err)?;
            if pts.len() == 1 {
                chart
                    .draw_series([Circle::new(pts[0], 4, color(i).filled())])
                    .map_err(draw_err)?;
            }
        }
        draw_legend(&legend, series.iter().map(|(l, _)| l.as_str()))?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_text_and_escaped_labels() {
        let series = vec![
            Series {
                label: "omega <aligner>".into(),
                points: vec![
                    Point {
                        x: 1.0,
                        y: 40.0,
                        ci: Some((20.0, 60.0)),
                    },
                    Point {
                        x: 2.0,
                        y: 55.0,
                        ci: Some((35.0, 70.0)),
                    },
                ],
            },
            Series {
                label: "initial".into(),
                points: vec![Point {
                    x: 2.0,
                    y: -10.0,
                    ci: None,
                }],
            },
        ];
        let svg = over_rounds("omega", "%", &series, YRange::Fixed(-100.0, 100.0)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<text") && svg.contains("omega &lt;aligner&gt;"));
        assert!(!svg.contains("<aligner>"));
        assert!(svg.contains("<polyline") || svg.contains("<path"));

        let pts = [
            Tradeoff {
                group: "aligner".into(),
                label: "r1".into(),
                x: 10.0,
                y: 20.0,
                x_ci: Some((0.0, 30.0)),
                y_ci: Some((5.0, 40.0)),
            },
            Tradeoff {
                group: "aligner".into(),
                label: "r2".into(),
                x: 10.0,
                y: 20.0,
                x_ci: None,
                y_ci: None,
            },
        ];
        let svg = tradeoff(
            "trade-off",
            ("helpfulness", "harmlessness"),
            (-110.0, 110.0),
            &pts,
        )
        .unwrap();
        assert!(
            svg.contains(">\nr1\n</text>") && svg.contains(">\nr2\n</text>"),
            "{svg}"
        );

        let svg = over_steps(
            "loss",
            "loss",
            &[("round 1".into(), vec![(1.0, 0.7), (2.0, 0.6)])],
        )
        .unwrap();
        assert!(svg.contains(">\nround 1\n</text>"), "{svg}");
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(trim_number(100.0), "100");
        assert_eq!(trim_number(12.345), "12.35");
        assert_eq!(trim_number(-0.001), "0");
        assert_eq!(trim_number(0.5), "0.5");
    }
}
