//! `cuattn`: the command line of the crate.
//!
//! - `cuattn info`: version, the nvcc that built the kernels, every kernel's ptxas report, the GPU.
//! - `cuattn check`: every kernel against its CPU reference on the GPU, as a pass/fail table.
//! - `cuattn bench <family>`: benchmark tables (or `--json`).
//! - `cuattn embed --model DIR [TEXT ...]`: sentence embeddings (CPU or GPU runtime).
//! - `cuattn generate --model DIR --prompt TEXT`: GPT-2 text generation (CPU or GPU runtime).

use clap::{Parser, Subcommand, ValueEnum};
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
    Bench {
        family: Family,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Small tensors and few iterations: a smoke test, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Only these dtypes (default: all).
        #[arg(long, value_delimiter = ',')]
        dtype: Vec<cuattn::DType>,
        /// Instead of the table, time every launch variant (register path with 1/2/4 packs per
        /// thread, generic path with and without the row cache) on the headline shapes.
        #[arg(long)]
        sweep: bool,
    },
    /// Sentence embeddings with a sentence-transformers / BERT model folder: one sentence per
    /// TEXT argument and per line of --input.
    Embed(EmbedArgs),
    /// Continue a prompt with a GPT-2 model folder (config.json, model.safetensors; the
    /// tokenizer from tokenizer.json, vocab.json + merges.txt, or GPT-2's built-in BPE).
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    model: std::path::PathBuf,
    /// The text to continue. Repeat for a batch: the continuations then print after each
    /// other when all are done (and --json gives arrays).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens holding this much probability, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Storage type: on the GPU of weights and activations; on the CPU of the weight
    /// matrices (f32 or bf16; arithmetic in f32).
    #[arg(long, default_value = "f32")]
    dtype: cuattn::DType,
    /// Print one JSON object {"prompt_ids", "generated_ids", "text"} instead of streaming.
    #[arg(long)]
    json: bool,
    /// Print generated tokens/s (model loading and tokenization excluded) on stderr.
    #[arg(long)]
    timing: bool,
    /// Before the timed call, generate 2 tokens for the same prompts (loads the kernels and
    /// sets up cuBLAS outside the timing; for benchmarks).
    #[arg(long)]
    warmup: bool,
    /// Recompute the whole sequence every step instead of using the KV cache (for comparisons).
    #[arg(long)]
    recompute: bool,
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// Hugging Face / sentence-transformers model folder (config.json, model.safetensors,
    /// tokenizer.json; modules.json and 1_Pooling/ for the pooling).
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Storage type: on the GPU of weights and activations; on the CPU of the weight
    /// matrices (f32 or bf16; arithmetic in f32).
    #[arg(long, default_value = "f32")]
    dtype: cuattn::DType,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Read sentences from FILE, one per line (`-`: standard input), after any TEXT.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Print one JSON object {"model", "dim", "embeddings"} instead of text.
    #[arg(long)]
    json: bool,
    /// Print the cosine-similarity matrix of the sentences instead of their vectors.
    #[arg(long, conflicts_with = "json")]
    similarity: bool,
    /// Print the time spent embedding (model loading excluded) and sentences/s on stderr.
    #[arg(long)]
    timing: bool,
    text: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceChoice {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Family {
    Layernorm,
    Attention,
    /// Block-sparse attention vs fraction of blocks kept (bf16, hd128, blocks of 128).
    Sparse,
    Decode,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { json } => info(json),
        Command::Check => check(),
        Command::Bench {
            family,
            json,
            quick,
            dtype,
            sweep,
        } => bench(family, json, quick, dtype, sweep),
        Command::Embed(args) => embed(args),
        Command::Generate(args) => generate(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `check` and `bench` when there is no GPU to run on (1 means a failure).
const NO_GPU: u8 = 2;

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

fn info(json: bool) -> CliResult {
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
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("cuattn {}", env!("CARGO_PKG_VERSION"));
    println!("kernels built by: {}", cuattn::kernels::nvcc_version());
    let modules: Vec<_> = cuattn::kernels::modules()
        .iter()
        .map(|m| format!("{} ({} KiB)", m.name, m.fatbin.len() / 1024))
        .collect();
    println!(
        "modules: {}",
        if modules.is_empty() {
            "none".to_string()
        } else {
            modules.join(", ")
        }
    );
    if !resources.is_empty() {
        println!();
        println!(
            "{:<32} {:<6} {:>5} {:>10} {:>7} {:>12}",
            "kernel", "arch", "regs", "smem (B)", "stack", "spills st/ld"
        );
        for r in &resources {
            println!(
                "{:<32} {:<6} {:>5} {:>10} {:>7} {:>7}/{:<4}",
                r.kernel,
                r.arch,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                r.spill_store_bytes,
                r.spill_load_bytes
            );
        }
        println!("(smem: static only; dynamic shared memory is sized per launch)");
    }
    println!();
    match gpu {
        Ok(g) => println!("GPU: {g}"),
        Err(e) => println!("GPU: {e}"),
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

#[cfg(feature = "cuda")]
fn check() -> CliResult {
    use cuattn::check::layernorm as ln;
    let gpu = match cuattn::gpu::Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cuattn check needs a CUDA GPU: {e}");
            return Ok(ExitCode::from(NO_GPU));
        }
    };
    println!(
        "checking every kernel against its CPU reference on {}",
        gpu.info().name
    );
    println!("{:<10} {:<36} {:<7} detail", "kernel", "case", "result");
    let mut failures = 0;
    let mut report = |kernel: &str, case: &str, r: Result<(), String>| {
        let (status, detail) = match r {
            Ok(()) => ("pass", String::new()),
            Err(e) => {
                failures += 1;
                ("FAIL", e)
            }
        };
        println!("{kernel:<10} {case:<36} {status:<7} {detail}");
    };
    for (name, case) in ln::standard_cases() {
        report("ln_fwd", &name, ln::forward(&gpu, &case, false).map(|_| ()));
        report(
            "ln_add_fwd",
            &name,
            ln::forward(&gpu, &case, true).map(|_| ()),
        );
        report("ln_bwd", &name, ln::backward(&gpu, &case));
    }
    for (name, case) in cuattn::check::attention::standard_cases() {
        report(
            "attn_exact",
            &name,
            cuattn::check::attention::forward(&gpu, &case),
        );
    }
    match cuattn::check::sparse::standard_cases() {
        Ok(cases) => {
            for (name, case) in cases {
                report("sparse", &name, cuattn::check::sparse::forward(&gpu, &case));
            }
        }
        Err(e) => report("sparse", "layouts", Err(e.to_string())),
    }
    for (name, case) in cuattn::check::decode::standard_cases() {
        report("decode", &name, cuattn::check::decode::forward(&gpu, &case));
    }
    if failures > 0 {
        println!("{failures} check(s) FAILED");
        return Ok(ExitCode::FAILURE);
    }
    println!("all checks passed");
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
fn check() -> CliResult {
    eprintln!("cuattn check needs a CUDA GPU: this build has no `cuda` feature");
    Ok(ExitCode::from(NO_GPU))
}

#[cfg(feature = "cuda")]
fn bench(
    family: Family,
    json: bool,
    quick: bool,
    dtypes: Vec<cuattn::DType>,
    sweep: bool,
) -> CliResult {
    let gpu = match cuattn::gpu::Gpu::shared() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cuattn bench needs a CUDA GPU: {e}");
            return Ok(ExitCode::from(NO_GPU));
        }
    };
    let dtypes = if dtypes.is_empty() {
        cuattn::DType::ALL.to_vec()
    } else {
        dtypes
    };
    let copy_gbs = cuattn::bench::copy_bandwidth_gbs(&gpu, if quick { 64 << 20 } else { 1 << 30 })?;
    match family {
        Family::Layernorm if sweep => {
            let rows = cuattn::bench::layernorm::sweep(&gpu, &dtypes, copy_gbs)?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                println!(
                    "LayerNorm launch variants on {} (copy {:.0} GB/s)",
                    gpu.info().name,
                    copy_gbs
                );
                println!(
                    "{:<9} {:<5} {:>14} {:<16} {:>10} {:>7}",
                    "op", "dtype", "shape", "variant", "time (µs)", "% copy"
                );
                for r in rows {
                    let shape = format!("{}x{}", r.rows, r.hidden);
                    println!(
                        "{:<9} {:<5} {:>14} {:<16} {:>10.1} {:>6.1}%",
                        r.op, r.dtype, shape, r.variant, r.time_us, r.pct_copy
                    );
                }
            }
        }
        Family::Attention => {
            let dtypes: Vec<_> = if dtypes.len() == 3 {
                vec![cuattn::DType::F16, cuattn::DType::BF16]
            } else {
                dtypes
            };
            let rows = cuattn::bench::attention::run(&gpu, &dtypes, quick)?;
            if json {
                let v = serde_json::json!({"family": "attention", "device": gpu.info().name, "rows": rows});
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "Attention forward on {} (FLOPs 4·B·H·L²·D, half when causal)",
                    gpu.info().name
                );
                println!(
                    "{:<13} {:<5} {:>16} {:>4} {:<7} {:>11} {:>9}",
                    "kernel", "dtype", "B×H×L", "D", "causal", "time (µs)", "TFLOP/s"
                );
                for r in rows {
                    let shape = format!("{}x{}x{}", r.batch, r.heads, r.len);
                    println!(
                        "{:<13} {:<5} {:>16} {:>4} {:<7} {:>11.1} {:>9.1}",
                        r.kernel, r.dtype, shape, r.dim, r.causal, r.time_us, r.tflops
                    );
                }
            }
        }
        Family::Sparse => {
            let rows = cuattn::bench::sparse::run(&gpu, quick)?;
            if json {
                let v = serde_json::json!({"family": "sparse", "device": gpu.info().name, "rows": rows});
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "Block-sparse attention on {} (bf16, D 128, blocks of {}; FLOPs of kept blocks)",
                    gpu.info().name,
                    cuattn::bench::sparse::BLOCK
                );
                println!(
                    "{:<7} {:>16} {:>8} {:>8} {:>11} {:>9} {:>8}",
                    "kernel", "B×H×L", "density", "kept", "time (µs)", "TFLOP/s", "vs dense"
                );
                for r in rows {
                    let shape = format!("{}x{}x{}", r.batch, r.heads, r.len);
                    println!(
                        "{:<7} {:>16} {:>8.2} {:>8.3} {:>11.1} {:>9.1} {:>7.1}x",
                        r.kernel,
                        shape,
                        r.density,
                        r.kept_fraction,
                        r.time_us,
                        r.tflops,
                        r.speedup_vs_dense
                    );
                }
            }
        }
        Family::Decode => {
            let rows = cuattn::bench::decode::run(&gpu, &dtypes, quick, copy_gbs)?;
            if json {
                let v = serde_json::json!({
                    "family": "decode",
                    "device": gpu.info().name,
                    "copy_bandwidth_gbs": copy_gbs,
                    "rows": rows,
                });
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "Decode attention on {} (Hq {}, Hkv {}, D {}; bytes = K + V + q + O; copy {:.0} GB/s)",
                    gpu.info().name,
                    cuattn::bench::decode::HEADS_Q,
                    cuattn::bench::decode::HEADS_KV,
                    cuattn::bench::decode::DIM,
                    copy_gbs
                );
                println!(
                    "{:<5} {:>5} {:>7} {:>6} {:>10} {:>8} {:>7}",
                    "dtype", "batch", "len", "splits", "time (µs)", "GB/s", "% copy"
                );
                for r in rows {
                    println!(
                        "{:<5} {:>5} {:>7} {:>6} {:>10.1} {:>8.0} {:>6.1}%",
                        r.dtype, r.batch, r.len, r.splits, r.time_us, r.gbs, r.pct_copy
                    );
                }
            }
        }
        Family::Layernorm => {
            let rows = cuattn::bench::layernorm::run(&gpu, &dtypes, quick, copy_gbs)?;
            if json {
                let v = serde_json::json!({
                    "family": "layernorm",
                    "device": gpu.info().name,
                    "copy_bandwidth_gbs": copy_gbs,
                    "rows": rows,
                });
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "LayerNorm on {} (measured copy bandwidth {:.0} GB/s)",
                    gpu.info().name,
                    copy_gbs
                );
                println!(
                    "{:<17} {:<5} {:>8} {:>6} {:>10} {:>8} {:>7}",
                    "op", "dtype", "rows", "hidden", "time (µs)", "GB/s", "% copy"
                );
                for r in rows {
                    println!(
                        "{:<17} {:<5} {:>8} {:>6} {:>10.1} {:>8.0} {:>6.1}%",
                        r.op, r.dtype, r.rows, r.hidden, r.time_us, r.gbs, r.pct_copy
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
fn bench(_: Family, _: bool, _: bool, _: Vec<cuattn::DType>, _: bool) -> CliResult {
    eprintln!("cuattn bench needs a CUDA GPU: this build has no `cuda` feature");
    Ok(ExitCode::from(NO_GPU))
}

fn embed(args: EmbedArgs) -> CliResult {
    let mut texts = args.text.clone();
    if let Some(path) = &args.input {
        let content = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        };
        texts.extend(content.lines().map(str::to_string));
    }
    match args.device {
        DeviceChoice::Cpu => embed_cpu(&args, &texts),
        DeviceChoice::Cuda => embed_cuda(&args, &texts, false),
        DeviceChoice::Auto => embed_cuda(&args, &texts, true),
    }
}

#[cfg(feature = "cuda")]
fn embed_cuda(args: &EmbedArgs, texts: &[String], fallback: bool) -> CliResult {
    match cuattn::gpu::Gpu::shared()
        .and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, args.dtype))
    {
        Ok(be) => embed_on(&be, args, texts),
        Err(e) if fallback => {
            eprintln!("no usable GPU ({e}); embedding on the CPU");
            embed_cpu(args, texts)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn embed_cuda(args: &EmbedArgs, texts: &[String], fallback: bool) -> CliResult {
    if fallback {
        embed_cpu(args, texts)
    } else {
        Err(cuattn::Error::CudaDisabled.into())
    }
}

/// On the CPU: f32, or bf16 weight matrices with f32 arithmetic; f16 is refused.
fn embed_cpu(args: &EmbedArgs, texts: &[String]) -> CliResult {
    match args.dtype {
        cuattn::DType::F32 => embed_on(&cuattn::runtime::Cpu, args, texts),
        cuattn::DType::BF16 => embed_on(&cuattn::runtime::CpuBf16, args, texts),
        cuattn::DType::F16 => Err(cpu_f16_refused().into()),
    }
}

fn cpu_f16_refused() -> cuattn::Error {
    cuattn::Error::invalid(
        "dtype",
        "the CPU backend stores weights in f32 or bf16 (--dtype f32 or bf16), not f16",
    )
}

fn embed_on<B: cuattn::runtime::Backend>(be: &B, args: &EmbedArgs, texts: &[String]) -> CliResult {
    use cuattn::runtime::sentence::SentenceEmbedder;
    let model = SentenceEmbedder::from_folder(be, &args.model)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    // A bar only when there is more than one batch: a single batch is over in a moment.
    let bar = if texts.len() > args.batch_size {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(texts.len() as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} sentences ({per_sec}, eta {eta})",
        )?);
        Some(bar)
    } else {
        None
    };
    let start = std::time::Instant::now();
    let out = model.embed(be, &refs, args.batch_size, |done| {
        if let Some(b) = &bar {
            b.set_position(done as u64)
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if args.timing {
        eprintln!(
            "embedded {} sentences in {seconds:.3} s: {:.1} sentences/s on {}",
            texts.len(),
            texts.len() as f64 / seconds,
            be.describe()
        );
    }
    if !out.truncated.is_empty() {
        eprintln!(
            "warning: {} input(s) longer than {} tokens were truncated, as sentence-transformers \
             does (input numbers, from 1: {:?})",
            out.truncated.len(),
            model.tokenizer.max_len(),
            out.truncated.iter().map(|i| i + 1).collect::<Vec<_>>()
        );
    }
    if args.json {
        let v = serde_json::json!({
            "model": args.model.display().to_string(),
            "dim": out.dim,
            "embeddings": out.vectors,
        });
        println!("{}", serde_json::to_string(&v)?);
    } else if args.similarity {
        eprintln!("{} on {}", args.model.display(), be.describe());
        for (i, t) in texts.iter().enumerate() {
            println!("[{}] {t}", i + 1);
        }
        print!("{:>6}", "");
        for j in 0..texts.len() {
            print!("{:>7}", format!("[{}]", j + 1));
        }
        println!();
        for (i, a) in out.vectors.iter().enumerate() {
            print!("{:>6}", format!("[{}]", i + 1));
            for b in &out.vectors {
                print!("{:>7.3}", cuattn::runtime::pooling::cosine(a, b));
            }
            println!();
        }
    } else {
        for v in &out.vectors {
            let row: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
            println!("{}", row.join(" "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn generate(args: GenerateArgs) -> CliResult {
    match args.device {
        DeviceChoice::Cpu => generate_cpu(&args),
        DeviceChoice::Cuda => generate_cuda(&args, false),
        DeviceChoice::Auto => generate_cuda(&args, true),
    }
}

#[cfg(feature = "cuda")]
fn generate_cuda(args: &GenerateArgs, fallback: bool) -> CliResult {
    match cuattn::gpu::Gpu::shared()
        .and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, args.dtype))
    {
        Ok(be) => generate_on(&be, args),
        Err(e) if fallback => {
            eprintln!("no usable GPU ({e}); generating on the CPU");
            generate_cpu(args)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn generate_cuda(args: &GenerateArgs, fallback: bool) -> CliResult {
    if fallback {
        generate_cpu(args)
    } else {
        Err(cuattn::Error::CudaDisabled.into())
    }
}

/// On the CPU: f32, or bf16 weight matrices with f32 arithmetic; f16 is refused.
fn generate_cpu(args: &GenerateArgs) -> CliResult {
    match args.dtype {
        cuattn::DType::F32 => generate_on(&cuattn::runtime::Cpu, args),
        cuattn::DType::BF16 => generate_on(&cuattn::runtime::CpuBf16, args),
        cuattn::DType::F16 => Err(cpu_f16_refused().into()),
    }
}

fn generate_on<B: cuattn::runtime::generate::GenerateBackend>(
    be: &B,
    args: &GenerateArgs,
) -> CliResult {
    use cuattn::runtime::generate::{generate, GenerateOptions, Sampling};
    use cuattn::runtime::gpt2::Gpt2;
    use cuattn::runtime::gpt2_tokenizer::{Gpt2Tokenizer, Utf8Stream};
    use std::io::Write;
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.validate()?;
    let model = Gpt2::from_folder(be, &args.model)?;
    let tokenizer = Gpt2Tokenizer::from_folder(&args.model, model.config.vocab_size)?;
    let prompts = args
        .prompt
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<cuattn::Result<Vec<_>>>()?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        use_kv_cache: !args.recompute,
        ..GenerateOptions::default()
    };
    if args.warmup {
        let short = GenerateOptions {
            max_new_tokens: opts.max_new_tokens.min(2),
            ..opts
        };
        generate(be, &model, &prompts, &short, &mut |_, _| {})?;
    }
    let eos = model.config.eos_token_id;
    // Stream only a single prompt's continuation, and only as text.
    let stream = !args.json && prompts.len() == 1;
    let mut utf8 = Utf8Stream::default();
    let mut stdout = std::io::stdout().lock();
    let mut stream_error = None;
    let start = std::time::Instant::now();
    let out = generate(be, &model, &prompts, &opts, &mut |_, token| {
        if !stream || token == eos || stream_error.is_some() {
            return;
        }
        let piece = tokenizer
            .token_bytes(token)
            .map(|b| utf8.push(&b))
            .map_err(Box::<dyn std::error::Error>::from)
            .and_then(|s| {
                stdout.write_all(s.as_bytes())?;
                Ok(stdout.flush()?)
            });
        if let Err(e) = piece {
            stream_error = Some(e);
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(e) = stream_error {
        return Err(e);
    }
    // The text of a continuation leaves out a final end-of-text token.
    let texts = out
        .generated
        .iter()
        .map(|g| tokenizer.decode(g.strip_suffix(&[eos]).unwrap_or(g)))
        .collect::<cuattn::Result<Vec<_>>>()?;
    if args.json {
        let v = if prompts.len() == 1 {
            serde_json::json!({
                "prompt_ids": prompts[0],
                "generated_ids": out.generated[0],
                "text": texts[0],
            })
        } else {
            serde_json::json!({
                "prompt_ids": prompts,
                "generated_ids": out.generated,
                "text": texts,
            })
        };
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    } else if stream {
        writeln!(stdout, "{}", utf8.finish())?;
    } else {
        for t in &texts {
            writeln!(stdout, "{t}")?;
        }
    }
    if args.timing {
        let tokens: usize = out.generated.iter().map(Vec::len).sum();
        eprintln!(
            "generated {tokens} tokens for {} prompt(s) in {seconds:.6} s ({} model steps): \
             {:.1} tokens/s on {}",
            prompts.len(),
            out.steps,
            tokens as f64 / seconds,
            be.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}
