//! The subcommands of the `cuattn` binary, one file each; `main.rs` holds the clap `Command`
//! enum and dispatches to the `run` function of each.

pub mod bench;
pub mod check;
pub mod embed;
pub mod fill_mask;
pub mod generate;
pub mod info;
pub mod noise;

use clap::ValueEnum;
use std::process::ExitCode;

/// Exit status of `check` and `bench` when there is no GPU to run on (1 means a failure).
pub const NO_GPU: u8 = 2;

pub type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}
