//! `cuattn generate --model DIR --prompt TEXT`: text generation with a GPT-2, GPT-Neo, GPT-1
//! or BART folder (config.json's `model_type`), greedy, sampled or by beam search, on the CPU or GPU runtime.
//! The folder's generation_config.json supplies defaults that flags override. For BART the
//! prompt is the encoder's input (`<s> text </s>`) and the output the decoder's tokens after
//! its start token.

use super::{cpu_dtype, CliResult, DeviceChoice};
use cuattn::runtime::generate::{generate, GenerateBackend, GenerateOptions, Sampling, TokenModel};
use cuattn::runtime::generation_config::GenerationConfig;
use cuattn::runtime::gpt1_tokenizer::Gpt1Tokenizer;
use cuattn::runtime::gpt2_tokenizer::{Gpt2Tokenizer, Utf8Stream};
use std::process::ExitCode;

/// Prompts run together in one generation call; more run in successive groups, so memory
/// (logits, KV cache) follows this, not the number of prompts.
const PROMPT_GROUP: usize = 64;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: std::path::PathBuf,
    /// The text to continue (`<|endoftext|>` in it is the end-of-text token, as in Hugging
    /// Face). Repeat for a batch: the continuations then print one per line when done (and
    /// --json gives arrays); prompts run in groups of 64.
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
    /// Storage type: on the GPU of weights and activations (f32 default, f16, bf16); on the
    /// CPU of the weight matrices (f32 or bf16, arithmetic in f32; f16 is refused there).
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
    /// On the GPU, run every decoding step op by op instead of replaying it from a CUDA graph
    /// (for comparisons; the environment variable CUATTN_DECODE_GRAPH=0 does the same).
    #[arg(long)]
    no_cuda_graph: bool,
}

pub fn run(args: GenerateArgs) -> CliResult {
    // Options out of range, then options that would have no effect, are refused before the
    // model loads.
    Sampling {
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
    if args.no_cuda_graph && matches!(args.device, DeviceChoice::Cpu) {
        return Err(cuattn::Error::invalid(
            "--no-cuda-graph",
            "it turns off the CUDA graph of the GPU's decoding steps, and --device cpu has none",
        )
        .into());
    }
    match args.device {
        DeviceChoice::Cpu => generate_cpu(&args),
        DeviceChoice::Cuda => generate_cuda(&args, false),
        DeviceChoice::Auto => generate_cuda(&args, true),
    }
}

#[cfg(feature = "cuda")]
fn generate_cuda(args: &GenerateArgs, fallback: bool) -> CliResult {
    let dtype = args.dtype.unwrap_or(cuattn::DType::F32);
    match cuattn::gpu::Gpu::shared().and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, dtype)) {
        Ok(mut be) => {
            if args.no_cuda_graph {
                be.set_decode_graph(false);
            }
            generate_on(&be, args)
        }
        Err(e) if fallback => {
            cpu_dtype(args.dtype)?;
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
    match cpu_dtype(args.dtype)? {
        cuattn::DType::BF16 => generate_on(&cuattn::runtime::CpuBf16, args),
        _ => generate_on(&cuattn::runtime::Cpu, args),
    }
}

fn generate_on<B: GenerateBackend + cuattn::runtime::decoder_only::DecoderStepBackend>(
    be: &B,
    args: &GenerateArgs,
) -> CliResult {
    use cuattn::runtime::bart::Bart;
    use cuattn::runtime::checkpoint::read_json;
    use cuattn::runtime::gpt1::Gpt1;
    use cuattn::runtime::gpt2::Gpt2;
    use cuattn::runtime::gpt_neo::GptNeo;
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
        "gpt_neo" => {
            let model = GptNeo::from_folder(be, &args.model)?;
            let c = &model.config;
            let tokenizer = Gpt2Tokenizer::from_folder(&args.model, c.vocab_size)?;
            let (context, eos) = (c.max_position_embeddings, c.eos_token_id);
            run_decoder_only(be, &model, &tokenizer, context, eos, &gen_config, args)
        }
        "openai-gpt" => {
            let model = Gpt1::from_folder(be, &args.model)?;
            let tokenizer = Gpt1Tokenizer::from_folder(&args.model)?;
            let c = &model.config;
            // GPT-1 has no end-of-text token unless its config names one.
            let eos = c.eos_token_id.unwrap_or(u32::MAX);
            run_decoder_only(
                be,
                &model,
                &tokenizer,
                c.n_positions,
                eos,
                &gen_config,
                args,
            )
        }
        _ => {
            let model = Gpt2::from_folder(be, &args.model)?;
            let tokenizer = Gpt2Tokenizer::from_folder(&args.model, model.config.vocab_size)?;
            let (context, eos) = (model.config.n_positions, model.config.eos_token_id);
            run_decoder_only(be, &model, &tokenizer, context, eos, &gen_config, args)
        }
    }
}

/// A decoder-only model (GPT-2, GPT-Neo, GPT-1): the prompts are its input; refuses a
/// `--max-new-tokens` the `context` cannot hold after the longest prompt.
fn run_decoder_only<B: GenerateBackend, M: TokenModel<B>>(
    be: &B,
    model: &M,
    tokenizer: &dyn TextCodec,
    context: usize,
    eos: u32,
    gen_config: &GenerationConfig,
    args: &GenerateArgs,
) -> CliResult {
    let prompts = args
        .prompt
        .iter()
        .map(|p| tokenizer.encode(p))
        .collect::<cuattn::Result<Vec<_>>>()?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let opts = options(args, gen_config.apply(GenerateOptions::default(), longest))?;
    for (i, ids) in prompts.iter().enumerate() {
        if !ids.is_empty() && ids.len().saturating_add(opts.max_new_tokens) > context {
            return Err(cuattn::Error::invalid(
                "--max-new-tokens",
                format!(
                    "{}: prompt {} has {} tokens and the model's context is {context} \
                     positions, so at most {} new tokens fit",
                    opts.max_new_tokens,
                    i + 1,
                    ids.len(),
                    context.saturating_sub(ids.len())
                ),
            )
            .into());
        }
    }
    run_model(be, model, tokenizer, &prompts, &[eos], &opts, args)
}

/// What printing a continuation needs of a tokenizer.
trait TextCodec {
    fn encode(&self, text: &str) -> cuattn::Result<Vec<u32>>;
    fn decode(&self, ids: &[u32]) -> cuattn::Result<String>;
    /// The text token `id` adds to a stream (`utf8` holds back a character a byte-level
    /// token leaves unfinished).
    fn stream(&self, id: u32, utf8: &mut Utf8Stream) -> cuattn::Result<String>;
}

impl TextCodec for Gpt2Tokenizer {
    fn encode(&self, text: &str) -> cuattn::Result<Vec<u32>> {
        Gpt2Tokenizer::encode(self, text)
    }
    fn decode(&self, ids: &[u32]) -> cuattn::Result<String> {
        Gpt2Tokenizer::decode(self, ids)
    }
    fn stream(&self, id: u32, utf8: &mut Utf8Stream) -> cuattn::Result<String> {
        Ok(utf8.push(&self.token_bytes(id)?))
    }
}

impl TextCodec for Gpt1Tokenizer {
    fn encode(&self, text: &str) -> cuattn::Result<Vec<u32>> {
        Gpt1Tokenizer::encode(self, text)
    }
    fn decode(&self, ids: &[u32]) -> cuattn::Result<String> {
        Gpt1Tokenizer::decode(self, ids)
    }
    fn stream(&self, id: u32, _utf8: &mut Utf8Stream) -> cuattn::Result<String> {
        self.token_text(id)
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
    tokenizer: &dyn TextCodec,
    inputs: &[Vec<u32>],
    special: &[u32],
    opts: &GenerateOptions,
    args: &GenerateArgs,
) -> CliResult {
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
    let (mut seconds, mut steps) = (0.0, 0usize);
    let (mut generated, mut stop, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    for (g, group) in inputs.chunks(PROMPT_GROUP).enumerate() {
        let opts = GenerateOptions {
            sampling: Sampling {
                seed: opts.sampling.seed.wrapping_add(g as u64),
                ..opts.sampling
            },
            ..*opts
        };
        let start = std::time::Instant::now();
        let out = generate(be, model, group, &opts, &mut |_, token| {
            if !stream || special.contains(&token) || stream_error.is_some() {
                return;
            }
            let piece = tokenizer
                .stream(token, &mut utf8)
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
        if let Some(e) = stream_error.take() {
            return Err(e);
        }
        steps += out.steps;
        generated.extend(out.generated);
        stop.extend(out.stop);
        scores.extend(out.scores);
    }
    // The text leaves out special tokens (GPT-2: a final end-of-text).
    let texts = generated
        .iter()
        .map(|g| {
            let kept: Vec<u32> = g.iter().copied().filter(|t| !special.contains(t)).collect();
            tokenizer.decode(&kept)
        })
        .collect::<cuattn::Result<Vec<_>>>()?;
    let stops: Vec<&str> = stop.iter().map(|s| s.as_str()).collect();
    if args.json {
        let mut v = if inputs.len() == 1 && generated.len() == 1 {
            serde_json::json!({
                "prompt_ids": inputs[0],
                "generated_ids": generated[0],
                "text": texts[0],
                "stop_reason": stops[0],
            })
        } else {
            serde_json::json!({
                "prompt_ids": inputs,
                "generated_ids": generated,
                "text": texts,
                "stop_reason": stops,
            })
        };
        if !scores.is_empty() {
            v["scores"] = serde_json::json!(scores);
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
        let tokens: usize = generated.iter().map(Vec::len).sum();
        eprintln!(
            "generated {tokens} tokens for {} prompt(s) in {seconds:.6} s ({} model steps): \
             {:.1} tokens/s on {}",
            inputs.len(),
            steps,
            tokens as f64 / seconds,
            be.describe()
        );
    }
    Ok(ExitCode::SUCCESS)
}
