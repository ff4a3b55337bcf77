//! GPT-Neo (Hugging Face `GPTNeoForCausalLM`, `model_type: gpt_neo`): GPT-3's alternation of
//! dense and locally banded attention as EleutherAI shipped it. The same decoder-only,
//! pre-LayerNorm stack as GPT-2 ([`super::decoder_only`]), with these differences, each taken
//! from Hugging Face's `modeling_gpt_neo.py` and held to it by tests/runtime_gpt_neo.rs:
//!
//! - Layer i's attention is `global` (causal over every earlier position) or `local`: query i
//!   sees key j iff `i − window_size < j ≤ i` (the last `window_size` positions, itself
//!   included; HF builds this as the causal mask XOR the causal mask shifted down by
//!   `window_size`). The kinds come from `attention_types`, a list of `[[kinds…], repeat]`
//!   pairs expanded in order (`[[["global", "local"], 12]]` → 24 layers alternating); a local
//!   layer runs the backends' sliding-window attention (the CPU computes the band only; the
//!   CUDA backend's fused kernel skips the tiles outside it), and during decoding attends to
//!   the last `window_size` cached positions.
//! - Scores are not scaled by 1/√head_dim (scale 1).
//! - Q, K and V are three bias-free `nn.Linear` projections (`attn.attention.{q,k,v}_proj`,
//!   fused here into one GEMM), the output projection `attn.attention.out_proj` has a bias;
//!   the MLP is `nn.Linear` (`mlp.c_fc`, `mlp.c_proj`: `[out, in]`, not GPT-2's Conv1D).
//! - The language-model head is `lm_head.weight` when the checkpoint stores one, else the
//!   token embedding ([`Checkpoint::take_lm_head`]).
//!
//! The tokenizer is GPT-2's byte-level BPE ([`super::gpt2_tokenizer`]).

use super::backend::{Activation, Backend};
use super::checkpoint::{distinct_head, read_json, Checkpoint};
use super::config::{Fields, MAX_COUNT, MAX_LAYERS, MAX_WIDTH};
use super::decoder_only::{DecoderBlock, DecoderConfig, DecoderLm, DecoderOnly, Norm};
use super::layers::{Embedding, FeedForward, LayerNorm, Linear, MultiHeadAttention};
use crate::error::Result;
use serde_json::Value;
use std::ops::RangeInclusive;
use std::path::Path;

/// The attention of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKind {
    /// Causal over the whole sequence.
    Global,
    /// Causal over the last `window_size` positions.
    Local,
}

/// The fields of a GPT-Neo `config.json` the model uses.
#[derive(Clone, Debug, PartialEq)]
pub struct GptNeoConfig {
    pub vocab_size: usize,
    /// Context length: positions 0 .. max_position_embeddings have an embedding.
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// MLP width (`intermediate_size`, or 4·hidden_size when null).
    pub intermediate_size: usize,
    /// Per layer, from `attention_types`.
    pub attention_layers: Vec<AttentionKind>,
    /// Positions a local layer's query sees (itself included), ≥ 1.
    pub window_size: usize,
    pub activation: Activation,
    pub layer_norm_epsilon: f32,
    /// The head is the token embedding (`tie_word_embeddings`, default true).
    pub tie_word_embeddings: bool,
    /// End-of-text id (`eos_token_id`, 50256 when absent).
    pub eos_token_id: u32,
}

/// The largest `[kinds…]` list of one `attention_types` entry (every layer its own kind).
const MAX_KINDS: usize = MAX_LAYERS;

impl GptNeoConfig {
    /// Reads `dir/config.json`; anything but a GPT-Neo is an error.
    pub fn from_folder(dir: &Path) -> Result<GptNeoConfig> {
        let path = dir.join("config.json");
        Self::from_json(&read_json(&path)?, &path.display().to_string())
    }

    /// Parses a `config.json` value (`file` names it in errors). Every field is type- and
    /// range-checked; `attention_types` must expand to exactly `num_layers` kinds, each
    /// `global` or `local` (Hugging Face's own checks), and a stored `attention_layers` (which
    /// Hugging Face recomputes from `attention_types`) must agree with it.
    pub fn from_json(v: &Value, file: &str) -> Result<GptNeoConfig> {
        let f = Fields::new(v, file)?;
        let model_type = f.str_or("model_type", "")?;
        if model_type != "gpt_neo" {
            return Err(f.err(format!(
                "unsupported architecture: model_type `{model_type}`; this loader reads `gpt_neo`"
            )));
        }
        let act_name = f.str_or("activation_function", "gelu_new")?;
        let activation = Activation::from_hf_name(act_name)
            .ok_or_else(|| f.err(format!("unsupported activation_function `{act_name}`")))?;
        let hidden_size = f.int("hidden_size", 1..=MAX_WIDTH)?;
        let vocab_size = f.int("vocab_size", 1..=MAX_COUNT)?;
        // `num_attention_heads` / `num_hidden_layers` are Hugging Face's aliases of these.
        let present = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
        let aliased = |key: &str, alias: &str, range: RangeInclusive<usize>| -> Result<usize> {
            match (present(key), present(alias)) {
                (false, true) => f.int(alias, range),
                (true, true) => {
                    let (n, a) = (f.int(key, range.clone())?, f.int(alias, range)?);
                    if n != a {
                        return Err(f.err(format!("`{key}` is {n} but its alias `{alias}` is {a}")));
                    }
                    Ok(n)
                }
                _ => f.int(key, range),
            }
        };
        let num_layers = aliased("num_layers", "num_hidden_layers", 1..=MAX_LAYERS)?;
        let num_heads = aliased("num_heads", "num_attention_heads", 1..=MAX_WIDTH)?;
        let attention_layers = attention_layers(&f, v, num_layers)?;
        let c = GptNeoConfig {
            vocab_size,
            max_position_embeddings: f.int("max_position_embeddings", 1..=MAX_COUNT)?,
            hidden_size,
            num_layers,
            num_heads,
            intermediate_size: f.int_or("intermediate_size", 4 * hidden_size, 1..=MAX_WIDTH)?,
            attention_layers,
            window_size: f.int_or("window_size", 256, 1..=MAX_COUNT)?,
            activation,
            layer_norm_epsilon: f.epsilon_or("layer_norm_epsilon", 1e-5)?,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(true),
            eos_token_id: f.int_or("eos_token_id", 50256, 0..=vocab_size - 1)? as u32,
        };
        if !c.hidden_size.is_multiple_of(c.num_heads) {
            return Err(f.err(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                c.hidden_size, c.num_heads
            )));
        }
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Expands `attention_types` (default `[[["global", "local"], 12]]`, as Hugging Face's) into
/// one kind per layer, checking its shape and counting before expanding anything.
fn attention_layers(f: &Fields<'_>, v: &Value, num_layers: usize) -> Result<Vec<AttentionKind>> {
    let default = serde_json::json!([[["global", "local"], 12]]);
    let types = match v.get("attention_types") {
        None | Some(Value::Null) => &default,
        Some(t) => t,
    };
    let bad = |why: String| f.err(format!("`attention_types` {why}"));
    let entries = types
        .as_array()
        .ok_or_else(|| bad(format!("is {types}, not a list of [[kinds…], count] pairs")))?;
    let mut layers = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let pair = entry.as_array().filter(|p| p.len() == 2);
        let (kinds, count) = match pair {
            Some(p) => (p[0].as_array(), p[1].as_u64()),
            None => (None, None),
        };
        let (Some(kinds), Some(count)) = (kinds, count) else {
            return Err(bad(format!(
                "entry {i} is {entry}, not a [[kinds…], count] pair"
            )));
        };
        if kinds.len() > MAX_KINDS {
            return Err(bad(format!("entry {i} lists {} kinds", kinds.len())));
        }
        let kinds = kinds
            .iter()
            .map(|k| match k.as_str() {
                Some("global") => Ok(AttentionKind::Global),
                Some("local") => Ok(AttentionKind::Local),
                _ => Err(bad(format!(
                    "entry {i} has the kind {k}: only \"global\" and \"local\" exist"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        // Counted before anything is expanded: a corrupt count cannot allocate.
        let total = (kinds.len() as u64)
            .checked_mul(count)
            .and_then(|n| n.checked_add(layers.len() as u64));
        match total {
            Some(n) if n <= num_layers as u64 => {}
            _ => {
                return Err(bad(format!(
                    "gives more layers than num_layers ({num_layers}) by entry {i}"
                )))
            }
        }
        // ≤ num_layers (checked above); an empty list repeated any number of times adds none.
        let n = kinds.len() * count as usize;
        layers.extend(kinds.iter().cycle().take(n));
    }
    if layers.len() != num_layers {
        return Err(bad(format!(
            "gives {} layers but num_layers is {num_layers}",
            layers.len()
        )));
    }
    if let Some(stored) = v.get("attention_layers").filter(|x| !x.is_null()) {
        let name = |k: &AttentionKind| match k {
            AttentionKind::Global => "global",
            AttentionKind::Local => "local",
        };
        let expected: Vec<&str> = layers.iter().map(name).collect();
        if stored != &serde_json::json!(expected) {
            return Err(f.err(format!(
                "`attention_layers` {stored} disagrees with `attention_types` {types}, which \
                 expands to {expected:?}"
            )));
        }
    }
    Ok(layers)
}

/// A loaded GPT-Neo language model on backend `B`.
pub type GptNeo<B> = DecoderLm<B, GptNeoConfig>;

impl DecoderConfig for GptNeoConfig {
    const FAMILY: &'static str = "GPT-Neo";

    fn read(dir: &Path) -> Result<Self> {
        GptNeoConfig::from_folder(dir)
    }

    fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    fn cache_layout(&self) -> (usize, usize) {
        (self.num_layers, self.hidden_size)
    }

    /// Takes every GPT-Neo tensor out of `ckpt`: names with or without the `transformer.`
    /// prefix (a `GPTNeoForCausalLM` or a bare `GPTNeoModel`); the head as
    /// [`Checkpoint::take_lm_head`] says.
    fn build<B: Backend>(&self, be: &B, ckpt: &mut Checkpoint) -> Result<DecoderOnly<B>> {
        let c = self;
        let (e, inner) = (c.hidden_size, c.intermediate_size);
        let head = ckpt.take_lm_head(c.tie_word_embeddings, &[c.vocab_size, e])?;
        ckpt.detect_prefix("transformer.", "wte.weight");
        // The config against the file's tensors before anything sized by it is allocated.
        ckpt.expect_shape(
            "wte.weight",
            &[c.vocab_size, e],
            "vocab_size and hidden_size",
        )?;
        ckpt.expect_shape(
            "wpe.weight",
            &[c.max_position_embeddings, e],
            "max_position_embeddings and hidden_size",
        )?;
        ckpt.expect_layers("h.", c.num_layers, "num_layers")?;
        let ln = |ckpt: &mut Checkpoint, name: &str| -> Result<LayerNorm<B>> {
            let gamma = ckpt.take(&format!("{name}.weight"), &[e])?;
            let beta = ckpt.take(&format!("{name}.bias"), &[e])?;
            LayerNorm::new(be, &gamma, &beta, c.layer_norm_epsilon)
        };
        // nn.Linear: weight [out, in], bias [out].
        let linear = |ckpt: &mut Checkpoint, name: &str, inp: usize, out: usize| {
            let w = ckpt.take(&format!("{name}.weight"), &[out, inp])?;
            let b = ckpt.take(&format!("{name}.bias"), &[out])?;
            Linear::from_owned(be, w, Some(b))
        };
        let wte = ckpt.take("wte.weight", &[c.vocab_size, e])?;
        let lm_head = match distinct_head(head, &wte) {
            Some(w) => Some(Linear::from_owned(be, w, None)?),
            None => None,
        };
        let wte = Embedding::from_owned(be, wte)?;
        let wpe = Embedding::from_owned(
            be,
            ckpt.take("wpe.weight", &[c.max_position_embeddings, e])?,
        )?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for (i, kind) in c.attention_layers.iter().enumerate() {
            let p = format!("h.{i}");
            let a = format!("{p}.attn.attention");
            // Checkpoints saved by older versions carry the mask buffers; masks are computed.
            ckpt.discard(&format!("{a}.bias"));
            ckpt.discard(&format!("{a}.masked_bias"));
            let proj = |ckpt: &mut Checkpoint, name: &str| {
                ckpt.take(&format!("{a}.{name}.weight"), &[e, e])
            };
            let (q, k, v) = (
                proj(ckpt, "q_proj")?,
                proj(ckpt, "k_proj")?,
                proj(ckpt, "v_proj")?,
            );
            let out_w = proj(ckpt, "out_proj")?;
            let out_b = ckpt.take(&format!("{a}.out_proj.bias"), &[e])?;
            let mut attn = MultiHeadAttention::self_attention(
                be,
                c.num_heads,
                (&q, None),
                (&k, None),
                (&v, None),
                (&out_w, Some(&out_b)),
            )?;
            attn.scale = Some(1.0);
            attn.local_window = (*kind == AttentionKind::Local).then_some(c.window_size);
            blocks.push(DecoderBlock {
                ln_1: ln(ckpt, &format!("{p}.ln_1"))?,
                attn,
                ln_2: ln(ckpt, &format!("{p}.ln_2"))?,
                mlp: FeedForward {
                    up: linear(ckpt, &format!("{p}.mlp.c_fc"), e, inner)?,
                    down: linear(ckpt, &format!("{p}.mlp.c_proj"), inner, e)?,
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
            n_positions: c.max_position_embeddings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GPTNeoConfig().to_json_string()` of transformers 5.24 (EleutherAI/gpt-neo-1.3B's
    /// shape): 24 layers alternating from `[[["global", "local"], 12]]`, window 256.
    const HF_DEFAULT: &str = r#"{"activation_function": "gelu_new", "attention_dropout": 0.0,
        "attention_layers": ["global", "local", "global", "local", "global", "local", "global",
        "local", "global", "local", "global", "local", "global", "local", "global", "local",
        "global", "local", "global", "local", "global", "local", "global", "local"],
        "attention_types": [[["global", "local"], 12]], "bos_token_id": 50256,
        "classifier_dropout": 0.1, "embed_dropout": 0.0, "eos_token_id": 50256,
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": null,
        "layer_norm_epsilon": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neo",
        "num_heads": 16, "num_layers": 24, "pad_token_id": null, "resid_dropout": 0.0,
        "tie_word_embeddings": true, "transformers_version": "5.24.0", "use_cache": true,
        "vocab_size": 50257, "window_size": 256}"#;

    #[test]
    fn hugging_face_default_config_reads_as_24_alternating_layers() {
        let v: Value = serde_json::from_str(HF_DEFAULT).unwrap();
        let c = GptNeoConfig::from_json(&v, "config.json").unwrap();
        assert_eq!(c.num_layers, 24);
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.intermediate_size, 4 * 2048);
        assert_eq!(c.window_size, 256);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert!(c.attention_layers.iter().enumerate().all(|(i, &k)| k
            == if i % 2 == 0 {
                AttentionKind::Global
            } else {
                AttentionKind::Local
            }));
        // Without attention_types Hugging Face's default gives the same 24 layers.
        let mut v = v;
        v.as_object_mut().unwrap().remove("attention_types");
        assert_eq!(
            GptNeoConfig::from_json(&v, "config.json").unwrap(),
            c,
            "default attention_types"
        );
    }
}
