//! One benchmark run as bar panels: the JSON object `cuattn bench <family> --json` prints
//! (`{"family", "device", "rows": [...]}`, plus `copy_bandwidth_gbs` for the memory-bound
//! families), optionally beside the PyTorch baseline's JSON on the same shapes
//! (`scripts/torch_baseline.py`, rows with `backend` in place of `kernel`).
//!
//! Per family: which fields group rows into panels, which name the bars' category, and which
//! value is drawn:
//!
//! | family | panel | category | value |
//! |---|---|---|---|
//! | attention, attention-backward | dtype, head dim, causal | sequence length | TFLOP/s |
//! | sparse | dtype and shape | fraction of blocks kept | TFLOP/s |
//! | decode | dtype and heads | batch and cache length | GB/s, copy bandwidth drawn |
//! | layernorm | op, dtype | hidden size | GB/s, copy bandwidth drawn |
//! | layernorm-sweep (`--sweep`) | op, dtype | hidden size | % of copy bandwidth |
//! | training-ops | dtype | op | GB/s, copy bandwidth drawn |
//!
//! Bars: one per implementation, `cuattn <kernel>` for ours (`cuattn` when the family has one
//! kernel) and `torch <backend>` for the baseline; a baseline row that did not run (`null`
//! value, with an `error` or `skipped` note) has no bar.

use super::bars::{self, BarPanel, Ceiling, Series};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Which side of the comparison a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Ours,
    Baseline,
}

/// One drawable measurement.
#[derive(Clone, Debug, PartialEq)]
struct Point {
    panel: String,
    category: String,
    series: String,
    value: f64,
}

fn data_err(file: &str, reason: impl Into<String>) -> Error {
    Error::Data {
        file: file.to_string(),
        line: None,
        reason: reason.into(),
    }
}

/// A field of a row as text (strings as they are, numbers and booleans printed).
fn text(row: &Value, key: &str) -> Option<String> {
    match &row[key] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn num(row: &Value, key: &str) -> Option<f64> {
    row[key].as_f64().filter(|v| v.is_finite())
}

/// What a family's categories are (the x axis label).
fn category_desc(family: &str) -> &'static str {
    match family {
        "attention" | "attention-backward" => "sequence length L",
        "sparse" | "sparse-backward" => "fraction of key blocks kept",
        "decode" => "batch and KV cache length",
        "layernorm" | "layernorm-sweep" => "hidden size",
        _ => "op",
    }
}

/// What a family's picture shows: the value's field and axis label.
fn value_field(family: &str) -> Option<(&'static str, &'static str)> {
    Some(match family {
        "attention" | "attention-backward" | "sparse" | "sparse-backward" => ("tflops", "TFLOP/s"),
        "decode" | "layernorm" | "training-ops" => ("gbs", "GB/s"),
        "layernorm-sweep" => ("pct_copy", "% of measured copy bandwidth"),
        _ => return None,
    })
}

/// Families [`panels`] knows how to draw.
pub const FAMILIES: [&str; 8] = [
    "attention",
    "attention-backward",
    "sparse",
    "sparse-backward",
    "decode",
    "layernorm",
    "layernorm-sweep",
    "training-ops",
];

/// A fraction as a percentage label: `0.05` → `5%`, `0.125` → `12.5%`.
fn percent(fraction: f64) -> String {
    let p = fraction * 100.0;
    if (p - p.round()).abs() < 1e-9 {
        format!("{:.0}%", p.round())
    } else {
        format!("{p:.1}%")
    }
}

/// The panel and category of one row, by family.
fn place(family: &str, row: &Value) -> Option<(String, String)> {
    let t = |k: &str| text(row, k);
    Some(match family {
        "attention" | "attention-backward" => {
            let causal = if row["causal"].as_bool()? {
                ", causal"
            } else {
                ""
            };
            (
                format!("{}, head dim {}{causal}", t("dtype")?, t("dim")?),
                format!("L {}", t("len")?),
            )
        }
        "sparse" | "sparse-backward" => (
            format!(
                "{}, B {} H {} L {} D {}",
                t("dtype")?,
                t("batch")?,
                t("heads")?,
                t("len")?,
                t("dim")?
            ),
            percent(num(row, "density")?),
        ),
        "decode" => (
            format!(
                "{}, Hq {} Hkv {} D {}",
                t("dtype")?,
                t("heads_q")?,
                t("heads_kv")?,
                t("dim")?
            ),
            format!("B{} {}k", t("batch")?, row["len"].as_u64()?.div_ceil(1024)),
        ),
        "layernorm" | "layernorm-sweep" => (format!("{} {}", t("op")?, t("dtype")?), t("hidden")?),
        "training-ops" => (t("dtype")?, t("op")?),
        _ => return None,
    })
}

/// The bar a row belongs to.
fn series_name(row: &Value, side: Side) -> String {
    match side {
        Side::Ours => match text(row, "kernel").or_else(|| text(row, "variant")) {
            Some(k) => format!("cuattn {k}"),
            None => "cuattn".into(),
        },
        Side::Baseline => match text(row, "backend") {
            Some(b) => format!("torch {b}"),
            None => "torch".into(),
        },
    }
}

/// The points of one report (`file` names it in errors), checked to be of `family` when given.
fn points(report: &Value, file: &str, side: Side, family: Option<&str>) -> Result<Vec<Point>> {
    let fam = report["family"].as_str().ok_or_else(|| {
        data_err(
            file,
            "no `family` field (is this `cuattn bench --json` output?)",
        )
    })?;
    if let Some(f) = family {
        if f != fam {
            return Err(data_err(
                file,
                format!("family `{fam}`, but the other file is `{f}`"),
            ));
        }
    }
    let (field, _) = value_field(fam).ok_or_else(|| {
        data_err(
            file,
            format!(
                "family `{fam}` has no picture (known: {})",
                FAMILIES.join(", ")
            ),
        )
    })?;
    let rows = report["rows"]
        .as_array()
        .ok_or_else(|| data_err(file, "no `rows` list"))?;
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (panel, category) = place(fam, row).ok_or_else(|| {
            data_err(
                file,
                format!("row {i} lacks the fields a `{fam}` row has: {row}"),
            )
        })?;
        // A baseline's `null`: that backend did not run this shape (its row says why).
        let Some(value) = num(row, field) else {
            if row[field].is_null() && side == Side::Baseline {
                continue;
            }
            return Err(data_err(
                file,
                format!("row {i}: `{field}` is not a number"),
            ));
        };
        out.push(Point {
            panel,
            category,
            series: series_name(row, side),
            value,
        });
    }
    Ok(out)
}

/// Index of `key` in `list`, appended when new (first-seen order).
fn slot(list: &mut Vec<String>, key: &str) -> usize {
    match list.iter().position(|k| k == key) {
        Some(i) => i,
        None => {
            list.push(key.to_string());
            list.len() - 1
        }
    }
}

/// The panels of `ours` (the JSON of `cuattn bench --json`) and, when given, `baseline` (the
/// PyTorch JSON of the same family), with the picture's title. `names` label the two in
/// errors.
pub fn panels(
    ours: &Value,
    baseline: Option<&Value>,
    names: (&str, &str),
) -> Result<(String, Vec<BarPanel>)> {
    let mut pts = points(ours, names.0, Side::Ours, None)?;
    let family = ours["family"].as_str().unwrap_or_default().to_string();
    if let Some(b) = baseline {
        pts.extend(points(b, names.1, Side::Baseline, Some(&family))?);
    }
    if pts.is_empty() {
        return Err(data_err(names.0, "no rows to plot"));
    }
    let (_, y_desc) = value_field(&family).expect("points() checked the family");
    let mut panel_names = Vec::new();
    let mut series_names = Vec::new();
    for p in &pts {
        slot(&mut panel_names, &p.panel);
        slot(&mut series_names, &p.series);
    }
    let ceiling = match family.as_str() {
        "layernorm-sweep" => Some(Ceiling {
            label: "measured copy bandwidth (100%)".into(),
            value: 100.0,
        }),
        _ if y_desc == "GB/s" => num(ours, "copy_bandwidth_gbs").map(|v| Ceiling {
            label: format!("copy bandwidth measured in the same run ({v:.0} GB/s)"),
            value: v,
        }),
        _ => None,
    };
    let mut out = Vec::new();
    for name in &panel_names {
        let mine: Vec<&Point> = pts.iter().filter(|p| &p.panel == name).collect();
        let mut categories = Vec::new();
        for p in &mine {
            slot(&mut categories, &p.category);
        }
        let mut series = Vec::new();
        for (color, s) in series_names.iter().enumerate() {
            let mut values = vec![None; categories.len()];
            for p in mine.iter().filter(|p| &p.series == s) {
                let i = categories.iter().position(|c| c == &p.category).unwrap();
                // Two rows for one bar (a repeated shape): keep the better.
                values[i] = Some(values[i].map_or(p.value, |v: f64| v.max(p.value)));
            }
            if values.iter().any(Option::is_some) {
                series.push(Series {
                    name: s.clone(),
                    color,
                    values,
                });
            }
        }
        out.push(BarPanel {
            title: name.clone(),
            x_desc: category_desc(&family).to_string(),
            y_desc: y_desc.to_string(),
            categories,
            series,
            ceiling: ceiling.clone(),
        });
    }
    let device = ours["device"].as_str().unwrap_or("an unnamed device");
    let mut title = format!("cuattn bench {family} on {device}");
    if let Some(b) = baseline {
        let torch = b["torch_version"].as_str().unwrap_or("?");
        title.push_str(&format!(", beside PyTorch {torch}"));
    }
    Ok((title, out))
}

/// Draws one benchmark run (and its baseline) into the PNG file `path`.
pub fn plot(
    ours: &Value,
    baseline: Option<&Value>,
    names: (&str, &str),
    path: &Path,
) -> Result<()> {
    let (title, panels) = panels(ours, baseline, names)?;
    bars::draw(path, &title, &panels)
}

#[cfg(test)]
mod tests {
    use super::super::color;
    use super::super::test_png::{count, decode, temp};
    use super::*;
    use serde_json::json;

    /// Rows shaped like `cuattn bench attention --json`'s, with made-up values.
    fn attention(scale: f64) -> Value {
        let mut rows = Vec::new();
        for causal in [false, true] {
            for len in [512, 1024] {
                for (kernel, tf) in [("tensor_cores", 300.0), ("unfused_cublas", 100.0)] {
                    rows.push(json!({"op": "forward", "kernel": kernel, "dtype": "bf16",
                        "batch": 16384 / len, "heads": 16, "len": len, "dim": 128,
                        "causal": causal, "flops": 1e12, "time_us": 1.0, "tflops": tf * scale}));
                }
            }
        }
        json!({"family": "attention", "device": "Test GPU", "rows": rows})
    }

    #[test]
    fn attention_rows_become_a_panel_per_dtype_dim_and_causal() {
        let torch = json!({"family": "attention", "torch_version": "2.x", "rows": [
            {"op": "forward", "backend": "flash", "dtype": "bf16", "batch": 32, "heads": 16,
             "len": 512, "dim": 128, "causal": false, "tflops": 250.0},
            {"op": "forward", "backend": "math", "dtype": "bf16", "batch": 32, "heads": 16,
             "len": 512, "dim": 128, "causal": false, "tflops": null, "skipped": "too long"},
        ]});
        let (title, panels) = panels(&attention(1.0), Some(&torch), ("a", "b")).unwrap();
        assert_eq!(
            title,
            "cuattn bench attention on Test GPU, beside PyTorch 2.x"
        );
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["bf16, head dim 128", "bf16, head dim 128, causal"]);
        let p = &panels[0];
        assert_eq!(p.categories, ["L 512", "L 1024"]);
        let names: Vec<&str> = p.series.iter().map(|s| s.name.as_str()).collect();
        // `torch math` did not run: no bar, no series.
        assert_eq!(
            names,
            [
                "cuattn tensor_cores",
                "cuattn unfused_cublas",
                "torch flash"
            ]
        );
        assert_eq!(p.series[0].values, [Some(300.0), Some(300.0)]);
        assert_eq!(p.series[2].values, [Some(250.0), None]);
        assert_eq!(
            panels[1].series.len(),
            2,
            "no torch rows for the causal panel"
        );
        assert_eq!(p.ceiling, None);
    }

    #[test]
    fn memory_bound_families_draw_the_measured_copy_bandwidth() {
        let rows: Vec<Value> = [768, 4096]
            .iter()
            .map(|h| {
                json!({"op": "forward", "dtype": "f16", "rows": 1000, "hidden": h,
                "eps": 1e-5, "bytes": 1e9, "time_us": 400.0, "gbs": 2500.0, "pct_copy": 62.5})
            })
            .collect();
        let ours = json!({"family": "layernorm", "device": "G", "copy_bandwidth_gbs": 4000.0,
            "rows": rows});
        let (_, panels) = panels(&ours, None, ("a", "b")).unwrap();
        assert_eq!(panels.len(), 1);
        assert_eq!(panels[0].title, "forward f16");
        assert_eq!(panels[0].categories, ["768", "4096"]);
        assert_eq!(panels[0].ceiling.as_ref().unwrap().value, 4000.0);
        assert_eq!(panels[0].series[0].name, "cuattn");
    }

    #[test]
    fn plot_writes_a_png_with_every_series_in_proportion() {
        let path = temp("bench-attention.png");
        plot(&attention(1.0), None, ("a", "b"), &path).unwrap();
        let (w, h, px) = decode(&path);
        let (_, panels) = panels(&attention(1.0), None, ("a", "b")).unwrap();
        assert_eq!((w, h), bars::picture_size(&panels));
        // tensor_cores (colour 0) 300 TFLOP/s beside unfused (colour 1) 100: three times the ink.
        let ratio = count(&px, color(0)) as f64 / count(&px, color(1)) as f64;
        assert!((2.6..3.4).contains(&ratio), "pixel ratio {ratio}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reports_that_cannot_be_plotted_are_errors_naming_the_file() {
        let bad = [
            json!({"rows": []}),
            json!({"family": "unknown", "rows": []}),
            json!({"family": "attention"}),
            json!({"family": "attention", "rows": [{"kernel": "x"}]}),
            json!({"family": "attention", "rows": [{"kernel": "x", "dtype": "f16", "dim": 64,
                "len": 512, "causal": false, "tflops": "fast"}]}),
            json!({"family": "attention", "rows": []}),
        ];
        for b in &bad {
            let e = panels(b, None, ("bench.json", "torch.json")).unwrap_err();
            assert!(e.to_string().contains("bench.json"), "{e}");
        }
        let other = json!({"family": "decode", "rows": []});
        let e = panels(&attention(1.0), Some(&other), ("a.json", "torch.json")).unwrap_err();
        assert!(e.to_string().contains("torch.json"), "{e}");
    }
}
