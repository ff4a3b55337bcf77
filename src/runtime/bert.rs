//! BERT (Hugging Face `BertModel`): embeddings (word + position + token type, LayerNorm), N
//! post-LayerNorm encoder layers (multi-head self-attention with the key-padding mask, GELU
//! feed-forward) and the optional pooler (tanh of a linear layer on the first token).

use super::backend::{Activation, Backend, WeightUse};
use super::checkpoint::{read_json, Checkpoint};
use super::config::{Fields, MAX_COUNT, MAX_LAYERS, MAX_WIDTH};
use super::layers::{Embedding, FeedForward, LayerNorm, Linear, MultiHeadAttention, Packing};
use super::tokenizer::TokenBatch;
use crate::error::{Error, Result};
use std::path::Path;

/// The fields of a BERT `config.json` the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
}

impl BertConfig {
    /// Reads `dir/config.json`; anything but a BERT with absolute positions is an error.
    pub fn from_folder(dir: &Path) -> Result<BertConfig> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path.display().to_string())
    }

    /// Parses a `config.json` value (`file` names it in errors): every field the model uses
    /// type- and range-checked.
    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<BertConfig> {
        let f = Fields::new(v, file)?;
        let model_type = f.str_or("model_type", "")?;
        if model_type != "bert" {
            let arch = v["architectures"]
                .get(0)
                .and_then(|a| a.as_str())
                .unwrap_or("unknown");
            return Err(f.err(format!(
                "unsupported architecture: model_type `{model_type}` ({arch}); \
                 this runtime supports `bert`"
            )));
        }
        let pos = f.str_or("position_embedding_type", "absolute")?;
        if pos != "absolute" {
            return Err(f.err(format!(
                "unsupported position_embedding_type `{pos}` (only `absolute`)"
            )));
        }
        let act_name = f.str_or("hidden_act", "gelu")?;
        let hidden_act = Activation::from_hf_name(act_name)
            .ok_or_else(|| f.err(format!("unsupported hidden_act `{act_name}`")))?;
        let c = BertConfig {
            vocab_size: f.int("vocab_size", 1..=MAX_COUNT)?,
            hidden_size: f.int("hidden_size", 1..=MAX_WIDTH)?,
            num_hidden_layers: f.int("num_hidden_layers", 1..=MAX_LAYERS)?,
            num_attention_heads: f.int("num_attention_heads", 1..=MAX_WIDTH)?,
            intermediate_size: f.int("intermediate_size", 1..=MAX_WIDTH)?,
            hidden_act,
            max_position_embeddings: f.int("max_position_embeddings", 2..=MAX_COUNT)?,
            type_vocab_size: f.int_or("type_vocab_size", 2, 1..=MAX_COUNT)?,
            layer_norm_eps: f.epsilon_or("layer_norm_eps", 1e-12)?,
        };
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(f.err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(c)
    }
}

struct EncoderLayer<B: Backend> {
    attention: MultiHeadAttention<B>,
    attention_norm: LayerNorm<B>,
    ffn: FeedForward<B>,
    output_norm: LayerNorm<B>,
}

/// A loaded BERT on backend `B`.
pub struct Bert<B: Backend> {
    pub config: BertConfig,
    word: Embedding<B>,
    position: Embedding<B>,
    token_type: Embedding<B>,
    embedding_norm: LayerNorm<B>,
    layers: Vec<EncoderLayer<B>>,
    pooler: Option<Linear<B>>,
}

/// What a forward pass returns.
pub struct BertOutput<T> {
    /// `[batch·len, hidden]`: the last layer's hidden states (padding rows included).
    pub hidden: T,
    /// `[batch, hidden]`: tanh(W·h_CLS + b), when the checkpoint has a pooler.
    pub pooled: Option<T>,
}

impl<B: Backend> Bert<B> {
    /// Loads `dir/config.json` and `dir/model.safetensors`. Keys may carry a `bert.` prefix.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config = BertConfig::from_folder(dir)?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let bert = Self::from_checkpoint(be, config, &mut ckpt)?;
        ckpt.finish()?;
        Ok(bert)
    }

    /// Takes every BERT tensor out of `ckpt` (the caller checks for leftovers with
    /// [`Checkpoint::finish`]).
    pub fn from_checkpoint(be: &B, config: BertConfig, ckpt: &mut Checkpoint) -> Result<Self> {
        ckpt.detect_prefix("bert.", "embeddings.word_embeddings.weight");
        let c = &config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        // The config against the file's tensors before anything sized by it is allocated.
        ckpt.expect_shape(
            "embeddings.word_embeddings.weight",
            &[c.vocab_size, h],
            "vocab_size and hidden_size",
        )?;
        ckpt.expect_layers("encoder.layer.", c.num_hidden_layers, "num_hidden_layers")?;
        let ln = |ckpt: &mut Checkpoint, name: &str| -> Result<LayerNorm<B>> {
            // Old checkpoints name LayerNorm's parameters gamma/beta.
            let (g, b) = if ckpt.contains(&format!("{name}.gamma")) {
                ("gamma", "beta")
            } else {
                ("weight", "bias")
            };
            let gamma = ckpt.take(&format!("{name}.{g}"), &[h])?;
            let beta = ckpt.take(&format!("{name}.{b}"), &[h])?;
            LayerNorm::new(be, &gamma, &beta, c.layer_norm_eps)
        };
        let table = |ckpt: &mut Checkpoint, name: &str, rows: usize| -> Result<Embedding<B>> {
            Embedding::from_owned(
                be,
                ckpt.take(&format!("embeddings.{name}.weight"), &[rows, h])?,
            )
        };
        let word = table(ckpt, "word_embeddings", c.vocab_size)?;
        let position = table(ckpt, "position_embeddings", c.max_position_embeddings)?;
        let token_type = table(ckpt, "token_type_embeddings", c.type_vocab_size)?;
        let embedding_norm = ln(ckpt, "embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut lin = |name: &str, out: usize, inp: usize| -> Result<_> {
                Ok((
                    ckpt.take(&format!("{p}.{name}.weight"), &[out, inp])?,
                    ckpt.take(&format!("{p}.{name}.bias"), &[out])?,
                ))
            };
            let q = lin("attention.self.query", h, h)?;
            let k = lin("attention.self.key", h, h)?;
            let v = lin("attention.self.value", h, h)?;
            let o = lin("attention.output.dense", h, h)?;
            let up = lin("intermediate.dense", inter, h)?;
            let down = lin("output.dense", h, inter)?;
            // Encoder layers see whole sequences: weights stored for many-row GEMMs.
            let attention = MultiHeadAttention::self_attention_for(
                be,
                c.num_attention_heads,
                [
                    (&q.0, Some(&q.1)),
                    (&k.0, Some(&k.1)),
                    (&v.0, Some(&v.1)),
                    (&o.0, Some(&o.1)),
                ],
                WeightUse::ManyRows,
            )?;
            layers.push(EncoderLayer {
                attention,
                attention_norm: ln(ckpt, &format!("{p}.attention.output.LayerNorm"))?,
                ffn: FeedForward {
                    up: Linear::from_owned_for(be, up.0, Some(up.1), WeightUse::ManyRows)?,
                    down: Linear::from_owned_for(be, down.0, Some(down.1), WeightUse::ManyRows)?,
                    act: c.hidden_act,
                },
                output_norm: ln(ckpt, &format!("{p}.output.LayerNorm"))?,
            });
        }
        let pooler = if ckpt.contains("pooler.dense.weight") || ckpt.contains("pooler.dense.bias") {
            let w = ckpt.take("pooler.dense.weight", &[h, h])?;
            let b = ckpt.take("pooler.dense.bias", &[h])?;
            Some(Linear::from_owned(be, w, Some(b))?)
        } else {
            None
        };
        Ok(Bert {
            config,
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            pooler,
        })
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// The batch's sizes against each other and the model's positions.
    fn check_batch(&self, batch: &TokenBatch) -> Result<()> {
        let (n, len) = (batch.batch(), batch.len);
        if n == 0 || batch.ids.len() != n * len || batch.type_ids.len() != n * len {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} ids and {} type ids for {n} sequences of {len}",
                    batch.ids.len(),
                    batch.type_ids.len()
                ),
            ));
        }
        if len > self.config.max_position_embeddings {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{len} tokens exceed the model's {} positions",
                    self.config.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = batch.lens.iter().find(|&&l| l > len) {
            return Err(Error::invalid(
                "batch",
                format!("a sequence of {bad} tokens in a batch padded to {len}"),
            ));
        }
        Ok(())
    }

    /// Runs the encoder on a padded batch; padding keys are masked in every layer.
    pub fn forward(&self, be: &B, batch: &TokenBatch) -> Result<BertOutput<B::Tensor>> {
        self.check_batch(batch)?;
        let (n, len) = (batch.batch(), batch.len);
        let positions: Vec<u32> = (0..n).flat_map(|_| 0..len as u32).collect();
        let words = self.word.forward(be, &batch.ids)?;
        let pos = self.position.forward(be, &positions)?;
        let types = self.token_type.forward(be, &batch.type_ids)?;
        let summed = be.add(&words, &pos)?;
        let mut h = self.embedding_norm.forward(be, &summed, Some(&types))?;
        let all_full = batch.lens.iter().all(|&l| l == len);
        let key_lens = (!all_full).then_some(batch.lens.as_slice());
        for layer in &self.layers {
            let a = layer
                .attention
                .forward_self(be, &h, n, len, key_lens, false, None)?;
            let h1 = layer.attention_norm.forward(be, &a, Some(&h))?;
            let f = layer.ffn.forward(be, &h1)?;
            h = layer.output_norm.forward(be, &f, Some(&h1))?;
        }
        let pooled = match &self.pooler {
            Some(p) => {
                let first: Vec<u32> = (0..n as u32).map(|b| b * len as u32).collect();
                let cls = be.gather_rows(&h, &first)?;
                Some(p.forward(be, &cls, Activation::Tanh)?)
            }
            None => None,
        };
        Ok(BertOutput { hidden: h, pooled })
    }

    /// The last layer's hidden states of the batch's real tokens only, packed
    /// (`[Σ lens, hidden]`, sequence b after sequences 0..b; see [`Packing`]): every
    /// position-wise layer computes no padding row, and only the attention sees the padded
    /// layout. The same values as [`Bert::forward`]'s non-padding rows, up to f32 rounding.
    pub fn forward_packed(&self, be: &B, batch: &TokenBatch) -> Result<B::Tensor> {
        self.check_batch(batch)?;
        let packing = Packing::new(&batch.lens)?;
        let len = batch.len;
        let real = |all: &[u32]| -> Vec<u32> {
            (batch.lens.iter().enumerate())
                .flat_map(|(b, &n)| all[b * len..b * len + n].iter().copied())
                .collect()
        };
        let positions: Vec<u32> = (batch.lens.iter()).flat_map(|&n| 0..n as u32).collect();
        let words = self.word.forward(be, &real(&batch.ids))?;
        let pos = self.position.forward(be, &positions)?;
        let types = self.token_type.forward(be, &real(&batch.type_ids))?;
        let summed = be.add(&words, &pos)?;
        let mut h = self.embedding_norm.forward(be, &summed, Some(&types))?;
        for layer in &self.layers {
            let a = layer.attention.forward_self_packed(be, &h, &packing)?;
            let h1 = layer.attention_norm.forward(be, &a, Some(&h))?;
            let f = layer.ffn.forward(be, &h1)?;
            h = layer.output_norm.forward(be, &f, Some(&h1))?;
        }
        Ok(h)
    }
}
