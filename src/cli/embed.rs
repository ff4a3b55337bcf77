//! `cuattn embed --model DIR [TEXT ...]`: sentence embeddings (CPU or GPU runtime).
//!
//! Input is streamed: sentences are read (TEXT arguments, then `--input` line by line) and
//! embedded in chunks, and each chunk's vectors are written before the next is read, so
//! memory follows the model and the batch, not the input. Only `--similarity`, whose output
//! is a matrix of every pair, keeps every vector.

use super::{cpu_dtype, CliResult, DeviceChoice};
use cuattn::runtime::sentence::SentenceEmbedder;
use std::io::{BufRead, Write};
use std::process::ExitCode;

/// Sentences read per chunk (each chunk is sorted by length and cut into batches).
const CHUNK: usize = 1024;

/// A chunk also ends once its text passes this many bytes (with at least one sentence), so a
/// file of long lines holds no more than this and one line in memory.
const CHUNK_BYTES: usize = 64 << 20;

/// Longest `--input` line accepted, in bytes (a file without newlines, or `/dev/zero`, is an
/// error after this much, not a process that reads until it is killed).
const LINE_LIMIT: u64 = 64 << 20;

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Hugging Face / sentence-transformers model folder (config.json, model.safetensors,
    /// tokenizer.json; modules.json and 1_Pooling/ for the pooling).
    #[arg(long)]
    model: std::path::PathBuf,
    /// auto: the GPU when one is usable, else the CPU; cpu; cuda (an error without a GPU).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Storage and GEMM type on the GPU: f32 (default), f16 or bf16. The CPU computes in f32
    /// only: another dtype there is an error.
    #[arg(long)]
    dtype: Option<cuattn::DType>,
    /// Sentences per batch (≥ 1). A batch runs in forward passes of at most 8192 tokens
    /// (32 sentences at MiniLM's 256), which bounds memory whatever the batch size. On the
    /// CPU, batches go through up to one per thread at once, at most 16384 tokens in all.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Read sentences from FILE, one per line (`-`: standard input), after any TEXT. Lines must
    /// be UTF-8 and at most 64 MiB; text past the model's maximum length is not tokenized.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Print one JSON object {"dim", "embeddings", "model"} instead of text.
    #[arg(long)]
    json: bool,
    /// Print the cosine-similarity matrix of the sentences instead of their vectors.
    #[arg(long, conflicts_with = "json")]
    similarity: bool,
    /// Print the time spent embedding (model loading excluded) and sentences/s on stderr.
    #[arg(long)]
    timing: bool,
    /// Sentences to embed (before any --input lines).
    text: Vec<String>,
}

pub fn run(args: EmbedArgs) -> CliResult {
    if args.batch_size == 0 {
        return Err(cuattn::Error::invalid("--batch-size", "must be ≥ 1").into());
    }
    match args.device {
        DeviceChoice::Cpu => embed_cpu(&args),
        DeviceChoice::Cuda => embed_cuda(&args, false),
        DeviceChoice::Auto => embed_cuda(&args, true),
    }
}

#[cfg(feature = "cuda")]
fn embed_cuda(args: &EmbedArgs, fallback: bool) -> CliResult {
    let dtype = args.dtype.unwrap_or(cuattn::DType::F32);
    match cuattn::gpu::Gpu::shared().and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, dtype)) {
        Ok(be) => embed_on(&be, args),
        Err(e) if fallback => {
            cpu_dtype(args.dtype)?;
            eprintln!("no usable GPU ({e}); embedding on the CPU");
            embed_cpu(args)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn embed_cuda(args: &EmbedArgs, fallback: bool) -> CliResult {
    if fallback {
        embed_cpu(args)
    } else {
        Err(cuattn::Error::CudaDisabled.into())
    }
}

/// TEXT arguments, then the lines of `--input`, read on demand.
struct Sentences {
    args: std::vec::IntoIter<String>,
    input: Option<(Box<dyn BufRead>, String)>,
    line: usize,
}

impl Sentences {
    fn new(args: &EmbedArgs) -> Result<Self, Box<dyn std::error::Error>> {
        let input: Option<(Box<dyn BufRead>, String)> = match &args.input {
            None => None,
            Some(p) if p.as_os_str() == "-" => {
                Some((Box::new(std::io::stdin().lock()), "standard input".into()))
            }
            Some(p) => {
                let f = std::fs::File::open(p)
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                Some((
                    Box::new(std::io::BufReader::new(f)),
                    p.display().to_string(),
                ))
            }
        };
        Ok(Sentences {
            args: args.text.clone().into_iter(),
            input,
            line: 0,
        })
    }

    /// Up to `n` more sentences (fewer at the end, or when they pass [`CHUNK_BYTES`]); empty
    /// only at the end.
    fn next_chunk(&mut self, n: usize) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let mut out: Vec<String> = self.args.by_ref().take(n).collect();
        let Some((reader, name)) = self.input.as_mut() else {
            return Ok(out);
        };
        let mut buf = Vec::new();
        let mut bytes: usize = out.iter().map(String::len).sum();
        while out.len() < n && (out.is_empty() || bytes < CHUNK_BYTES) {
            buf.clear();
            let got = std::io::Read::take(&mut **reader, LINE_LIMIT + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            if got == 0 {
                self.input = None;
                break;
            }
            self.line += 1;
            if buf.last() == Some(&b'\n') {
                buf.pop();
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
            } else if got as u64 > LINE_LIMIT {
                return Err(format!(
                    "{name}, line {}: longer than {} MiB",
                    self.line,
                    LINE_LIMIT >> 20
                )
                .into());
            }
            let text = String::from_utf8(std::mem::take(&mut buf))
                .map_err(|_| format!("{name}, line {}: not valid UTF-8", self.line))?;
            bytes += text.len();
            out.push(text);
        }
        Ok(out)
    }
}

fn embed_on<B>(be: &B, args: &EmbedArgs) -> CliResult
where
    B: cuattn::runtime::Backend + Sync,
    B::Tensor: Sync,
{
    let model = SentenceEmbedder::from_folder(be, &args.model)?;
    let mut sentences = Sentences::new(args)?;
    let mut out = std::io::stdout().lock();
    let mut done = 0usize;
    let mut truncated = Vec::new();
    let mut kept: Vec<(String, Vec<f32>)> = Vec::new();
    let mut seconds = 0.0;
    let chunk_len = CHUNK.max(args.batch_size.min(8 * CHUNK));
    let mut bar = None;
    let mut json_open = false;
    loop {
        let texts = sentences.next_chunk(chunk_len)?;
        if texts.is_empty() {
            break;
        }
        // A bar once there is more than one chunk: a single one is over in a moment.
        if done > 0 && bar.is_none() {
            let b = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
            b.set_style(indicatif::ProgressStyle::with_template(
                "{pos} sentences ({per_sec})",
            )?);
            bar = Some(b);
        }
        let count = texts.len();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let start = std::time::Instant::now();
        let emb = model
            .embed(be, &refs, args.batch_size, |n| {
                if let Some(b) = &bar {
                    b.set_position((done + n) as u64)
                }
            })
            .map_err(|e| match e {
                // Number the input among all of them, not within the chunk.
                cuattn::Error::NonFinite { input, reason } => cuattn::Error::NonFinite {
                    input: input + done,
                    reason,
                },
                e => e,
            })?;
        seconds += start.elapsed().as_secs_f64();
        truncated.extend(emb.truncated.iter().map(|i| i + done + 1));
        if args.similarity {
            kept.extend(texts.into_iter().zip(emb.vectors));
        } else if args.json {
            for v in &emb.vectors {
                if done == 0 && !json_open {
                    write!(out, "{{\"dim\":{},\"embeddings\":[", emb.dim)?;
                    json_open = true;
                } else {
                    write!(out, ",")?;
                }
                write!(out, "{}", serde_json::to_string(v)?)?;
            }
        } else {
            for v in &emb.vectors {
                let row: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
                writeln!(out, "{}", row.join(" "))?;
            }
        }
        done += count;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if done == 0 {
        return Err(cuattn::Error::invalid(
            "texts",
            "no sentences to embed (no TEXT, empty --input)",
        )
        .into());
    }
    if args.timing {
        eprintln!(
            "embedded {done} sentences in {seconds:.3} s: {:.1} sentences/s on {}",
            done as f64 / seconds,
            be.describe()
        );
    }
    if !truncated.is_empty() {
        let shown: Vec<String> = truncated.iter().take(10).map(usize::to_string).collect();
        eprintln!(
            "warning: {} input(s) longer than {} tokens were truncated, as sentence-transformers \
             does (input numbers, from 1: {}{})",
            truncated.len(),
            model.tokenizer.max_len(),
            shown.join(", "),
            if truncated.len() > 10 { ", ..." } else { "" }
        );
    }
    if args.json {
        writeln!(
            out,
            "],\"model\":{}}}",
            serde_json::to_string(&args.model.display().to_string())?
        )?;
    } else if args.similarity {
        eprintln!("{} on {}", args.model.display(), be.describe());
        for (i, (t, _)) in kept.iter().enumerate() {
            writeln!(out, "[{}] {t}", i + 1)?;
        }
        write!(out, "{:>6}", "")?;
        for j in 0..kept.len() {
            write!(out, "{:>7}", format!("[{}]", j + 1))?;
        }
        writeln!(out)?;
        for (i, (_, a)) in kept.iter().enumerate() {
            write!(out, "{:>6}", format!("[{}]", i + 1))?;
            for (_, b) in &kept {
                write!(out, "{:>7.3}", cuattn::runtime::pooling::cosine(a, b))?;
            }
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// On the CPU: f32, or bf16 weight matrices with f32 arithmetic; f16 is refused.
fn embed_cpu(args: &EmbedArgs) -> CliResult {
    match cpu_dtype(args.dtype)? {
        cuattn::DType::BF16 => embed_on(&cuattn::runtime::CpuBf16, args),
        _ => embed_on(&cuattn::runtime::Cpu, args),
    }
}
