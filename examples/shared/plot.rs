//! Line charts written as SVG with plotters: one or more panels side by side, each with its
//! own axes; an axis on a log scale plots log10 of the values and labels the ticks with the
//! values themselves.

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::Result;

/// One line of a panel.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Line width in pixels (2 unless set: a wider line stays visible under one it coincides with).
    pub width: u32,
}

impl Series {
    pub fn new(name: impl Into<String>, color: RGBColor, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
            color,
            width: 2,
        }
    }
    pub fn width(mut self, width: u32) -> Self {
        self.width = width;
        self
    }
}

/// One chart: a title, two axes and its lines.
pub struct Panel {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    pub legend: SeriesLabelPosition,
}

impl Panel {
    /// A panel with its legend in the upper right corner.
    pub fn new(title: impl Into<String>, x: Axis, y: Axis, series: Vec<Series>) -> Self {
        Panel {
            title: title.into(),
            x,
            y,
            series,
            legend: SeriesLabelPosition::UpperRight,
        }
    }
    pub fn legend(mut self, position: SeriesLabelPosition) -> Self {
        self.legend = position;
        self
    }
}

/// An axis: its label, whether it is logarithmic, and an optional fixed range (else the data's).
pub struct Axis {
    pub label: String,
    pub log: bool,
    pub range: Option<(f64, f64)>,
}

impl Axis {
    pub fn linear(label: impl Into<String>) -> Self {
        Axis {
            label: label.into(),
            log: false,
            range: None,
        }
    }
    pub fn log(label: impl Into<String>) -> Self {
        Axis {
            log: true,
            ..Axis::linear(label)
        }
    }
    pub fn range(mut self, lo: f64, hi: f64) -> Self {
        self.range = Some((lo, hi));
        self
    }

    /// Whether `v` can be drawn on this axis (a log axis has no place for 0 or less).
    fn shows(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }

    /// The plotted range: the fixed one, or the data's with 5% room (log axes: whole decades).
    fn bounds(&self, values: impl Iterator<Item = f64>) -> (f64, f64) {
        if let Some(range) = self.range {
            return range;
        }
        let map = |v: f64| if self.log { v.log10() } else { v };
        let (lo, hi) = values
            .filter(|&v| self.shows(v))
            .map(map)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if !lo.is_finite() {
            return (1.0, 10.0);
        }
        if self.log {
            // Whole decades, so that plotters ticks every power of 10 in the range.
            let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor() + 1.0));
            // (A hair below the lowest power, which plotters would otherwise not tick.)
            return (0.999 * 10f64.powf(lo), 10f64.powf(hi));
        }
        let pad = ((hi - lo) * 0.05).max(1e-9);
        (lo - pad, hi + pad)
    }

    /// How many ticks to ask plotters for: on a log axis spanning two decades or more, one per
    /// decade (plotters then puts them at powers of 10); on a shorter one, enough for plotters to
    /// tick 1, 2, ..., 9 times a power of 10 (of which 1, 2 and 5 get labels).
    fn ticks(&self, range: std::ops::Range<f64>) -> usize {
        if !self.log {
            return 10;
        }
        let decades = (range.end / range.start).log10().abs().floor() as usize;
        if decades >= 2 { decades + 1 } else { 40 }
    }

    /// A tick's label; on a log axis only 1, 2 and 5 times a power of 10 are labelled.
    fn label_of(&self, v: f64) -> String {
        if !self.log {
            return trim(v);
        }
        let mantissa = v / 10f64.powf(v.log10().floor());
        if ![1.0, 2.0, 5.0, 10.0]
            .iter()
            .any(|m| (mantissa / m - 1.0).abs() < 1e-3)
        {
            String::new()
        } else if (1e-3..1e5).contains(&v) {
            trim(v)
        } else {
            format!("{v:.0e}")
        }
    }
}

/// At most three significant digits, without trailing zeros.
fn trim(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Colours that stay apart on white and in print.
pub const BLUE_: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE: RGBColor = RGBColor(255, 127, 14);
pub const GREEN_: RGBColor = RGBColor(44, 160, 44);
pub const RED_: RGBColor = RGBColor(214, 39, 40);
pub const PURPLE: RGBColor = RGBColor(148, 103, 189);
pub const GREY: RGBColor = RGBColor(127, 127, 127);

/// Where the README's pictures live: `docs/plots/<name>` in the repository.
pub fn docs_plot(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/plots")
        .join(name)
}

/// Writes `panels` side by side into an SVG file at `path`, each `panel_size` pixels.
pub fn write_svg(path: &Path, panel_size: (u32, u32), panels: &[Panel]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let size = (panel_size.0 * panels.len() as u32, panel_size.1);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(&areas) {
        draw_panel(panel, area)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(panel: &Panel, area: &DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()> {
    let all = || panel.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = panel.x.bounds(all().map(|p| p.0));
    let (y0, y1) = panel.y.bounds(all().map(|p| p.1));
    let linear = |lo: f64, hi: f64| -> RangedCoordf64 { (lo..hi).into() };
    let log = |lo: f64, hi: f64| -> LogCoord<f64> { (lo..hi).log_scale().into() };
    match (panel.x.log, panel.y.log) {
        (false, false) => draw_in(panel, area, linear(x0, x1), linear(y0, y1)),
        (false, true) => draw_in(panel, area, linear(x0, x1), log(y0, y1)),
        (true, false) => draw_in(panel, area, log(x0, x1), linear(y0, y1)),
        (true, true) => draw_in(panel, area, log(x0, x1), log(y0, y1)),
    }
}

fn draw_in<X, Y>(
    panel: &Panel,
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    x: X,
    y: Y,
) -> Result<()>
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let (x_range, y_range) = (x.range(), y.range());
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)?;
    let x_label = |v: &f64| panel.x.label_of(*v);
    let y_label = |v: &f64| panel.y.label_of(*v);
    chart
        .configure_mesh()
        .x_desc(panel.x.label.as_str())
        .y_desc(panel.y.label.as_str())
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .x_labels(panel.x.ticks(x_range))
        .y_labels(panel.y.ticks(y_range))
        .max_light_lines(0)
        .draw()?;
    for s in &panel.series {
        // A point on the same pixel as the one before adds nothing to the picture.
        let mut last_pixel = None;
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|&(x, y)| panel.x.shows(x) && panel.y.shows(y))
            .filter(|p| {
                let pixel = Some(chart.backend_coord(p));
                std::mem::replace(&mut last_pixel, pixel) != pixel
            })
            .collect();
        let style = s.color.stroke_width(s.width);
        chart
            .draw_series(LineSeries::new(points, style))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(panel.legend.clone())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    Ok(())
}
