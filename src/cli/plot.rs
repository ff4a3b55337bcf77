//! `cuattn plot`: benchmark results as PNG pictures, without a GPU.
//!
//! - `cuattn plot bench BENCH.json [--baseline TORCH.json] --out FILE.png`: a saved
//!   `cuattn bench <family> --json` run (what `bench --plot` draws), optionally beside the
//!   PyTorch baseline's JSON on the same shapes (`scripts/torch_baseline.py`).
//! - `cuattn plot roofline [DIR] --out FILE.png`: every GPU report in DIR (default
//!   `docs/gpu-runs`) as a roofline and a bandwidth panel per run, against the card's
//!   measured limits.

use super::CliResult;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct PlotArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// One saved `cuattn bench <family> --json` run as bar panels (ours beside each baseline).
    Bench {
        /// The JSON `cuattn bench <family> --json` printed.
        json: PathBuf,
        /// PyTorch's JSON for the same family and shapes (scripts/torch_baseline.py): its
        /// backends become bars beside ours.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// The picture to write (.png).
        #[arg(long)]
        out: PathBuf,
    },
    /// Every GPU report in DIR (files `<run>-bench_<family>.json`, `<run>-torch_<family>.json`)
    /// as a roofline (TFLOP/s against FLOP per byte) and a bandwidth panel per run.
    Roofline {
        /// The reports folder.
        #[arg(default_value = "docs/gpu-runs")]
        dir: PathBuf,
        /// The picture to write (.png).
        #[arg(long)]
        out: PathBuf,
    },
}

/// A report's JSON (at most 16 MiB).
fn read_report(path: &Path) -> Result<serde_json::Value, cuattn::Error> {
    let bytes = cuattn::runtime::folder::read_bounded(path, 16 << 20)?;
    serde_json::from_slice(&bytes).map_err(|e| cuattn::Error::Data {
        file: path.display().to_string(),
        line: None,
        reason: format!("not valid JSON: {e}"),
    })
}

pub fn run(args: PlotArgs) -> CliResult {
    match args.what {
        What::Bench {
            json,
            baseline,
            out,
        } => {
            cuattn::plots::check_png_path(&out, "--out")?;
            let ours = read_report(&json)?;
            let theirs = baseline.as_deref().map(read_report).transpose()?;
            let names = (
                json.display().to_string(),
                baseline
                    .as_ref()
                    .map(|b| b.display().to_string())
                    .unwrap_or_default(),
            );
            cuattn::plots::bench::plot(&ours, theirs.as_ref(), (&names.0, &names.1), &out)?;
            eprintln!("wrote {}", out.display());
        }
        What::Roofline { dir, out } => {
            cuattn::plots::check_png_path(&out, "--out")?;
            let runs = cuattn::plots::roofline::plot_dir(&dir, &out)?;
            let points: usize = runs
                .iter()
                .map(|r| r.roofline.len() + r.bandwidth.len())
                .sum();
            eprintln!(
                "wrote {} ({} runs, {points} measurements)",
                out.display(),
                runs.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
