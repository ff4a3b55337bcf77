//! `cuattn info`: version, the nvcc that built the kernels, every kernel's ptxas report, the GPU.

use super::CliResult;
use std::io::Write;
use std::process::ExitCode;

pub fn run(json: bool) -> CliResult {
    let mut out = std::io::stdout().lock();
    let resources = cuattn::kernels::resources();
    let gpu = gpu_summary();
    if json {
        let v = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "nvcc": cuattn::kernels::nvcc_version(),
            "kernels": resources,
            "gpu": gpu.as_ref().map_err(|e| e.to_string()).ok(),
            "gpu_error": gpu.as_ref().err().map(|e| e.to_string()),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "cuattn {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "kernels built by: {}", cuattn::kernels::nvcc_version())?;
    let modules: Vec<_> = cuattn::kernels::modules()
        .iter()
        .map(|m| format!("{} ({} KiB)", m.name, m.fatbin.len() / 1024))
        .collect();
    writeln!(
        out,
        "modules: {}",
        if modules.is_empty() {
            "none".to_string()
        } else {
            modules.join(", ")
        }
    )?;
    if !resources.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "{:<32} {:<6} {:>5} {:>10} {:>7} {:>12}",
            "kernel", "arch", "regs", "smem (B)", "stack", "spills st/ld"
        )?;
        for r in &resources {
            writeln!(
                out,
                "{:<32} {:<6} {:>5} {:>10} {:>7} {:>7}/{:<4}",
                r.kernel,
                r.arch,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                r.spill_store_bytes,
                r.spill_load_bytes
            )?;
        }
        writeln!(
            out,
            "(smem: static only; dynamic shared memory is sized per launch)"
        )?;
    }
    writeln!(out)?;
    match gpu {
        Ok(g) => writeln!(out, "GPU: {g}")?,
        Err(e) => writeln!(out, "GPU: {e}")?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "cuda")]
fn gpu_summary() -> Result<String, cuattn::Error> {
    let gpu = cuattn::gpu::Gpu::shared()?;
    let i = gpu.info();
    Ok(format!(
        "{} (compute capability {}.{}, {:.1} GiB, {} SMs, {} KiB shared memory per block)",
        i.name,
        i.compute_capability.0,
        i.compute_capability.1,
        i.total_memory_bytes as f64 / (1u64 << 30) as f64,
        i.multiprocessors,
        i.max_shared_per_block_optin / 1024
    ))
}

#[cfg(not(feature = "cuda"))]
fn gpu_summary() -> Result<String, cuattn::Error> {
    Err(cuattn::Error::CudaDisabled)
}
