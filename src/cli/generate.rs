//! `cuattn generate --model DIR --prompt TEXT`: GPT-2 text generation (CPU or GPU runtime).

use super::{check_cpu_dtype, CliResult, DeviceChoice};
use std::process::ExitCode;

/// Prompts run together in one generation call; more run in successive groups, so memory
/// (logits, KV cache) follows this, not the number of prompts.
const PROMPT_GROUP: usize = 64;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// GPT-2 model folder (config.json, model.safetensors; tokenizer.json, vocab.json +
    /// merges.txt, or none for GPT-2's own vocabulary).
    #[arg(long)]
    model: std::path::PathBuf,
    /// The text to continue (`<|endoftext|>` in it is the end-of-text token, as in Hugging
    /// Face). Repeat for a batch: the continuations then print one per line when done (and
    /// --json gives arrays); prompts run in groups of 64.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens to generate per prompt; prompt plus continuation must fit the model's context
    /// (n_positions), else an error says how many fit.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0: greedy (argmax); > 0: sample from softmax(logits / temperature).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the K most likely tokens only (0: all). Needs --temperature > 0.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens holding this much probability, in (0, 1]. Needs
    /// --temperature > 0.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (group g of 64 prompts uses seed + g).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto: the GPU when one is usable, else the CPU; cpu; cuda (an error without a GPU).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Storage and GEMM type on the GPU: f32 (default), f16 or bf16. The CPU computes in f32
    /// only: another dtype there is an error.
    #[arg(long)]
    dtype: Option<cuattn::DType>,
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
    // Options out of range, then options that would have no effect, are refused before the
    // model loads.
    cuattn::runtime::generate::Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    }
    .validate()?;
    if args.temperature == 0.0 && (args.top_k != 0 || args.top_p != 1.0) {
        return Err(cuattn::Error::invalid(
            "--top-k/--top-p",
            "they filter the tokens sampling draws from, and --temperature 0 (the default) is \
             greedy: set --temperature > 0 to sample",
        )
        .into());
    }
    match args.device {
        DeviceChoice::Cpu => {
            check_cpu_dtype(args.dtype)?;
            generate_on(&cuattn::runtime::Cpu, &args)
        }
        DeviceChoice::Cuda => generate_cuda(&args, false),
        DeviceChoice::Auto => generate_cuda(&args, true),
    }
}

#[cfg(feature = "cuda")]
fn generate_cuda(args: &GenerateArgs, fallback: bool) -> CliResult {
    let dtype = args.dtype.unwrap_or(cuattn::DType::F32);
    match cuattn::gpu::Gpu::shared().and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, dtype)) {
        Ok(be) => generate_on(&be, args),
        Err(e) if fallback => {
            check_cpu_dtype(args.dtype)?;
            eprintln!("no usable GPU ({e}); generating on the CPU");
            generate_on(&cuattn::runtime::Cpu, args)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn generate_cuda(args: &GenerateArgs, fallback: bool) -> CliResult {
    if fallback {
        check_cpu_dtype(args.dtype)?;
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
    let context = model.config.n_positions;
    let encode = |i: usize, p: &str| -> cuattn::Result<Vec<u32>> {
        let ids = tokenizer.encode(p)?;
        if ids.len().saturating_add(args.max_new_tokens) > context && !ids.is_empty() {
            return Err(cuattn::Error::invalid(
                "--max-new-tokens",
                format!(
                    "{}: prompt {} has {} tokens and the model's context is {context} \
                     positions, so at most {} new tokens fit",
                    args.max_new_tokens,
                    i + 1,
                    ids.len(),
                    context.saturating_sub(ids.len())
                ),
            ));
        }
        Ok(ids)
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling,
        use_kv_cache: !args.recompute,
        ..GenerateOptions::default()
    };
    let eos = model.config.eos_token_id;
    // Stream only a single prompt's continuation, and only as text.
    let stream = !args.json && args.prompt.len() == 1;
    let mut utf8 = Utf8Stream::default();
    let mut stdout = std::io::stdout().lock();
    let mut stream_error = None;
    let (mut seconds, mut tokens, mut steps) = (0.0, 0usize, 0usize);
    let (mut all_prompts, mut all_generated, mut all_texts) = (Vec::new(), Vec::new(), Vec::new());
    for (g, group) in args.prompt.chunks(PROMPT_GROUP).enumerate() {
        let prompts = group
            .iter()
            .enumerate()
            .map(|(i, p)| encode(g * PROMPT_GROUP + i, p.as_str()))
            .collect::<cuattn::Result<Vec<_>>>()?;
        let opts = GenerateOptions {
            sampling: Sampling {
                seed: args.seed.wrapping_add(g as u64),
                ..opts.sampling
            },
            ..opts
        };
        if args.warmup && g == 0 {
            let short = GenerateOptions {
                max_new_tokens: opts.max_new_tokens.min(2),
                ..opts
            };
            generate(be, &model, &prompts, &short, &mut |_, _| {})?;
        }
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
        seconds += start.elapsed().as_secs_f64();
        steps += out.steps;
        tokens += out.generated.iter().map(Vec::len).sum::<usize>();
        if let Some(e) = stream_error.take() {
            return Err(e);
        }
        // The text of a continuation leaves out a final end-of-text token.
        let texts = out
            .generated
            .iter()
            .map(|g| tokenizer.decode(g.strip_suffix(&[eos]).unwrap_or(g)))
            .collect::<cuattn::Result<Vec<_>>>()?;
        if args.json {
            all_prompts.extend(prompts);
            all_generated.extend(out.generated);
            all_texts.extend(texts);
        } else if !stream {
            for t in &texts {
                writeln!(stdout, "{t}")?;
            }
        }
    }
    if args.json {
        let v = if args.prompt.len() == 1 {
            serde_json::json!({
                "prompt_ids": all_prompts[0],
                "generated_ids": all_generated[0],
                "text": all_texts[0],
            })
        } else {
            serde_json::json!({
                "prompt_ids": all_prompts,
                "generated_ids": all_generated,
                "text": all_texts,
            })
        };
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    } else if stream {
        writeln!(stdout, "{}", utf8.finish())?;
    }
    stdout.flush()?;
    if args.timing {
        eprintln!(
            "generated {tokens} tokens for {} prompt(s) in {seconds:.6} s ({steps} model steps): \
             {:.1} tokens/s on {}",
            args.prompt.len(),
            tokens as f64 / seconds,
            be.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}
