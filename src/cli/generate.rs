//! `cuattn generate --model DIR --prompt TEXT`: GPT-2 text generation (CPU or GPU runtime).

use super::{CliResult, DeviceChoice};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct GenerateArgs {
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
    /// Storage type on the GPU (the CPU computes in f32).
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

pub fn run(args: GenerateArgs) -> CliResult {
    match args.device {
        DeviceChoice::Cpu => generate_on(&cuattn::runtime::Cpu, &args),
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
            generate_on(&cuattn::runtime::Cpu, args)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn generate_cuda(args: &GenerateArgs, fallback: bool) -> CliResult {
    if fallback {
        generate_on(&cuattn::runtime::Cpu, args)
    } else {
        Err(cuattn::Error::CudaDisabled.into())
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
