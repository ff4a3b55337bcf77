//! Trains Bahdanau's RNN with additive attention, the original Transformer, or a decoder-only
//! model with GPT-3's alternating dense and local attention (`gpt3-sparse`; `gpt3-dense` has
//! every layer global) from scratch on a generated digit task, then measures exact-sequence
//! accuracy on held-out sources by greedy decoding and draws the loss curve and one test
//! example's attention (source × target).
//!
//!     cargo run --release --example seq2seq -- --arch bahdanau|transformer|gpt3-sparse|gpt3-dense \
//!         --task reverse|sort|add [--device auto|cpu|cuda] [--seed S] [--steps N] [--json]
//!
//! `--cell gru|lstm` picks Bahdanau's recurrent cell (default gru; the LSTM's PNGs are named
//! `bahdanau-lstm-…`).
//!
//! The decoder-only models read `source <s> target </s>` as one sequence (loss on the target
//! part). `--task text` trains them as byte-level language models on a text corpus
//! (`--corpus`, default `data/kjv/genesis.txt`), saves the model as a Hugging Face GPT-Neo
//! folder (`--save`, default `target/seq2seq/gpt3-sparse-text`) that `cuattn generate --model
//! DIR "prompt"` loads, and with `--compare-dense` trains the all-global model on the same
//! batches too and draws both loss curves on one PNG.
//!
//! Training stops after `--steps` optimizer steps, or earlier once greedy decoding gets at
//! least 99.5% of `--val-size` validation examples (training split, fresh draws) right at two
//! evaluations in a row.
//! The test set (held out by content, see `cuattn::runtime::seq2seq::tasks`) is only decoded
//! at the end. `--json` prints one final line:
//! `{"arch","task","steps","seconds","sequence_accuracy","attention_png","loss_png"}`, with
//! `"cell"` for Bahdanau.
//! `--beams N` (the Transformer) decodes the test set by beam search through the shared
//! decoding loop (`cuattn::runtime::generate`); `sequence_accuracy` is then the beam search's
//! and `greedy_sequence_accuracy` is added.

use clap::{Parser, ValueEnum};
use cuattn::finetune::train_log::{plot_loss, StepRecord};
use cuattn::runtime::generate::GenerateBackend;
use cuattn::runtime::seq2seq::tasks::{render, Example, Sampler, Task, VOCAB};
use cuattn::runtime::seq2seq::{
    Bahdanau, BahdanauConfig, Cell, Decoded, Gpt3, Gpt3Config, Seq2Seq, Seq2SeqBatch, Transformer,
    TransformerConfig, EOS,
};
use cuattn::runtime::train::{AdamW, AdamWConfig, CrossEntropy, TrainBackend};
use cuattn::runtime::Cpu;
use cuattn::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Arch {
    Bahdanau,
    Transformer,
    /// Decoder-only, layers alternating global and local (sliding-window) causal attention.
    #[value(name = "gpt3-sparse")]
    Gpt3Sparse,
    /// Decoder-only, every layer global.
    #[value(name = "gpt3-dense")]
    Gpt3Dense,
}

/// A digit task, or `text` (decoder-only models: language modelling on `--corpus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TaskArg {
    Reverse,
    Sort,
    Add,
    Text,
}

/// Bahdanau's recurrent cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CellArg {
    Gru,
    Lstm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Parser, Debug)]
#[command(about = "Train a sequence-to-sequence model on a digit task")]
struct Args {
    #[arg(long, value_enum)]
    arch: Arch,
    #[arg(long, value_enum, default_value = "reverse")]
    task: TaskArg,
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Bahdanau's encoder and decoder cell (default gru).
    #[arg(long, value_enum)]
    cell: Option<CellArg>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most optimizer steps (default 3000).
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per optimizer step (default 64; 16 on text).
    #[arg(long)]
    batch: Option<usize>,
    /// Held-out test examples decoded at the end.
    #[arg(long, default_value_t = 1000)]
    test_size: usize,
    /// Validation examples (training split) decoded every `--eval-every` steps.
    #[arg(long, default_value_t = 200)]
    val_size: usize,
    #[arg(long, default_value_t = 250)]
    eval_every: usize,
    /// Where the PNGs go.
    #[arg(long, default_value = "target/seq2seq")]
    out: PathBuf,
    /// Label smoothing of the loss (the Transformer paper used 0.1).
    #[arg(long)]
    label_smoothing: Option<f32>,
    /// Model width: the Transformer's d_model (feed-forward 2·d), or the Bahdanau encoder's
    /// hidden size per direction (decoder state, alignment and output layers from it).
    #[arg(long)]
    width: Option<usize>,
    /// Layers of each Transformer stack (the decoder-only models: twice this).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Positions a local layer's query sees, itself included (gpt3-sparse; default 8 on the
    /// digit tasks, 16 on text).
    #[arg(long)]
    window: Option<usize>,
    /// Context of the decoder-only models on text (tokens per training sequence).
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// The text corpus of `--task text`.
    #[arg(long, default_value = "data/kjv/genesis.txt")]
    corpus: PathBuf,
    /// Where `--task text` saves the trained model (a Hugging Face GPT-Neo folder).
    #[arg(long)]
    save: Option<PathBuf>,
    /// `--task text`: also train the all-global model on the same batches and draw both
    /// loss curves on one PNG.
    #[arg(long)]
    compare_dense: bool,
    /// Peak learning rate (Bahdanau: constant; Transformer: the schedule's factor).
    #[arg(long)]
    lr: Option<f32>,
    /// The Transformer schedule's warm-up steps.
    #[arg(long, default_value_t = 400)]
    warmup: usize,
    /// Beam search with this many beams for the held-out test set (the Transformer; 1: greedy).
    #[arg(long, default_value_t = 1)]
    beams: usize,
    /// Print one JSON line at the end instead of the summary.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    if args.beams == 0 {
        return Err(Error::invalid("beams", "--beams must be ≥ 1"));
    }
    if args.beams > 1 && args.arch != Arch::Transformer {
        return Err(Error::invalid(
            "beams",
            "--beams decodes the Transformer through the shared decoding loop; the other \
             architectures decode greedily",
        ));
    }
    if args.cell.is_some() && args.arch != Arch::Bahdanau {
        return Err(Error::invalid(
            "cell",
            "--cell picks Bahdanau's recurrent cell; the other architectures have none",
        ));
    }
    if args.batch == Some(0) || args.val_size == 0 || args.test_size == 0 || args.eval_every == 0 {
        return Err(Error::invalid(
            "batch",
            "--batch, --val-size, --test-size and --eval-every must be ≥ 1",
        ));
    }
    // The decoder-only models train on the CPU: their local layers need the sliding window,
    // which the CUDA training attention does not take yet.
    let cpu_only = matches!(args.arch, Arch::Gpt3Sparse | Arch::Gpt3Dense);
    if args.task == TaskArg::Text {
        if args.device == Device::Cuda {
            return Err(cpu_only_error());
        }
        return text::run(&Cpu, args);
    }
    #[cfg(feature = "cuda")]
    if args.device == Device::Cuda || (args.device == Device::Auto && !cpu_only) {
        if cpu_only {
            return Err(cpu_only_error());
        }
        let device = cuattn::gpu::Gpu::shared()
            .and_then(|gpu| cuattn::runtime::cuda::Cuda::new(gpu, cuattn::DType::F32));
        match device {
            Ok(be) => {
                if !args.json {
                    eprintln!("device: CUDA (f32)");
                }
                return run_on(&be, args);
            }
            Err(e) if args.device == Device::Cuda => return Err(e),
            Err(_) if !args.json => eprintln!("device auto: no CUDA device, the CPU"),
            Err(_) => {}
        }
    }
    #[cfg(not(feature = "cuda"))]
    if args.device == Device::Cuda {
        return Err(Error::invalid(
            "device",
            "this build has no CUDA support (build with the `cuda` feature)",
        ));
    }
    if cpu_only && args.device == Device::Cuda {
        return Err(cpu_only_error());
    }
    run_on(&Cpu, args)
}

fn cpu_only_error() -> Error {
    Error::invalid(
        "device",
        "the gpt3 architectures train on the CPU only: the CUDA training attention has no \
         sliding window yet; use --device cpu",
    )
}

/// Trains and evaluates the digit-task model `args` names on backend `be`.
fn run_on<B: TrainBackend + GenerateBackend>(be: &B, args: &Args) -> Result<()> {
    let task = match args.task {
        TaskArg::Reverse => Task::Reverse,
        TaskArg::Sort => Task::Sort,
        TaskArg::Add => Task::Add,
        TaskArg::Text => return Err(Error::invalid("task", "text runs through text::run")),
    };
    match args.arch {
        Arch::Bahdanau => {
            let h = args.width.unwrap_or(32);
            let config = BahdanauConfig {
                vocab: VOCAB,
                emb: h / 2,
                enc_hidden: h,
                dec_hidden: 2 * h,
                attn: h,
                readout: 2 * h,
                cell: match args.cell {
                    None | Some(CellArg::Gru) => Cell::Gru,
                    Some(CellArg::Lstm) => Cell::Lstm,
                },
            };
            let mut model = Bahdanau::new(be, config, args.seed)?;
            let cell = Some(config.cell);
            train(
                be,
                &mut model,
                args,
                task,
                args.steps.unwrap_or(3000),
                None,
                cell,
            )
        }
        Arch::Transformer => {
            let d = args.width.unwrap_or(32);
            let config = TransformerConfig {
                vocab: VOCAB,
                d_model: d,
                heads: 4,
                ff: 2 * d,
                enc_layers: args.layers,
                dec_layers: args.layers,
                pre_ln: false,
                shared_embeddings: true,
                ln_eps: 1e-5,
            };
            let mut model = Transformer::new(be, config, args.seed)?;
            let beams = args.beams;
            let beam = move |m: &Transformer<B>, srcs: &[Vec<u32>], max_len: usize| {
                let g = m.beam_search(be, srcs, max_len, beams, 1.0)?;
                // Generated tokens end with EOS when the hypothesis finished.
                Ok(g.generated
                    .into_iter()
                    .map(|mut t| {
                        if t.last() == Some(&EOS) {
                            t.pop();
                        }
                        t
                    })
                    .collect())
            };
            let beam: Option<&BeamFn<'_, Transformer<B>>> = (beams > 1).then_some(&beam);
            train(
                be,
                &mut model,
                args,
                task,
                args.steps.unwrap_or(3000),
                beam,
                None,
            )
        }
        Arch::Gpt3Sparse | Arch::Gpt3Dense => {
            let d = args.width.unwrap_or(32);
            let config = Gpt3Config {
                vocab: VOCAB,
                d_model: d,
                heads: 4,
                ff: 4 * d,
                // Source, separator, target and EOS of the longest example, with room.
                context: 2 * task.max_target_len() + 8,
                attention: Gpt3Config::alternating(2 * args.layers, args.arch == Arch::Gpt3Dense),
                window: args.window.unwrap_or(8),
                ln_eps: 1e-5,
                eos: EOS,
            };
            let mut model = Gpt3::new(be, config, args.seed)?;
            train(
                be,
                &mut model,
                args,
                task,
                args.steps.unwrap_or(3000),
                None,
                None,
            )
        }
    }
}

/// The rate of step `step` (from 1): for the Transformer the paper's
/// factor·d^−½·min(step^−½, step·warmup^−3/2); for the RNN a constant (Adam's default 1e-3
/// unless `--lr`).
fn learning_rate(args: &Args, d_model: usize, step: usize) -> f32 {
    match args.arch {
        Arch::Bahdanau => args.lr.unwrap_or(1e-3),
        Arch::Transformer | Arch::Gpt3Sparse | Arch::Gpt3Dense => {
            let (s, w) = (step as f64, args.warmup.max(1) as f64);
            let factor = args.lr.unwrap_or(1.0) as f64;
            (factor * (d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * w.powf(-1.5))) as f32
        }
    }
}

/// `--batch` on the digit tasks (default 64).
fn batch_size(args: &Args) -> usize {
    args.batch.unwrap_or(64)
}

fn pairs(examples: &[Example]) -> Vec<(Vec<u32>, Vec<u32>)> {
    examples
        .iter()
        .map(|e| (e.src.clone(), e.tgt.clone()))
        .collect()
}

/// Greedy decodes in batches; returns the decodes and the fraction exactly right.
fn evaluate<B: TrainBackend, M: Seq2Seq<B>>(
    be: &B,
    model: &M,
    examples: &[Example],
    task: Task,
) -> Result<(Vec<Decoded>, f64)> {
    let mut out = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(250) {
        let srcs: Vec<Vec<u32>> = chunk.iter().map(|e| e.src.clone()).collect();
        out.extend(model.greedy(be, &srcs, task.max_target_len() + 2)?);
    }
    let right = out
        .iter()
        .zip(examples)
        .filter(|(d, e)| d.tokens == e.tgt)
        .count();
    Ok((out, right as f64 / examples.len() as f64))
}

/// Decodes sources (at most `max_len` tokens each) to their tokens without EOS.
type BeamFn<'a, M> = dyn Fn(&M, &[Vec<u32>], usize) -> Result<Vec<Vec<u32>>> + 'a;

/// Trains `model` (Bahdanau's with its `cell`) and reports.
fn train<B: TrainBackend, M: Seq2Seq<B>>(
    be: &B,
    model: &mut M,
    args: &Args,
    task: Task,
    max_steps: usize,
    beam: Option<&BeamFn<'_, M>>,
    cell: Option<Cell>,
) -> Result<()> {
    let arch = args.arch;
    let d_model = args.width.unwrap_or(32);
    let (beta2, eps) = match arch {
        Arch::Bahdanau => (0.999, 1e-8),
        Arch::Transformer | Arch::Gpt3Sparse | Arch::Gpt3Dense => (0.98, 1e-9),
    };
    let mut opt = AdamW::new(
        be,
        model.parameters(),
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2,
            eps,
            weight_decay: 0.0,
        },
    )?;
    let ce = CrossEntropy {
        label_smoothing: args.label_smoothing.unwrap_or(0.0),
        ..CrossEntropy::default()
    };
    let mut train_set = Sampler::new(task, false, args.seed);
    let val = Sampler::new(task, false, args.seed.wrapping_add(1_000_003)).batch(args.val_size);
    let test = Sampler::new(task, true, args.seed).batch(args.test_size);

    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(max_steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let mut records = Vec::with_capacity(max_steps);
    let mut good_evals = 0;
    let mut steps = 0;
    for step in 1..=max_steps {
        let t0 = Instant::now();
        let batch = Seq2SeqBatch::from_pairs(&pairs(&train_set.batch(batch_size(args))))?;
        let (loss, mut grads) = model.loss_and_grads(be, &batch, &ce)?;
        if !loss.is_finite() {
            return Err(Error::invalid(
                "loss",
                format!("non-finite loss {loss} at step {step}"),
            ));
        }
        grads.clip_global_norm(be, 1.0)?;
        let lr = learning_rate(args, d_model, step);
        opt.step(be, model.parameters_mut(), &grads, lr)?;
        records.push(StepRecord {
            step,
            epoch: 1,
            loss: loss as f64,
            lr: lr as f64,
            samples_per_s: batch_size(args) as f64 / t0.elapsed().as_secs_f64(),
            eval: None,
        });
        steps = step;
        bar.inc(1);
        if step % 20 == 0 {
            bar.set_message(format!("loss {loss:.4}"));
        }
        if step % args.eval_every == 0 {
            let (_, acc) = evaluate(be, model, &val, task)?;
            bar.set_message(format!("loss {loss:.4} val acc {acc:.3}"));
            if !args.json {
                bar.println(format!(
                    "step {step}: loss {loss:.4}, validation sequence accuracy {acc:.3} ({:.0} s)",
                    start.elapsed().as_secs_f64()
                ));
            }
            good_evals = if acc >= 0.995 { good_evals + 1 } else { 0 };
            if good_evals >= 2 {
                break;
            }
        }
    }
    bar.finish_and_clear();
    let train_seconds = start.elapsed().as_secs_f64();
    let (decoded, greedy_accuracy) = evaluate(be, model, &test, task)?;
    let beam_accuracy = match beam {
        Some(decode) => {
            let mut right = 0;
            for chunk in test.chunks(250) {
                let srcs: Vec<Vec<u32>> = chunk.iter().map(|e| e.src.clone()).collect();
                let got = decode(model, &srcs, task.max_target_len() + 2)?;
                right += got.iter().zip(chunk).filter(|(g, e)| **g == e.tgt).count();
            }
            Some(right as f64 / test.len() as f64)
        }
        None => None,
    };
    let accuracy = beam_accuracy.unwrap_or(greedy_accuracy);
    let seconds = start.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out).map_err(|e| Error::Io {
        path: args.out.display().to_string(),
        source: e,
    })?;
    // The GRU keeps the plain name; another cell gets its own files.
    let label = match cell {
        Some(c) if c != Cell::Gru => format!("{}-{}", model.arch(), c.name()),
        _ => model.arch().to_string(),
    };
    let stem = format!("{label}-{}", task.name());
    let loss_png = args.out.join(format!("{stem}-loss.png"));
    plot_loss(
        &loss_png,
        &records,
        &format!("{label} on {}: training loss", task.name()),
    )?;
    // The longest test source shows the most alignment.
    let pick = (0..test.len())
        .max_by_key(|&i| (test[i].src.len(), std::cmp::Reverse(i)))
        .unwrap_or(0);
    let attention_png = args.out.join(format!("{stem}-attention.png"));
    plot_attention(&attention_png, &test[pick], &decoded[pick], &label)?;

    if args.json {
        let mut line = serde_json::json!({
            "arch": model.arch(),
            "task": task.name(),
            "steps": steps,
            "seconds": (seconds * 10.0).round() / 10.0,
            "sequence_accuracy": accuracy,
            "attention_png": attention_png.display().to_string(),
            "loss_png": loss_png.display().to_string(),
        });
        if let Some(c) = cell {
            line["cell"] = c.name().into();
        }
        if beam_accuracy.is_some() {
            line["beams"] = args.beams.into();
            line["greedy_sequence_accuracy"] = greedy_accuracy.into();
        }
        println!("{line}");
    } else {
        println!(
            "{} on {}: {steps} steps in {train_seconds:.1} s ({} parameters); held-out exact-sequence accuracy {accuracy:.4} on {} examples",
            label,
            task.name(),
            model
                .parameters()
                .iter()
                .map(|p| be.shape(&p.value).iter().product::<usize>())
                .sum::<usize>(),
            test.len()
        );
        if beam_accuracy.is_some() {
            println!(
                "(beam search with {} beams; greedy decoding: {greedy_accuracy:.4})",
                args.beams
            );
        }
        println!(
            "example: {} → {} (expected {})",
            render(&test[pick].src),
            render(&decoded[pick].tokens),
            render(&test[pick].tgt)
        );
        println!(
            "wrote {} and {}",
            loss_png.display(),
            attention_png.display()
        );
    }
    Ok(())
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The attention of every output step (rows, EOS last) over the source tokens (columns, EOS
/// last) as a grey-scale grid.
fn plot_attention(path: &Path, ex: &Example, d: &Decoded, arch: &str) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| io_err(path, e);
    let mut src: Vec<String> = ex.src.iter().map(|&t| render(&[t])).collect();
    src.push("</s>".into());
    let mut out: Vec<String> = d.tokens.iter().map(|&t| render(&[t])).collect();
    out.push("</s>".into());
    let (cols, rows) = (src.len(), d.attention.len().max(1));
    let cell = 40u32;
    let root = BitMapBackend::new(path, (cols as u32 * cell + 140, rows as u32 * cell + 140))
        .into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{arch}: attention (source × output)"),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(36)
        // Doubled integer coordinates: cell (i, j) spans 2j−1..2j+1, so the even positions
        // where the labels go are the cells' centres.
        .build_cartesian_2d(-1..2 * cols as i32 - 1, 2 * rows as i32 - 1..-1)
        .map_err(|e| err(&e))?;
    let (sx, so) = (src.clone(), out.clone());
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(2 * cols + 1)
        .y_labels(2 * rows + 1)
        .x_label_formatter(&move |&x| centre_label(&sx, x))
        .y_label_formatter(&move |&y| centre_label(&so, y))
        .x_desc("source")
        .y_desc("output")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(d.attention.iter().enumerate().flat_map(|(i, row)| {
            row.iter().enumerate().map(move |(j, &a)| {
                let v = (255.0 * (1.0 - a.clamp(0.0, 1.0))) as u8;
                let (x, y) = (2 * j as i32, 2 * i as i32);
                Rectangle::new([(x - 1, y - 1), (x + 1, y + 1)], RGBColor(v, v, v).filled())
            })
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The label of the cell centred at doubled coordinate `x` (none between cells).
fn centre_label(labels: &[String], x: i32) -> String {
    if x < 0 || x % 2 != 0 {
        return String::new();
    }
    labels.get(x as usize / 2).cloned().unwrap_or_default()
}

#[path = "seq2seq/text.rs"]
mod text;
