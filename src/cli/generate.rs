//! `cuattn generate --model DIR --prompt TEXT`: text generation with a GPT-2 or a BART folder
//! (config.json's `model_type`), greedy, sampled or by beam search, on the CPU or GPU runtime.
//! The folder's generation_config.json supplies defaults that flags override. For BART the
//! prompt is the encoder's input (`<s> text </s>`) and the output the decoder's tokens after
//! its start token.

use super::{CliResult, DeviceChoice};
use cuattn::runtime::generate::{generate, GenerateBackend, GenerateOptions, Sampling, TokenModel};
use cuattn::runtime::generation_config::GenerationConfig;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: std::path::PathBuf,
    /// The text to continue. Repeat for a batch: the continuations then print after each
    /// other when all are done (and --json gives arrays).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// New tokens per sequence (default: generation_config.json's max_new_tokens or
    /// max_length, else 32).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Beam search with this many beams (1: greedy or sampling).
    #[arg(long)]
    num_beams: Option<usize>,
    /// Beam scores are sum(log p) / length^length_penalty.
    #[arg(long)]
    length_penalty: Option<f32>,
    /// Beam search stops: true (num_beams finished), false (heuristic), never.
    #[arg(long)]
    early_stopping: Option<String>,
    /// Never repeat an n-gram of this size (0: off).
    #[arg(long)]
    no_repeat_ngram_size: Option<usize>,
    /// End-of-text is forbidden before this many new tokens.
    #[arg(long)]
    min_new_tokens: Option<usize>,
    /// Hypotheses printed per prompt (≤ num_beams).
    #[arg(long)]
    num_return_sequences: Option<usize>,
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
    use cuattn::runtime::bart::Bart;
    use cuattn::runtime::checkpoint::read_json;
    use cuattn::runtime::gpt2::Gpt2;
    use cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer;
    let config = read_json(&args.model.join("config.json"))?;
    let gen_config = GenerationConfig::from_folder(&args.model)?;
    match config["model_type"].as_str().unwrap_or("") {
        "bart" => {
            let mut model = Bart::from_folder(be, &args.model)?;
            if let Some(start) = gen_config.decoder_start_token_id {
                model.config.decoder_start_token_id = start;
            }
            let c = model.config.clone();
            let tokenizer = Gpt2Tokenizer::from_folder(&args.model, c.vocab_size)?;
            // <s> text </s>, as BART's tokenizer makes encoder inputs.
            let inputs = args
                .prompt
                .iter()
                .map(|p| {
                    let mut ids = vec![c.bos_token_id];
                    ids.extend(tokenizer.encode(p)?);
                    ids.push(c.eos_token_id);
                    Ok(ids)
                })
                .collect::<cuattn::Result<Vec<_>>>()?;
            let base = GenerateOptions {
                forced_bos_token_id: c.forced_bos_token_id,
                forced_eos_token_id: c.forced_eos_token_id,
                ..GenerateOptions::default()
            };
            let opts = options(args, gen_config.apply(base, 1))?;
            let special = [
                c.bos_token_id,
                c.pad_token_id,
                c.eos_token_id,
                c.decoder_start_token_id,
            ];
            run_model(be, &model, &tokenizer, &inputs, &special, &opts, args)
        }
        _ => {
            let model = Gpt2::from_folder(be, &args.model)?;
            let tokenizer = Gpt2Tokenizer::from_folder(&args.model, model.config.vocab_size)?;
            let prompts = args
                .prompt
                .iter()
                .map(|p| tokenizer.encode(p))
                .collect::<cuattn::Result<Vec<_>>>()?;
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            let opts = options(args, gen_config.apply(GenerateOptions::default(), longest))?;
            let eos = model.config.eos_token_id;
            run_model(be, &model, &tokenizer, &prompts, &[eos], &opts, args)
        }
    }
}

/// The flags over the folder's defaults.
fn options(args: &GenerateArgs, defaults: GenerateOptions) -> cuattn::Result<GenerateOptions> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens.unwrap_or(defaults.max_new_tokens),
        sampling,
        use_kv_cache: !args.recompute,
        num_beams: args.num_beams.unwrap_or(defaults.num_beams),
        length_penalty: args.length_penalty.unwrap_or(defaults.length_penalty),
        early_stopping: match &args.early_stopping {
            Some(s) => s.parse()?,
            None => defaults.early_stopping,
        },
        num_return_sequences: args
            .num_return_sequences
            .unwrap_or(defaults.num_return_sequences),
        no_repeat_ngram_size: args
            .no_repeat_ngram_size
            .unwrap_or(defaults.no_repeat_ngram_size),
        min_new_tokens: args.min_new_tokens.unwrap_or(defaults.min_new_tokens),
        ..defaults
    };
    opts.validate()?;
    Ok(opts)
}

/// Generates for `inputs` and prints the result; `special` ids are left out of the text.
fn run_model<B: GenerateBackend, M: TokenModel<B>>(
    be: &B,
    model: &M,
    tokenizer: &cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer,
    inputs: &[Vec<u32>],
    special: &[u32],
    opts: &GenerateOptions,
    args: &GenerateArgs,
) -> CliResult {
    use cuattn::runtime::gpt2_tokenizer::Utf8Stream;
    use std::io::Write;
    if args.warmup {
        let short = GenerateOptions {
            max_new_tokens: opts.max_new_tokens.min(2),
            ..*opts
        };
        generate(be, model, inputs, &short, &mut |_, _| {})?;
    }
    // Stream only a single prompt's continuation, and only as text (beam search knows its
    // hypotheses only at the end).
    let stream = !args.json && inputs.len() == 1 && opts.num_beams == 1;
    let mut utf8 = Utf8Stream::default();
    let mut stdout = std::io::stdout().lock();
    let mut stream_error = None;
    let start = std::time::Instant::now();
    let out = generate(be, model, inputs, opts, &mut |_, token| {
        if !stream || special.contains(&token) || stream_error.is_some() {
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
    // The text leaves out special tokens (GPT-2: a final end-of-text).
    let texts = out
        .generated
        .iter()
        .map(|g| {
            let kept: Vec<u32> = g.iter().copied().filter(|t| !special.contains(t)).collect();
            tokenizer.decode(&kept)
        })
        .collect::<cuattn::Result<Vec<_>>>()?;
    let stops: Vec<&str> = out.stop.iter().map(|s| s.as_str()).collect();
    if args.json {
        let mut v = if inputs.len() == 1 && out.generated.len() == 1 {
            serde_json::json!({
                "prompt_ids": inputs[0],
                "generated_ids": out.generated[0],
                "text": texts[0],
                "stop_reason": stops[0],
            })
        } else {
            serde_json::json!({
                "prompt_ids": inputs,
                "generated_ids": out.generated,
                "text": texts,
                "stop_reason": stops,
            })
        };
        if !out.scores.is_empty() {
            v["scores"] = serde_json::json!(out.scores);
        }
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
            inputs.len(),
            out.steps,
            tokens as f64 / seconds,
            be.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}
