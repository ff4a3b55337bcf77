//! A trained [`Gpt3`] saved as a Hugging Face GPT-Neo folder, with a byte-level tokenizer, so
//! that `cuattn generate --model DIR` and `GPTNeoForCausalLM.from_pretrained(DIR)` load it:
//!
//! - `config.json`: `model_type: gpt_neo`, the sizes, `attention_types` (the model's own
//!   layer list, repeated once) with `attention_layers` spelled out, `window_size`,
//!   `activation_function: gelu_new`, tied embeddings, end of text as BOS and EOS;
//! - `model.safetensors`: every parameter in f32 under GPT-Neo's names
//!   (`transformer.h.0.attn.attention.q_proj.weight`, …; the tied `lm_head.weight` is not
//!   stored, as Hugging Face saves it);
//! - `vocab.json` + `merges.txt`: GPT-2's byte-level BPE with no merges. Token b (0 ≤ b < 256)
//!   is byte b, written as GPT-2's printable stand-in for that byte; token 256 is
//!   `<|endoftext|>`. Any text encodes as its UTF-8 bytes, so [`encode_bytes`] is the
//!   tokenizer's encoding and every byte sequence decodes.

use super::gpt3::Gpt3;
use crate::error::{Error, Result};
use crate::runtime::checkpoint::{write_json, write_safetensors, NamedTensor};
use crate::runtime::gpt2_tokenizer::{byte_to_unicode, END_OF_TEXT};
use crate::runtime::gpt_neo::AttentionKind;
use crate::runtime::train::TrainBackend;
use std::path::Path;

/// The byte-level vocabulary: 256 bytes and the end-of-text token.
pub const BYTE_VOCAB: usize = 257;
/// `<|endoftext|>`'s id in the byte-level vocabulary.
pub const END_OF_TEXT_ID: u32 = 256;

/// The token ids of `text` in the byte-level vocabulary: its UTF-8 bytes.
pub fn encode_bytes(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| io_err(path, e))
}

/// Writes the byte-level tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`)
/// into `dir`; `context` is the model's length limit.
pub fn write_byte_tokenizer(dir: &Path, context: usize) -> Result<()> {
    let mut vocab = serde_json::Map::new();
    for (b, c) in byte_to_unicode().iter().enumerate() {
        vocab.insert(c.to_string(), serde_json::json!(b));
    }
    vocab.insert(END_OF_TEXT.into(), serde_json::json!(END_OF_TEXT_ID));
    write_json(&dir.join("vocab.json"), &serde_json::Value::Object(vocab))?;
    // No merges: every token is one byte.
    write_text(&dir.join("merges.txt"), "#version: 0.2\n")?;
    let config = serde_json::json!({
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": false,
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "model_max_length": context,
    });
    write_json(&dir.join("tokenizer_config.json"), &config)
}

/// The `config.json` of a model.
pub fn gpt_neo_config<B: TrainBackend>(model: &Gpt3<B>) -> serde_json::Value {
    let c = &model.config;
    let kinds: Vec<&str> = c
        .attention
        .iter()
        .map(|k| match k {
            AttentionKind::Global => "global",
            AttentionKind::Local => "local",
        })
        .collect();
    serde_json::json!({
        "architectures": ["GPTNeoForCausalLM"],
        "model_type": "gpt_neo",
        "vocab_size": c.vocab,
        "max_position_embeddings": c.context,
        "hidden_size": c.d_model,
        "num_layers": kinds.len(),
        "num_heads": c.heads,
        "intermediate_size": c.ff,
        "attention_types": [[kinds, 1]],
        "attention_layers": kinds,
        "window_size": c.window,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.ln_eps,
        "tie_word_embeddings": true,
        "bos_token_id": c.eos,
        "eos_token_id": c.eos,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "resid_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "dtype": "float32",
    })
}

/// Saves `model` as a GPT-Neo folder `dir` (created if missing; its files replaced), with the
/// byte-level tokenizer when `byte_tokenizer` (the text model; the digit models have no text).
pub fn save_gpt_neo<B: TrainBackend>(
    be: &B,
    model: &Gpt3<B>,
    dir: &Path,
    byte_tokenizer: bool,
) -> Result<()> {
    use super::Seq2Seq;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write_json(&dir.join("config.json"), &gpt_neo_config(model))?;
    let params = model.parameters();
    let values = params
        .iter()
        .map(|p| be.to_f32(&p.value))
        .collect::<Result<Vec<_>>>()?;
    let tensors: Vec<NamedTensor<'_>> = params
        .iter()
        .zip(&values)
        .map(|(p, v)| NamedTensor {
            name: p.name.clone(),
            shape: be.shape(&p.value).to_vec(),
            values: v,
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    if byte_tokenizer {
        if model.config.vocab != BYTE_VOCAB {
            return Err(Error::invalid(
                "model",
                format!(
                    "a byte-level tokenizer needs a vocabulary of {BYTE_VOCAB}, not {}",
                    model.config.vocab
                ),
            ));
        }
        write_byte_tokenizer(dir, model.config.context)?;
    }
    Ok(())
}
