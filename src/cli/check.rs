//! `cuattn check`: every kernel against its CPU reference on the GPU, as a pass/fail table.

use super::{CliResult, NO_GPU};
use std::process::ExitCode;

#[cfg(all(feature = "cuda", feature = "testing"))]
pub fn run() -> CliResult {
    use cuattn::check::layernorm as ln;
    use std::io::Write;
    let gpu = match cuattn::gpu::Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cuattn check needs a CUDA GPU: {e}");
            return Ok(ExitCode::from(NO_GPU));
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "checking every kernel against its CPU reference on {}",
        gpu.info().name
    )?;
    writeln!(
        out,
        "{:<10} {:<36} {:<7} detail",
        "kernel", "case", "result"
    )?;
    let mut failures = 0;
    let mut report = |kernel: &str, case: &str, r: Result<(), String>| -> std::io::Result<()> {
        let (status, detail) = match r {
            Ok(()) => ("pass", String::new()),
            Err(e) => {
                failures += 1;
                ("FAIL", e)
            }
        };
        writeln!(out, "{kernel:<10} {case:<36} {status:<7} {detail}")
    };
    for (name, case) in ln::standard_cases() {
        report("ln_fwd", &name, ln::forward(&gpu, &case, false).map(|_| ()))?;
        report(
            "ln_add_fwd",
            &name,
            ln::forward(&gpu, &case, true).map(|_| ()),
        )?;
        report("ln_bwd", &name, ln::backward(&gpu, &case))?;
    }
    for (name, case) in cuattn::check::attention::standard_cases() {
        report(
            "attn_exact",
            &name,
            cuattn::check::attention::forward(&gpu, &case),
        )?;
    }
    for (name, case) in cuattn::check::attention_backward::standard_cases() {
        report(
            "attn_bwd",
            &name,
            cuattn::check::attention_backward::backward(&gpu, &case),
        )?;
    }
    match cuattn::check::sparse::standard_cases() {
        Ok(cases) => {
            for (name, case) in cases {
                report("sparse", &name, cuattn::check::sparse::forward(&gpu, &case))?;
            }
        }
        Err(e) => report("sparse", "layouts", Err(e.to_string()))?,
    }
    match cuattn::check::sparse_backward::standard_cases() {
        Ok(cases) => {
            for (name, case) in cases {
                let r = cuattn::check::sparse_backward::backward(&gpu, &case);
                report("sparse_bwd", &name, r)?;
            }
        }
        Err(e) => report("sparse_bwd", "layouts", Err(e.to_string()))?,
    }
    for (name, case) in cuattn::check::decode::standard_cases() {
        report("decode", &name, cuattn::check::decode::forward(&gpu, &case))?;
    }
    for (name, run) in cuattn::check::training::standard_cases() {
        report("training", &name, run(&gpu))?;
    }
    if failures > 0 {
        writeln!(out, "{failures} check(s) FAILED")?;
        return Ok(ExitCode::FAILURE);
    }
    writeln!(out, "all checks passed")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(all(feature = "cuda", feature = "testing")))]
pub fn run() -> CliResult {
    if !cfg!(feature = "cuda") {
        eprintln!("cuattn check needs a CUDA GPU: this build has no `cuda` feature");
        return Ok(ExitCode::from(NO_GPU));
    }
    eprintln!(
        "cuattn check is test scaffolding: this build has no `testing` feature \
         (cargo build --release --features testing)"
    );
    Ok(ExitCode::FAILURE)
}
