//! `cuattn`: the command line of the crate.
//!
//! - `cuattn info`: version, the nvcc that built the kernels, every kernel's ptxas report, the GPU.
//! - `cuattn check`: every kernel against its CPU reference on the GPU, as a pass/fail table.
//! - `cuattn bench <family>`: benchmark tables (or `--json`).
//! - `cuattn embed --model DIR [TEXT ...]`: sentence embeddings (CPU or GPU runtime).
//! - `cuattn generate --model DIR --prompt TEXT`: GPT-2 text generation (CPU or GPU runtime).

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cuattn",
    version,
    about = "Hand-written CUDA attention kernels: info, checks and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Crate version, kernel build (nvcc, ptxas resources per kernel) and the GPU found.
    Info {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run every kernel against its CPU reference on random inputs (needs a GPU).
    /// Exit status: 0 all pass, 1 a check failed, 2 no GPU.
    Check,
    /// Benchmark a kernel family (needs a GPU).
    Bench(cli::bench::BenchArgs),
    /// Sentence embeddings with a sentence-transformers / BERT model folder: one sentence per
    /// TEXT argument and per line of --input.
    Embed(cli::embed::EmbedArgs),
    /// Continue a prompt with a GPT-2 model folder, or transform it with a BART one
    /// (config.json, model.safetensors, generation_config.json; the tokenizer from
    /// tokenizer.json, vocab.json + merges.txt, or GPT-2's built-in BPE).
    Generate(cli::generate::GenerateArgs),
    /// Show BART's noising transforms on a text.
    Noise(cli::noise::NoiseArgs),
    /// Predict the [MASK] tokens of a text with a BertForMaskedLM / BertForPreTraining folder.
    FillMask(cli::fill_mask::FillMaskArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { json } => cli::info::run(json),
        Command::Check => cli::check::run(),
        Command::Bench(args) => cli::bench::run(args),
        Command::Embed(args) => cli::embed::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Noise(args) => cli::noise::run(args),
        Command::FillMask(args) => cli::fill_mask::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
