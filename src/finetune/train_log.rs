//! What a fine-tuning run records: one row per optimizer step (loss, rate, throughput) with the
//! evaluation metrics on the last step of each epoch, written as `train_log.csv`, and the loss
//! curve drawn as `loss.png` (plotters, bitmap backend, with an embedded DejaVu Sans so the
//! picture does not depend on the machine's fonts).

use crate::error::{Error, Result};
use std::path::Path;

/// Loss and accuracy on the evaluation file.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EvalMetrics {
    pub loss: f64,
    pub accuracy: f64,
}

/// One optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// From 1.
    pub step: usize,
    /// From 1.
    pub epoch: usize,
    /// Mean cross-entropy of the step's examples (over its accumulated micro-batches).
    pub loss: f64,
    /// The rate the step used.
    pub lr: f64,
    /// Examples per second of this step (forward, backward and optimizer).
    pub samples_per_s: f64,
    /// Set on the last step of an epoch when there is an evaluation file.
    pub eval: Option<EvalMetrics>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Writes `train_log.csv`: `step,epoch,loss,lr,samples_per_s,eval_loss,eval_accuracy` (the
/// eval columns empty except at the end of an epoch with an evaluation file).
pub fn write_csv(path: &Path, records: &[StepRecord]) -> Result<()> {
    let mut w = csv::Writer::from_path(path).map_err(|e| io_err(path, e))?;
    w.write_record([
        "step",
        "epoch",
        "loss",
        "lr",
        "samples_per_s",
        "eval_loss",
        "eval_accuracy",
    ])
    .map_err(|e| io_err(path, e))?;
    for r in records {
        let (el, ea) = r.eval.map_or((String::new(), String::new()), |m| {
            (format!("{:.6}", m.loss), format!("{:.6}", m.accuracy))
        });
        w.write_record([
            r.step.to_string(),
            r.epoch.to_string(),
            format!("{:.6}", r.loss),
            format!("{:e}", r.lr),
            format!("{:.2}", r.samples_per_s),
            el,
            ea,
        ])
        .map_err(|e| io_err(path, e))?;
    }
    w.flush().map_err(|e| io_err(path, e))
}

/// Mean of the last `window` losses up to each step: the curve a reader follows through noisy
/// per-batch losses.
pub fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
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

fn register_font() -> Result<()> {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *FONT.get_or_init(|| {
        plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "font",
            "the embedded DejaVu Sans did not load",
        ))
    }
}

/// Draws `loss.png`: the loss of every step, its moving average, and the evaluation loss at
/// the end of each epoch when there is one.
pub fn plot_loss(path: &Path, records: &[StepRecord], title: &str) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let err = |e: &dyn std::fmt::Display| io_err(path, e);
    if records.is_empty() {
        return Err(Error::invalid("records", "no steps to plot"));
    }
    let losses: Vec<f64> = records.iter().map(|r| r.loss).collect();
    let smooth = moving_average(&losses, (records.len() / 20).clamp(1, 50));
    let evals: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.eval.map(|m| (r.step as f64, m.loss)))
        .collect();
    let finite = losses
        .iter()
        .chain(evals.iter().map(|(_, l)| l))
        .copied()
        .filter(|l| l.is_finite());
    let y_max = finite.fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let x_max = records.len().max(2) as f64;

    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(1f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("cross-entropy loss")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    let light = RGBColor(160, 190, 230);
    chart
        .draw_series(LineSeries::new(
            records.iter().map(|r| (r.step as f64, r.loss)),
            &light,
        ))
        .map_err(|e| err(&e))?
        .label("training loss (each step)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], light));
    chart
        .draw_series(LineSeries::new(
            records
                .iter()
                .zip(&smooth)
                .map(|(r, s)| (r.step as f64, *s)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("training loss (moving average)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !evals.is_empty() {
        chart
            .draw_series(
                evals
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 5, RED.filled())),
            )
            .map_err(|e| err(&e))?
            .label("evaluation loss (end of epoch)")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
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

    fn records() -> Vec<StepRecord> {
        (1..=12)
            .map(|s| StepRecord {
                step: s,
                epoch: 1 + (s - 1) / 6,
                loss: 0.7 / s as f64,
                lr: 1e-4,
                samples_per_s: 100.0,
                eval: (s % 6 == 0).then_some(EvalMetrics {
                    loss: 0.5,
                    accuracy: 0.75,
                }),
            })
            .collect()
    }

    #[test]
    fn moving_average_uses_the_available_prefix() {
        assert_eq!(
            moving_average(&[2.0, 4.0, 6.0, 8.0], 2),
            [2.0, 3.0, 5.0, 7.0]
        );
    }

    #[test]
    fn csv_has_a_row_per_step_and_eval_only_at_epoch_ends() {
        let dir = std::env::temp_dir().join(format!("cuattn-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("train_log.csv");
        write_csv(&p, &records()).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "step,epoch,loss,lr,samples_per_s,eval_loss,eval_accuracy"
        );
        assert_eq!(lines.len(), 13);
        assert!(lines[1].ends_with(",,"), "{}", lines[1]);
        assert!(lines[6].ends_with(",0.500000,0.750000"), "{}", lines[6]);
    }

    #[test]
    fn loss_plot_is_a_png() {
        let dir = std::env::temp_dir().join(format!("cuattn-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("loss.png");
        plot_loss(&p, &records(), "test").unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(plot_loss(&p, &[], "empty").is_err());
    }
}
