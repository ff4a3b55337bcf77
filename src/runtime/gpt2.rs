//! GPT-2 (Hugging Face `GPT2LMHeadModel`): token + learned position embeddings, N pre-LayerNorm
//! decoder blocks (causal multi-head self-attention from the fused Conv1D `c_attn`, `gelu_new`
//! MLP), the final LayerNorm and the language-model head (tied to the token embedding unless
//! the checkpoint carries its own `lm_head.weight`). Any size of the family: the shapes come
//! from `config.json`.

use super::backend::{Activation, Backend};
use super::checkpoint::{read_json, Checkpoint};
use super::config::{Fields, MAX_COUNT, MAX_LAYERS, MAX_WIDTH};
use super::layers::{Embedding, FeedForward, KvCache, LayerNorm, Linear, MultiHeadAttention};
use crate::error::{Error, Result};
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

struct Block<B: Backend> {
    ln_1: LayerNorm<B>,
    attn: MultiHeadAttention<B>,
    ln_2: LayerNorm<B>,
    mlp: FeedForward<B>,
}

/// A loaded GPT-2 language model on backend `B`.
pub struct Gpt2<B: Backend> {
    pub config: Gpt2Config,
    wte: Embedding<B>,
    wpe: Embedding<B>,
    blocks: Vec<Block<B>>,
    ln_f: LayerNorm<B>,
    /// `[vocab, n_embd]`, no bias, when the checkpoint has its own; `None` when tied: the
    /// logits then read `wte`'s table itself (one copy of the largest tensor, not two).
    lm_head: Option<Linear<B>>,
    /// Whether the checkpoint had its own `lm_head.weight`.
    pub separate_lm_head: bool,
}

impl<B: Backend> Gpt2<B> {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config = Gpt2Config::from_folder(dir)?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let model = Self::from_checkpoint(be, config, &mut ckpt)?;
        ckpt.finish()?;
        Ok(model)
    }

    /// Takes every GPT-2 tensor out of `ckpt`: names with or without the `transformer.` prefix
    /// (a `GPT2LMHeadModel` or a bare `GPT2Model`), `lm_head.weight` if present.
    pub fn from_checkpoint(be: &B, config: Gpt2Config, ckpt: &mut Checkpoint) -> Result<Self> {
        // `lm_head.weight` never carries the prefix, so look for it before choosing one.
        let separate_lm_head = ckpt.contains("lm_head.weight");
        let lm_head = if separate_lm_head {
            let w = ckpt.take("lm_head.weight", &[config.vocab_size, config.n_embd])?;
            Some(Linear::from_owned(be, w, None)?)
        } else {
            None
        };
        ckpt.detect_prefix("transformer.", "wte.weight");
        let c = &config;
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
        let wte = Embedding::from_owned(be, ckpt.take("wte.weight", &[c.vocab_size, e])?)?;
        let wpe = Embedding::from_owned(be, ckpt.take("wpe.weight", &[c.n_positions, e])?)?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("h.{i}");
            // Old checkpoints carry the causal-mask buffers; the mask is computed here.
            ckpt.discard(&format!("{p}.attn.bias"));
            ckpt.discard(&format!("{p}.attn.masked_bias"));
            let qkv = conv(ckpt, &format!("{p}.attn.c_attn"), e, 3 * e)?;
            let out = conv(ckpt, &format!("{p}.attn.c_proj"), e, e)?;
            blocks.push(Block {
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
        Ok(Gpt2 {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            separate_lm_head,
        })
    }

    /// The final hidden states (after `ln_f`), `[batch·len, n_embd]`, of `batch` sequences of
    /// `len` tokens (`ids` and `positions` row-major `[batch, len]`).
    ///
    /// Without caches every sequence attends causally to its own tokens from the first one;
    /// padding must come after a sequence's tokens (right padding), where causality keeps it
    /// out of every real token's view. With caches (one per layer) the tokens are appended to
    /// them and attend to everything cached (see [`KvCache`]).
    pub fn forward(
        &self,
        be: &B,
        ids: &[u32],
        positions: &[u32],
        batch: usize,
        len: usize,
        caches: Option<&mut [&mut dyn KvCache<B>]>,
    ) -> Result<B::Tensor> {
        if ids.len() != batch * len || positions.len() != ids.len() || ids.is_empty() {
            return Err(Error::shape(
                "ids",
                format!("{batch}·{len} ids and as many positions, at least one"),
                &[ids.len(), positions.len()],
            ));
        }
        if let Some(c) = caches.as_deref() {
            if c.len() != self.blocks.len() {
                return Err(Error::invalid(
                    "caches",
                    format!("{} caches for {} layers", c.len(), self.blocks.len()),
                ));
            }
        }
        if let Some(&bad) = positions
            .iter()
            .find(|&&p| p as usize >= self.config.n_positions)
        {
            return Err(Error::invalid(
                "positions",
                format!(
                    "position {bad} is past the context of {} positions",
                    self.config.n_positions
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(Error::invalid(
                "ids",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        let mut x = be.add(
            &self.wte.forward(be, ids)?,
            &self.wpe.forward(be, positions)?,
        )?;
        let mut caches = caches.map(|c| c.iter_mut());
        for block in &self.blocks {
            let h = block.ln_1.forward(be, &x, None)?;
            let cache: Option<&mut dyn KvCache<B>> = match caches.as_mut() {
                Some(it) => it.next().map(|c| &mut **c as &mut dyn KvCache<B>),
                None => None,
            };
            let a = block
                .attn
                .forward_self(be, &h, batch, len, None, true, cache)?;
            x = be.add(&x, &a)?;
            let h = block.ln_2.forward(be, &x, None)?;
            let m = block.mlp.forward(be, &h)?;
            x = be.add(&x, &m)?;
        }
        self.ln_f.forward(be, &x, None)
    }

    /// Logits `[rows.len(), vocab]` of the hidden-state rows `rows`.
    pub fn logits(&self, be: &B, hidden: &B::Tensor, rows: &[u32]) -> Result<B::Tensor> {
        let picked = be.gather_rows(hidden, rows)?;
        match &self.lm_head {
            Some(head) => head.forward(be, &picked, Activation::None),
            None => be.linear(&picked, &self.wte.table, None, Activation::None),
        }
    }

    /// Logits at every position of one sequence, `[len, vocab]` as f32 (a full forward pass).
    pub fn sequence_logits(&self, be: &B, ids: &[u32]) -> Result<Vec<f32>> {
        let positions: Vec<u32> = (0..ids.len() as u32).collect();
        let hidden = self.forward(be, ids, &positions, 1, ids.len(), None)?;
        be.to_f32(&self.logits(be, &hidden, &positions)?)
    }
}
