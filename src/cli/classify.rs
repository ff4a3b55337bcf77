//! `cuattn classify --model DIR [TEXT ...]`: the predicted label and its probability for each
//! text with a `BertForSequenceClassification` folder (one written by `cuattn finetune`, or
//! any Hugging Face one with a fast tokenizer), on the CPU or the GPU.

use super::{CliResult, DeviceChoice};
use cuattn::finetune::classify::SequenceClassifier;
use cuattn::runtime::Backend;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ClassifyArgs {
    /// A BertForSequenceClassification folder (config.json with id2label, model.safetensors,
    /// tokenizer.json).
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Storage type on the GPU (the CPU computes in f32).
    #[arg(long, default_value = "f32")]
    dtype: cuattn::DType,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Read texts from FILE, one per line (`-`: standard input), after any TEXT.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Print one JSON object {"labels", "probabilities", "logits", "id2label"} in input order.
    #[arg(long)]
    json: bool,
    text: Vec<String>,
}

pub fn run(args: ClassifyArgs) -> CliResult {
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
        DeviceChoice::Cpu => classify_on(&cuattn::runtime::Cpu, &args, &texts),
        DeviceChoice::Cuda => classify_cuda(&args, &texts, false),
        DeviceChoice::Auto => classify_cuda(&args, &texts, true),
    }
}

#[cfg(feature = "cuda")]
fn classify_cuda(args: &ClassifyArgs, texts: &[String], fallback: bool) -> CliResult {
    match cuattn::gpu::Gpu::shared()
        .and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, args.dtype))
    {
        Ok(be) => classify_on(&be, args, texts),
        Err(e) if fallback => {
            eprintln!("no usable GPU ({e}); classifying on the CPU");
            classify_on(&cuattn::runtime::Cpu, args, texts)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(feature = "cuda"))]
fn classify_cuda(args: &ClassifyArgs, texts: &[String], fallback: bool) -> CliResult {
    if fallback {
        classify_on(&cuattn::runtime::Cpu, args, texts)
    } else {
        Err(cuattn::Error::CudaDisabled.into())
    }
}

fn classify_on<B: Backend>(be: &B, args: &ClassifyArgs, texts: &[String]) -> CliResult {
    let model = SequenceClassifier::from_folder(be, &args.model)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let pred = model.predict(be, &refs, args.batch_size)?;
    let names = &model.head.labels.names;
    let labels: Vec<&str> = (0..texts.len())
        .map(|i| names[pred.argmax(i)].as_str())
        .collect();
    if args.json {
        let v = serde_json::json!({
            "labels": labels,
            "probabilities": pred.probabilities,
            "logits": pred.logits,
            "id2label": model.head.labels.id2label_json(),
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
        for (i, t) in texts.iter().enumerate() {
            let p = pred.probabilities[i][pred.argmax(i)];
            println!("{:<width$}  {p:.3}  {t}", labels[i]);
        }
    }
    Ok(ExitCode::SUCCESS)
}
