//! The report's SVG plots: loss and validation curves, sweep lines, user groups.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::*;
use crate::config::Stage;
use crate::train::EpochRecord;
use crate::{Error, Result};

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("plot: {e}"))
}

/// Colours of the groups' lines, in order.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Per group: for each epoch index (pre-training epochs, then the next stage's), the mean and the
/// min..max over its runs of `value`.
fn series(g: &Group, value: impl Fn(&EpochRecord) -> f64) -> Vec<(f64, f64, f64, f64)> {
    let mut at: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for r in &g.runs {
        for (i, h) in r.result.history.iter().enumerate() {
            at.entry(i + 1).or_default().push(value(h));
        }
    }
    at.into_iter()
        .map(|(x, v)| {
            (x as f64, mean(&v), v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
        })
        .collect()
}

/// Training loss and validation Recall@20 / NDCG@20 per epoch, one panel each, one line per group
/// (mean over its runs) with the runs' range as a band; the epoch axis runs through both stages.
pub fn curves_svg(groups: &[Group], path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((3, 1));
    type Value = fn(&EpochRecord) -> f64;
    let metrics: [(&str, Value); 3] =
        [("training loss", |h| h.loss), ("valid recall@20", |h| h.valid.recall20), ("valid ndcg@20", |h| h.valid.ndcg20)];
    for (panel, (name, f)) in panels.iter().zip(metrics.iter()) {
        let all: Vec<Vec<(f64, f64, f64, f64)>> = groups.iter().map(|g| series(g, f)).collect();
        let xs = all.iter().flatten().map(|p| p.0).fold(1.0, f64::max);
        let (lo, hi) = all.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.2), b.max(p.3)));
        let (lo, hi) = if lo.is_finite() { (lo, if hi > lo { hi } else { lo + 1.0 }) } else { (0.0, 1.0) };
        let pad = (hi - lo) * 0.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} per epoch (pre-training, then fine-tuning)"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.5..xs + 0.5, (lo - pad)..(hi + pad))
            .map_err(plot_err)?;
        chart.configure_mesh().x_desc("epoch").y_desc(*name).draw().map_err(plot_err)?;
        for (i, (g, s)) in groups.iter().zip(&all).enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            if g.runs.len() > 1 {
                let mut band: Vec<(f64, f64)> = s.iter().map(|p| (p.0, p.3)).collect();
                band.extend(s.iter().rev().map(|p| (p.0, p.2)));
                chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.2).filled()))).map_err(plot_err)?;
            }
            chart
                .draw_series(LineSeries::new(s.iter().map(|p| (p.0, p.1)), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(format!("{} ({} runs)", g.label, g.runs.len()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            // Where pre-training ends.
            if let Some(r) = g.runs.first() {
                if let Some(k) = r.result.history.iter().position(|h| h.stage != Stage::Pretrain).filter(|&k| k > 0) {
                    let x = k as f64 + 0.5;
                    chart
                        .draw_series(DashedLineSeries::new([(x, lo - pad), (x, hi + pad)], 4, 4, c.mix(0.5).stroke_width(1)))
                        .map_err(plot_err)?;
                }
            }
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Sweep lines: test Recall@20 and NDCG@20 against the value of one numeric setting, one line per
/// series (mean over seeds). `points`: (series, x, recall@20, ndcg@20).
pub fn sweep_svg(setting: &str, points: &[(String, f64, f64, f64)], log_x: bool, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 2));
    let mut names: Vec<&String> = points.iter().map(|p| &p.0).collect();
    names.dedup();
    let tx = |x: f64| if log_x { x.max(1e-12).log10() } else { x };
    let (x0, x1) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(tx(p.1)), b.max(tx(p.1))));
    let (x0, x1) = if x1 > x0 { (x0, x1) } else { (x0 - 1.0, x0 + 1.0) };
    for (k, panel) in panels.iter().enumerate() {
        let val = |p: &(String, f64, f64, f64)| if k == 0 { p.2 } else { p.3 };
        let (lo, hi) = points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(val(p)), b.max(val(p))));
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.01, lo + 0.01) };
        let pad = (hi - lo) * 0.1;
        let metric = if k == 0 { "test recall@20" } else { "test ndcg@20" };
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{metric} against {setting}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d((x0 - (x1 - x0) * 0.05)..(x1 + (x1 - x0) * 0.05), (lo - pad)..(hi + pad))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(if log_x { format!("log10 {setting}") } else { setting.to_string() })
            .y_desc(metric)
            .draw()
            .map_err(plot_err)?;
        for (i, name) in names.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let mut pts: Vec<(f64, f64)> = points.iter().filter(|p| &p.0 == *name).map(|p| (tx(p.1), val(p))).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled()))).map_err(plot_err)?;
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Test Recall@20 and NDCG@20 per user group, one bar per model group side by side.
pub fn groups_svg(data: &[(String, Vec<crate::data::groups::UserGroup>)], path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 2));
    let n = data.first().map_or(0, |d| d.1.len());
    let m = data.len().max(1);
    for (k, panel) in panels.iter().enumerate() {
        let get = |g: &crate::data::groups::UserGroup| g.metrics.map(|x| if k == 0 { x.recall20 } else { x.ndcg20 }).unwrap_or(0.0);
        let top = data.iter().flat_map(|d| d.1.iter().map(get)).fold(0.0, f64::max).max(1e-3) * 1.5;
        let metric = if k == 0 { "test recall@20" } else { "test ndcg@20" };
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{metric} by history length"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)
            .map_err(plot_err)?;
        let labels: Vec<String> = data.first().map_or(Vec::new(), |d| {
            d.1.iter()
                .map(|g| match (g.min_len, g.max_len) {
                    (Some(a), Some(b)) => format!("{a}-{b}"),
                    _ => "-".into(),
                })
                .collect()
        });
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n.max(1))
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
                    labels.get(x.round() as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_desc("history length (user group)")
            .y_desc(metric)
            .draw()
            .map_err(plot_err)?;
        for (i, (label, groups)) in data.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let w = 0.8 / m as f64;
            chart
                .draw_series(groups.iter().enumerate().map(|(g, ug)| {
                    let x0 = g as f64 - 0.4 + i as f64 * w;
                    Rectangle::new([(x0, 0.0), (x0 + w * 0.95, get(ug))], c.filled())
                }))
                .map_err(plot_err)?
                .label(label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Write an SVG through a temporary file, so that a failed plot leaves no partial file.
pub(super) fn write_svg(path: &Path, draw: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_file_name(format!(".{}.tmp-{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("plot"), std::process::id()));
    draw(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}
