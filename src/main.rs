//! `cuattn`: the command line of the crate.
//!
//! - `cuattn info`: version, the nvcc that built the kernels, every kernel's ptxas report, the GPU.
//! - `cuattn check`: every kernel against its CPU reference on the GPU, as a pass/fail table.
//! - `cuattn bench <family>`: benchmark tables (or `--json`).
//! - `cuattn embed --model DIR [TEXT ...]`: sentence embeddings (CPU or GPU runtime).
//! - `cuattn generate --model DIR --prompt TEXT`: GPT-2 / GPT-Neo / GPT-1 text generation (CPU
//!   or GPU runtime).
//! - `cuattn finetune --model DIR --train FILE --out DIR`: fine-tune BERT for classification.
//! - `cuattn classify --model DIR [TEXT ...]`: labels and probabilities with such a model.
//! - `cuattn plot bench|roofline ... --out FILE.png`: benchmark results as pictures.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cuattn",
    version,
    about = "Hand-written CUDA attention kernels and a small transformer runtime: kernel info, \
             checks and benchmarks (GPU), sentence embeddings and GPT-2 generation (CPU or GPU)",
    after_help = cli::EXIT_STATUS_HELP
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
    /// Exit status: 0 all pass, 1 a check failed, 3 no GPU.
    Check,
    /// Benchmark a kernel family (needs a GPU).
    Bench(cli::bench::BenchArgs),
    /// Sentence embeddings with a sentence-transformers / BERT model folder: one sentence per
    /// TEXT argument and per line of --input.
    Embed(cli::embed::EmbedArgs),
    /// Continue a prompt with a GPT-2, GPT-Neo or GPT-1 model folder, or transform it with a
    /// BART one (config.json, model.safetensors, generation_config.json; the tokenizer from
    /// tokenizer.json, vocab.json + merges.txt, or GPT-2's built-in BPE).
    Generate(cli::generate::GenerateArgs),
    /// Fine-tune a BERT folder for sequence classification on a .tsv/.csv/.jsonl file and
    /// write a Hugging Face BertForSequenceClassification folder (+ train_log.csv, loss.png).
    Finetune(Box<cli::finetune::FinetuneArgs>),
    /// Predicted label and probability per text with a BertForSequenceClassification folder.
    Classify(cli::classify::ClassifyArgs),
    /// Show BART's noising transforms on a text.
    Noise(cli::noise::NoiseArgs),
    /// Predict the [MASK] tokens of a text with a BertForMaskedLM / BertForPreTraining folder.
    FillMask(cli::fill_mask::FillMaskArgs),
    /// Draw benchmark results as PNG: a saved `bench --json` run, or every GPU report as a
    /// roofline (no GPU needed).
    Plot(cli::plot::PlotArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; anything else is a usage error.
            let code = if e.use_stderr() { cli::USAGE_ERROR } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // The command runs on a worker of one rayon pool, so a parallel op starts on the calling
    // thread and the other workers join it. Called from outside a pool, every op would be
    // handed to the pool while this thread sleeps until it is done: a wake-up per op, about 60
    // per token when decoding one sequence. 8 MiB of stack, as the main thread has.
    let pool = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build();
    let run = move || exit_code(dispatch(cli.command));
    match pool {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    }
}

fn exit_code(result: cli::CliResult) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            let (code, message) = cli::exit_for(&*e);
            if let Some(m) = message {
                eprintln!("error: {m}");
            }
            ExitCode::from(code)
        }
    }
}

fn dispatch(command: Command) -> cli::CliResult {
    match command {
        Command::Info { json } => cli::info::run(json),
        Command::Check => cli::check::run(),
        Command::Bench(args) => cli::bench::run(args),
        Command::Embed(args) => cli::embed::run(args),
        Command::Generate(args) => cli::generate::run(args),
        Command::Finetune(args) => cli::finetune::run(*args),
        Command::Classify(args) => cli::classify::run(args),
        Command::Noise(args) => cli::noise::run(args),
        Command::FillMask(args) => cli::fill_mask::run(args),
        Command::Plot(args) => cli::plot::run(args),
    }
}
