//! Greedy GPT-2 continuation on the CPU.
//!
//!     cargo run --release --example 03_generate_text [GPT2_DIR] [PROMPT]
//!
//! GPT2_DIR defaults to the committed tiny GPT-2 (random weights: the text is gibberish, the
//! mechanics are real); a Hugging Face `gpt2` folder gives real text.

use cuattn::runtime::generate::{generate, GenerateOptions};
use cuattn::runtime::gpt2::Gpt2;
use cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer;
use cuattn::runtime::Cpu;
use std::path::PathBuf;

fn main() -> cuattn::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "tests/fixtures/tiny-gpt2".into()),
    );
    let prompt = args
        .next()
        .unwrap_or_else(|| "The meaning of life is".into());
    let model = Gpt2::from_folder(&Cpu, &dir)?;
    let tokenizer = Gpt2Tokenizer::from_folder(&dir, model.config.vocab_size)?;
    let ids = tokenizer.encode(&prompt)?;
    let opts = GenerateOptions {
        max_new_tokens: 16,
        ..GenerateOptions::default()
    };
    // The callback sees each token as it is chosen (sequence index, token id).
    let out = generate(&Cpu, &model, &[ids], &opts, &mut |_, _| {})?;
    println!("{prompt}{}", tokenizer.decode(&out.generated[0])?);
    Ok(())
}
