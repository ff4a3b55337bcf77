//! `cuattn embed --model DIR [TEXT ...]`: sentence embeddings (CPU or GPU runtime).

use super::{CliResult, DeviceChoice};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Hugging Face / sentence-transformers model folder (config.json, model.safetensors,
    /// tokenizer.json; modules.json and 1_Pooling/ for the pooling).
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Storage type on the GPU (the CPU computes in f32).
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

pub fn run(args: EmbedArgs) -> CliResult {
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
        DeviceChoice::Cpu => embed_on(&cuattn::runtime::Cpu, &args, &texts),
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
            embed_on(&cuattn::runtime::Cpu, args, texts)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn embed_cuda(args: &EmbedArgs, texts: &[String], fallback: bool) -> CliResult {
    if fallback {
        embed_on(&cuattn::runtime::Cpu, args, texts)
    } else {
        Err(cuattn::Error::CudaDisabled.into())
    }
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
