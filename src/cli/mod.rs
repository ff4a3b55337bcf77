//! The subcommands of the `cuattn` binary, one file each; `main.rs` holds the clap `Command`
//! enum and dispatches to the `run` function of each.

pub mod bench;
pub mod check;
pub mod classify;
pub mod embed;
pub mod fill_mask;
pub mod finetune;
pub mod generate;
pub mod info;
pub mod noise;

use clap::ValueEnum;
use std::process::ExitCode;

/// Exit status of a runtime error (a bad model folder or input, a failed write) and of a
/// `check` that failed.
pub const RUNTIME_ERROR: u8 = 1;
/// Exit status of a usage error (clap's: an unknown option, a value it cannot parse).
pub const USAGE_ERROR: u8 = 2;
/// Exit status when a command needs a GPU and none is usable (`check`, `bench`,
/// `--device cuda`, or a build without the `cuda` feature).
pub const NO_GPU: u8 = 3;

/// The exit statuses, for the top-level help.
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 success; 1 runtime error (bad model folder or \
    input, failed write, a failed check); 2 usage error (unknown option, invalid value); 3 no \
    usable GPU (check, bench, --device cuda). Output to a closed pipe (`| head`) ends quietly \
    with status 0.";

pub type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// The exit status and message (`None`: end quietly) for a command's error.
pub fn exit_for(e: &(dyn std::error::Error + 'static)) -> (u8, Option<String>) {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                // The reader went away (`| head`): nothing more to say to anyone.
                return (0, None);
            }
        }
        if let Some(c) = s.downcast_ref::<cuattn::Error>() {
            if matches!(c, cuattn::Error::NoDevice(_) | cuattn::Error::CudaDisabled) {
                return (NO_GPU, Some(e.to_string()));
            }
        }
        source = s.source();
    }
    (RUNTIME_ERROR, Some(e.to_string()))
}

/// What `--dtype` does on the CPU for commands that only run models (`embed`, `generate`):
/// f32 (the default), or bf16 weight matrices with f32 arithmetic (`CpuBf16`); f16 is refused
/// rather than ignored.
pub fn cpu_dtype(dtype: Option<cuattn::DType>) -> Result<cuattn::DType, cuattn::Error> {
    match dtype.unwrap_or(cuattn::DType::F32) {
        cuattn::DType::F16 => Err(cuattn::Error::invalid(
            "--dtype",
            "the CPU backend stores weights in f32 or bf16 (--dtype f32 or bf16), not f16 \
             (f16 applies on the GPU: --device cuda)",
        )),
        d => Ok(d),
    }
}
