//! The PNG chart: connection rate by concurrency (left) and latency percentiles at the fixed
//! rate (right), per target, medians with min–max whiskers.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};
use serde_json::Value;

use super::{Summary, num};

/// Width and height of the chart in pixels.
const SIZE: (u32, u32) = (1600, 720);

/// The colour of a target (fixed for the usual names, a palette otherwise).
fn colour(target: &str, i: usize) -> RGBColor {
    match target {
        "direct" => RGBColor(60, 60, 60),
        "tcpshift" => RGBColor(31, 119, 180),
        "nftables" => RGBColor(44, 160, 44),
        "haproxy" => RGBColor(255, 127, 14),
        "nginx" => RGBColor(214, 39, 40),
        _ => [
            RGBColor(148, 103, 189),
            RGBColor(140, 86, 75),
            RGBColor(227, 119, 194),
            RGBColor(188, 189, 34),
        ][i % 4],
    }
}

/// Loads `font` as the chart's sans-serif font and draws `summary` into `out`.
pub fn draw(summary: &Summary, machine: &Value, font: &Path, out: &Path) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "cannot read the chart font {} (install Debian's fonts-dejavu-core or pass --font)",
            font.display()
        )
    })?;
    // The font registry keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", font.display()))?;
    render(summary, machine, out).map_err(|e| anyhow!("{e}"))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn render(s: &Summary, machine: &Value, out: &Path) -> DrawResult {
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let m = |k: &str| {
        machine
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let title = format!(
        "tcpshift benchmark — {} ({} cores), kernel {} — medians of {} round(s), whiskers min–max",
        m("cpu"),
        machine.get("cores").and_then(Value::as_u64).unwrap_or(0),
        m("kernel"),
        s.rounds
    );
    let root = root.titled(&title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(SIZE.0 * 55 / 100);
    rate_panel(s, &left)?;
    latency_panel(s, &right)?;
    root.present()?;
    Ok(())
}

fn rate_panel(
    s: &Summary,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> DrawResult {
    let mut concs: Vec<usize> = s
        .rate
        .iter()
        .flat_map(|r| r.by_concurrency.keys().copied())
        .collect();
    concs.sort_unstable();
    concs.dedup();
    let ymax = s
        .rate
        .iter()
        .flat_map(|r| r.by_concurrency.values().map(|f| f.value.max))
        .fold(1.0, f64::max)
        * 1.15;
    let n = concs.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Connection rate (connections/s) by concurrent clients",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            concs
                .get(i as usize)
                .map_or(String::new(), |c| c.to_string())
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&label)
        .y_label_formatter(&|y| num(*y, 0))
        .x_desc("concurrent clients")
        .y_desc("connections/s")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (i, row) in s.rate.iter().enumerate() {
        let c = colour(&row.target, i);
        let pts: Vec<(f64, f64, f64, f64)> = concs
            .iter()
            .enumerate()
            .filter_map(|(x, conc)| {
                row.by_concurrency
                    .get(conc)
                    .map(|f| (x as f64, f.value.median, f.value.min, f.value.max))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(3),
            ))?
            .label(row.target.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled())))?;
        chart.draw_series(
            pts.iter()
                .map(|p| PathElement::new([(p.0, p.2), (p.0, p.3)], c.stroke_width(2))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    Ok(())
}

fn latency_panel(
    s: &Summary,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
) -> DrawResult {
    let offered = s.latency.first().map_or(0.0, |l| l.offered_rate);
    // Logarithmic: p50 and p99 can be orders of magnitude apart.
    let ymax = s
        .latency
        .iter()
        .map(|l| l.p99_us.value.max)
        .fold(1.0, f64::max)
        * 2.0;
    let ymin = s
        .latency
        .iter()
        .map(|l| l.p50_us.value.min)
        .fold(f64::INFINITY, f64::min)
        .clamp(1.0, ymax / 10.0)
        / 2.0;
    let n = s.latency.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Latency at {} connections/s (µs)", num(offered, 0)),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (ymin..ymax).log_scale())?;
    let names: Vec<String> = s.latency.iter().map(|l| l.target.clone()).collect();
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&label)
        .y_label_formatter(&|y| num(*y, 0))
        .y_desc("µs, log scale (connect to close, from the scheduled start)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for (i, l) in s.latency.iter().enumerate() {
        let c = colour(&l.target, i);
        let x = i as f64;
        // p50: light bar on the left, p99: full bar on the right.
        for (dx, fig, fill) in [
            (-0.36, &l.p50_us, c.mix(0.35)),
            (0.02, &l.p99_us, c.mix(1.0)),
        ] {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x + dx, ymin), (x + dx + 0.34, fig.value.median)],
                fill.filled(),
            )))?;
            let mid = x + dx + 0.17;
            chart.draw_series(std::iter::once(PathElement::new(
                [(mid, fig.value.min), (mid, fig.value.max)],
                BLACK.stroke_width(2),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                num(fig.value.median, 0),
                (x + dx + 0.02, fig.value.max * 1.15),
                ("sans-serif", 14).into_font().color(&BLACK),
            )))?;
        }
    }
    // Legend for the two bars.
    let grey = RGBColor(60, 60, 60);
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, ymin), (0.0, ymin)],
            grey.mix(0.35).filled(),
        )))?
        .label("p50 (light)")
        .legend(move |(x, y)| {
            Rectangle::new([(x, y - 6), (x + 16, y + 6)], grey.mix(0.35).filled())
        });
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(0.0, ymin), (0.0, ymin)],
            grey.filled(),
        )))?
        .label("p99 (dark)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], grey.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    Ok(())
}
