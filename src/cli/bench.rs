//! `cuattn bench <family>`: benchmark tables (or `--json`) of a kernel family on the GPU.

use super::{CliResult, NO_GPU};
use clap::ValueEnum;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct BenchArgs {
    family: Family,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Small tensors and few iterations: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Only these dtypes, comma-separated: f32, f16, bf16 (default: all; attention: f16,bf16).
    #[arg(long, value_delimiter = ',')]
    dtype: Vec<cuattn::DType>,
    /// `layernorm` only: instead of the table, time every launch variant (register path with
    /// 1/2/4 packs per thread, generic path with and without the row cache) on the headline
    /// shapes. Other families have no variants: an error.
    #[arg(long)]
    sweep: bool,
    /// Also draw what was measured into this PNG file: a panel per group of shapes, a bar per
    /// implementation (ours beside the same run's baselines), the measured copy bandwidth
    /// across the memory-bound families. `cuattn plot bench` draws a saved `--json` later.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Family {
    Layernorm,
    Attention,
    /// Attention backward (dQ, dK, dV): deterministic and fast modes, TFLOP/s = 2.5× forward FLOPs.
    AttentionBackward,
    /// Block-sparse attention vs fraction of blocks kept (bf16, hd128, blocks of 128).
    Sparse,
    /// Block-sparse attention backward vs fraction of blocks kept (bf16, hd128, blocks of 64),
    /// both modes, beside the dense backward.
    SparseBackward,
    Decode,
    /// Training ops (bias+GELU, column sums, dropout, embedding backward, cross-entropy,
    /// gradient norm and clipping, AdamW) at BERT/GPT-2 step sizes.
    TrainingOps,
}

pub fn run(args: BenchArgs) -> CliResult {
    // Options are checked before looking for a GPU: a wrong one is a usage error anywhere.
    if args.sweep && !matches!(args.family, Family::Layernorm) {
        return Err(cuattn::Error::invalid(
            "--sweep",
            "only `bench layernorm` has launch variants to sweep",
        )
        .into());
    }
    if let Some(p) = &args.plot {
        cuattn::plots::check_png_path(p, "--plot")?;
    }
    let report = bench(args.family, args.json, args.quick, args.dtype, args.sweep)?;
    if let (Some(path), Some(report)) = (&args.plot, &report) {
        cuattn::plots::bench::plot(report, None, ("the bench results", ""), path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(match report {
        Some(_) => ExitCode::SUCCESS,
        None => ExitCode::from(NO_GPU),
    })
}

/// The measured rows as `--json` prints them (`None`: no GPU, nothing measured).
type Report = Result<Option<serde_json::Value>, Box<dyn std::error::Error>>;

#[cfg(all(feature = "cuda", feature = "testing"))]
fn bench(
    family: Family,
    json: bool,
    quick: bool,
    dtypes: Vec<cuattn::DType>,
    sweep: bool,
) -> Report {
    use std::io::Write;
    let gpu = match cuattn::gpu::Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cuattn bench needs a CUDA GPU: {e}");
            return Ok(None);
        }
    };
    let mut out = std::io::stdout().lock();
    let dtypes = if dtypes.is_empty() {
        cuattn::DType::ALL.to_vec()
    } else {
        dtypes
    };
    let copy_gbs = cuattn::bench::copy_bandwidth_gbs(&gpu, if quick { 64 << 20 } else { 1 << 30 })?;
    let device = gpu.info().name.clone();
    let report = match family {
        Family::Layernorm if sweep => {
            let rows = cuattn::bench::layernorm::sweep(&gpu, &dtypes, copy_gbs)?;
            // `--json` prints the bare list; the picture needs the family and device too.
            let report = serde_json::json!({
                "family": "layernorm-sweep",
                "device": device,
                "copy_bandwidth_gbs": copy_gbs,
                "rows": rows,
            });
            if json {
                writeln!(out, "{}", serde_json::to_string(&rows)?)?;
            } else {
                writeln!(
                    out,
                    "LayerNorm launch variants on {} (copy {:.0} GB/s)",
                    gpu.info().name,
                    copy_gbs
                )?;
                writeln!(
                    out,
                    "{:<9} {:<5} {:>14} {:<16} {:>10} {:>7}",
                    "op", "dtype", "shape", "variant", "time (µs)", "% copy"
                )?;
                for r in rows {
                    let shape = format!("{}x{}", r.rows, r.hidden);
                    writeln!(
                        out,
                        "{:<9} {:<5} {:>14} {:<16} {:>10.1} {:>6.1}%",
                        r.op, r.dtype, shape, r.variant, r.time_us, r.pct_copy
                    )?;
                }
            }
            report
        }
        Family::Attention => {
            let dtypes: Vec<_> = if dtypes.len() == 3 {
                vec![cuattn::DType::F16, cuattn::DType::BF16]
            } else {
                dtypes
            };
            let rows = cuattn::bench::attention::run(&gpu, &dtypes, quick)?;
            let v =
                serde_json::json!({"family": "attention", "device": gpu.info().name, "rows": rows});
            if json {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(
                    out,
                    "Attention forward on {} (FLOPs 4·B·H·L²·D, half when causal)",
                    gpu.info().name
                )?;
                writeln!(
                    out,
                    "{:<13} {:<5} {:>16} {:>4} {:<7} {:>11} {:>9}",
                    "kernel", "dtype", "B×H×L", "D", "causal", "time (µs)", "TFLOP/s"
                )?;
                for r in rows {
                    let shape = format!("{}x{}x{}", r.batch, r.heads, r.len);
                    writeln!(
                        out,
                        "{:<13} {:<5} {:>16} {:>4} {:<7} {:>11.1} {:>9.1}",
                        r.kernel, r.dtype, shape, r.dim, r.causal, r.time_us, r.tflops
                    )?;
                }
            }
            v
        }
        Family::Sparse => {
            let rows = cuattn::bench::sparse::run(&gpu, quick)?;
            let v =
                serde_json::json!({"family": "sparse", "device": gpu.info().name, "rows": rows});
            if json {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(
                    out,
                    "Block-sparse attention on {} (bf16, D 128, blocks of {}; FLOPs of kept blocks)",
                    gpu.info().name,
                    cuattn::bench::sparse::BLOCK
                )?;
                write_sparse_rows(&mut out, &rows, 7)?;
            }
            v
        }
        Family::SparseBackward => {
            let rows = cuattn::bench::sparse::run_backward(&gpu, quick)?;
            let v = serde_json::json!({"family": "sparse-backward", "device": gpu.info().name, "rows": rows});
            if json {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(
                    out,
                    "Block-sparse attention backward on {} (bf16, D 128, blocks of {}; 2.5× forward FLOPs of kept blocks)",
                    gpu.info().name,
                    cuattn::bench::sparse::BACKWARD_BLOCK
                )?;
                write_sparse_rows(&mut out, &rows, 11)?;
            }
            v
        }
        Family::AttentionBackward => {
            let dtypes: Vec<_> = if dtypes.len() == 3 {
                vec![cuattn::DType::F16, cuattn::DType::BF16]
            } else {
                dtypes
            };
            let rows = cuattn::bench::attention_backward::run(&gpu, &dtypes, quick)?;
            let v = serde_json::json!({"family": "attention-backward", "device": gpu.info().name, "rows": rows});
            if json {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(
                    out,
                    "Attention backward on {} (FLOPs 2.5·4·B·H·L²·D, half when causal)",
                    gpu.info().name
                )?;
                writeln!(
                    out,
                    "{:<13} {:<5} {:>16} {:>4} {:<7} {:>11} {:>9}",
                    "kernel", "dtype", "B×H×L", "D", "causal", "time (µs)", "TFLOP/s"
                )?;
                for r in rows {
                    let shape = format!("{}x{}x{}", r.batch, r.heads, r.len);
                    writeln!(
                        out,
                        "{:<13} {:<5} {:>16} {:>4} {:<7} {:>11.1} {:>9.1}",
                        r.kernel, r.dtype, shape, r.dim, r.causal, r.time_us, r.tflops
                    )?;
                }
            }
            v
        }
        Family::TrainingOps => {
            let rows = cuattn::bench::training_ops::run(&gpu, &dtypes, quick, copy_gbs)?;
            cuattn::bench::training_ops::print(&gpu, &rows, copy_gbs, json)?;
            serde_json::json!({
                "family": "training-ops",
                "device": device,
                "copy_bandwidth_gbs": copy_gbs,
                "rows": rows,
            })
        }
        Family::Decode => {
            let rows = cuattn::bench::decode::run(&gpu, &dtypes, quick, copy_gbs)?;
            let v = serde_json::json!({
                "family": "decode",
                "device": gpu.info().name,
                "copy_bandwidth_gbs": copy_gbs,
                "rows": rows,
            });
            if json {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(
                    out,
                    "Decode attention on {} (Hq {}, Hkv {}, D {}; bytes = K + V + q + O; copy {:.0} GB/s)",
                    gpu.info().name,
                    cuattn::bench::decode::HEADS_Q,
                    cuattn::bench::decode::HEADS_KV,
                    cuattn::bench::decode::DIM,
                    copy_gbs
                )?;
                writeln!(
                    out,
                    "{:<5} {:>5} {:>7} {:>6} {:>10} {:>8} {:>7}",
                    "dtype", "batch", "len", "splits", "time (µs)", "GB/s", "% copy"
                )?;
                for r in rows {
                    writeln!(
                        out,
                        "{:<5} {:>5} {:>7} {:>6} {:>10.1} {:>8.0} {:>6.1}%",
                        r.dtype, r.batch, r.len, r.splits, r.time_us, r.gbs, r.pct_copy
                    )?;
                }
            }
            v
        }
        Family::Layernorm => {
            let rows = cuattn::bench::layernorm::run(&gpu, &dtypes, quick, copy_gbs)?;
            let v = serde_json::json!({
                "family": "layernorm",
                "device": gpu.info().name,
                "copy_bandwidth_gbs": copy_gbs,
                "rows": rows,
            });
            if json {
                writeln!(out, "{}", serde_json::to_string(&v)?)?;
            } else {
                writeln!(
                    out,
                    "LayerNorm on {} (measured copy bandwidth {:.0} GB/s)",
                    gpu.info().name,
                    copy_gbs
                )?;
                writeln!(
                    out,
                    "{:<17} {:<5} {:>8} {:>6} {:>10} {:>8} {:>7}",
                    "op", "dtype", "rows", "hidden", "time (µs)", "GB/s", "% copy"
                )?;
                for r in rows {
                    writeln!(
                        out,
                        "{:<17} {:<5} {:>8} {:>6} {:>10.1} {:>8.0} {:>6.1}%",
                        r.op, r.dtype, r.rows, r.hidden, r.time_us, r.gbs, r.pct_copy
                    )?;
                }
            }
            v
        }
    };
    out.flush()?;
    Ok(Some(report))
}

#[cfg(not(all(feature = "cuda", feature = "testing")))]
fn bench(_: Family, _: bool, _: bool, _: Vec<cuattn::DType>, _: bool) -> Report {
    if cfg!(feature = "cuda") {
        return Err(cuattn::Error::invalid(
            "bench",
            "the benchmarks are test scaffolding: this build has no `testing` feature \
             (cargo build --release --features testing)",
        )
        .into());
    }
    eprintln!("cuattn bench needs a CUDA GPU: this build has no `cuda` feature");
    Ok(None)
}

#[cfg(all(feature = "cuda", feature = "testing"))]
/// The table of a block-sparse family (forward or backward): one line per row, the kernel
/// name in a column `kernel_width` wide.
fn write_sparse_rows(
    out: &mut impl std::io::Write,
    rows: &[cuattn::bench::sparse::Row],
    kernel_width: usize,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<kernel_width$} {:>16} {:>8} {:>8} {:>11} {:>9} {:>8}",
        "kernel", "B×H×L", "density", "kept", "time (µs)", "TFLOP/s", "vs dense"
    )?;
    for r in rows {
        let shape = format!("{}x{}x{}", r.batch, r.heads, r.len);
        writeln!(
            out,
            "{:<kernel_width$} {:>16} {:>8.2} {:>8.3} {:>11.1} {:>9.1} {:>7.1}x",
            r.kernel, shape, r.density, r.kept_fraction, r.time_us, r.tflops, r.speedup_vs_dense
        )?;
    }
    Ok(())
}
