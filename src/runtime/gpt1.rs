//! GPT-1 (Hugging Face `OpenAIGPTLMHeadModel`, `model_type: openai-gpt`): the decoder-only
//! stack of [`super::decoder_only`] with post-LayerNorm blocks (`ln_1(x + attn(x))`, then
//! `ln_2(n + mlp(n))`, no final LayerNorm), learned positions, GPT-2's Conv1D weight layout
//! (`[in, out]`), scores scaled by 1/√head_dim, and the head tied to the token embedding
//! unless the checkpoint stores `lm_head.weight` ([`Checkpoint::take_lm_head`]). Matched against Hugging
//! Face's `modeling_openai.py` by tests/runtime_gpt1.rs; where it differs in form:
//!
//! - `afn: "gelu"` is GELU's tanh approximation there (`ACT_FNS["gelu"] = gelu_new`), so it is
//!   here; `relu` too; `silu`/`swish` are refused (no such activation in this runtime).
//! - Hugging Face masks future keys by setting their scores to −10⁴ instead of removing them;
//!   after the softmax their weight is exp(−10⁴ − max) = 0 in f32 unless every visible score is
//!   itself below about −10⁴ + 100, so removing them is the same arithmetic.
//! - GPT-1 has no end-of-text token: unless the config names an `eos_token_id`, generation
//!   stops at `max_new_tokens` or the context, and right padding uses id 0 (never seen by a
//!   real token).
//!
//! The tokenizer is [`super::gpt1_tokenizer`].

use super::backend::{Activation, Backend};
use super::checkpoint::{distinct_head, read_json, Checkpoint};
use super::config::{Fields, MAX_COUNT, MAX_LAYERS, MAX_WIDTH};
use super::decoder_only::{DecoderBlock, DecoderConfig, DecoderLm, DecoderOnly, Norm};
use super::layers::{Embedding, FeedForward, LayerNorm, Linear, MultiHeadAttention};
use crate::error::Result;
use std::path::Path;

/// An id no vocabulary reaches: "no end-of-text token" for the decoding loop.
const NO_TOKEN: u32 = u32::MAX;

/// The fields of a GPT-1 `config.json` the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt1Config {
    pub vocab_size: usize,
    /// Context length: positions 0 .. n_positions have an embedding.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub activation: Activation,
    pub layer_norm_epsilon: f32,
    pub tie_word_embeddings: bool,
    /// `None` for GPT-1's own checkpoints (it has no end-of-text token).
    pub eos_token_id: Option<u32>,
}

impl Gpt1Config {
    /// Reads `dir/config.json`; anything but a GPT-1 is an error.
    pub fn from_folder(dir: &Path) -> Result<Gpt1Config> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path.display().to_string())
    }

    /// Parses a `config.json` value (`file` names it in errors), every field type- and
    /// range-checked.
    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<Gpt1Config> {
        let f = Fields::new(v, file)?;
        let model_type = f.str_or("model_type", "")?;
        if model_type != "openai-gpt" {
            return Err(f.err(format!(
                "unsupported architecture: model_type `{model_type}`; this loader reads \
                 `openai-gpt`"
            )));
        }
        // Hugging Face's ACT_FNS of this model: "gelu" is the tanh approximation.
        let afn = f.str_or("afn", "gelu")?;
        let activation = match afn {
            "gelu" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            _ => return Err(f.err(format!("unsupported afn `{afn}`"))),
        };
        let n_embd = f.int("n_embd", 1..=MAX_WIDTH)?;
        let vocab_size = f.int("vocab_size", 1..=MAX_COUNT)?;
        let eos = match v.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(_) => Some(f.int("eos_token_id", 0..=vocab_size - 1)? as u32),
        };
        let c = Gpt1Config {
            vocab_size,
            n_positions: f.int("n_positions", 1..=MAX_COUNT)?,
            n_embd,
            n_layer: f.int("n_layer", 1..=MAX_LAYERS)?,
            n_head: f.int("n_head", 1..=MAX_WIDTH)?,
            activation,
            layer_norm_epsilon: f.epsilon_or("layer_norm_epsilon", 1e-5)?,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(true),
            eos_token_id: eos,
        };
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(f.err(format!(
                "n_embd {} is not a multiple of n_head {}",
                c.n_embd, c.n_head
            )));
        }
        Ok(c)
    }
}

/// A loaded GPT-1 language model on backend `B`.
pub type Gpt1<B> = DecoderLm<B, Gpt1Config>;

impl DecoderConfig for Gpt1Config {
    const FAMILY: &'static str = "GPT-1";

    fn read(dir: &Path) -> Result<Self> {
        Gpt1Config::from_folder(dir)
    }

    /// The config's `eos_token_id`, or an id no token has (GPT-1 has none).
    fn eos_token_id(&self) -> u32 {
        self.eos_token_id.unwrap_or(NO_TOKEN)
    }

    fn pad_token_id(&self) -> u32 {
        self.eos_token_id.unwrap_or(0)
    }

    fn cache_layout(&self) -> (usize, usize) {
        (self.n_layer, self.n_embd)
    }

    /// Takes every GPT-1 tensor out of `ckpt`: names with or without the `transformer.`
    /// prefix (an `OpenAIGPTLMHeadModel` or a bare `OpenAIGPTModel`).
    fn build<B: Backend>(&self, be: &B, ckpt: &mut Checkpoint) -> Result<DecoderOnly<B>> {
        let c = self;
        let e = c.n_embd;
        let head = ckpt.take_lm_head(c.tie_word_embeddings, &[c.vocab_size, e])?;
        ckpt.detect_prefix("transformer.", "tokens_embed.weight");
        ckpt.expect_shape(
            "tokens_embed.weight",
            &[c.vocab_size, e],
            "vocab_size and n_embd",
        )?;
        ckpt.expect_shape(
            "positions_embed.weight",
            &[c.n_positions, e],
            "n_positions and n_embd",
        )?;
        ckpt.expect_layers("h.", c.n_layer, "n_layer")?;
        let ln = |ckpt: &mut Checkpoint, name: &str| -> Result<LayerNorm<B>> {
            let gamma = ckpt.take(&format!("{name}.weight"), &[e])?;
            let beta = ckpt.take(&format!("{name}.bias"), &[e])?;
            LayerNorm::new(be, &gamma, &beta, c.layer_norm_epsilon)
        };
        let conv = |ckpt: &mut Checkpoint, name: &str, inp: usize, out: usize| {
            let w = ckpt.take(&format!("{name}.weight"), &[inp, out])?;
            let b = ckpt.take(&format!("{name}.bias"), &[out])?;
            Linear::from_conv1d(be, &w, Some(&b))
        };
        let wte = ckpt.take("tokens_embed.weight", &[c.vocab_size, e])?;
        let lm_head = match distinct_head(head, &wte) {
            Some(w) => Some(Linear::from_owned(be, w, None)?),
            None => None,
        };
        let wte = Embedding::from_owned(be, wte)?;
        let wpe = Embedding::from_owned(
            be,
            ckpt.take("positions_embed.weight", &[c.n_positions, e])?,
        )?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("h.{i}");
            ckpt.discard(&format!("{p}.attn.bias"));
            let qkv = conv(ckpt, &format!("{p}.attn.c_attn"), e, 3 * e)?;
            let out = conv(ckpt, &format!("{p}.attn.c_proj"), e, e)?;
            blocks.push(DecoderBlock {
                attn: MultiHeadAttention::from_fused_qkv(c.n_head, qkv, out)?,
                ln_1: ln(ckpt, &format!("{p}.ln_1"))?,
                mlp: FeedForward {
                    up: conv(ckpt, &format!("{p}.mlp.c_fc"), e, 4 * e)?,
                    down: conv(ckpt, &format!("{p}.mlp.c_proj"), 4 * e, e)?,
                    act: c.activation,
                },
                ln_2: ln(ckpt, &format!("{p}.ln_2"))?,
            });
        }
        Ok(DecoderOnly {
            wte,
            wpe,
            blocks,
            norm: Norm::Post,
            ln_f: None,
            lm_head,
            vocab_size: c.vocab_size,
            n_positions: c.n_positions,
        })
    }
}
