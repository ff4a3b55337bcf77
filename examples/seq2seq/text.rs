//! `--task text`: the decoder-only models as byte-level language models on a text corpus,
//! saved as a Hugging Face GPT-Neo folder (see the example's docs).

use super::{Arch, Args};
use cuattn::finetune::train_log::StepRecord;
use cuattn::plots::curves::{self, Series};
use cuattn::runtime::gpt_neo::AttentionKind;
use cuattn::runtime::seq2seq::hf_export::{encode_bytes, save_gpt_neo, BYTE_VOCAB, END_OF_TEXT_ID};
use cuattn::runtime::seq2seq::text::TextCorpus;
use cuattn::runtime::seq2seq::{Gpt3, Gpt3Config, Seq2Seq};
use cuattn::runtime::train::{AdamW, AdamWConfig, CrossEntropy, TrainBackend};
use cuattn::runtime::Cpu;
use cuattn::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// What one model's training gave.
struct Trained {
    arch: &'static str,
    records: Vec<StepRecord>,
    val_loss: f64,
    seconds: f64,
    model: Gpt3<Cpu>,
}

/// `--batch` on text (default 16).
fn batch(args: &Args) -> usize {
    args.batch.unwrap_or(16)
}

fn config(args: &Args, dense: bool) -> Gpt3Config {
    let d = args.width.unwrap_or(64);
    Gpt3Config {
        vocab: BYTE_VOCAB,
        d_model: d,
        heads: 4,
        ff: 4 * d,
        context: args.context,
        attention: Gpt3Config::alternating(2 * args.layers, dense),
        window: args.window.unwrap_or(16),
        ln_eps: 1e-5,
        eos: END_OF_TEXT_ID,
    }
}

/// Linear warm-up to the peak rate over `warmup` steps, then a cosine decay to a tenth of it.
fn learning_rate(peak: f32, warmup: usize, steps: usize, step: usize) -> f32 {
    if step <= warmup {
        return peak * step as f32 / warmup.max(1) as f32;
    }
    let t = (step - warmup) as f32 / (steps - warmup).max(1) as f32;
    peak * (0.1 + 0.45 * (1.0 + (std::f32::consts::PI * t.min(1.0)).cos()))
}

/// Mean loss over a fixed set of validation windows.
fn validation_loss(be: &Cpu, model: &Gpt3<Cpu>, corpus: &TextCorpus, args: &Args) -> Result<f64> {
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x5a17);
    let mut sum = 0.0;
    let n = 8;
    for _ in 0..n {
        let b = corpus.batch(&mut rng, true, batch(args), args.context)?;
        let f = model.forward(be, &b.ids, b.batch, b.len)?;
        let logits = model.logits(be, &f.hidden)?;
        let (loss, _) = be.cross_entropy(&logits, &b.labels, &CrossEntropy::default())?;
        sum += loss as f64;
    }
    Ok(sum / n as f64)
}

fn train_one(
    be: &Cpu,
    args: &Args,
    corpus: &TextCorpus,
    dense: bool,
    steps: usize,
) -> Result<Trained> {
    let mut model = Gpt3::new(be, config(args, dense), args.seed)?;
    let arch = model.arch();
    let mut opt = AdamW::new(
        be,
        model.parameters(),
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )?;
    // The same seed for both models: they see the same batches in the same order.
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(arch);
    let (peak, warmup) = (args.lr.unwrap_or(2e-3), args.warmup.min(steps / 10));
    let start = Instant::now();
    let mut records = Vec::with_capacity(steps);
    for step in 1..=steps {
        let t0 = Instant::now();
        let b = corpus.batch(&mut rng, false, batch(args), args.context)?;
        let (loss, mut grads) = model.lm_loss_and_grads(
            be,
            &b.ids,
            &b.labels,
            b.batch,
            b.len,
            &CrossEntropy::default(),
        )?;
        if !loss.is_finite() {
            return Err(Error::invalid(
                "loss",
                format!("non-finite loss {loss} at step {step}"),
            ));
        }
        grads.clip_global_norm(be, 1.0)?;
        let lr = learning_rate(peak, warmup, steps, step);
        opt.step(be, model.parameters_mut(), &grads, lr)?;
        records.push(StepRecord {
            step,
            epoch: 1,
            loss: loss as f64,
            lr: lr as f64,
            samples_per_s: batch(args) as f64 / t0.elapsed().as_secs_f64(),
            eval: None,
        });
        bar.inc(1);
        if step % 10 == 0 {
            bar.set_message(format!("{arch} loss {loss:.3}"));
        }
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let val_loss = validation_loss(be, &model, corpus, args)?;
    Ok(Trained {
        arch,
        records,
        val_loss,
        seconds,
        model,
    })
}

/// Greedy continuation of `prompt` for `n` bytes (recomputing the window each step).
fn continue_text(be: &Cpu, model: &Gpt3<Cpu>, prompt: &str, n: usize) -> Result<String> {
    let mut ids = encode_bytes(prompt);
    let ctx = model.config.context;
    for _ in 0..n {
        let start = ids.len().saturating_sub(ctx);
        let logits = model.sequence_logits(be, &ids[start..])?;
        let v = model.config.vocab;
        let last = &logits[logits.len() - v..];
        let next = (0..v).fold(0, |best, i| if last[i] > last[best] { i } else { best });
        if next as u32 == END_OF_TEXT_ID {
            break;
        }
        ids.push(next as u32);
    }
    let bytes: Vec<u8> = ids.iter().map(|&t| t as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

pub fn run(be: &Cpu, args: &Args) -> Result<()> {
    let dense_first = match args.arch {
        Arch::Gpt3Sparse => false,
        Arch::Gpt3Dense => true,
        _ => {
            return Err(Error::invalid(
                "arch",
                "--task text trains the decoder-only models: --arch gpt3-sparse or gpt3-dense",
            ))
        }
    };
    let corpus = TextCorpus::from_file(&args.corpus)?;
    let steps = args.steps.unwrap_or(600);
    std::fs::create_dir_all(&args.out).map_err(|e| Error::Io {
        path: args.out.display().to_string(),
        source: e,
    })?;
    let mut runs = vec![train_one(be, args, &corpus, dense_first, steps)?];
    if args.compare_dense && !dense_first {
        runs.push(train_one(be, args, &corpus, true, steps)?);
    }
    let main = &runs[0];
    let dir = args
        .save
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("target/seq2seq/{}-text", main.arch)));
    save_gpt_neo(be, &main.model, &dir, true)?;
    // The trained model's logits on the first context of the validation text (longer than
    // the window), for scripts/check_gpt_neo_export.py to compare Hugging Face's against.
    let ids = &corpus.val[..main.model.config.context.min(corpus.val.len())];
    let logits = main.model.sequence_logits(be, ids)?;
    let logits_json = args.out.join(format!("{}-text-logits.json", main.arch));
    let rows: Vec<&[f32]> = logits.chunks(main.model.config.vocab).collect();
    std::fs::write(
        &logits_json,
        serde_json::json!({"ids": ids, "logits": rows}).to_string(),
    )
    .map_err(|e| Error::Io {
        path: logits_json.display().to_string(),
        source: e,
    })?;
    let loss_png = args.out.join(format!("{}-text-loss.png", main.arch));
    let series: Vec<Series> = runs
        .iter()
        .map(|r| Series {
            label: format!(
                "{} ({} layers{})",
                r.arch,
                r.model.config.attention.len(),
                if r.model.config.attention.contains(&AttentionKind::Local) {
                    format!(", window {}", r.model.config.window)
                } else {
                    String::new()
                }
            ),
            points: r.records.iter().map(|s| (s.step as f64, s.loss)).collect(),
        })
        .collect();
    curves::draw(
        &loss_png,
        &format!(
            "byte-level language model on {}: training loss",
            args.corpus
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        "optimizer step",
        "cross-entropy loss (nats per byte)",
        &series,
    )?;
    if args.json {
        let runs_json: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "arch": r.arch,
                    "seconds": (r.seconds * 10.0).round() / 10.0,
                    "final_train_loss": r.records.last().map(|s| s.loss),
                    "val_loss": r.val_loss,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "task": "text",
                "steps": steps,
                "runs": runs_json,
                "model_dir": dir.display().to_string(),
                "logits_json": logits_json.display().to_string(),
                "loss_png": loss_png.display().to_string(),
            })
        );
    } else {
        for r in &runs {
            println!(
                "{}: {steps} steps in {:.1} s; last training loss {:.3}, validation loss {:.3} nats/byte",
                r.arch,
                r.seconds,
                r.records.last().map_or(f64::NAN, |s| s.loss),
                r.val_loss
            );
        }
        let prompt = "And God said";
        println!(
            "greedy sample: {:?}",
            continue_text(be, &main.model, prompt, 120)?
        );
        println!(
            "wrote {} and the model folder {} (try: cuattn generate --model {} \"{prompt}\")",
            loss_png.display(),
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}
