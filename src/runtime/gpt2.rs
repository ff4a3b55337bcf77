//! GPT-2 (Hugging Face `GPT2LMHeadModel`): token + learned position embeddings, N pre-LayerNorm
//! decoder blocks (causal multi-head self-attention from the fused Conv1D `c_attn`, `gelu_new`
//! MLP), the final LayerNorm and the language-model head (`lm_head.weight` when the checkpoint
//! stores one, else the token embedding: [`Checkpoint::take_lm_head`]). Any size of the
//! family: the shapes come from `config.json`.

use super::backend::{Activation, Backend};
use super::checkpoint::{distinct_head, read_json, Checkpoint};
use super::config::{Fields, MAX_COUNT, MAX_LAYERS, MAX_WIDTH};
use super::decoder_only::{DecoderBlock, DecoderConfig, DecoderLm, DecoderOnly, Norm};
use super::layers::{Embedding, FeedForward, LayerNorm, Linear, MultiHeadAttention};
use crate::error::Result;
use std::path::Path;

/// The fields of a GPT-2 `config.json` the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Context length: positions 0 .. n_positions have an embedding.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width (`n_inner`, or 4·n_embd when null).
    pub n_inner: usize,
    pub activation: Activation,
    pub layer_norm_epsilon: f32,
    /// End-of-text id (`eos_token_id`, 50256 when absent).
    pub eos_token_id: u32,
    /// The head is the token embedding (`tie_word_embeddings`, default true).
    pub tie_word_embeddings: bool,
}

impl Gpt2Config {
    /// Reads `dir/config.json`; anything but a GPT-2 is an error.
    pub fn from_folder(dir: &Path) -> Result<Gpt2Config> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path.display().to_string())
    }

    /// Parses a `config.json` value (`file` names it in errors).
    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<Gpt2Config> {
        let f = Fields::new(v, file)?;
        let model_type = f.str_or("model_type", "")?;
        if model_type != "gpt2" {
            return Err(f.err(format!(
                "unsupported architecture: model_type `{model_type}`; this generator supports `gpt2`"
            )));
        }
        let act_name = f.str_or("activation_function", "gelu_new")?;
        let activation = Activation::from_hf_name(act_name)
            .ok_or_else(|| f.err(format!("unsupported activation_function `{act_name}`")))?;
        // Options that change the arithmetic and that this model does not implement.
        for (key, plain) in [
            ("scale_attn_by_inverse_layer_idx", false),
            ("reorder_and_upcast_attn", false),
            ("add_cross_attention", false),
            ("scale_attn_weights", true),
        ] {
            if let Some(b) = f.bool_opt(key)? {
                if b != plain {
                    return Err(f.err(format!("unsupported `{key}`: {b}")));
                }
            }
        }
        let n_embd = f.int("n_embd", 1..=MAX_WIDTH)?;
        let vocab_size = f.int("vocab_size", 1..=MAX_COUNT)?;
        let c = Gpt2Config {
            vocab_size,
            n_positions: f.int("n_positions", 1..=MAX_COUNT)?,
            n_embd,
            n_layer: f.int("n_layer", 1..=MAX_LAYERS)?,
            n_head: f.int("n_head", 1..=MAX_WIDTH)?,
            n_inner: f.int_or("n_inner", 4 * n_embd, 1..=MAX_WIDTH)?,
            activation,
            layer_norm_epsilon: f.epsilon_or("layer_norm_epsilon", 1e-5)?,
            eos_token_id: f.int_or("eos_token_id", 50256, 0..=vocab_size - 1)? as u32,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(true),
        };
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(f.err(format!(
                "n_embd {} is not a multiple of n_head {}",
                c.n_embd, c.n_head
            )));
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// A loaded GPT-2 language model on backend `B`.
pub type Gpt2<B> = DecoderLm<B, Gpt2Config>;

impl DecoderConfig for Gpt2Config {
    const FAMILY: &'static str = "GPT-2";

    fn read(dir: &Path) -> Result<Self> {
        Gpt2Config::from_folder(dir)
    }

    fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    fn cache_layout(&self) -> (usize, usize) {
        (self.n_layer, self.n_embd)
    }

    /// Every GPT-2 tensor: names with or without the `transformer.` prefix (a
    /// `GPT2LMHeadModel` or a bare `GPT2Model`); the head as [`Checkpoint::take_lm_head`] says.
    fn build<B: Backend>(&self, be: &B, ckpt: &mut Checkpoint) -> Result<DecoderOnly<B>> {
        let c = self;
        let head = ckpt.take_lm_head(c.tie_word_embeddings, &[c.vocab_size, c.n_embd])?;
        ckpt.detect_prefix("transformer.", "wte.weight");
        let (e, inner) = (c.n_embd, c.n_inner);
        // The config against the file's tensors before anything sized by it is allocated.
        ckpt.expect_shape("wte.weight", &[c.vocab_size, e], "vocab_size and n_embd")?;
        ckpt.expect_layers("h.", c.n_layer, "n_layer")?;
        let ln = |ckpt: &mut Checkpoint, name: &str| -> Result<LayerNorm<B>> {
            let gamma = ckpt.take(&format!("{name}.weight"), &[e])?;
            let beta = ckpt.take(&format!("{name}.bias"), &[e])?;
            LayerNorm::new(be, &gamma, &beta, c.layer_norm_epsilon)
        };
        // Conv1D: weight [in, out], bias [out].
        let conv = |ckpt: &mut Checkpoint, name: &str, inp: usize, out: usize| {
            let w = ckpt.take(&format!("{name}.weight"), &[inp, out])?;
            let b = ckpt.take(&format!("{name}.bias"), &[out])?;
            Linear::from_conv1d(be, &w, Some(&b))
        };
        let wte = ckpt.take("wte.weight", &[c.vocab_size, e])?;
        let lm_head = match distinct_head(head, &wte) {
            Some(w) => Some(Linear::from_owned(be, w, None)?),
            None => None,
        };
        let wte = Embedding::from_owned(be, wte)?;
        let wpe = Embedding::from_owned(be, ckpt.take("wpe.weight", &[c.n_positions, e])?)?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("h.{i}");
            // Old checkpoints carry the causal-mask buffers; the mask is computed here.
            ckpt.discard(&format!("{p}.attn.bias"));
            ckpt.discard(&format!("{p}.attn.masked_bias"));
            let qkv = conv(ckpt, &format!("{p}.attn.c_attn"), e, 3 * e)?;
            let out = conv(ckpt, &format!("{p}.attn.c_proj"), e, e)?;
            blocks.push(DecoderBlock {
                ln_1: ln(ckpt, &format!("{p}.ln_1"))?,
                attn: MultiHeadAttention::from_fused_qkv(c.n_head, qkv, out)?,
                ln_2: ln(ckpt, &format!("{p}.ln_2"))?,
                mlp: FeedForward {
                    up: conv(ckpt, &format!("{p}.mlp.c_fc"), e, inner)?,
                    down: conv(ckpt, &format!("{p}.mlp.c_proj"), inner, e)?,
                    act: c.activation,
                },
            });
        }
        let ln_f = ln(ckpt, "ln_f")?;
        Ok(DecoderOnly {
            wte,
            wpe,
            blocks,
            norm: Norm::Pre,
            ln_f: Some(ln_f),
            lm_head,
            vocab_size: c.vocab_size,
            n_positions: c.n_positions,
        })
    }
}
