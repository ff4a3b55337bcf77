//! Every committed GPU report as a roofline: the JSON files under `docs/gpu-runs/`, named
//! `<run>-bench_<family>[-<variant>].json` (ours, `cuattn bench <family> --json`) and
//! `<run>-torch_<family>.json` (PyTorch on the same shapes, `scripts/torch_baseline.py`),
//! grouped by `<run>` (date, card and, when recorded, commit). Each run is one row of two
//! panels against that card's measured limits:
//!
//! - **roofline** (log-log): achieved TFLOP/s against arithmetic intensity, FLOPs as each
//!   benchmark counts them over the fewest bytes the op must move; for attention forward and
//!   block-sparse rows (whose records carry no byte count) Q, K and V read and O written once
//!   (4·B·H·L·D elements; for sparse rows that is the dense count, so their intensity is a
//!   lower bound), for attention backward Q, K, V, O, dO read and dQ, dK, dV written
//!   (8·B·H·L·D). The roof: the device-to-device copy bandwidth measured in the run, up to
//!   the ridge, then PyTorch's bf16 matmul TFLOP/s measured on the card (`matmul_tflops`);
//! - **bandwidth**: achieved GB/s of the memory-bound families (rows with `bytes` and `gbs`:
//!   layernorm, decode, training ops) against bytes moved per call, with the measured copy
//!   bandwidth drawn across.
//!
//! Ours are filled discs, PyTorch's backends hollow triangles; an implementation keeps its
//! colour in every run. A limit the run did not measure is taken from another run on the same
//! card, and the panel says which; with none, that roof is left out and the panel says so.

use super::bench::Side;
use super::{color, draw_err, draw_legend, legend_height, register_font, LegendEntry, Mark};
use crate::error::{Error, Result};
use crate::runtime::folder::read_bounded;
use plotters::prelude::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Largest report file read (the committed ones are under 40 KB).
const REPORT_LIMIT: u64 = 16 << 20;

/// One report file.
#[derive(Clone, Debug)]
pub struct ReportFile {
    pub path: PathBuf,
    /// The file-name prefix the run's files share, e.g. `2026-11-26-h200-b284275`.
    pub run: String,
    pub side: Side,
    pub family: String,
    /// What follows the family in the file name (`v1` for `bench_attention-v1.json`).
    pub variant: String,
    pub json: Value,
}

fn data_err(file: &Path, reason: impl Into<String>) -> Error {
    Error::Data {
        file: file.display().to_string(),
        line: None,
        reason: reason.into(),
    }
}

/// `(run, side, rest)` of a report file's stem: `<run>-bench_<rest>` or `<run>-torch_<rest>`.
fn split_name(stem: &str) -> Option<(String, Side, String)> {
    let found = [("-bench_", Side::Ours), ("-torch_", Side::Baseline)]
        .into_iter()
        .filter_map(|(tag, side)| stem.find(tag).map(|i| (i, tag, side)))
        .min_by_key(|(i, _, _)| *i)?;
    let (i, tag, side) = found;
    Some((
        stem[..i].to_string(),
        side,
        stem[i + tag.len()..].to_string(),
    ))
}

/// Reads every report file in `dir` (other files are left alone). A report file that is not
/// JSON, has no `family`, or whose name disagrees with its family is an error naming it.
pub fn read_reports(dir: &Path) -> Result<Vec<ReportFile>> {
    let io = |e: std::io::Error| Error::Io {
        path: dir.display().to_string(),
        source: e,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let Some((run, side, rest)) = split_name(stem) else {
            continue;
        };
        let bytes = read_bounded(&path, REPORT_LIMIT)?;
        let json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| data_err(&path, format!("not valid JSON: {e}")))?;
        let family = json["family"]
            .as_str()
            .ok_or_else(|| data_err(&path, "no `family` field"))?
            .to_string();
        let Some(variant) = rest.strip_prefix(family.as_str()) else {
            return Err(data_err(
                &path,
                format!("the file name says `{rest}` but the file's family is `{family}`"),
            ));
        };
        let variant = variant.trim_start_matches('-').to_string();
        if !json["rows"].is_array() {
            return Err(data_err(&path, "no `rows` list"));
        }
        out.push(ReportFile {
            path,
            run,
            side,
            family,
            variant,
            json,
        });
    }
    if out.is_empty() {
        return Err(data_err(
            dir,
            "no GPU report here (files named <run>-bench_<family>.json or <run>-torch_<family>.json)",
        ));
    }
    Ok(out)
}

/// A measured limit and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    pub value: f64,
    pub source: String,
}

/// One measurement on a panel.
#[derive(Clone, Debug, PartialEq)]
pub struct Dot {
    pub series: String,
    pub side: Side,
    pub x: f64,
    pub y: f64,
}

/// One run's two panels.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPlot {
    pub run: String,
    pub device: String,
    pub copy_gbs: Option<Limit>,
    pub matmul_tflops: Option<Limit>,
    /// x: FLOP per byte, y: TFLOP/s.
    pub roofline: Vec<Dot>,
    /// x: MB moved per call, y: GB/s.
    pub bandwidth: Vec<Dot>,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v[key].as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

/// The fewest bytes a FLOP-counted row's op moves (see the module notes), when known.
fn min_bytes(family: &str, row: &Value) -> Option<f64> {
    if let Some(b) = num(row, "bytes") {
        return Some(b);
    }
    let size = match row["dtype"].as_str()? {
        "f32" => 4.0,
        "f16" | "bf16" => 2.0,
        _ => return None,
    };
    let elems = ["batch", "heads", "len", "dim"]
        .iter()
        .map(|k| num(row, k))
        .product::<Option<f64>>()?;
    let tensors = match family {
        "attention" | "sparse" => 4.0,
        "attention-backward" => 8.0,
        _ => return None,
    };
    Some(tensors * elems * size)
}

/// The legend name of a row's implementation.
fn series_name(f: &ReportFile, row: &Value) -> String {
    let family = if f.variant.is_empty() {
        f.family.clone()
    } else {
        format!("{} {}", f.family, f.variant)
    };
    let who = match f.side {
        Side::Ours => match row["kernel"].as_str() {
            Some(k) => format!("cuattn {k}"),
            None => "cuattn".into(),
        },
        Side::Baseline => match row["backend"].as_str() {
            Some(b) => format!("torch {b}"),
            None => "torch".into(),
        },
    };
    format!("{family}: {who}")
}

/// The mean of the values of `key` in the files that pass `keep`.
fn mean_of(files: &[&ReportFile], key: &str, keep: impl Fn(&ReportFile) -> bool) -> Option<f64> {
    let v: Vec<f64> = files
        .iter()
        .filter(|f| keep(f))
        .filter_map(|f| num(&f.json, key))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The runs of `files`, in name order, with their limits and points.
pub fn runs(files: &[ReportFile]) -> Vec<RunPlot> {
    let mut names: Vec<&str> = files.iter().map(|f| f.run.as_str()).collect();
    names.sort();
    names.dedup();
    let mut out: Vec<RunPlot> = names
        .iter()
        .map(|&run| {
            let mine: Vec<&ReportFile> = files.iter().filter(|f| f.run == run).collect();
            let device = mine
                .iter()
                .find_map(|f| f.json["device"].as_str())
                .unwrap_or("unnamed device")
                .to_string();
            let copy_gbs = mean_of(&mine, "copy_bandwidth_gbs", |f| f.side == Side::Ours)
                .map(|value| Limit {
                    value,
                    source: "cuattn bench, this run".into(),
                })
                .or_else(|| {
                    mean_of(&mine, "copy_bandwidth_gbs", |_| true).map(|value| Limit {
                        value,
                        source: "PyTorch, this run".into(),
                    })
                });
            let matmul_tflops = mean_of(&mine, "matmul_tflops", |_| true).map(|value| Limit {
                value,
                source: "PyTorch, this run".into(),
            });
            let mut plot = RunPlot {
                run: run.to_string(),
                device,
                copy_gbs,
                matmul_tflops,
                roofline: Vec::new(),
                bandwidth: Vec::new(),
            };
            for f in &mine {
                for row in f.json["rows"].as_array().into_iter().flatten() {
                    let series = series_name(f, row);
                    if let (Some(flops), Some(tflops)) = (num(row, "flops"), num(row, "tflops")) {
                        if let Some(bytes) = min_bytes(&f.family, row) {
                            plot.roofline.push(Dot {
                                series: series.clone(),
                                side: f.side,
                                x: flops / bytes,
                                y: tflops,
                            });
                        }
                    } else if let (Some(bytes), Some(gbs)) = (num(row, "bytes"), num(row, "gbs")) {
                        plot.bandwidth.push(Dot {
                            series,
                            side: f.side,
                            x: bytes / 1e6,
                            y: gbs,
                        });
                    }
                }
            }
            plot
        })
        .collect();
    // A limit the run did not measure: the same card's from another run, named.
    for i in 0..out.len() {
        let donor = |get: fn(&RunPlot) -> &Option<Limit>| {
            out.iter()
                .find(|o| o.device == out[i].device && o.run != out[i].run && get(o).is_some())
                .map(|o| Limit {
                    value: get(o).as_ref().unwrap().value,
                    source: format!("run {}", o.run),
                })
        };
        let copy = donor(|r| &r.copy_gbs);
        let matmul = donor(|r| &r.matmul_tflops);
        let r = &mut out[i];
        if r.copy_gbs.is_none() {
            r.copy_gbs = copy;
        }
        if r.matmul_tflops.is_none() {
            r.matmul_tflops = matmul;
        }
    }
    out
}

/// Pixels of one panel (two per run, side by side) and of the picture's title.
pub const PANEL: (u32, u32) = (800, 480);
const TITLE_H: u32 = 44;
const RUN_CAPTION_H: u32 = 34;

/// The series of a panel's dots in order of first appearance: a series' colour is its place
/// here, so the colours of one panel are all different.
fn series_order(dots: &[Dot]) -> Vec<(String, Side)> {
    let mut out: Vec<(String, Side)> = Vec::new();
    for d in dots {
        if !out.iter().any(|(s, _)| s == &d.series) {
            out.push((d.series.clone(), d.side));
        }
    }
    out
}

fn color_of(order: &[(String, Side)], series: &str) -> RGBColor {
    color(order.iter().position(|(s, _)| s == series).unwrap_or(0))
}

const MATMUL_GREY: RGBColor = RGBColor(120, 120, 120);

/// The legends under a run's two panels: each panel's series, then the limits drawn on it.
fn legends(r: &RunPlot) -> [Vec<LegendEntry>; 2] {
    let series = |dots: &[Dot]| -> Vec<LegendEntry> {
        let order = series_order(dots);
        order
            .iter()
            .map(|(s, side)| LegendEntry {
                name: s.clone(),
                mark: Mark::Dot {
                    color: color_of(&order, s),
                    ours: *side == Side::Ours,
                },
            })
            .collect()
    };
    let copy = r.copy_gbs.as_ref().map(|c| LegendEntry {
        name: format!("copy bandwidth {:.0} GB/s ({})", c.value, c.source),
        mark: Mark::Dashed(BLACK),
    });
    let matmul = r.matmul_tflops.as_ref().map(|m| LegendEntry {
        name: format!("bf16 matmul {:.0} TFLOP/s ({})", m.value, m.source),
        mark: Mark::Dashed(MATMUL_GREY),
    });
    let mut left = series(&r.roofline);
    if !left.is_empty() {
        left.extend(copy.clone());
        left.extend(matmul);
    }
    let mut right = series(&r.bandwidth);
    if !right.is_empty() {
        right.extend(copy);
    }
    [left, right]
}

/// Pixels of one run's row: caption, panels, the taller of the two legends.
fn run_height(r: &RunPlot) -> u32 {
    let [left, right] = legends(r);
    RUN_CAPTION_H + PANEL.1 + legend_height(&left, PANEL.0).max(legend_height(&right, PANEL.0))
}

/// Width and height in pixels of the picture [`draw`] makes of `runs`.
pub fn picture_size(runs: &[RunPlot]) -> (u32, u32) {
    (
        2 * PANEL.0,
        TITLE_H + runs.iter().map(run_height).sum::<u32>(),
    )
}

/// Draws `runs` into the PNG file `path`, one row of two panels per run.
pub fn draw(path: &Path, runs: &[RunPlot]) -> Result<()> {
    if runs.is_empty() {
        return Err(Error::invalid("reports", "no runs to plot"));
    }
    register_font()?;
    let (width, height) = picture_size(runs);
    let err = |e: &dyn std::fmt::Display| draw_err(path, e);
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (title, mut rest) = root.split_vertically(TITLE_H);
    title
        .titled(
            "GPU reports: cuattn (filled discs) beside PyTorch (hollow triangles), measured limits dashed",
            ("sans-serif", 20),
        )
        .map_err(|e| err(&e))?;
    for r in runs {
        let (row, below) = rest.split_vertically(run_height(r));
        rest = below;
        let (caption, body) = row.split_vertically(RUN_CAPTION_H);
        caption
            .titled(&format!("{} ({})", r.run, r.device), ("sans-serif", 18))
            .map_err(|e| err(&e))?;
        let (panels, legend_area) = body.split_vertically(PANEL.1);
        let (left, right) = panels.split_horizontally(PANEL.0);
        roofline_panel(&left, r).map_err(|e| err(&e))?;
        bandwidth_panel(&right, r).map_err(|e| err(&e))?;
        let (left_legend, right_legend) = legend_area.split_horizontally(PANEL.0);
        let [l, rl] = legends(r);
        draw_legend(&left_legend, &l).map_err(|e| err(&e))?;
        draw_legend(&right_legend, &rl).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// A log axis' tick label: whole numbers from 1 up, two significant digits below.
fn log_label(v: &f64) -> String {
    if *v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Writes `text` in the middle of an empty panel.
fn empty_panel(area: &Area<'_>, title: &str, text: &str) -> std::result::Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    area.titled(title, ("sans-serif", 16))
        .map_err(|e| e.to_string())?;
    area.draw(&Text::new(
        text.to_string(),
        (w as i32 / 2 - 180, h as i32 / 2),
        ("sans-serif", 15).into_font().color(&RGBColor(90, 90, 90)),
    ))
    .map_err(|e| e.to_string())
}

/// `(lo, hi)` around `values` for a log axis: a factor of 2 of room on each side.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    (lo / 2.0, hi * 2.0)
}

/// Draws the dots of `ds` on `chart`: ours as filled discs, baselines as hollow triangles.
fn draw_dots<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    ds: &[Dot],
) -> std::result::Result<(), String>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let order = &series_order(ds);
    let ours = ds.iter().filter(|d| d.side == Side::Ours);
    chart
        .draw_series(ours.map(|d| Circle::new((d.x, d.y), 4, color_of(order, &d.series).filled())))
        .map_err(|e| s(&e))?;
    let theirs = ds.iter().filter(|d| d.side == Side::Baseline);
    chart
        .draw_series(theirs.map(|d| {
            TriangleMarker::new((d.x, d.y), 6, color_of(order, &d.series).stroke_width(2))
        }))
        .map_err(|e| s(&e))?;
    Ok(())
}

fn roofline_panel(area: &Area<'_>, r: &RunPlot) -> std::result::Result<(), String> {
    let title = "roofline: FLOP-counted benchmarks";
    if r.roofline.is_empty() {
        return empty_panel(area, title, "no FLOP-counted benchmark in this run");
    }
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let ridge = match (&r.copy_gbs, &r.matmul_tflops) {
        (Some(c), Some(m)) => Some(m.value * 1e3 / c.value),
        _ => None,
    };
    let (x_lo, x_hi) = log_range(r.roofline.iter().map(|d| d.x).chain(ridge));
    let (y_lo, y_hi) = log_range(
        r.roofline
            .iter()
            .map(|d| d.y)
            .chain(r.matmul_tflops.iter().map(|m| m.value)),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
        .map_err(|e| s(&e))?;
    chart
        .configure_mesh()
        .x_desc("arithmetic intensity (FLOP per byte, fewest bytes the op moves)")
        .y_desc("achieved TFLOP/s")
        .x_label_formatter(&log_label)
        .y_label_formatter(&log_label)
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| s(&e))?;
    // The roof: TFLOP/s = GB/s · FLOP/B / 1000 up to the ridge, then the matmul ceiling.
    if let Some(c) = &r.copy_gbs {
        let x_end = ridge.unwrap_or(x_hi).min(x_hi);
        let line = [(x_lo, c.value * x_lo / 1e3), (x_end, c.value * x_end / 1e3)];
        chart
            .draw_series(DashedLineSeries::new(line, 10, 6, BLACK.stroke_width(2)))
            .map_err(|e| s(&e))?;
    }
    if let Some(m) = &r.matmul_tflops {
        let x_start = ridge.unwrap_or(x_lo).max(x_lo);
        let line = [(x_start, m.value), (x_hi, m.value)];
        chart
            .draw_series(DashedLineSeries::new(
                line,
                10,
                6,
                MATMUL_GREY.stroke_width(2),
            ))
            .map_err(|e| s(&e))?;
    }
    draw_dots(&mut chart, &r.roofline)
}

fn bandwidth_panel(area: &Area<'_>, r: &RunPlot) -> std::result::Result<(), String> {
    let title = "bandwidth: memory-bound benchmarks";
    if r.bandwidth.is_empty() {
        return empty_panel(area, title, "no memory-bound benchmark in this run");
    }
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let (x_lo, x_hi) = log_range(r.bandwidth.iter().map(|d| d.x));
    let y_hi = r
        .bandwidth
        .iter()
        .map(|d| d.y)
        .chain(r.copy_gbs.iter().map(|c| c.value))
        .fold(0.0f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0f64..y_hi)
        .map_err(|e| s(&e))?;
    chart
        .configure_mesh()
        .x_desc("MB moved per call (log)")
        .y_desc("achieved GB/s")
        .x_label_formatter(&log_label)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| s(&e))?;
    if let Some(c) = &r.copy_gbs {
        chart
            .draw_series(DashedLineSeries::new(
                [(x_lo, c.value), (x_hi, c.value)],
                10,
                6,
                BLACK.stroke_width(2),
            ))
            .map_err(|e| s(&e))?;
    }
    draw_dots(&mut chart, &r.bandwidth)
}

/// Reads the reports in `dir` and draws them into the PNG file `out`; returns the runs drawn.
pub fn plot_dir(dir: &Path, out: &Path) -> Result<Vec<RunPlot>> {
    let runs = runs(&read_reports(dir)?);
    draw(out, &runs)?;
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::super::test_png::{count, decode, temp};
    use super::*;
    use serde_json::json;

    /// A reports folder with one run: our attention and layernorm, PyTorch's attention.
    fn reports(name: &str) -> PathBuf {
        let dir = temp(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let attn_row = |who: (&str, &str), tflops: f64| {
            json!({"op": "forward", who.0: who.1, "dtype": "bf16", "batch": 4, "heads": 16,
                "len": 4096, "dim": 128, "causal": false, "flops": 1.0995e12,
                "time_us": 1.0, "tflops": tflops})
        };
        let write = |file: &str, v: Value| {
            std::fs::write(dir.join(file), serde_json::to_vec(&v).unwrap()).unwrap()
        };
        write(
            "2026-01-02-x100-abc1234-bench_attention.json",
            json!({"family": "attention", "device": "X100",
                "rows": [attn_row(("kernel", "tensor_cores"), 400.0)]}),
        );
        write(
            "2026-01-02-x100-abc1234-torch_attention.json",
            json!({"family": "attention", "device": "X100", "matmul_tflops": 800.0,
                "rows": [attn_row(("backend", "flash"), 500.0),
                         attn_row(("backend", "math"), f64::NAN)]}),
        );
        write(
            "2026-01-02-x100-abc1234-bench_layernorm.json",
            json!({"family": "layernorm", "device": "X100", "copy_bandwidth_gbs": 4000.0,
                "rows": [{"op": "forward", "dtype": "f16", "rows": 10, "hidden": 768,
                    "bytes": 2.0e8, "time_us": 80.0, "gbs": 2500.0, "pct_copy": 62.5}]}),
        );
        std::fs::write(dir.join("notes.md"), "not a report").unwrap();
        dir
    }

    #[test]
    fn report_files_are_grouped_by_run_with_their_measured_limits() {
        let dir = reports("roof-read");
        let files = read_reports(&dir).unwrap();
        assert_eq!(files.len(), 3);
        let rs = runs(&files);
        assert_eq!(rs.len(), 1);
        let r = &rs[0];
        assert_eq!(
            (r.run.as_str(), r.device.as_str()),
            ("2026-01-02-x100-abc1234", "X100")
        );
        assert_eq!(r.copy_gbs.as_ref().unwrap().value, 4000.0);
        assert_eq!(r.matmul_tflops.as_ref().unwrap().value, 800.0);
        // Intensity: FLOPs over Q, K, V, O once in bf16: 4 · (4·16·4096·128) · 2 bytes.
        let bytes = 4.0 * (4.0 * 16.0 * 4096.0 * 128.0) * 2.0;
        assert_eq!(r.roofline.len(), 2, "the NaN (null) torch row is left out");
        assert_eq!(r.roofline[0].series, "attention: cuattn tensor_cores");
        assert_eq!(r.roofline[1].series, "attention: torch flash");
        assert_eq!(r.roofline[0].x, 1.0995e12 / bytes);
        assert_eq!((r.roofline[0].y, r.roofline[1].y), (400.0, 500.0));
        assert_eq!(r.bandwidth.len(), 1);
        assert_eq!((r.bandwidth[0].x, r.bandwidth[0].y), (200.0, 2500.0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_limit_missing_from_a_run_comes_from_the_same_card_and_says_so() {
        let dir = reports("roof-donor");
        std::fs::write(
            dir.join("2026-01-03-x100-bench_sparse.json"),
            serde_json::to_vec(&json!({"family": "sparse", "device": "X100", "rows": []})).unwrap(),
        )
        .unwrap();
        let rs = runs(&read_reports(&dir).unwrap());
        assert_eq!(rs.len(), 2);
        let later = &rs[1];
        assert_eq!(later.run, "2026-01-03-x100");
        assert_eq!(
            later.copy_gbs,
            Some(Limit {
                value: 4000.0,
                source: "run 2026-01-02-x100-abc1234".into()
            })
        );
        assert_eq!(later.matmul_tflops.as_ref().unwrap().value, 800.0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_roofline_png_has_the_computed_size_and_both_sides_drawn() {
        let dir = reports("roof-draw");
        let out = temp("roofline.png");
        let rs = plot_dir(&dir, &out).unwrap();
        let (w, h, px) = decode(&out);
        assert_eq!((w, h), picture_size(&rs));
        for dots in [&rs[0].roofline, &rs[0].bandwidth] {
            let order = series_order(dots);
            assert!(!order.is_empty());
            for (name, _) in &order {
                let n = count(&px, color_of(&order, name));
                assert!(n > 20, "{name}: {n} pixels of its colour");
            }
        }
        std::fs::remove_file(&out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_report_folders_are_errors_naming_the_file() {
        let dir = reports("roof-bad");
        let bad = dir.join("2026-01-02-x100-bench_decode.json");
        std::fs::write(&bad, "{not json").unwrap();
        let e = read_reports(&dir).unwrap_err().to_string();
        assert!(e.contains("bench_decode.json") && e.contains("JSON"), "{e}");
        std::fs::write(&bad, r#"{"family": "attention", "rows": []}"#).unwrap();
        let e = read_reports(&dir).unwrap_err().to_string();
        assert!(e.contains("family is `attention`"), "{e}");
        std::fs::write(&bad, r#"{"rows": []}"#).unwrap();
        let e = read_reports(&dir).unwrap_err().to_string();
        assert!(e.contains("no `family`"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        let empty = temp("roof-empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = read_reports(&empty).unwrap_err().to_string();
        assert!(e.contains("no GPU report"), "{e}");
        std::fs::remove_dir_all(&empty).unwrap();
        assert!(read_reports(&temp("roof-missing")).is_err());
    }
}
