//! `cuattn finetune --model DIR --train FILE --out DIR`: fine-tunes a BERT folder for sequence
//! classification (a new head on a bare encoder, or an existing head trained further) and
//! writes a Hugging Face folder, `train_log.csv` and `loss.png`.

use super::{CliResult, DeviceChoice};
use cuattn::finetune::classify::{require_tokenizer, HeadConfig};
use cuattn::finetune::data::{self, Example, LabelSet};
use cuattn::finetune::export;
use cuattn::finetune::schedule::ScheduleKind;
use cuattn::finetune::session::{BertTrainee, HeadChoice};
use cuattn::finetune::train_log;
use cuattn::finetune::trainer::{self, TrainOptions};
use cuattn::runtime::checkpoint::{read_json, Checkpoint};
use cuattn::runtime::tokenizer::Tokenizer;
use cuattn::runtime::train::TrainBackend;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// A BERT folder: a bare encoder (gets a new classification head) or a
    /// BertForSequenceClassification (its head is trained further). Needs tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// Training examples: .tsv/.csv with a header naming `text` (or `sentence`) and `label`,
    /// or .jsonl objects with `text` and `label`.
    #[arg(long)]
    train: PathBuf,
    /// Evaluation examples (same formats), scored at the end of every epoch.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Output folder (must not exist, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace the files of an existing output folder.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Number of optimizer steps (overrides --epochs; the data is cycled as needed).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// AdamW weight decay (not applied to biases and LayerNorm weights).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Steps of linear warm-up from 0.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, value_enum, default_value = "linear")]
    schedule: ScheduleKind,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Truncate inputs to this many tokens (special tokens included).
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// Seeds the shuffling, dropout and a new head's initialisation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the training file's order.
    #[arg(long)]
    no_shuffle: bool,
    /// Micro-batches whose gradients make one optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Compute type on the GPU (f32 master weights either way); the CPU trains in f32.
    #[arg(long, default_value = "f32")]
    dtype: cuattn::DType,
    /// Print one JSON object {"steps", "losses", "eval", "out"} at the end.
    #[arg(long)]
    json: bool,
}

/// Everything read and checked before a model is loaded.
struct Prepared {
    opts: TrainOptions,
    head: HeadChoice,
    labels: LabelSet,
    source_config: serde_json::Value,
    train: Vec<Example>,
    eval: Option<Vec<Example>>,
}

fn prepare(args: &FinetuneArgs) -> Result<Prepared, Box<dyn std::error::Error>> {
    let opts = TrainOptions {
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        weight_decay: args.weight_decay,
        warmup_steps: args.warmup_steps,
        schedule: args.schedule,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        shuffle: !args.no_shuffle,
        eval_batch_size: args.batch_size.max(32),
    };
    opts.validate()?;
    export::check_out_dir(&args.out, &args.model, args.overwrite)?;
    let config_path = args.model.join("config.json");
    let source_config = read_json(&config_path)?;
    require_tokenizer(&args.model)?;
    let has_head = Checkpoint::open(&args.model.join("model.safetensors"))?
        .names()
        .any(|n| n == "classifier.weight");
    let train_rows = data::read_file(&args.train)?;
    let (labels, head) = if has_head {
        let hc = HeadConfig::from_json(&config_path, &source_config)?;
        (hc.labels, HeadChoice::Existing)
    } else {
        let labels = LabelSet::from_training(&args.train, &train_rows)?;
        let n = labels.len();
        (labels, HeadChoice::New { num_labels: n })
    };
    let train = labels.assign(&args.train, train_rows)?;
    let eval = match &args.eval {
        Some(p) => Some(labels.assign(p, data::read_file(p)?)?),
        None => None,
    };
    Ok(Prepared {
        opts,
        head,
        labels,
        source_config,
        train,
        eval,
    })
}

pub fn run(args: FinetuneArgs) -> CliResult {
    let prepared = prepare(&args)?;
    match args.device {
        DeviceChoice::Cpu => {
            if args.dtype != cuattn::DType::F32 {
                return Err(format!(
                    "--dtype {}: the CPU trains in f32 (mixed precision is for --device cuda)",
                    args.dtype
                )
                .into());
            }
            finetune_on(&cuattn::runtime::Cpu, &args, prepared)
        }
        DeviceChoice::Cuda => finetune_cuda(&args, prepared, false),
        DeviceChoice::Auto => finetune_cuda(&args, prepared, true),
    }
}

/// The CUDA backend does not implement the training runtime yet (`docs/training.md`): `cuda`
/// says so; `auto` trains on the CPU.
fn finetune_cuda(args: &FinetuneArgs, prepared: Prepared, fallback: bool) -> CliResult {
    if fallback {
        if !args.json {
            eprintln!("training on the CPU in f32 (GPU training is not implemented yet)");
        }
        return finetune_on(&cuattn::runtime::Cpu, args, prepared);
    }
    Err(
        "--device cuda: the CUDA backend does not implement training yet (the training \
         runtime runs on the CPU; use --device cpu)"
            .into(),
    )
}

fn finetune_on<B: TrainBackend>(be: &B, args: &FinetuneArgs, p: Prepared) -> CliResult {
    let mut model = BertTrainee::load(be, &args.model, p.head, &p.opts)?;
    let positions = model.max_positions();
    let tokenizer = Tokenizer::from_file(
        &args.model.join("tokenizer.json"),
        args.max_len.min(positions),
    )?;
    let encode = |texts: &[&str]| tokenizer.encode_batch(texts);
    let total = p.opts.total_steps(p.train.len());
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{bar:30} step {pos}/{len} {msg} (eta {eta})",
    )?);
    if !args.json {
        eprintln!(
            "fine-tuning {} on {} ({} examples, {} labels: {}) for {total} steps, on {}",
            args.model.display(),
            args.train.display(),
            p.train.len(),
            p.labels.len(),
            p.labels.names.join(", "),
            be.describe()
        );
    }
    let report = trainer::train(
        &mut model,
        &encode,
        &p.train,
        p.eval.as_deref(),
        &p.opts,
        |r, _| {
            bar.set_position(r.step as u64);
            bar.set_message(format!(
                "epoch {} loss {:.4} lr {:.2e} {:.1} samples/s",
                r.epoch, r.loss, r.lr, r.samples_per_s
            ));
            if let (Some(m), false) = (r.eval, args.json) {
                let line = format!(
                    "epoch {}: eval loss {:.4}, accuracy {:.4}",
                    r.epoch, m.loss, m.accuracy
                );
                // A hidden bar (stderr not a terminal) prints nothing of its own.
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
            }
        },
    )?;
    bar.finish_and_clear();

    export::create_out_dir(&args.out)?;
    let config = export::classification_config(&p.source_config, &p.labels);
    export::write_config_and_tokenizer(&args.out, &args.model, &config)?;
    model.save(&args.out.join("model.safetensors"))?;
    train_log::write_csv(&args.out.join("train_log.csv"), &report.records)?;
    train_log::plot_loss(
        &args.out.join("loss.png"),
        &report.records,
        &format!(
            "fine-tuning {} on {}",
            args.model
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy()),
            args.train
                .file_name()
                .map_or("data".into(), |n| n.to_string_lossy())
        ),
    )?;

    let losses: Vec<f64> = report.records.iter().map(|r| r.loss).collect();
    if args.json {
        let v = serde_json::json!({
            "steps": report.records.len(),
            "losses": losses,
            "eval": report.final_eval,
            "out": args.out.display().to_string(),
        });
        println!("{}", serde_json::to_string(&v)?);
    } else {
        let mean_sps = report.records.iter().map(|r| r.samples_per_s).sum::<f64>()
            / report.records.len().max(1) as f64;
        println!(
            "trained {} steps: loss {:.4} -> {:.4}, {mean_sps:.1} samples/s",
            report.records.len(),
            losses.first().copied().unwrap_or(f64::NAN),
            losses.last().copied().unwrap_or(f64::NAN),
        );
        if let Some(m) = report.final_eval {
            println!(
                "eval ({}): accuracy {:.4}, loss {:.4}",
                args.eval
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
                m.accuracy,
                m.loss
            );
        }
        println!("wrote {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}
