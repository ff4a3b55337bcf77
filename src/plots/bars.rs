//! Grouped bar charts: one panel per group of shapes, one bar per implementation at each
//! shape (ours beside each baseline), an optional dashed line for a measured limit, one legend
//! for the whole picture. Panels are laid out two to a row.

use super::{color, draw_err, draw_legend, legend_height, register_font, LegendEntry, Mark};
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// One implementation's values, one per category of its panel (`None`: not measured there).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// Index into [`super::PALETTE`]: the same implementation has the same colour in every
    /// panel.
    pub color: usize,
    pub values: Vec<Option<f64>>,
}

/// A measured limit drawn across a panel (e.g. the copy bandwidth).
#[derive(Clone, Debug, PartialEq)]
pub struct Ceiling {
    pub label: String,
    pub value: f64,
}

/// One panel: categories along x, a group of bars per category.
#[derive(Clone, Debug, PartialEq)]
pub struct BarPanel {
    pub title: String,
    /// What the categories are (the x axis).
    pub x_desc: String,
    pub y_desc: String,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    pub ceiling: Option<Ceiling>,
}

/// Pixels of one panel.
pub const PANEL: (u32, u32) = (800, 420);
/// Pixels above the panels for the title.
const TITLE_H: u32 = 44;

fn columns(panels: usize) -> u32 {
    if panels > 1 {
        2
    } else {
        1
    }
}

/// The legend of a picture: every series once (by name, first colour seen), then the limits.
fn legend(panels: &[BarPanel]) -> Vec<LegendEntry> {
    let mut out: Vec<LegendEntry> = Vec::new();
    let mut add = |name: &str, mark: Mark| {
        if !out.iter().any(|e| e.name == name) {
            out.push(LegendEntry {
                name: name.to_string(),
                mark,
            });
        }
    };
    for p in panels {
        for s in &p.series {
            add(&s.name, Mark::Bar(color(s.color)));
        }
    }
    for p in panels {
        if let Some(c) = &p.ceiling {
            add(&c.label, Mark::Dashed(BLACK));
        }
    }
    out
}

/// Width and height in pixels of the picture [`draw`] makes of `panels`.
pub fn picture_size(panels: &[BarPanel]) -> (u32, u32) {
    let cols = columns(panels.len());
    let rows = (panels.len() as u32).div_ceil(cols);
    let width = cols * PANEL.0;
    (
        width,
        TITLE_H + legend_height(&legend(panels), width) + rows * PANEL.1,
    )
}

/// Rejects what cannot be drawn: no panels, a panel without categories or series, a series
/// whose value count differs from its categories, a negative or non-finite value.
fn validate(panels: &[BarPanel]) -> Result<()> {
    if panels.is_empty() {
        return Err(Error::invalid("records", "nothing to plot"));
    }
    for p in panels {
        if p.categories.is_empty() || p.series.is_empty() {
            return Err(Error::invalid(
                "records",
                format!("panel `{}` has no categories or no series", p.title),
            ));
        }
        for s in &p.series {
            if s.values.len() != p.categories.len() {
                return Err(Error::invalid(
                    "records",
                    format!(
                        "series `{}` of panel `{}` has {} values for {} categories",
                        s.name,
                        p.title,
                        s.values.len(),
                        p.categories.len()
                    ),
                ));
            }
            let values = s
                .values
                .iter()
                .flatten()
                .chain(p.ceiling.iter().map(|c| &c.value));
            if let Some(v) = values.into_iter().find(|v| !v.is_finite() || **v < 0.0) {
                return Err(Error::invalid(
                    "records",
                    format!("panel `{}`: value {v} cannot be a bar", p.title),
                ));
            }
        }
    }
    Ok(())
}

/// Draws `panels` under `title` into the PNG file `path`.
pub fn draw(path: &Path, title: &str, panels: &[BarPanel]) -> Result<()> {
    validate(panels)?;
    register_font()?;
    let (width, height) = picture_size(panels);
    let entries = legend(panels);
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| draw_err(path, e);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (head, body) = root.split_vertically(TITLE_H + legend_height(&entries, width));
    let (title_area, legend_area) = head.split_vertically(TITLE_H);
    title_area
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    draw_legend(&legend_area, &entries).map_err(|e| err(&e))?;
    let cols = columns(panels.len());
    let rows = (panels.len() as u32).div_ceil(cols);
    let areas = body.split_evenly((rows as usize, cols as usize));
    for (p, area) in panels.iter().zip(&areas) {
        panel(area, p).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The category name at tick `x` (ticks sit on whole numbers; others get no label).
fn label_at(categories: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < categories.len() {
        categories[i as usize].clone()
    } else {
        String::new()
    }
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    p: &BarPanel,
) -> std::result::Result<(), String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let n = p.categories.len();
    let top = p
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .chain(p.ceiling.iter().map(|c| &c.value))
        .fold(0.0f64, |a, &b| a.max(b));
    let y_max = if top > 0.0 { top * 1.08 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..y_max)
        .map_err(|e| s(&e))?;
    let categories = p.categories.clone();
    let label = move |x: &f64| label_at(&categories, *x);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(2))
        .x_label_formatter(&label)
        .x_desc(p.x_desc.as_str())
        .y_desc(p.y_desc.as_str())
        .y_label_formatter(&|v| {
            if y_max >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .light_line_style(RGBColor(238, 238, 238))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .draw()
        .map_err(|e| s(&e))?;
    // Each category's group takes 80% of its slot; the bars split it evenly.
    let group = 0.8;
    let w = group / p.series.len() as f64;
    for (j, series) in p.series.iter().enumerate() {
        let c = color(series.color);
        let bars = series.values.iter().enumerate().filter_map(|(i, v)| {
            v.map(|v| {
                let x0 = i as f64 - group / 2.0 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, v)], c.filled())
            })
        });
        chart.draw_series(bars).map_err(|e| s(&e))?;
    }
    if let Some(cl) = &p.ceiling {
        let line = [(-0.5, cl.value), (n as f64 - 0.5, cl.value)];
        chart
            .draw_series(DashedLineSeries::new(line, 10, 6, BLACK.stroke_width(2)))
            .map_err(|e| s(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_png::{count, decode, temp};
    use super::*;

    fn panel(title: &str, ours: f64, theirs: f64) -> BarPanel {
        BarPanel {
            title: title.into(),
            x_desc: "sequence length".into(),
            y_desc: "TFLOP/s".into(),
            categories: vec!["L 512".into(), "L 1024".into()],
            series: vec![
                Series {
                    name: "cuattn".into(),
                    color: 0,
                    values: vec![Some(ours), Some(ours)],
                },
                Series {
                    name: "baseline".into(),
                    color: 1,
                    values: vec![Some(theirs), Some(theirs)],
                },
            ],
            ceiling: None,
        }
    }

    #[test]
    fn bars_are_drawn_in_proportion_to_their_values() {
        // Bars of equal width: the pixels of each series' colour grow with its value.
        let path = temp("bars.png");
        let panels = [panel("a", 200.0, 100.0), panel("b", 200.0, 100.0)];
        draw(&path, "test", &panels).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!((w, h), picture_size(&panels));
        assert_eq!(w, 2 * PANEL.0);
        let (ours, theirs) = (count(&px, color(0)), count(&px, color(1)));
        assert!(theirs > 1000, "baseline bars drawn: {theirs} pixels");
        let ratio = ours as f64 / theirs as f64;
        assert!((1.8..2.2).contains(&ratio), "ours/theirs pixels {ratio}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_ceiling_and_missing_values_draw_and_bad_values_are_refused() {
        let path = temp("ceiling.png");
        let mut p = panel("c", 3.0, 2.0);
        p.series[1].values[0] = None;
        p.ceiling = Some(Ceiling {
            label: "copy".into(),
            value: 4.0,
        });
        draw(&path, "test", std::slice::from_ref(&p)).unwrap();
        let (w, h, px) = decode(&path);
        assert_eq!((w, h), picture_size(std::slice::from_ref(&p)));
        assert!(count(&px, color(1)) > 0);
        std::fs::remove_file(&path).unwrap();

        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            let mut q = p.clone();
            q.series[0].values[1] = Some(bad);
            assert!(draw(&path, "t", &[q]).is_err(), "{bad}");
        }
        let mut q = p.clone();
        q.series[0].values.pop();
        assert!(draw(&path, "t", &[q]).is_err());
        assert!(draw(&path, "t", &[]).is_err());
        assert!(!path.exists(), "nothing written for refused input");
    }
}
