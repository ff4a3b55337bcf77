//! Trains a BART folder a few steps on BART's text-infilling objective over a text corpus and
//! saves it as a Hugging Face folder, on the CPU:
//!
//!     cargo run --release --no-default-features --example bart_denoise -- \
//!         [--model tests/fixtures/tiny-bart] [--corpus data/kjv/genesis.txt] [--steps 20] \
//!         [--batch 4] [--max-tokens 48] [--lr 1e-3] [--seed 0] [--dropout P] \
//!         [--layerdrop P] [--recompute] [--out target/bart-denoise]
//!
//! Each sentence of the corpus (`cuattn::data::noise::split_sentences`) becomes
//! `<s> tokens </s>` (at most `--max-tokens` tokens between them); the encoder reads it after
//! text infilling (30% of the words, span lengths Poisson(3), whole words: a token whose bytes
//! start with a space starts a word) and the decoder learns to restore it. `--dropout` and
//! `--layerdrop` override the config's probabilities (`dropout`, both stacks' LayerDrop);
//! `--recompute` keeps only each layer's input in the forward. The trained model goes to
//! `--out` through `save_pretrained` with the model folder's tokenizer and generation files,
//! so `cuattn generate --model OUT` and `BartForConditionalGeneration.from_pretrained(OUT)`
//! load it; the example reads it back and checks that the reloaded model's loss on the first
//! batch is the trained model's, bit for bit.

use clap::Parser;
use cuattn::data::noise::{infill, split_sentences, NoiseOptions};
use cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer;
use cuattn::runtime::train::{
    AdamW, AdamWConfig, BartForConditionalGeneration, DenoisingBatch, StepOptions,
};
use cuattn::runtime::Cpu;
use cuattn::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "tests/fixtures/tiny-bart")]
    model: PathBuf,
    #[arg(long, default_value = "data/kjv/genesis.txt")]
    corpus: PathBuf,
    #[arg(long, default_value_t = 20)]
    steps: u64,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens kept of each sentence (between `<s>` and `</s>`).
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Overrides the config's `dropout`.
    #[arg(long)]
    dropout: Option<f32>,
    /// Overrides both stacks' LayerDrop probability.
    #[arg(long)]
    layerdrop: Option<f32>,
    #[arg(long)]
    recompute: bool,
    #[arg(long, default_value = "target/bart-denoise")]
    out: PathBuf,
}

/// Files of the model folder copied next to the saved weights when present.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// One sentence: `<s> tokens </s>` and which tokens start a word.
struct Sentence {
    ids: Vec<u32>,
    starts: Vec<bool>,
}

fn sentences(args: &Args, tok: &Gpt2Tokenizer, bos: u32, eos: u32) -> Result<Vec<Sentence>> {
    let text = std::fs::read_to_string(&args.corpus).map_err(|e| Error::Io {
        path: args.corpus.display().to_string(),
        source: e,
    })?;
    let mut out = Vec::new();
    for s in split_sentences(&text) {
        // A leading space, as BART's tokenizer (add_prefix_space) gives the first word.
        let mut inner = tok.encode(&format!(" {}", s.trim()))?;
        inner.truncate(args.max_tokens);
        if inner.len() < 4 {
            continue;
        }
        let starts = inner
            .iter()
            .map(|&id| Ok(tok.token_bytes(id)?.first() == Some(&b' ')))
            .collect::<Result<Vec<bool>>>()?;
        let mut ids = vec![bos];
        ids.extend(inner);
        ids.push(eos);
        out.push(Sentence { ids, starts });
    }
    if out.is_empty() {
        return Err(Error::invalid("corpus", "no sentence of 4 tokens or more"));
    }
    Ok(out)
}

/// Batch `step`: the next `n` sentences (cycling), noised by text infilling seeded by
/// (seed, step, row); inputs padded with `pad`, labels with −100.
fn batch(
    all: &[Sentence],
    n: usize,
    step: u64,
    seed: u64,
    mask: u32,
    pad: u32,
) -> Result<DenoisingBatch> {
    let rows: Vec<&Sentence> = (0..n)
        .map(|i| &all[(step as usize * n + i) % all.len()])
        .collect();
    let mut noised = Vec::with_capacity(n);
    for (i, s) in rows.iter().enumerate() {
        let inner = &s.ids[1..s.ids.len() - 1];
        let opts = NoiseOptions {
            ratio: 0.3,
            poisson_lambda: 3.0,
            seed: seed ^ (step << 16) ^ i as u64,
        };
        let (out, _) = infill(inner, &s.starts, &mask, &opts)?;
        let mut ids = vec![s.ids[0]];
        ids.extend(out);
        ids.push(*s.ids.last().expect("<s> … </s>"));
        noised.push(ids);
    }
    let len_in = noised.iter().map(Vec::len).max().unwrap_or(0);
    let len_out = rows.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut b = DenoisingBatch {
        input_ids: Vec::with_capacity(n * len_in),
        input_lens: noised.iter().map(Vec::len).collect(),
        labels: Vec::with_capacity(n * len_out),
    };
    for (x, s) in noised.iter().zip(&rows) {
        b.input_ids.extend(x);
        b.input_ids
            .resize(b.input_ids.len() + len_in - x.len(), pad);
        b.labels.extend(s.ids.iter().map(|&t| t as i64));
        b.labels
            .resize(b.labels.len() + len_out - s.ids.len(), -100);
    }
    Ok(b)
}

fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    for name in SIDE_FILES {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).map_err(|e| Error::Io {
                path: to.join(name).display().to_string(),
                source: e,
            })?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let be = Cpu;
    let mut model = BartForConditionalGeneration::from_folder(&be, &args.model)?;
    if let Some(p) = args.dropout {
        model.config.dropout = p;
    }
    if let Some(p) = args.layerdrop {
        model.config.encoder_layerdrop = p;
        model.config.decoder_layerdrop = p;
    }
    let c = model.config.clone();
    let tok = Gpt2Tokenizer::from_folder(&args.model, c.vocab_size)?;
    let mask = match tok.encode("<mask>")?[..] {
        [id] => id,
        _ => return Err(Error::Tokenizer("`<mask>` is not one token".into())),
    };
    let all = sentences(&args, &tok, c.bos_token_id, c.eos_token_id)?;
    let cfg = AdamWConfig {
        lr: args.lr,
        ..Default::default()
    };
    let mut opt = AdamW::new(&be, model.parameters(), cfg)?;
    let bar = ProgressBar::new(args.steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .map_err(|e| Error::invalid("progress", e.to_string()))?,
    );
    let first = batch(&all, args.batch, 0, args.seed, mask, c.pad_token_id)?;
    let before = model.forward_backward(&be, &first)?.loss;
    for step in 0..args.steps {
        let b = batch(&all, args.batch, step, args.seed, mask, c.pad_token_id)?;
        let opts = StepOptions {
            dropout_seed: Some(args.seed),
            step,
            recompute: args.recompute,
            ..Default::default()
        };
        let out = model.forward_backward_with(&be, &b, &opts)?;
        opt.step(&be, model.parameters_mut(), &out.grads, args.lr)?;
        bar.set_message(format!("loss {:.4}", out.loss));
        bar.inc(1);
    }
    bar.finish();
    let after = model.forward_backward(&be, &first)?.loss;
    model.save_pretrained(&be, &args.out)?;
    copy_side_files(&args.model, &args.out)?;
    let reloaded = BartForConditionalGeneration::from_folder(&be, &args.out)?;
    let again = reloaded.forward_backward(&be, &first)?.loss;
    println!(
        "first batch's eval loss: {before:.4} before, {after:.4} after {} steps; saved to {} \
         and read back: {again:.4} ({})",
        args.steps,
        args.out.display(),
        if again.to_bits() == after.to_bits() {
            "the same bits"
        } else {
            "DIFFERENT"
        }
    );
    if again.to_bits() != after.to_bits() {
        return Err(Error::invalid("save", "the reloaded model's loss differs"));
    }
    Ok(())
}
