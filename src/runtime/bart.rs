//! BART (Hugging Face `BartForConditionalGeneration` / `BartModel`): a bidirectional encoder
//! and an autoregressive decoder, both post-LayerNorm, sharing one token embedding
//! (`model.shared`, multiplied by √d_model when `scale_embedding`), each with learned
//! positions stored two rows down (BART's offset of 2: position p is row p + 2) and a LayerNorm
//! on the embeddings (`layernorm_embedding`). The language-model head is the checkpoint's
//! `lm_head.weight` when it stores one, else the shared embedding
//! ([`Checkpoint::take_lm_head`]), plus `final_logits_bias`.
//!
//! Encoder layer: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x)), padding masked by key length.
//! Decoder layer: x = LN(x + CausalSelfAttn(x)); x = LN(x + CrossAttn(x, memory));
//! x = LN(x + FFN(x)).
//!
//! For generation ([`super::generate`]) the encoder runs once per input, and every decoder
//! layer's cross-attention keys and values are projected from its output once
//! ([`BartMemory`]) and read by every step; the decoder's self-attention uses the KV cache.
//! Encoder inputs are right-padded in a batch; the cross-attention masks the padding by each
//! input's length.

use super::backend::{Activation, Backend, WeightUse};
use super::checkpoint::{distinct_head, read_json, Checkpoint, HostParam};
use super::generate::{check_vocab, TokenModel};
use super::layers::{Embedding, FeedForward, KvCache, LayerNorm, Linear, MultiHeadAttention};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// Rows BART's learned position tables hold before position 0.
pub const POSITION_OFFSET: u32 = 2;

/// The fields of a BART `config.json` the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct BartConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub activation: Activation,
    /// Positions 0 .. max_position_embeddings exist (the tables have 2 more rows).
    pub max_position_embeddings: usize,
    pub scale_embedding: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub pad_token_id: u32,
    pub eos_token_id: u32,
    pub decoder_start_token_id: u32,
    /// Generation defaults some checkpoints keep in config.json.
    pub forced_bos_token_id: Option<u32>,
    pub forced_eos_token_id: Option<u32>,
    /// Training only (inference never drops): `dropout` after the embeddings' LayerNorm and
    /// after every attention and feed-forward output, `attention_dropout` on the attention
    /// probabilities, `activation_dropout` after the feed-forward activation. Hugging Face's
    /// defaults: 0.1, 0, 0.
    pub dropout: f32,
    pub attention_dropout: f32,
    pub activation_dropout: f32,
    /// Training only: LayerDrop, the probability that a whole encoder (decoder) layer is
    /// skipped in a training step (Hugging Face's default 0).
    pub encoder_layerdrop: f32,
    pub decoder_layerdrop: f32,
}

impl BartConfig {
    pub fn from_folder(dir: &Path) -> Result<BartConfig> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path.display().to_string())
    }

    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<BartConfig> {
        let err = |reason: String| Error::Config {
            file: file.to_string(),
            reason,
        };
        let model_type = v["model_type"].as_str().unwrap_or("");
        if model_type != "bart" {
            return Err(err(format!(
                "unsupported architecture: model_type `{model_type}`; expected `bart`"
            )));
        }
        let int = |key: &str| -> Result<usize> {
            v[key]
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("missing or non-integer `{key}`")))
        };
        let id = |key: &str, default: u32| v[key].as_u64().map_or(default, |x| x as u32);
        let opt_id = |key: &str| v[key].as_u64().map(|x| x as u32);
        let act_name = v["activation_function"].as_str().unwrap_or("gelu");
        let activation = Activation::from_hf_name(act_name)
            .ok_or_else(|| err(format!("unsupported activation_function `{act_name}`")))?;
        for key in ["normalize_before", "add_final_layer_norm"] {
            if v[key].as_bool() == Some(true) {
                return Err(err(format!(
                    "unsupported `{key}`: true (mBART-style pre-LN)"
                )));
            }
        }
        let prob = |key: &str, default: f64| -> Result<f32> {
            let p = v[key].as_f64().unwrap_or(default);
            if !(0.0..1.0).contains(&p) {
                return Err(err(format!("`{key}` = {p} is not a probability in [0, 1)")));
            }
            Ok(p as f32)
        };
        // A layer skipped with probability 1 is still a model (embeddings only): [0, 1].
        let layerdrop = |key: &str| -> Result<f32> {
            let p = v[key].as_f64().unwrap_or(0.0);
            if !(0.0..=1.0).contains(&p) {
                return Err(err(format!("`{key}` = {p} is not a probability in [0, 1]")));
            }
            Ok(p as f32)
        };
        let eos = id("eos_token_id", 2);
        let c = BartConfig {
            vocab_size: int("vocab_size")?,
            d_model: int("d_model")?,
            encoder_layers: int("encoder_layers")?,
            decoder_layers: int("decoder_layers")?,
            encoder_attention_heads: int("encoder_attention_heads")?,
            decoder_attention_heads: int("decoder_attention_heads")?,
            encoder_ffn_dim: int("encoder_ffn_dim")?,
            decoder_ffn_dim: int("decoder_ffn_dim")?,
            activation,
            max_position_embeddings: int("max_position_embeddings")?,
            scale_embedding: v["scale_embedding"].as_bool().unwrap_or(false),
            tie_word_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(true),
            bos_token_id: id("bos_token_id", 0),
            pad_token_id: id("pad_token_id", 1),
            eos_token_id: eos,
            decoder_start_token_id: id("decoder_start_token_id", eos),
            forced_bos_token_id: opt_id("forced_bos_token_id"),
            forced_eos_token_id: opt_id("forced_eos_token_id"),
            dropout: prob("dropout", 0.1)?,
            attention_dropout: prob("attention_dropout", 0.0)?,
            activation_dropout: prob("activation_dropout", 0.0)?,
            encoder_layerdrop: layerdrop("encoder_layerdrop")?,
            decoder_layerdrop: layerdrop("decoder_layerdrop")?,
        };
        for heads in [c.encoder_attention_heads, c.decoder_attention_heads] {
            if heads == 0 || !c.d_model.is_multiple_of(heads) {
                return Err(err(format!(
                    "d_model {} is not a multiple of {heads} attention heads",
                    c.d_model
                )));
            }
        }
        if c.vocab_size == 0 || c.max_position_embeddings == 0 || c.decoder_layers == 0 {
            return Err(err(
                "vocab_size, max_position_embeddings and decoder_layers must be ≥ 1".into(),
            ));
        }
        for (name, tok) in [
            ("eos_token_id", c.eos_token_id),
            ("pad_token_id", c.pad_token_id),
            ("decoder_start_token_id", c.decoder_start_token_id),
        ] {
            if tok as usize >= c.vocab_size {
                return Err(err(format!("{name} {tok} is outside the vocabulary")));
            }
        }
        Ok(c)
    }
}

/// The name (after the `model.` prefix) of the token table stack `stack` (`encoder` or
/// `decoder`) reads when it is not the shared one: transformers 5 gives an untied BART
/// (`tie_word_embeddings: false`) separate `encoder.embed_tokens` and `decoder.embed_tokens`
/// parameters (and `save_pretrained` writes them); a stack whose table the checkpoint lacks
/// reads `shared`, as every stack of a tied model does. The inference and the training loaders
/// both ask here.
pub(crate) fn own_stack_table(c: &BartConfig, ckpt: &Checkpoint, stack: &str) -> Option<String> {
    let name = format!("{stack}.embed_tokens.weight");
    (!c.tie_word_embeddings && ckpt.contains(&name)).then_some(name)
}

/// The token table times the embedding scale (one f32 multiply per value, as HF's
/// `BartScaledWordEmbedding` does after the lookup).
fn scale_param(p: &HostParam, scale: f32) -> HostParam {
    HostParam {
        shape: p.shape.clone(),
        values: p.values.iter().map(|x| x * scale).collect(),
    }
}

struct EncoderLayer<B: Backend> {
    self_attn: MultiHeadAttention<B>,
    self_attn_layer_norm: LayerNorm<B>,
    ffn: FeedForward<B>,
    final_layer_norm: LayerNorm<B>,
}

struct DecoderLayer<B: Backend> {
    self_attn: MultiHeadAttention<B>,
    self_attn_layer_norm: LayerNorm<B>,
    encoder_attn: MultiHeadAttention<B>,
    encoder_attn_layer_norm: LayerNorm<B>,
    ffn: FeedForward<B>,
    final_layer_norm: LayerNorm<B>,
}

/// One stack's embeddings: scaled token table, positions, their LayerNorm.
struct Embeddings<B: Backend> {
    /// Shared with the other stack (and the tied head when `embed_scale` is 1) unless the
    /// checkpoint gives this stack its own table: a tied BART-base holds its 154 MB table once.
    tokens: Arc<Embedding<B>>,
    positions: Embedding<B>,
    layer_norm: LayerNorm<B>,
}

/// A loaded BART on backend `B`.
pub struct Bart<B: Backend> {
    pub config: BartConfig,
    encoder_embed: Embeddings<B>,
    encoder: Vec<EncoderLayer<B>>,
    decoder_embed: Embeddings<B>,
    decoder: Vec<DecoderLayer<B>>,
    /// The head's weight `[vocab, d_model]`: `lm_head.weight` when distinct, else the shared
    /// (unscaled) token table.
    lm_head: Arc<Embedding<B>>,
    /// `final_logits_bias` `[vocab]` (zeros when the checkpoint has none).
    lm_bias: B::Tensor,
    /// Whether the checkpoint had its own `lm_head.weight` (untied head).
    pub separate_lm_head: bool,
}

/// What the decoder reads from the encoder, per generation row: every decoder layer's
/// cross-attention keys and values `[rows·len_k, 2·d_model]`, and each row's input length.
pub struct BartMemory<B: Backend> {
    pub kv: Vec<B::Tensor>,
    pub len_k: usize,
    pub lens: Vec<usize>,
}

impl<B: Backend> Bart<B> {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config = BartConfig::from_folder(dir)?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let model = Self::from_checkpoint(be, config, &mut ckpt)?;
        ckpt.finish()?;
        Ok(model)
    }

    /// Takes every BART tensor out of `ckpt`: names with the `model.` prefix
    /// (`BartForConditionalGeneration`) or without (`BartModel`, whose head is then the tied
    /// embedding with a zero bias).
    pub fn from_checkpoint(be: &B, config: BartConfig, ckpt: &mut Checkpoint) -> Result<Self> {
        let c = &config;
        let (v, d) = (c.vocab_size, c.d_model);
        // Outside the `model.` prefix: look for them before choosing one.
        let lm_head_param = ckpt.take_lm_head(c.tie_word_embeddings, &[v, d])?;
        let bias = if ckpt.contains("final_logits_bias") {
            let b = ckpt.take("final_logits_bias", &[1, v])?;
            HostParam {
                shape: vec![v],
                values: b.values,
            }
        } else {
            HostParam {
                shape: vec![v],
                values: vec![0.0; v],
            }
        };
        ckpt.detect_prefix("model.", "shared.weight");
        let shared = ckpt.take("shared.weight", &[v, d])?;
        let lm_head_param = distinct_head(lm_head_param, &shared);
        let separate_lm_head = lm_head_param.is_some();
        let scale = if c.scale_embedding {
            (d as f32).sqrt()
        } else {
            1.0
        };
        // Every copy of the table is uploaded without a host copy and held once: the stacks
        // share the (scaled) table, and the tied head reads the unscaled one.
        let scaled = (scale != 1.0).then(|| scale_param(&shared, scale));
        let shared = Arc::new(Embedding::from_owned(be, shared)?);
        let stack_table = match scaled {
            Some(t) => Arc::new(Embedding::from_owned(be, t)?),
            None => Arc::clone(&shared),
        };
        let ln = |ckpt: &mut Checkpoint, name: &str| -> Result<LayerNorm<B>> {
            let gamma = ckpt.take(&format!("{name}.weight"), &[d])?;
            let beta = ckpt.take(&format!("{name}.bias"), &[d])?;
            LayerNorm::new(be, &gamma, &beta, 1e-5)
        };
        let linear = |ckpt: &mut Checkpoint, name: &str, out: usize, inp: usize| {
            Ok::<_, Error>((
                ckpt.take(&format!("{name}.weight"), &[out, inp])?,
                ckpt.take(&format!("{name}.bias"), &[out])?,
            ))
        };
        // `usage`: the encoder's layers see whole inputs (WeightUse::ManyRows), the decoder's
        // one token per step.
        let attention =
            |ckpt: &mut Checkpoint, name: &str, heads: usize, cross: bool, usage: WeightUse| {
                let q = linear(ckpt, &format!("{name}.q_proj"), d, d)?;
                let k = linear(ckpt, &format!("{name}.k_proj"), d, d)?;
                let val = linear(ckpt, &format!("{name}.v_proj"), d, d)?;
                let o = linear(ckpt, &format!("{name}.out_proj"), d, d)?;
                fn part(p: &(HostParam, HostParam)) -> (&HostParam, Option<&HostParam>) {
                    (&p.0, Some(&p.1))
                }
                if cross {
                    MultiHeadAttention::cross_attention(
                        be,
                        heads,
                        part(&q),
                        part(&k),
                        part(&val),
                        part(&o),
                    )
                } else {
                    MultiHeadAttention::self_attention_for(
                        be,
                        heads,
                        [part(&q), part(&k), part(&val), part(&o)],
                        usage,
                    )
                }
            };
        let ffn = |ckpt: &mut Checkpoint,
                   name: &str,
                   inner: usize,
                   usage: WeightUse|
         -> Result<FeedForward<B>> {
            let (w1, b1) = linear(ckpt, &format!("{name}.fc1"), inner, d)?;
            let (w2, b2) = linear(ckpt, &format!("{name}.fc2"), d, inner)?;
            Ok(FeedForward {
                up: Linear::from_owned_for(be, w1, Some(b1), usage)?,
                down: Linear::from_owned_for(be, w2, Some(b2), usage)?,
                act: c.activation,
            })
        };
        // Tied: both stacks read the shared table (a saved copy is the same). Untied
        // (transformers 5 unties the stacks' tables too): a stack's own table when saved.
        let embeddings = |ckpt: &mut Checkpoint, stack: &str| -> Result<Embeddings<B>> {
            let tokens = if let Some(name) = own_stack_table(c, ckpt, stack) {
                let own = ckpt.take(&name, &[v, d])?;
                let own = if scale != 1.0 {
                    scale_param(&own, scale)
                } else {
                    own
                };
                Arc::new(Embedding::from_owned(be, own)?)
            } else {
                ckpt.discard(&format!("{stack}.embed_tokens.weight"));
                Arc::clone(&stack_table)
            };
            Ok(Embeddings {
                tokens,
                positions: Embedding::new(
                    be,
                    &ckpt.take(
                        &format!("{stack}.embed_positions.weight"),
                        &[c.max_position_embeddings + POSITION_OFFSET as usize, d],
                    )?,
                )?,
                layer_norm: ln(ckpt, &format!("{stack}.layernorm_embedding"))?,
            })
        };
        let encoder_embed = embeddings(ckpt, "encoder")?;
        let mut encoder = Vec::with_capacity(c.encoder_layers);
        for i in 0..c.encoder_layers {
            let p = format!("encoder.layers.{i}");
            encoder.push(EncoderLayer {
                self_attn: attention(
                    ckpt,
                    &format!("{p}.self_attn"),
                    c.encoder_attention_heads,
                    false,
                    WeightUse::ManyRows,
                )?,
                self_attn_layer_norm: ln(ckpt, &format!("{p}.self_attn_layer_norm"))?,
                ffn: ffn(ckpt, &p, c.encoder_ffn_dim, WeightUse::ManyRows)?,
                final_layer_norm: ln(ckpt, &format!("{p}.final_layer_norm"))?,
            });
        }
        let decoder_embed = embeddings(ckpt, "decoder")?;
        let mut decoder = Vec::with_capacity(c.decoder_layers);
        for i in 0..c.decoder_layers {
            let p = format!("decoder.layers.{i}");
            let heads = c.decoder_attention_heads;
            decoder.push(DecoderLayer {
                self_attn: attention(
                    ckpt,
                    &format!("{p}.self_attn"),
                    heads,
                    false,
                    WeightUse::AnyRows,
                )?,
                self_attn_layer_norm: ln(ckpt, &format!("{p}.self_attn_layer_norm"))?,
                encoder_attn: attention(
                    ckpt,
                    &format!("{p}.encoder_attn"),
                    heads,
                    true,
                    WeightUse::AnyRows,
                )?,
                encoder_attn_layer_norm: ln(ckpt, &format!("{p}.encoder_attn_layer_norm"))?,
                ffn: ffn(ckpt, &p, c.decoder_ffn_dim, WeightUse::AnyRows)?,
                final_layer_norm: ln(ckpt, &format!("{p}.final_layer_norm"))?,
            });
        }
        let lm_head = match lm_head_param {
            Some(p) => Arc::new(Embedding::from_owned(be, p)?),
            None => shared,
        };
        let lm_bias = be.upload_owned(&bias.shape, bias.values)?;
        Ok(Bart {
            config,
            encoder_embed,
            encoder,
            decoder_embed,
            decoder,
            lm_head,
            lm_bias,
            separate_lm_head,
        })
    }

    fn check_ids(&self, ids: &[u32], positions: &[u32]) -> Result<Vec<u32>> {
        let c = &self.config;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(
                "ids",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    c.vocab_size
                ),
            ));
        }
        if let Some(&bad) = positions
            .iter()
            .find(|&&p| p as usize >= c.max_position_embeddings)
        {
            return Err(Error::invalid(
                "positions",
                format!(
                    "position {bad} is past the {} positions",
                    c.max_position_embeddings
                ),
            ));
        }
        Ok(positions.iter().map(|p| p + POSITION_OFFSET).collect())
    }

    fn embed(
        &self,
        be: &B,
        e: &Embeddings<B>,
        ids: &[u32],
        positions: &[u32],
    ) -> Result<B::Tensor> {
        let rows = self.check_ids(ids, positions)?;
        let tok = e.tokens.forward(be, ids)?;
        let pos = e.positions.forward(be, &rows)?;
        e.layer_norm.forward(be, &tok, Some(&pos))
    }

    /// The encoder's last hidden states `[batch·len, d_model]` of `batch` inputs of `len`
    /// tokens (`ids` row-major, right-padded; `lens` the real lengths).
    pub fn encode_hidden(
        &self,
        be: &B,
        ids: &[u32],
        batch: usize,
        len: usize,
        lens: &[usize],
    ) -> Result<B::Tensor> {
        if ids.len() != batch * len || ids.is_empty() || lens.len() != batch {
            return Err(Error::shape(
                "ids",
                format!("{batch}·{len} ids (at least one) and {batch} lengths"),
                &[ids.len(), lens.len()],
            ));
        }
        if let Some(&bad) = lens.iter().find(|&&l| l == 0 || l > len) {
            return Err(Error::invalid(
                "lens",
                format!("length {bad} is outside 1 ..= {len}"),
            ));
        }
        let positions: Vec<u32> = (0..batch * len).map(|r| (r % len) as u32).collect();
        let mut x = self.embed(be, &self.encoder_embed, ids, &positions)?;
        for l in &self.encoder {
            let a = l
                .self_attn
                .forward_self(be, &x, batch, len, Some(lens), false, None)?;
            x = l.self_attn_layer_norm.forward(be, &a, Some(&x))?;
            let f = l.ffn.forward(be, &x)?;
            x = l.final_layer_norm.forward(be, &f, Some(&x))?;
        }
        Ok(x)
    }

    /// Cross-attention keys and values of every decoder layer for encoder states `hidden`
    /// (`[batch·len_k, d]`), each input's repeated `copies` times.
    pub fn memory(
        &self,
        be: &B,
        hidden: &B::Tensor,
        batch: usize,
        len_k: usize,
        lens: &[usize],
        copies: usize,
    ) -> Result<BartMemory<B>> {
        let rows: Vec<u32> = (0..batch * copies * len_k)
            .map(|r| {
                let (row, t) = (r / len_k, r % len_k);
                ((row / copies) * len_k + t) as u32
            })
            .collect();
        let kv = self
            .decoder
            .iter()
            .map(|l| {
                let kv = l.encoder_attn.cross_kv(be, hidden)?;
                if copies == 1 {
                    Ok(kv)
                } else {
                    be.gather_rows(&kv, &rows)
                }
            })
            .collect::<Result<_>>()?;
        Ok(BartMemory {
            kv,
            len_k,
            lens: lens
                .iter()
                .flat_map(|&l| std::iter::repeat_n(l, copies))
                .collect(),
        })
    }

    /// The encoder inputs right-padded with `pad_token_id`: ids, length, lengths.
    pub fn pad_inputs(&self, inputs: &[Vec<u32>]) -> (Vec<u32>, usize, Vec<usize>) {
        let len = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![self.config.pad_token_id; inputs.len() * len];
        for (b, x) in inputs.iter().enumerate() {
            ids[b * len..b * len + x.len()].copy_from_slice(x);
        }
        (ids, len, inputs.iter().map(Vec::len).collect())
    }

    /// The decoder's final hidden states `[batch·len, d]` for decoder `ids`/`positions`
    /// (`[batch, len]`) over `memory`, appending to `caches` when given (see
    /// [`super::gpt2::Gpt2::forward`] for the cache contract).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_hidden(
        &self,
        be: &B,
        memory: &BartMemory<B>,
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
        if memory.lens.len() != batch || memory.kv.len() != self.decoder.len() {
            return Err(Error::invalid(
                "memory",
                format!(
                    "memory for {} rows and {} layers, decoder call of {batch} rows and {} layers",
                    memory.lens.len(),
                    memory.kv.len(),
                    self.decoder.len()
                ),
            ));
        }
        if let Some(c) = caches.as_deref() {
            if c.len() != self.decoder.len() {
                return Err(Error::invalid(
                    "caches",
                    format!("{} caches for {} layers", c.len(), self.decoder.len()),
                ));
            }
        }
        let mut x = self.embed(be, &self.decoder_embed, ids, positions)?;
        let mut caches = caches.map(|c| c.iter_mut());
        for (l, kv) in self.decoder.iter().zip(&memory.kv) {
            let cache: Option<&mut dyn KvCache<B>> = match caches.as_mut() {
                Some(it) => it.next().map(|c| &mut **c as &mut dyn KvCache<B>),
                None => None,
            };
            let a = l
                .self_attn
                .forward_self(be, &x, batch, len, None, true, cache)?;
            x = l.self_attn_layer_norm.forward(be, &a, Some(&x))?;
            let a = l.encoder_attn.forward_cross_kv(
                be,
                &x,
                kv,
                batch,
                len,
                memory.len_k,
                Some(&memory.lens),
            )?;
            x = l.encoder_attn_layer_norm.forward(be, &a, Some(&x))?;
            let f = l.ffn.forward(be, &x)?;
            x = l.final_layer_norm.forward(be, &f, Some(&x))?;
        }
        Ok(x)
    }

    /// Logits `[rows.len(), vocab]` of the hidden-state rows `rows`.
    pub fn logits(&self, be: &B, hidden: &B::Tensor, rows: &[u32]) -> Result<B::Tensor> {
        let picked = be.gather_rows(hidden, rows)?;
        be.linear(
            &picked,
            &self.lm_head.table,
            Some(&self.lm_bias),
            Activation::None,
        )
    }

    /// Teacher-forced logits `[len, vocab]` (f32) of decoder tokens `decoder_ids` given encoder
    /// input `input` (full forward passes, no cache).
    pub fn sequence_logits(&self, be: &B, input: &[u32], decoder_ids: &[u32]) -> Result<Vec<f32>> {
        let memory = self.encode(be, &[input.to_vec()], 1)?;
        let positions: Vec<u32> = (0..decoder_ids.len() as u32).collect();
        let hidden = self.decode_hidden(
            be,
            &memory,
            decoder_ids,
            &positions,
            1,
            decoder_ids.len(),
            None,
        )?;
        be.to_f32(&self.logits(be, &hidden, &positions)?)
    }
}

impl<B: Backend> TokenModel<B> for Bart<B> {
    type Memory = BartMemory<B>;

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn eos_token_id(&self) -> u32 {
        self.config.eos_token_id
    }

    fn pad_token_id(&self) -> u32 {
        self.config.pad_token_id
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn cache_layout(&self) -> (usize, usize) {
        (self.config.decoder_layers, self.config.d_model)
    }

    fn decoder_prompt(&self, index: usize, input: &[u32]) -> Result<Vec<u32>> {
        let c = &self.config;
        if input.is_empty() {
            return Err(Error::invalid(
                "prompt",
                format!("input {index} is empty: the encoder needs at least one token"),
            ));
        }
        if input.len() > c.max_position_embeddings {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "input {index} has {} tokens, more than the encoder's {} positions",
                    input.len(),
                    c.max_position_embeddings
                ),
            ));
        }
        check_vocab(index, input, c.vocab_size)?;
        Ok(vec![c.decoder_start_token_id])
    }

    fn encode(&self, be: &B, inputs: &[Vec<u32>], copies: usize) -> Result<BartMemory<B>> {
        for (i, x) in inputs.iter().enumerate() {
            self.decoder_prompt(i, x)?;
        }
        let (ids, len, lens) = self.pad_inputs(inputs);
        let hidden = self.encode_hidden(be, &ids, inputs.len(), len, &lens)?;
        self.memory(be, &hidden, inputs.len(), len, &lens, copies.max(1))
    }

    fn select_memory(
        &self,
        be: &B,
        memory: &BartMemory<B>,
        keep: &[usize],
    ) -> Result<BartMemory<B>> {
        let len_k = memory.len_k;
        if let Some(&bad) = keep.iter().find(|&&j| j >= memory.lens.len()) {
            return Err(Error::invalid(
                "keep",
                format!("row {bad} is outside the memory's {}", memory.lens.len()),
            ));
        }
        let rows: Vec<u32> = keep
            .iter()
            .flat_map(|&j| (j * len_k..(j + 1) * len_k).map(|r| r as u32))
            .collect();
        Ok(BartMemory {
            kv: memory
                .kv
                .iter()
                .map(|kv| be.gather_rows(kv, &rows))
                .collect::<Result<_>>()?,
            len_k,
            lens: keep.iter().map(|&j| memory.lens[j]).collect(),
        })
    }

    fn decode(
        &self,
        be: &B,
        memory: &BartMemory<B>,
        ids: &[u32],
        positions: &[u32],
        batch: usize,
        len: usize,
        rows: &[u32],
        caches: Option<&mut [&mut dyn KvCache<B>]>,
    ) -> Result<Vec<f32>> {
        let hidden = self.decode_hidden(be, memory, ids, positions, batch, len, caches)?;
        be.to_f32(&self.logits(be, &hidden, rows)?)
    }
}
