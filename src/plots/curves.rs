//! Several training curves on one chart (e.g. the loss of two models trained on the same data
//! in the same order): each series drawn faintly step by step, with its moving average on top
//! in the same colour, and a legend.

use super::{color, draw_err, register_font};
use crate::error::{Error, Result};
use std::path::Path;

/// One curve: its legend label and its (step, value) points in step order.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// The trailing mean of `values` over `window` points (fewer at the start).
fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Draws `series` into the PNG `path` under `title`, with axis names `x_desc` and `y_desc`.
/// Non-finite values are left out of the axis range (and of nothing else: a NaN shows as a
/// gap in plotters' line).
pub fn draw(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let err = |e: &dyn std::fmt::Display| draw_err(path, e);
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(Error::invalid("series", "no points to plot"));
    }
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let x_max = finite().map(|p| p.0).fold(1.0f64, f64::max).max(2.0);
    let x_min = finite().map(|p| p.0).fold(x_max, f64::min).min(x_max - 1.0);
    let y_max = finite().map(|p| p.1).fold(1e-3f64, f64::max) * 1.05;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.mix(0.25)))
            .map_err(|e| err(&e))?;
        let ys: Vec<f64> = s.points.iter().map(|p| p.1).collect();
        let smooth = moving_average(&ys, (ys.len() / 20).clamp(1, 50));
        chart
            .draw_series(LineSeries::new(
                s.points.iter().zip(&smooth).map(|(p, &y)| (p.0, y)),
                c.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{} (moving average)", s.label))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_series_draw_in_their_own_colours() {
        let path = crate::plots::test_png::temp("curves-two.png");
        let series: Vec<Series> = (0..2)
            .map(|k| Series {
                label: format!("model {k}"),
                points: (1..=40)
                    .map(|s| (s as f64, (2.0 + k as f64) / s as f64))
                    .collect(),
            })
            .collect();
        draw(&path, "two curves", "step", "loss", &series).unwrap();
        let (_, _, pixels) = crate::plots::test_png::decode(&path);
        for i in 0..2 {
            assert!(
                crate::plots::test_png::count(&pixels, color(i)) > 50,
                "series {i} is not drawn in its colour"
            );
        }
        assert!(draw(&path, "none", "step", "loss", &[]).is_err());
    }
}
