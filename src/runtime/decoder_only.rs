//! The decoder-only language model GPT-2 ([`super::gpt2`]), GPT-Neo ([`super::gpt_neo`]) and
//! GPT-1 ([`super::gpt1`]) share: token plus learned position embeddings, N blocks of causal
//! self-attention and a feed-forward block, each with a residual connection, and a
//! language-model head that is the token embedding itself (tied) unless the checkpoint has its
//! own.
//!
//! Where the LayerNorms sit is the one structural choice ([`Norm`]): before each sub-layer
//! with a final LayerNorm after the last block (GPT-2, GPT-Neo), or after each residual sum
//! with no final one (GPT-1, the original Transformer's decoder). What differs between the
//! models beyond that (projections fused or not, biases, the attention scale, local windows)
//! lives in their [`MultiHeadAttention`] and [`FeedForward`] layers, built by each model's
//! loader from its own config and weight names ([`DecoderConfig::build`]).
//!
//! A loaded model is a [`DecoderLm`]: the family's config beside the stack. `Gpt2<B>`,
//! `GptNeo<B>` and `Gpt1<B>` are that type with their configs, so loading, the forward pass
//! and the decoding loop's [`TokenModel`] are written once here.

use super::backend::{Activation, Backend};
use super::checkpoint::Checkpoint;
use super::generate::TokenModel;
use super::kv_cache::DecodeStep;
use super::layers::{Embedding, FeedForward, KvCache, LayerNorm, Linear, MultiHeadAttention};
use crate::error::{Error, Result};
use std::path::Path;

/// Where a block's LayerNorms sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`; a final LayerNorm after the last block.
    Pre,
    /// `ln_1(x + attn(x))`, then `ln_2(x + mlp(x))`; no final LayerNorm.
    Post,
}

/// One decoder block: causal self-attention and a feed-forward block.
pub struct DecoderBlock<B: Backend> {
    pub ln_1: LayerNorm<B>,
    pub attn: MultiHeadAttention<B>,
    pub ln_2: LayerNorm<B>,
    pub mlp: FeedForward<B>,
}

/// A decoder-only language model on backend `B`.
pub struct DecoderOnly<B: Backend> {
    /// Token embedding `[vocab, width]`.
    pub wte: Embedding<B>,
    /// Learned positions `[n_positions, width]`.
    pub wpe: Embedding<B>,
    pub blocks: Vec<DecoderBlock<B>>,
    pub norm: Norm,
    /// The final LayerNorm ([`Norm::Pre`] only).
    pub ln_f: Option<LayerNorm<B>>,
    /// `[vocab, width]`, no bias, when the checkpoint has its own; `None` when tied: the
    /// logits then read `wte`'s table itself (one copy of the largest tensor, not two).
    pub lm_head: Option<Linear<B>>,
    pub vocab_size: usize,
    pub n_positions: usize,
}

impl<B: Backend> DecoderOnly<B> {
    /// The final hidden states (after the last LayerNorm), `[batch·len, width]`, of `batch`
    /// sequences of `len` tokens (`ids` and `positions` row-major `[batch, len]`).
    ///
    /// Without caches every sequence attends causally to its own tokens from the first one;
    /// padding must come after a sequence's tokens (right padding), where causality keeps it
    /// out of every real token's view. With caches (one per layer) the tokens are appended to
    /// them and attend to everything cached (see [`KvCache`]), or to the last `w` positions in
    /// a layer with a local window.
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
        if let Some(&bad) = positions.iter().find(|&&p| p as usize >= self.n_positions) {
            return Err(Error::invalid(
                "positions",
                format!(
                    "position {bad} is past the context of {} positions",
                    self.n_positions
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::invalid(
                "ids",
                format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            ));
        }
        let mut x = be.add(
            &self.wte.forward(be, ids)?,
            &self.wpe.forward(be, positions)?,
        )?;
        let mut caches = caches.map(|c| c.iter_mut());
        for block in &self.blocks {
            let cache: Option<&mut dyn KvCache<B>> = match caches.as_mut() {
                Some(it) => it.next().map(|c| &mut **c as &mut dyn KvCache<B>),
                None => None,
            };
            match self.norm {
                Norm::Pre => {
                    let h = block.ln_1.forward(be, &x, None)?;
                    let a = block
                        .attn
                        .forward_self(be, &h, batch, len, None, true, cache)?;
                    x = be.add(&x, &a)?;
                    let h = block.ln_2.forward(be, &x, None)?;
                    let m = block.mlp.forward(be, &h)?;
                    x = be.add(&x, &m)?;
                }
                Norm::Post => {
                    let a = block
                        .attn
                        .forward_self(be, &x, batch, len, None, true, cache)?;
                    let n = block.ln_1.forward(be, &a, Some(&x))?;
                    let m = block.mlp.forward(be, &n)?;
                    x = block.ln_2.forward(be, &m, Some(&n))?;
                }
            }
        }
        match &self.ln_f {
            Some(ln_f) => ln_f.forward(be, &x, None),
            None => Ok(x),
        }
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

    /// Checks prompt `index` of a decoder-only model (`model` names it in errors): at least one
    /// token, no more than the context, every id in the vocabulary. Returns it as the decoder
    /// prompt.
    pub fn check_prompt(&self, model: &str, index: usize, input: &[u32]) -> Result<Vec<u32>> {
        if input.is_empty() {
            return Err(Error::invalid(
                "prompt",
                format!("prompt {index} is empty: {model} needs at least one token to continue"),
            ));
        }
        if input.len() > self.n_positions {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "prompt {index} has {} tokens, more than the model's context of {}",
                    input.len(),
                    self.n_positions
                ),
            ));
        }
        super::generate::check_vocab(index, input, self.vocab_size)?;
        Ok(input.to_vec())
    }
}

/// Backends that may run a decoder-only model's one-token decoding steps their own way
/// ([`TokenModel::captured_step`]): the CUDA backend replays them from a CUDA graph
/// (`super::graph_step`); the CPU backends keep the default, none.
pub trait DecoderStepBackend: Backend + Sized {
    /// A step for `batch` sequences of up to `capacity` positions of `lm`, or `None` where
    /// this backend (or its settings, or the model's structure) has none.
    fn decoder_step<'m>(
        &'m self,
        _lm: &'m DecoderOnly<Self>,
        _batch: usize,
        _capacity: usize,
    ) -> Result<Option<Box<dyn DecodeStep<Self> + 'm>>> {
        Ok(None)
    }
}

impl DecoderStepBackend for super::cpu::Cpu {}
impl DecoderStepBackend for super::cpu::CpuBf16 {}

/// What a decoder-only family (GPT-1, GPT-2, GPT-Neo) supplies to [`DecoderLm`]: how to read
/// its `config.json`, its token ids, and how to build the stack from its weight names.
pub trait DecoderConfig: Sized {
    /// The family's name in messages ("GPT-2").
    const FAMILY: &'static str;
    /// Reads `dir/config.json`.
    fn read(dir: &Path) -> Result<Self>;
    /// End-of-sequence id (one no token has when the family has none).
    fn eos_token_id(&self) -> u32;
    /// The id right padding is filled with (never seen by a real token).
    fn pad_token_id(&self) -> u32 {
        self.eos_token_id()
    }
    /// Layers and width (heads·dim) of the self-attention KV cache.
    fn cache_layout(&self) -> (usize, usize);
    /// Takes every tensor of the family out of `ckpt` and builds the stack (shapes checked
    /// against the config before anything sized by it is allocated).
    fn build<B: Backend>(&self, be: &B, ckpt: &mut Checkpoint) -> Result<DecoderOnly<B>>;
}

/// A loaded decoder-only language model on backend `B`: its family's config `C` and the
/// shared stack.
pub struct DecoderLm<B: Backend, C> {
    pub config: C,
    lm: DecoderOnly<B>,
}

impl<B: Backend, C: DecoderConfig> DecoderLm<B, C> {
    /// Loads `dir/config.json` and `dir/model.safetensors`; a tensor the model does not use is
    /// an error naming it.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config = C::read(dir)?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let model = Self::from_checkpoint(be, config, &mut ckpt)?;
        ckpt.finish()?;
        Ok(model)
    }

    /// Takes the model's tensors out of `ckpt` (see [`DecoderConfig::build`]).
    pub fn from_checkpoint(be: &B, config: C, ckpt: &mut Checkpoint) -> Result<Self> {
        let lm = config.build(be, ckpt)?;
        Ok(DecoderLm { config, lm })
    }

    /// The final hidden states: see [`DecoderOnly::forward`].
    pub fn forward(
        &self,
        be: &B,
        ids: &[u32],
        positions: &[u32],
        batch: usize,
        len: usize,
        caches: Option<&mut [&mut dyn KvCache<B>]>,
    ) -> Result<B::Tensor> {
        self.lm.forward(be, ids, positions, batch, len, caches)
    }

    /// Logits `[rows.len(), vocab]` of the hidden-state rows `rows`.
    pub fn logits(&self, be: &B, hidden: &B::Tensor, rows: &[u32]) -> Result<B::Tensor> {
        self.lm.logits(be, hidden, rows)
    }

    /// Logits at every position of one sequence, `[len, vocab]` as f32 (a full forward pass).
    pub fn sequence_logits(&self, be: &B, ids: &[u32]) -> Result<Vec<f32>> {
        self.lm.sequence_logits(be, ids)
    }

    /// Whether the language-model head is a matrix of its own (an untied `lm_head.weight`)
    /// rather than the token embedding.
    pub fn has_own_lm_head(&self) -> bool {
        self.lm.lm_head.is_some()
    }

    /// The stack itself.
    pub fn decoder(&self) -> &DecoderOnly<B> {
        &self.lm
    }
}

impl<B: DecoderStepBackend, C: DecoderConfig> TokenModel<B> for DecoderLm<B, C> {
    type Memory = ();

    fn vocab_size(&self) -> usize {
        self.lm.vocab_size
    }

    fn eos_token_id(&self) -> u32 {
        self.config.eos_token_id()
    }

    fn pad_token_id(&self) -> u32 {
        self.config.pad_token_id()
    }

    fn max_positions(&self) -> usize {
        self.lm.n_positions
    }

    fn cache_layout(&self) -> (usize, usize) {
        self.config.cache_layout()
    }

    fn decoder_prompt(&self, index: usize, input: &[u32]) -> Result<Vec<u32>> {
        self.lm.check_prompt(C::FAMILY, index, input)
    }

    fn encode(&self, _be: &B, _inputs: &[Vec<u32>], _copies: usize) -> Result<()> {
        Ok(())
    }

    fn select_memory(&self, _be: &B, _memory: &(), _keep: &[usize]) -> Result<()> {
        Ok(())
    }

    fn captured_step<'s>(
        &'s self,
        be: &'s B,
        batch: usize,
        capacity: usize,
    ) -> Result<Option<Box<dyn DecodeStep<B> + 's>>> {
        be.decoder_step(&self.lm, batch, capacity)
    }

    fn decode(
        &self,
        be: &B,
        _memory: &(),
        ids: &[u32],
        positions: &[u32],
        batch: usize,
        len: usize,
        rows: &[u32],
        caches: Option<&mut [&mut dyn KvCache<B>]>,
    ) -> Result<Vec<f32>> {
        let hidden = self.lm.forward(be, ids, positions, batch, len, caches)?;
        be.to_f32(&self.lm.logits(be, &hidden, rows)?)
    }
}
