//! Benchmarks as pictures (PNG, drawn with `plotters`' bitmap backend and an embedded DejaVu
//! Sans, so a picture looks the same on every machine and needs no system fonts):
//!
//! - [`bars`]: grouped bar charts, one panel per shape group, ours beside each baseline.
//! - [`bench`]: the records of one `cuattn bench <family> --json` run (and optionally the
//!   PyTorch baseline's JSON on the same shapes) as such panels: `cuattn bench ... --plot`,
//!   `cuattn plot bench`.
//! - [`curves`]: several training curves on one chart (`examples/seq2seq.rs --task text`).
//! - [`roofline`]: every committed GPU report (`docs/gpu-runs/*.json`) as a roofline against
//!   the card's measured limits: `cuattn plot roofline`.
//!
//! Everything here works on the benchmark records as JSON (the form `--json` prints and the
//! reports keep), so it runs and is tested without a GPU.

pub mod bars;
pub mod bench;
pub mod curves;
pub mod roofline;

use crate::error::{Error, Result};
use plotters::style::{IntoFont, RGBColor};
use std::path::Path;

/// Registers the embedded DejaVu Sans as plotters' `sans-serif` (once per process).
pub fn register_font() -> Result<()> {
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

/// A drawing failure on `path` as an [`Error::Io`].
pub fn draw_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The colours series are drawn in, in order (Okabe–Ito's colour-blind-safe set, then darker
/// and lighter extras), so the first seven series are the easiest to tell apart.
pub const PALETTE: [RGBColor; 14] = [
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 114, 178),   // blue
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(230, 159, 0),   // orange
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(140, 86, 75),   // brown
    RGBColor(60, 60, 60),    // dark grey
    RGBColor(120, 60, 180),  // violet
    RGBColor(0, 90, 60),     // dark green
    RGBColor(180, 30, 60),   // crimson
    RGBColor(150, 150, 20),  // olive
    RGBColor(0, 60, 120),    // navy
    RGBColor(250, 120, 120), // salmon
];

/// The colour of series number `i`.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Checks that `path` names a `.png` file in a folder that exists: the one format the bitmap
/// backend writes here. Called before any work, so a wrong name fails fast.
pub fn check_png_path(path: &Path, arg: &'static str) -> Result<()> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(Error::invalid(
            arg,
            format!(
                "{} does not end in .png (PNG is the one format written)",
                path.display()
            ),
        ));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if !dir.is_dir() {
            return Err(Error::invalid(
                arg,
                format!("folder {} does not exist", dir.display()),
            ));
        }
    }
    Ok(())
}

/// How a series is drawn, for its legend entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mark {
    /// A filled bar.
    Bar(RGBColor),
    /// A point: ours filled (a disc), a baseline's hollow (a triangle).
    Dot { color: RGBColor, ours: bool },
    /// A dashed line (a measured limit).
    Dashed(RGBColor),
}

/// One line of a legend.
#[derive(Clone, Debug, PartialEq)]
pub struct LegendEntry {
    pub name: String,
    pub mark: Mark,
}

const LEGEND_FONT: u32 = 14;
const LEGEND_ROW: u32 = 22;

/// The entries of each legend line when they are laid out left to right in `width` pixels.
fn legend_lines(entries: &[LegendEntry], width: u32) -> Vec<Vec<&LegendEntry>> {
    let font = ("sans-serif", LEGEND_FONT).into_font();
    let mut lines: Vec<Vec<&LegendEntry>> = Vec::new();
    let mut used = width; // forces a first line
    for e in entries {
        let text_w = font
            .box_size(&e.name)
            .map(|(w, _)| w)
            .unwrap_or(8 * e.name.len() as u32);
        let w = 28 + text_w + 24;
        if used + w > width.saturating_sub(16) || lines.is_empty() {
            lines.push(Vec::new());
            used = 16;
        }
        used += w;
        lines.last_mut().expect("a line was pushed").push(e);
    }
    lines
}

/// Height in pixels of the legend of `entries` in `width` pixels (0 without entries).
pub fn legend_height(entries: &[LegendEntry], width: u32) -> u32 {
    match legend_lines(entries, width).len() {
        0 => 0,
        n => n as u32 * LEGEND_ROW + 10,
    }
}

/// Draws a point mark centred at `(x, y)` (pixels of `area`).
fn draw_mark<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    mark: Mark,
    (x, y): (i32, i32),
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let r = match mark {
        Mark::Bar(c) => area.draw(&Rectangle::new(
            [(x - 8, y - 6), (x + 8, y + 6)],
            c.filled(),
        )),
        Mark::Dot { color, ours: true } => area.draw(&Circle::new((x, y), 5, color.filled())),
        Mark::Dot { color, ours: false } => {
            area.draw(&TriangleMarker::new((x, y), 7, color.stroke_width(2)))
        }
        Mark::Dashed(c) => area
            .draw(&PathElement::new(
                [(x - 12, y), (x - 4, y)],
                c.stroke_width(2),
            ))
            .and_then(|_| {
                area.draw(&PathElement::new(
                    [(x + 2, y), (x + 10, y)],
                    c.stroke_width(2),
                ))
            }),
    };
    r.map_err(|e| e.to_string())
}

/// Draws the legend of `entries` into `area`, left to right, wrapping lines.
pub fn draw_legend<DB: plotters::prelude::DrawingBackend>(
    area: &plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    entries: &[LegendEntry],
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let width = area.dim_in_pixel().0;
    let font = ("sans-serif", LEGEND_FONT).into_font();
    for (i, line) in legend_lines(entries, width).iter().enumerate() {
        let y = 5 + i as i32 * LEGEND_ROW as i32 + LEGEND_ROW as i32 / 2;
        let mut x = 16;
        for e in line {
            draw_mark(area, e.mark, (x + 10, y))?;
            area.draw(&Text::new(
                e.name.clone(),
                (x + 28, y - LEGEND_FONT as i32 / 2 - 1),
                font.clone().color(&BLACK),
            ))
            .map_err(|e| e.to_string())?;
            let text_w = font
                .box_size(&e.name)
                .map(|(w, _)| w)
                .unwrap_or(8 * e.name.len() as u32);
            x += (28 + text_w + 24) as i32;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_png {
    //! Reading back what was drawn, for the tests of this module's pictures.

    /// Width, height and RGB pixels of a PNG file.
    pub fn decode(path: &std::path::Path) -> (u32, u32, Vec<[u8; 3]>) {
        let file = std::fs::File::open(path).unwrap();
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let step = match info.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => panic!("unexpected PNG colour type {other:?}"),
        };
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let pixels = buf[..info.buffer_size()]
            .chunks_exact(step)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        (info.width, info.height, pixels)
    }

    /// How many pixels have exactly this colour.
    pub fn count(pixels: &[[u8; 3]], c: plotters::style::RGBColor) -> usize {
        pixels.iter().filter(|p| **p == [c.0, c.1, c.2]).count()
    }

    /// A fresh path in the temporary folder.
    pub fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("cuattn-plot-{}-{name}", std::process::id()))
    }
}
