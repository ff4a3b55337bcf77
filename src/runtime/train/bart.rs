//! `BartForConditionalGeneration` as Hugging Face defines it, trainable for BART's denoising
//! objective: the encoder reads the noised text, the decoder is fed the original shifted right
//! (`decoder_start_token_id` first) and predicts the original; loss = mean cross-entropy over
//! the labels that are not −100. Forward + backward give the gradient of every parameter
//! under its Hugging Face name.
//!
//! The architecture is [`crate::runtime::bart`]'s (post-LN layers, learned positions two rows
//! down, `layernorm_embedding`, the embedding ×√d when `scale_embedding`), built from the
//! training layers of [`super::layers`] (self- and cross-attention, feed-forward, LayerNorm,
//! all with their backward). `final_logits_bias` is a buffer in Hugging Face (not a
//! parameter): it is added to the logits and gets no gradient.
//!
//! Token tables. A tied model (`tie_word_embeddings: true`) has one, `model.shared`, used three
//! times — encoder lookup, decoder lookup, output projection — and its gradient is the sum of
//! the three (the lookups give none to the padding row). In transformers 5 an untied model has
//! four distinct parameters: `model.shared.weight`, `model.encoder.embed_tokens.weight`,
//! `model.decoder.embed_tokens.weight` and `lm_head.weight` (`save_pretrained` writes all four);
//! each stack reads its own table and the head its own, so each gets only its own use's
//! gradient and `model.shared` is read by nothing (autograd leaves it without a gradient and
//! `torch.optim.AdamW` skips it), so it is not a parameter here (read and dropped). A stack whose
//! own table the checkpoint lacks reads `model.shared` instead, as the inference loader does
//! ([`crate::runtime::bart`]); the head of an untied model must be stored. A tied config
//! whose checkpoint stores an `lm_head.weight` different from `model.shared` gets that head
//! as a parameter of its own (transformers 5 does not tie such a pair; the stacks still read
//! `model.shared`).
//!
//! Dropout ([`StepOptions::dropout_seed`]; `None` runs as `model.eval()`) with Hugging Face's
//! placement: `dropout` after each stack's `layernorm_embedding` and after every attention
//! output projection and feed-forward output (before the residual add), `attention_dropout` on
//! the self- and cross-attention probabilities, `activation_dropout` between the feed-forward
//! activation and `fc2`. Masks come from the Philox streams of [`crate::rng`]: site s of step t
//! uses offset `t·sites + s` (sites numbered in forward order, see [`DropoutSiteInfo`]), so a
//! step is a pure function of (weights, batch, seed, step) on either backend, and the backward
//! regenerates each mask. The decoder sees every earlier target position (HF's default without
//! a `decoder_attention_mask`: right padding only ever follows the real tokens).
//!
//! LayerDrop (`encoder_layerdrop`, `decoder_layerdrop`, [`BartForConditionalGeneration::
//! skipped_layers`]) as Hugging Face's `BartEncoder`/`BartDecoder`: only in training (a
//! dropout seed set), one uniform draw u per layer and step for the whole batch, the layer
//! skipped (its output is its input) when u < p; eval never skips. The draw is the Philox word
//! of (seed, [`LAYERDROP_STREAM`] | step, layer index) against round(p·2^32), so the step stays
//! a pure function of (weights, batch, seed, step) on either backend and p = 1 skips every
//! layer. A skipped layer's parameters are listed in the output's [`Gradients::no_grad`]
//! (autograd leaves them without a gradient, `.grad is None`), and so are the encoder's own
//! parameters when every decoder layer is skipped (nothing reads the encoder's output then);
//! they hold zero tensors, so the
//! global norm and clipping read them as torch's do (not at all); [`super::AdamW::step`]
//! skips them as `torch.optim.AdamW` does: no weight decay, no moment update, and their
//! per-parameter step count, which their bias correction uses, does not advance. Its dropout
//! sites keep their numbers unused. Hugging Face's decoder skips with `continue`, so with a
//! cache the skipped layer's entry would be missing; our training step keeps no KV cache and
//! generation is eval, so the question does not arise here.
//!
//! Recomputation ([`StepOptions::recompute`]): the forward keeps only each layer's input
//! (`Kept::Input`) and the backward runs that layer's forward again, with the same weights
//! and the same Philox masks, just before the layer's backward, so the gradients are bit for
//! bit those of the step that keeps everything (tested on the CPU). It saves, per layer, in
//! f32 with r = batch·len rows of the stack, d = d_model, f = the layer's ffn dim, h = heads
//! and m = batch·len_in: the encoder layer's q, k, v, attention context, two LayerNorm inputs,
//! the sub-layer output, fc1's pre-activation and activation and the softmax statistics,
//! 4·r·(7d + 2f + h) bytes; the decoder layer's 4·(r·(11d + 2f + 2h) + 2·m·d) bytes (its
//! cross-attention keys and values are m rows). At BART-base's sizes (d 768, f 3072, 12 heads)
//! that is 45 MiB per encoder layer and 63 MiB per decoder layer for every 4096 rows (and
//! m = r), for one more forward of every layer (about a third more arithmetic in the layers).
//! A unit test sums the cache tensors' sizes against these formulas.
//!
//! Saving ([`BartForConditionalGeneration::save_pretrained`]): `config.json` (the loaded one,
//! with every field [`BartConfig`] holds set from the model's config) and `model.safetensors`
//! with the tensors transformers 5's `save_pretrained` writes — tied: `model.shared.weight`
//! and no `lm_head.weight`; untied: all four tables — plus `final_logits_bias` `[1, vocab]`.
//! transformers 5.24 loads it without a missing or unexpected key (tests/train_bart_save.rs).

use super::backend::{DropoutSite, TrainBackend};
use super::bert_encoder::StepOptions;
use super::layers::{
    cross_attention_backward, cross_attention_forward, feed_forward_backward_dropout,
    feed_forward_forward_dropout, layer_norm_backward, layer_norm_forward, linear_backward,
    linear_forward, maybe_dropout, self_attention_backward, self_attention_forward,
    FeedForwardCache, FeedForwardParams, LayerNormParams, LinearParams, SelfAttentionCache,
    SelfAttentionParams,
};
use super::optim::{Gradients, Param};
use crate::error::{Error, Result};
use crate::rng::Dropout;
use crate::runtime::backend::{Activation, AttentionMask, CausalAlign};
use crate::runtime::bart::{own_stack_table, BartConfig, POSITION_OFFSET};
use crate::runtime::checkpoint::{
    distinct_head, read_json, write_json, write_safetensors, Checkpoint, HostParam, NamedTensor,
};
use std::path::Path;

/// BART's LayerNorm epsilon (PyTorch's default).
const LN_EPS: f32 = 1e-5;

/// One denoising batch: the noised inputs (right-padded with `pad_token_id`) and the original
/// sequences as labels (right-padded with −100).
#[derive(Clone, Debug, PartialEq)]
pub struct DenoisingBatch {
    /// `[batch·len_in]`.
    pub input_ids: Vec<u32>,
    /// Real tokens of each input (the rest of its row is padding).
    pub input_lens: Vec<usize>,
    /// `[batch·len_out]`, −100 on padding.
    pub labels: Vec<i64>,
}

/// Hugging Face's `shift_tokens_right`: each row of `labels` (`[batch, len]`) moved one to the
/// right behind `start`, −100 replaced by `pad`.
pub fn shift_tokens_right(labels: &[i64], batch: usize, pad: u32, start: u32) -> Result<Vec<u32>> {
    if batch == 0 || !labels.len().is_multiple_of(batch) {
        return Err(Error::invalid(
            "labels",
            format!("{} labels do not split into {batch} rows", labels.len()),
        ));
    }
    let len = labels.len() / batch;
    let mut out = Vec::with_capacity(labels.len());
    for row in labels.chunks(len) {
        out.push(start);
        for &l in &row[..len - 1] {
            out.push(match l {
                -100 => pad,
                l if l >= 0 && l <= u32::MAX as i64 => l as u32,
                l => {
                    return Err(Error::invalid(
                        "labels",
                        format!("label {l} is not a token id"),
                    ))
                }
            });
        }
    }
    Ok(out)
}

type Lin = (usize, usize);

#[derive(Clone, Copy, Debug)]
struct AttnIx {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
}

#[derive(Clone, Copy, Debug)]
struct EncIx {
    attn: AttnIx,
    ln1: Lin,
    fc1: Lin,
    fc2: Lin,
    ln2: Lin,
}

#[derive(Clone, Copy, Debug)]
struct DecIx {
    attn: AttnIx,
    ln1: Lin,
    cross: AttnIx,
    ln2: Lin,
    fc1: Lin,
    fc2: Lin,
    ln3: Lin,
}

impl AttnIx {
    fn lins(&self) -> [Lin; 4] {
        [self.q, self.k, self.v, self.o]
    }
}

impl EncIx {
    /// Every (weight, bias) pair of the layer.
    fn lins(&self) -> Vec<Lin> {
        let mut v = self.attn.lins().to_vec();
        v.extend([self.ln1, self.fc1, self.fc2, self.ln2]);
        v
    }
}

impl DecIx {
    /// Every (weight, bias) pair of the layer.
    fn lins(&self) -> Vec<Lin> {
        let mut v = self.attn.lins().to_vec();
        v.extend(self.cross.lins());
        v.extend([self.ln1, self.ln2, self.fc1, self.fc2, self.ln3]);
        v
    }
}

/// Token table, positions table and `layernorm_embedding` of one stack.
#[derive(Clone, Copy, Debug)]
struct EmbIx {
    tok: usize,
    pos: usize,
    ln: Lin,
}

/// Which uses of the token embedding have a table of their own (all false when tied: every
/// use reads `model.shared`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct OwnTables {
    encoder: bool,
    decoder: bool,
    head: bool,
}

impl OwnTables {
    /// Whether some use reads `model.shared` (else it is not a parameter here).
    fn shared_used(&self) -> bool {
        !(self.encoder && self.decoder && self.head)
    }
}

/// Parameter names and shapes in Hugging Face's `named_parameters` order, with the token
/// tables `own` says exist besides (or instead of) `model.shared`.
fn names_and_shapes(c: &BartConfig, own: OwnTables) -> Vec<(String, Vec<usize>)> {
    let (d, v) = (c.d_model, c.vocab_size);
    let pos = c.max_position_embeddings + POSITION_OFFSET as usize;
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    if own.shared_used() {
        out.push(("model.shared.weight".into(), vec![v, d]));
    }
    let lin = |out: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, i: usize| {
        out.push((format!("{name}.weight"), vec![o, i]));
        out.push((format!("{name}.bias"), vec![o]));
    };
    let ln = |out: &mut Vec<(String, Vec<usize>)>, name: String| {
        out.push((format!("{name}.weight"), vec![d]));
        out.push((format!("{name}.bias"), vec![d]));
    };
    for (stack, layers, ffn, own_table) in [
        ("encoder", c.encoder_layers, c.encoder_ffn_dim, own.encoder),
        ("decoder", c.decoder_layers, c.decoder_ffn_dim, own.decoder),
    ] {
        if own_table {
            out.push((format!("model.{stack}.embed_tokens.weight"), vec![v, d]));
        }
        out.push((
            format!("model.{stack}.embed_positions.weight"),
            vec![pos, d],
        ));
        for l in 0..layers {
            let p = format!("model.{stack}.layers.{l}");
            let attns: &[&str] = if stack == "encoder" {
                &["self_attn"]
            } else {
                &["self_attn", "encoder_attn"]
            };
            for a in attns {
                for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
                    lin(&mut out, format!("{p}.{a}.{proj}"), d, d);
                }
                ln(&mut out, format!("{p}.{a}_layer_norm"));
            }
            lin(&mut out, format!("{p}.fc1"), ffn, d);
            lin(&mut out, format!("{p}.fc2"), d, ffn);
            ln(&mut out, format!("{p}.final_layer_norm"));
        }
        ln(&mut out, format!("model.{stack}.layernorm_embedding"));
    }
    if own.head {
        out.push(("lm_head.weight".into(), vec![v, d]));
    }
    out
}

/// Dropout sites of one step of a model with `enc` encoder and `dec` decoder layers.
fn sites_per_step(enc: usize, dec: usize) -> u64 {
    2 + 4 * enc as u64 + 6 * dec as u64
}

/// One dropout site of a step, as [`BartForConditionalGeneration::dropout_sites`] lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct DropoutSiteInfo {
    /// Where: e.g. `model.encoder.layers.0.self_attn` (probabilities), `….self_attn.out`,
    /// `….fc1.act`, `….fc2.out`, `model.decoder.layernorm_embedding.out`.
    pub name: String,
    /// Which config field gives its probability: `dropout`, `attention_dropout` or
    /// `activation_dropout`.
    pub kind: &'static str,
    pub site: DropoutSite,
    /// The shape of the tensor it drops from (`[batch, heads, len_q, len_k]` for
    /// probabilities, `[rows, width]` otherwise).
    pub shape: Vec<usize>,
}

/// The sites of one step, in forward order (site number = position in this order).
struct Sites {
    enc_emb: Option<DropoutSite>,
    /// Per encoder layer: probabilities, attention output, activation, feed-forward output.
    enc: Vec<[Option<DropoutSite>; 4]>,
    dec_emb: Option<DropoutSite>,
    /// Per decoder layer: self-attention probabilities and output, cross-attention
    /// probabilities and output, activation, feed-forward output.
    dec: Vec<[Option<DropoutSite>; 6]>,
}

/// `dropout(x)` at an active site, else `None` (the caller reads `x` itself: no copy).
fn dropped<B: TrainBackend>(
    be: &B,
    x: &B::Tensor,
    site: Option<DropoutSite>,
) -> Result<Option<B::Tensor>> {
    match site {
        Some(s) if s.p > 0.0 => be.dropout(x, s).map(Some),
        _ => Ok(None),
    }
}

/// A trainable BART (tied or untied) on backend `B`; parameters in f32.
pub struct BartForConditionalGeneration<B: TrainBackend> {
    /// Its dropout probabilities are read at every step.
    pub config: BartConfig,
    params: Vec<Param<B::Tensor>>,
    /// `final_logits_bias` `[vocab]` (a buffer: no gradient).
    final_logits_bias: B::Tensor,
    /// The `config.json` the model was loaded from ([`Self::save_pretrained`] writes it back
    /// with the fields of `config` updated); `None` for [`Self::from_host`].
    source_config: Option<serde_json::Value>,
    /// `model.shared.weight` of an untied model whose every use has a table of its own: no
    /// parameter (nothing reads it), kept on the host to be saved back as loaded.
    unused_shared: Option<HostParam>,
    enc_emb: EmbIx,
    dec_emb: EmbIx,
    /// The output projection's table.
    head: usize,
    enc: Vec<EncIx>,
    dec: Vec<DecIx>,
}

struct Sub<T, C> {
    /// The LayerNorm's input (residual + sub-block output).
    s: T,
    c: C,
}

struct EncCache<T> {
    attn: Sub<T, SelfAttentionCache<T>>,
    h1: T,
    ffn: Sub<T, FeedForwardCache<T>>,
}

struct DecCache<T> {
    attn: Sub<T, SelfAttentionCache<T>>,
    h1: T,
    cross: Sub<T, SelfAttentionCache<T>>,
    h2: T,
    ffn: Sub<T, FeedForwardCache<T>>,
}

/// What the forward keeps of one layer for the backward.
enum Kept<T, C> {
    /// LayerDrop skipped it: its output is its input, its parameters get zero gradients.
    Skipped,
    /// Recomputation: the layer's input only; the backward runs the layer's forward again
    /// (same weights, same Philox masks) just before its backward.
    Input(T),
    /// The input and every intermediate the layer's backward reads.
    Full(T, C),
}

impl<T, C> Kept<T, C> {
    fn new(recompute: bool, input: T, cache: C) -> Self {
        if recompute {
            Kept::Input(input)
        } else {
            Kept::Full(input, cache)
        }
    }
}

/// The three attention masks of a step.
struct Masks<'m> {
    enc: AttentionMask<'m>,
    dec_self: AttentionMask<'m>,
    cross: AttentionMask<'m>,
}

/// Which layers a training step skips (LayerDrop), by stack and layer index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkippedLayers {
    pub encoder: Vec<bool>,
    pub decoder: Vec<bool>,
}

/// LayerDrop's Philox streams: step t draws from offset `LAYERDROP_STREAM | t`, element l for
/// encoder layer l and `encoder_layers + l` for decoder layer l. Dropout's offsets
/// (`t·sites + s`) stay below 2^63, so the two never share a stream.
pub const LAYERDROP_STREAM: u64 = 1 << 63;

/// Per-step shapes and ids.
struct Shapes<'a> {
    batch: usize,
    len_in: usize,
    len_out: usize,
    input_ids: &'a [u32],
    input_lens: Option<&'a [usize]>,
    decoder_ids: Vec<u32>,
    in_pos: Vec<u32>,
    out_pos: Vec<u32>,
}

/// What a denoising step computes.
pub struct DenoisingOutput<T> {
    pub loss: f32,
    /// `[batch·len_out, vocab]`.
    pub logits: T,
    /// The decoder's input ids (`shift_tokens_right` of the labels).
    pub decoder_input_ids: Vec<u32>,
    pub grads: Gradients<T>,
}

impl<B: TrainBackend> BartForConditionalGeneration<B> {
    /// Loads a `BartForConditionalGeneration` folder, tied or untied (the module doc says
    /// which tables an untied one has).
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let source_config = read_json(&path)?;
        let config = BartConfig::from_json(&source_config, &path.display().to_string())?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let v = config.vocab_size;
        let d = config.d_model;
        let tied = config.tie_word_embeddings;
        // The head's name carries no `model.` prefix: read before it is detected. Required
        // when untied; when tied, a stored head equal to the shared table is that table again.
        let stored_head = ckpt.take_lm_head(tied, &[v, d])?;
        let bias = if ckpt.contains("final_logits_bias") {
            ckpt.take("final_logits_bias", &[1, v])?.values
        } else {
            vec![0.0; v]
        };
        ckpt.detect_prefix("model.", "shared.weight");
        let shared = ckpt.take("shared.weight", &[v, d])?;
        // A tied config whose checkpoint stores a different head: transformers 5 does not tie
        // them (checked in 5.24), so the head is its own parameter, as in the inference loader.
        let head = if tied {
            distinct_head(stored_head, &shared)
        } else {
            stored_head
        };
        let own = OwnTables {
            encoder: own_stack_table(&config, &ckpt, "encoder").is_some(),
            decoder: own_stack_table(&config, &ckpt, "decoder").is_some(),
            head: head.is_some(),
        };
        for (stack, has_own) in [("encoder", own.encoder), ("decoder", own.decoder)] {
            if !has_own {
                ckpt.discard(&format!("{stack}.embed_tokens.weight"));
            }
        }
        let (mut head, mut shared) = (head, Some(shared));
        let mut host = Vec::new();
        for (name, shape) in names_and_shapes(&config, own) {
            let p = match name.as_str() {
                "lm_head.weight" => head.take().expect("an own head was read"),
                "model.shared.weight" => shared.take().expect("read once"),
                n => ckpt.take(n.strip_prefix("model.").expect("model. names"), &shape)?,
            };
            host.push((name, p));
        }
        ckpt.finish()?;
        let mut model = Self::from_host(be, config, host, &bias)?;
        model.source_config = Some(source_config);
        // Read by nothing when every use has its own table; kept to be saved back unchanged.
        model.unused_shared = shared;
        Ok(model)
    }

    /// A model from named host parameters in list order (see [`Self::parameter_names`]) and
    /// `final_logits_bias` `[vocab]`. The list says which own tables there are: for an
    /// untied config any of the stacks' and the head (which must be one), for a tied config
    /// only a head.
    pub fn from_host(
        be: &B,
        config: BartConfig,
        host: Vec<(String, HostParam)>,
        final_logits_bias: &[f32],
    ) -> Result<Self> {
        let has = |n: &str| host.iter().any(|(h, _)| h == n);
        let tied = config.tie_word_embeddings;
        let own = OwnTables {
            encoder: !tied && has("model.encoder.embed_tokens.weight"),
            decoder: !tied && has("model.decoder.embed_tokens.weight"),
            head: has("lm_head.weight"),
        };
        let expected = names_and_shapes(&config, own);
        let ok = (config.tie_word_embeddings || own.head)
            && host.len() == expected.len()
            && host
                .iter()
                .zip(&expected)
                .all(|((n, p), (en, es))| n == en && &p.shape == es);
        if !ok {
            return Err(Error::invalid(
                "params",
                if config.tie_word_embeddings {
                    "parameter list is not the tied BART's (names, order and shapes; an \
                     lm_head.weight of its own at the end is allowed)"
                } else {
                    "parameter list is not an untied BART's (names, order and shapes; \
                     lm_head.weight included)"
                },
            ));
        }
        if final_logits_bias.len() != config.vocab_size {
            return Err(Error::shape(
                "final_logits_bias",
                format!("[{}]", config.vocab_size),
                &[final_logits_bias.len()],
            ));
        }
        let index: std::collections::HashMap<String, usize> = expected
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let ix = |n: &str| index[n];
        let lin = |n: &str| (ix(&format!("{n}.weight")), ix(&format!("{n}.bias")));
        let attn = |n: &str| AttnIx {
            q: lin(&format!("{n}.q_proj")),
            k: lin(&format!("{n}.k_proj")),
            v: lin(&format!("{n}.v_proj")),
            o: lin(&format!("{n}.out_proj")),
        };
        let table = |own: bool, name: &str| ix(if own { name } else { "model.shared.weight" });
        let emb = |s: &str, own: bool| EmbIx {
            tok: table(own, &format!("model.{s}.embed_tokens.weight")),
            pos: ix(&format!("model.{s}.embed_positions.weight")),
            ln: lin(&format!("model.{s}.layernorm_embedding")),
        };
        let enc = (0..config.encoder_layers)
            .map(|l| {
                let p = format!("model.encoder.layers.{l}");
                EncIx {
                    attn: attn(&format!("{p}.self_attn")),
                    ln1: lin(&format!("{p}.self_attn_layer_norm")),
                    fc1: lin(&format!("{p}.fc1")),
                    fc2: lin(&format!("{p}.fc2")),
                    ln2: lin(&format!("{p}.final_layer_norm")),
                }
            })
            .collect();
        let dec = (0..config.decoder_layers)
            .map(|l| {
                let p = format!("model.decoder.layers.{l}");
                DecIx {
                    attn: attn(&format!("{p}.self_attn")),
                    ln1: lin(&format!("{p}.self_attn_layer_norm")),
                    cross: attn(&format!("{p}.encoder_attn")),
                    ln2: lin(&format!("{p}.encoder_attn_layer_norm")),
                    fc1: lin(&format!("{p}.fc1")),
                    fc2: lin(&format!("{p}.fc2")),
                    ln3: lin(&format!("{p}.final_layer_norm")),
                }
            })
            .collect();
        let params = host
            .into_iter()
            .map(|(name, p)| {
                Ok(Param {
                    decay: !(name.ends_with("bias")
                        || name.contains("layer_norm")
                        || name.contains("layernorm")),
                    value: be.upload_as(&p.shape, &p.values, crate::DType::F32)?,
                    name,
                })
            })
            .collect::<Result<_>>()?;
        Ok(BartForConditionalGeneration {
            final_logits_bias: be.upload_as(
                &[config.vocab_size],
                final_logits_bias,
                crate::DType::F32,
            )?,
            enc_emb: emb("encoder", own.encoder),
            dec_emb: emb("decoder", own.decoder),
            head: table(own.head, "lm_head.weight"),
            source_config: None,
            unused_shared: None,
            config,
            params,
            enc,
            dec,
        })
    }

    /// Every parameter's Hugging Face name, in list order.
    pub fn parameter_names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    pub fn parameters(&self) -> &[Param<B::Tensor>] {
        &self.params
    }

    pub fn parameters_mut(&mut self) -> &mut [Param<B::Tensor>] {
        &mut self.params
    }

    fn p(&self, i: usize) -> &B::Tensor {
        &self.params[i].value
    }

    fn lin(&self, (w, b): Lin) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: self.p(w),
            b: Some(self.p(b)),
        }
    }

    fn ln(&self, (g, b): Lin) -> LayerNormParams<'_, B::Tensor> {
        LayerNormParams {
            gamma: self.p(g),
            beta: self.p(b),
            eps: LN_EPS,
        }
    }

    /// The backward of a post-LN self-attention sub-layer `y = ln1(x + drop(attn(x)))`
    /// (`sub` = its projections, its LayerNorm and the heads; `(probs, out)` its dropout
    /// sites) from dL/dy: records the LayerNorm's and the projections' gradients and returns
    /// dL/dx. Encoder and decoder layers share it.
    #[allow(clippy::too_many_arguments)]
    fn self_attention_sublayer_backward(
        &self,
        be: &B,
        (attn, ln1, heads): (&AttnIx, Lin, usize),
        (probs, out): (Option<DropoutSite>, Option<DropoutSite>),
        x: &B::Tensor,
        cache: &Sub<B::Tensor, SelfAttentionCache<B::Tensor>>,
        mask: &AttentionMask<'_>,
        dy: &B::Tensor,
        grads: &mut [Option<B::Tensor>],
    ) -> Result<B::Tensor> {
        let ln = layer_norm_backward(be, self.ln(ln1), &cache.s, dy)?;
        set_ln(grads, ln1, ln.dgamma, ln.dbeta);
        let da = dropped(be, &ln.dx, out)?;
        let a = self_attention_backward(
            be,
            self.attn(attn, heads),
            x,
            &cache.c,
            mask,
            probs,
            da.as_ref().unwrap_or(&ln.dx),
        )?;
        for (ix, g) in [(attn.q, a.q), (attn.k, a.k), (attn.v, a.v), (attn.o, a.out)] {
            set_lin(grads, ix, g.dw, g.db);
        }
        let mut dx = ln.dx;
        be.accumulate(&mut dx, &a.dx)?;
        Ok(dx)
    }

    fn attn(&self, a: &AttnIx, heads: usize) -> SelfAttentionParams<'_, B::Tensor> {
        SelfAttentionParams {
            q: self.lin(a.q),
            k: self.lin(a.k),
            v: self.lin(a.v),
            out: self.lin(a.o),
            heads,
        }
    }

    fn ffn(&self, fc1: Lin, fc2: Lin) -> FeedForwardParams<'_, B::Tensor> {
        FeedForwardParams {
            up: self.lin(fc1),
            down: self.lin(fc2),
            act: self.config.activation,
        }
    }

    fn embed_scale(&self) -> f32 {
        if self.config.scale_embedding {
            (self.config.d_model as f32).sqrt()
        } else {
            1.0
        }
    }

    fn shapes<'a>(&self, b: &'a DenoisingBatch) -> Result<Shapes<'a>> {
        let batch = b.input_lens.len();
        if batch == 0
            || b.input_ids.is_empty()
            || !b.input_ids.len().is_multiple_of(batch)
            || b.labels.is_empty()
            || !b.labels.len().is_multiple_of(batch)
        {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} input ids and {} labels for {batch} sequences",
                    b.input_ids.len(),
                    b.labels.len()
                ),
            ));
        }
        let (len_in, len_out) = (b.input_ids.len() / batch, b.labels.len() / batch);
        let max = self.config.max_position_embeddings;
        if len_in > max || len_out > max {
            return Err(Error::invalid(
                "batch",
                format!("{len_in} input or {len_out} label positions exceed the model's {max}"),
            ));
        }
        if let Some(&bad) = b.input_lens.iter().find(|&&l| l == 0 || l > len_in) {
            return Err(Error::invalid(
                "input_lens",
                format!("an input length {bad} is not in 1..={len_in}"),
            ));
        }
        let v = self.config.vocab_size as u32;
        if let Some(&bad) = b.input_ids.iter().find(|&&i| i >= v) {
            return Err(Error::invalid(
                "input_ids",
                format!("id {bad} ≥ vocabulary {v}"),
            ));
        }
        let decoder_ids = shift_tokens_right(
            &b.labels,
            batch,
            self.config.pad_token_id,
            self.config.decoder_start_token_id,
        )?;
        if let Some(&bad) = decoder_ids.iter().find(|&&i| i >= v) {
            return Err(Error::invalid(
                "labels",
                format!("id {bad} ≥ vocabulary {v}"),
            ));
        }
        let pos = |len: usize| -> Vec<u32> {
            (0..batch)
                .flat_map(|_| (0..len as u32).map(|p| p + POSITION_OFFSET))
                .collect()
        };
        Ok(Shapes {
            batch,
            len_in,
            len_out,
            input_ids: &b.input_ids,
            input_lens: (!b.input_lens.iter().all(|&l| l == len_in)).then_some(&b.input_lens),
            decoder_ids,
            in_pos: pos(len_in),
            out_pos: pos(len_out),
        })
    }

    /// Token rows ×scale + position rows, then `layernorm_embedding`: output and LN input.
    fn embed(&self, be: &B, e: EmbIx, ids: &[u32], pos: &[u32]) -> Result<(B::Tensor, B::Tensor)> {
        let mut x = be.gather_rows(self.p(e.tok), ids)?;
        if self.config.scale_embedding {
            be.scale(&mut x, self.embed_scale())?;
        }
        let p = be.gather_rows(self.p(e.pos), pos)?;
        layer_norm_forward(be, self.ln(e.ln), &x, Some(&p))
    }

    /// The backward of [`Self::embed`] from dL/d(its output): positions' and LN's gradients
    /// into `grads`, the token lookup's added to its table's.
    #[allow(clippy::too_many_arguments)]
    fn embed_backward(
        &self,
        be: &B,
        e: EmbIx,
        ids: &[u32],
        pos: &[u32],
        s: &B::Tensor,
        dy: &B::Tensor,
        grads: &mut [Option<B::Tensor>],
    ) -> Result<()> {
        let ln = layer_norm_backward(be, self.ln(e.ln), s, dy)?;
        grads[e.ln.0] = Some(ln.dgamma);
        grads[e.ln.1] = Some(ln.dbeta);
        let rows = be.shape(self.p(e.pos))[0];
        grads[e.pos] = Some(be.gather_rows_backward(&ln.dx, pos, rows, None)?);
        let mut dx = ln.dx;
        if self.config.scale_embedding {
            be.scale(&mut dx, self.embed_scale())?;
        }
        let dtok = be.gather_rows_backward(
            &dx,
            ids,
            self.config.vocab_size,
            Some(self.config.pad_token_id),
        )?;
        add_grad(be, &mut grads[e.tok], dtok)
    }

    /// The dropout sites of a step under `opts` (none without a seed; a site of probability
    /// 0 is none).
    fn sites(&self, opts: &StepOptions) -> Sites {
        let c = &self.config;
        let per_step = sites_per_step(c.encoder_layers, c.decoder_layers);
        let site = |n: u64, p: f32| -> Option<DropoutSite> {
            let seed = opts.dropout_seed?;
            (p > 0.0).then_some(DropoutSite {
                p,
                seed,
                offset: opts.step.wrapping_mul(per_step).wrapping_add(n),
            })
        };
        let (hid, att, act) = (c.dropout, c.attention_dropout, c.activation_dropout);
        let enc = (0..c.encoder_layers as u64)
            .map(|l| {
                let b = 1 + 4 * l;
                [
                    site(b, att),
                    site(b + 1, hid),
                    site(b + 2, act),
                    site(b + 3, hid),
                ]
            })
            .collect();
        let d0 = 1 + 4 * c.encoder_layers as u64;
        let dec = (0..c.decoder_layers as u64)
            .map(|l| {
                let b = d0 + 1 + 6 * l;
                [
                    site(b, att),
                    site(b + 1, hid),
                    site(b + 2, att),
                    site(b + 3, hid),
                    site(b + 4, act),
                    site(b + 5, hid),
                ]
            })
            .collect();
        Sites {
            enc_emb: site(0, hid),
            enc,
            dec_emb: site(d0, hid),
            dec,
        }
    }

    /// Every active dropout site of a step on `batch` under `opts`, in forward order (which is
    /// also the order of their Philox offsets): where it is, its probability's config field,
    /// its stream and the shape it drops from. Empty without a seed or with all
    /// probabilities 0. The sites of a layer LayerDrop skips are left out (their offsets stay
    /// reserved: the other sites keep their streams).
    pub fn dropout_sites(
        &self,
        batch: &DenoisingBatch,
        opts: &StepOptions,
    ) -> Result<Vec<DropoutSiteInfo>> {
        let s = self.shapes(batch)?;
        let c = &self.config;
        let sites = self.sites(opts);
        let skip = self.skipped_layers(opts)?;
        let (d, b) = (c.d_model, s.batch);
        let (rin, rout) = (b * s.len_in, b * s.len_out);
        let mut out = Vec::new();
        let mut push = |name: String, kind: &'static str, site: Option<DropoutSite>, shape| {
            if let Some(site) = site {
                out.push(DropoutSiteInfo {
                    name,
                    kind,
                    site,
                    shape,
                });
            }
        };
        push(
            "model.encoder.layernorm_embedding.out".into(),
            "dropout",
            sites.enc_emb,
            vec![rin, d],
        );
        let eh = c.encoder_attention_heads;
        for (l, [probs, attn_out, act, ffn_out]) in sites.enc.iter().enumerate() {
            if skip.encoder[l] {
                continue;
            }
            let p = format!("model.encoder.layers.{l}");
            let probs_shape = vec![b, eh, s.len_in, s.len_in];
            push(
                format!("{p}.self_attn"),
                "attention_dropout",
                *probs,
                probs_shape,
            );
            push(
                format!("{p}.self_attn.out"),
                "dropout",
                *attn_out,
                vec![rin, d],
            );
            let ffn = c.encoder_ffn_dim;
            push(
                format!("{p}.fc1.act"),
                "activation_dropout",
                *act,
                vec![rin, ffn],
            );
            push(format!("{p}.fc2.out"), "dropout", *ffn_out, vec![rin, d]);
        }
        push(
            "model.decoder.layernorm_embedding.out".into(),
            "dropout",
            sites.dec_emb,
            vec![rout, d],
        );
        let dh = c.decoder_attention_heads;
        for (l, [sp, so, cp, co, act, ffn_out]) in sites.dec.iter().enumerate() {
            if skip.decoder[l] {
                continue;
            }
            let p = format!("model.decoder.layers.{l}");
            let self_shape = vec![b, dh, s.len_out, s.len_out];
            push(
                format!("{p}.self_attn"),
                "attention_dropout",
                *sp,
                self_shape,
            );
            push(format!("{p}.self_attn.out"), "dropout", *so, vec![rout, d]);
            let cross_shape = vec![b, dh, s.len_out, s.len_in];
            push(
                format!("{p}.encoder_attn"),
                "attention_dropout",
                *cp,
                cross_shape,
            );
            push(
                format!("{p}.encoder_attn.out"),
                "dropout",
                *co,
                vec![rout, d],
            );
            let ffn = c.decoder_ffn_dim;
            push(
                format!("{p}.fc1.act"),
                "activation_dropout",
                *act,
                vec![rout, ffn],
            );
            push(format!("{p}.fc2.out"), "dropout", *ffn_out, vec![rout, d]);
        }
        Ok(out)
    }

    fn masks<'m>(&self, s: &'m Shapes<'_>) -> Masks<'m> {
        let m = |len_q, len_k, key_lens, causal| AttentionMask {
            batch: s.batch,
            len_q,
            len_k,
            key_lens,
            causal,
            window: None,
            scale: None,
        };
        Masks {
            enc: m(s.len_in, s.len_in, s.input_lens, None),
            dec_self: m(s.len_out, s.len_out, None, Some(CausalAlign::TopLeft)),
            cross: m(s.len_out, s.len_in, s.input_lens, None),
        }
    }

    /// The layers a step under `opts` skips. LayerDrop as Hugging Face's: only in training
    /// (`opts.dropout_seed` set; `None` is `model.eval()`, which never skips), one uniform
    /// draw u per layer and step for the whole batch, the layer skipped when
    /// u < `encoder_layerdrop` (`decoder_layerdrop`). The draw is the Philox word of
    /// (seed, [`LAYERDROP_STREAM`] | step, layer) compared with round(p·2^32) as dropout's
    /// masks are, so p = 0 never skips, p = 1 always does, and either backend draws the same.
    pub fn skipped_layers(&self, opts: &StepOptions) -> Result<SkippedLayers> {
        let c = &self.config;
        let draw = |p: f32, index: usize| -> Result<bool> {
            let Some(seed) = opts.dropout_seed.filter(|_| p > 0.0) else {
                return Ok(false);
            };
            Ok(!Dropout::new(p)?.keeps(seed, LAYERDROP_STREAM | opts.step, index as u64))
        };
        Ok(SkippedLayers {
            encoder: (0..c.encoder_layers)
                .map(|l| draw(c.encoder_layerdrop, l))
                .collect::<Result<_>>()?,
            decoder: (0..c.decoder_layers)
                .map(|l| draw(c.decoder_layerdrop, c.encoder_layers + l))
                .collect::<Result<_>>()?,
        })
    }

    /// Forward, loss against `batch.labels` and backward without dropout (as
    /// `model.eval()`): the gradient of every parameter, in list order.
    pub fn forward_backward(
        &self,
        be: &B,
        batch: &DenoisingBatch,
    ) -> Result<DenoisingOutput<B::Tensor>> {
        self.forward_backward_with(be, batch, &StepOptions::default())
    }

    /// One encoder layer: `h1 = ln1(x + drop(attn(x)))`, `out = ln2(h1 + drop(ffn(h1)))`.
    fn enc_layer_forward(
        &self,
        be: &B,
        l: &EncIx,
        &[probs, attn_out, act, ffn_out]: &[Option<DropoutSite>; 4],
        x: &B::Tensor,
        mask: &AttentionMask<'_>,
    ) -> Result<(B::Tensor, EncCache<B::Tensor>)> {
        let heads = self.config.encoder_attention_heads;
        let (a, ac) = self_attention_forward(be, self.attn(&l.attn, heads), x, mask, probs)?;
        let a = maybe_dropout(be, a, attn_out)?;
        let (h1, s1) = layer_norm_forward(be, self.ln(l.ln1), &a, Some(x))?;
        let (f, fc) = feed_forward_forward_dropout(be, self.ffn(l.fc1, l.fc2), &h1, act)?;
        let f = maybe_dropout(be, f, ffn_out)?;
        let (out, s2) = layer_norm_forward(be, self.ln(l.ln2), &f, Some(&h1))?;
        let cache = EncCache {
            attn: Sub { s: s1, c: ac },
            h1,
            ffn: Sub { s: s2, c: fc },
        };
        Ok((out, cache))
    }

    /// The backward of [`Self::enc_layer_forward`] from dL/d(out): gradients into `grads`,
    /// returns dL/dx.
    #[allow(clippy::too_many_arguments)]
    fn enc_layer_backward(
        &self,
        be: &B,
        l: &EncIx,
        &[probs, attn_out, act, ffn_out]: &[Option<DropoutSite>; 4],
        x: &B::Tensor,
        c: &EncCache<B::Tensor>,
        mask: &AttentionMask<'_>,
        dout: &B::Tensor,
        grads: &mut [Option<B::Tensor>],
    ) -> Result<B::Tensor> {
        let ln2 = layer_norm_backward(be, self.ln(l.ln2), &c.ffn.s, dout)?;
        set_ln(grads, l.ln2, ln2.dgamma, ln2.dbeta);
        let df = dropped(be, &ln2.dx, ffn_out)?;
        let f = feed_forward_backward_dropout(
            be,
            self.ffn(l.fc1, l.fc2),
            &c.h1,
            &c.ffn.c,
            act,
            df.as_ref().unwrap_or(&ln2.dx),
        )?;
        set_lin(grads, l.fc1, f.up.dw, f.up.db);
        set_lin(grads, l.fc2, f.down.dw, f.down.db);
        let mut dh1 = ln2.dx;
        be.accumulate(&mut dh1, &f.dx)?;
        let sub = (&l.attn, l.ln1, self.config.encoder_attention_heads);
        self.self_attention_sublayer_backward(
            be,
            sub,
            (probs, attn_out),
            x,
            &c.attn,
            mask,
            &dh1,
            grads,
        )
    }

    /// One decoder layer: causal self-attention, cross-attention to `mem`, feed-forward, each
    /// followed by its residual add and LayerNorm.
    fn dec_layer_forward(
        &self,
        be: &B,
        l: &DecIx,
        &[sp, so, cp, co, act, ffn_out]: &[Option<DropoutSite>; 6],
        y: &B::Tensor,
        mem: &B::Tensor,
        masks: &Masks<'_>,
    ) -> Result<(B::Tensor, DecCache<B::Tensor>)> {
        let dh = self.config.decoder_attention_heads;
        let (a, ac) = self_attention_forward(be, self.attn(&l.attn, dh), y, &masks.dec_self, sp)?;
        let a = maybe_dropout(be, a, so)?;
        let (h1, s1) = layer_norm_forward(be, self.ln(l.ln1), &a, Some(y))?;
        let (c, cc) =
            cross_attention_forward(be, self.attn(&l.cross, dh), &h1, mem, &masks.cross, cp)?;
        let c = maybe_dropout(be, c, co)?;
        let (h2, s2) = layer_norm_forward(be, self.ln(l.ln2), &c, Some(&h1))?;
        let (f, fc) = feed_forward_forward_dropout(be, self.ffn(l.fc1, l.fc2), &h2, act)?;
        let f = maybe_dropout(be, f, ffn_out)?;
        let (out, s3) = layer_norm_forward(be, self.ln(l.ln3), &f, Some(&h2))?;
        let cache = DecCache {
            attn: Sub { s: s1, c: ac },
            h1,
            cross: Sub { s: s2, c: cc },
            h2,
            ffn: Sub { s: s3, c: fc },
        };
        Ok((out, cache))
    }

    /// The backward of [`Self::dec_layer_forward`] from dL/d(out): gradients into `grads`,
    /// dL/dmem added to `dmem`, returns dL/dy.
    #[allow(clippy::too_many_arguments)]
    fn dec_layer_backward(
        &self,
        be: &B,
        l: &DecIx,
        &[sp, so, cp, co, act, ffn_out]: &[Option<DropoutSite>; 6],
        y: &B::Tensor,
        mem: &B::Tensor,
        c: &DecCache<B::Tensor>,
        masks: &Masks<'_>,
        dout: &B::Tensor,
        grads: &mut [Option<B::Tensor>],
        dmem: &mut Option<B::Tensor>,
    ) -> Result<B::Tensor> {
        let dh = self.config.decoder_attention_heads;
        let ln3 = layer_norm_backward(be, self.ln(l.ln3), &c.ffn.s, dout)?;
        set_ln(grads, l.ln3, ln3.dgamma, ln3.dbeta);
        let df = dropped(be, &ln3.dx, ffn_out)?;
        let f = feed_forward_backward_dropout(
            be,
            self.ffn(l.fc1, l.fc2),
            &c.h2,
            &c.ffn.c,
            act,
            df.as_ref().unwrap_or(&ln3.dx),
        )?;
        set_lin(grads, l.fc1, f.up.dw, f.up.db);
        set_lin(grads, l.fc2, f.down.dw, f.down.db);
        let mut dh2 = ln3.dx;
        be.accumulate(&mut dh2, &f.dx)?;
        let ln2 = layer_norm_backward(be, self.ln(l.ln2), &c.cross.s, &dh2)?;
        set_ln(grads, l.ln2, ln2.dgamma, ln2.dbeta);
        let dc = dropped(be, &ln2.dx, co)?;
        let (dq, dm, cg) = cross_attention_backward(
            be,
            self.attn(&l.cross, dh),
            &c.h1,
            mem,
            &c.cross.c,
            &masks.cross,
            cp,
            dc.as_ref().unwrap_or(&ln2.dx),
        )?;
        let [gq, gk, gv, go] = cg;
        for (ix, g) in [
            (l.cross.q, gq),
            (l.cross.k, gk),
            (l.cross.v, gv),
            (l.cross.o, go),
        ] {
            set_lin(grads, ix, g.dw, g.db);
        }
        add_grad(be, dmem, dm)?;
        let mut dh1 = ln2.dx;
        be.accumulate(&mut dh1, &dq)?;
        let sub = (&l.attn, l.ln1, dh);
        self.self_attention_sublayer_backward(
            be,
            sub,
            (sp, so),
            y,
            &c.attn,
            &masks.dec_self,
            &dh1,
            grads,
        )
    }

    /// The encoder's parameters that nothing after it reads: its layers and embeddings, less
    /// a token table shared with the decoder or the head.
    fn encoder_only_params(&self) -> Vec<usize> {
        let pairs = |lins: Vec<Lin>| lins.into_iter().flat_map(|(w, b)| [w, b]);
        let emb = |e: EmbIx| [e.tok, e.pos, e.ln.0, e.ln.1];
        let elsewhere: Vec<usize> = self
            .dec
            .iter()
            .flat_map(|l| pairs(l.lins()))
            .chain(emb(self.dec_emb))
            .chain([self.head])
            .collect();
        self.enc
            .iter()
            .flat_map(|l| pairs(l.lins()))
            .chain(emb(self.enc_emb))
            .filter(|i| !elsewhere.contains(i))
            .collect()
    }

    /// Zero gradients for the parameters `lins` (a skipped layer's), listed in `no_grad`.
    fn zero_grads(
        &self,
        be: &B,
        lins: &[Lin],
        grads: &mut [Option<B::Tensor>],
        no_grad: &mut Vec<usize>,
    ) -> Result<()> {
        for &(w, b) in lins {
            for i in [w, b] {
                grads[i] = Some(be.zeros(be.shape(self.p(i)))?);
                no_grad.push(i);
            }
        }
        Ok(())
    }

    /// [`Self::forward_backward`] under `opts`: dropout and LayerDrop with the config's
    /// probabilities when `opts.dropout_seed` is set (streams picked by `opts.step`),
    /// `opts.recompute` to keep only each layer's input through the forward, `opts.loss` for
    /// the cross-entropy, `opts.loss_scale` on dL/dlogits (the gradients carry it, the loss
    /// does not).
    pub fn forward_backward_with(
        &self,
        be: &B,
        batch: &DenoisingBatch,
        opts: &StepOptions,
    ) -> Result<DenoisingOutput<B::Tensor>> {
        let loss_scale = opts.scale_factor()?;
        let s = self.shapes(batch)?;
        let sites = self.sites(opts);
        let skip = self.skipped_layers(opts)?;
        let masks = self.masks(&s);
        // Encoder.
        let (h, enc_s) = self.embed(be, self.enc_emb, s.input_ids, &s.in_pos)?;
        let mut h = maybe_dropout(be, h, sites.enc_emb)?;
        let mut enc_kept = Vec::with_capacity(self.enc.len());
        for ((l, site), &skipped) in self.enc.iter().zip(&sites.enc).zip(&skip.encoder) {
            if skipped {
                enc_kept.push(Kept::Skipped);
                continue;
            }
            let (out, c) = self.enc_layer_forward(be, l, site, &h, &masks.enc)?;
            enc_kept.push(Kept::new(opts.recompute, std::mem::replace(&mut h, out), c));
        }
        let mem = h;
        // Decoder.
        let (y, dec_s) = self.embed(be, self.dec_emb, &s.decoder_ids, &s.out_pos)?;
        let mut y = maybe_dropout(be, y, sites.dec_emb)?;
        let mut dec_kept = Vec::with_capacity(self.dec.len());
        for ((l, site), &skipped) in self.dec.iter().zip(&sites.dec).zip(&skip.decoder) {
            if skipped {
                dec_kept.push(Kept::Skipped);
                continue;
            }
            let (out, c) = self.dec_layer_forward(be, l, site, &y, &mem, &masks)?;
            dec_kept.push(Kept::new(opts.recompute, std::mem::replace(&mut y, out), c));
        }
        // Head (the shared table when tied, else lm_head) + final_logits_bias; the loss.
        let head = LinearParams {
            w: self.p(self.head),
            b: Some(&self.final_logits_bias),
        };
        let logits = linear_forward(be, head, &y)?;
        let (loss, mut dlogits) = be.cross_entropy(&logits, &batch.labels, &opts.loss)?;
        if let Some(f) = loss_scale {
            be.scale(&mut dlogits, f)?;
        }

        let mut grads: Vec<Option<B::Tensor>> = (0..self.params.len()).map(|_| None).collect();
        let mut no_grad = Vec::new();
        // The bias is a buffer: no gradient asked (b: None).
        let hg = linear_backward(
            be,
            LinearParams {
                w: self.p(self.head),
                b: None,
            },
            &y,
            &dlogits,
            true,
        )?;
        grads[self.head] = Some(hg.dw);
        let mut dy = hg.dx.expect("asked for dx");
        let mut dmem: Option<B::Tensor> = None;
        for ((l, site), kept) in self.dec.iter().zip(&sites.dec).zip(&dec_kept).rev() {
            // A recomputed layer's cache lives only for its backward.
            let recomputed;
            let (x, c) = match kept {
                Kept::Skipped => {
                    self.zero_grads(be, &l.lins(), &mut grads, &mut no_grad)?;
                    continue;
                }
                Kept::Full(x, c) => (x, c),
                Kept::Input(x) => {
                    recomputed = self.dec_layer_forward(be, l, site, x, &mem, &masks)?.1;
                    (x, &recomputed)
                }
            };
            dy = self
                .dec_layer_backward(be, l, site, x, &mem, c, &masks, &dy, &mut grads, &mut dmem)?;
        }
        let dy = maybe_dropout(be, dy, sites.dec_emb)?;
        self.embed_backward(
            be,
            self.dec_emb,
            &s.decoder_ids,
            &s.out_pos,
            &dec_s,
            &dy,
            &mut grads,
        )?;
        // No decoder layer ran (LayerDrop skipped them all): nothing read the encoder, whose
        // parameters then have no gradient in torch (their zero one is computed anyway).
        let memory_unread = dmem.is_none();
        let mut dh_enc = match dmem {
            Some(d) => d,
            None => be.zeros(be.shape(&mem))?,
        };
        for ((l, site), kept) in self.enc.iter().zip(&sites.enc).zip(&enc_kept).rev() {
            let recomputed;
            let (x, c) = match kept {
                Kept::Skipped => {
                    self.zero_grads(be, &l.lins(), &mut grads, &mut no_grad)?;
                    continue;
                }
                Kept::Full(x, c) => (x, c),
                Kept::Input(x) => {
                    recomputed = self.enc_layer_forward(be, l, site, x, &masks.enc)?.1;
                    (x, &recomputed)
                }
            };
            dh_enc = self.enc_layer_backward(be, l, site, x, c, &masks.enc, &dh_enc, &mut grads)?;
        }
        let dh_enc = maybe_dropout(be, dh_enc, sites.enc_emb)?;
        self.embed_backward(
            be,
            self.enc_emb,
            s.input_ids,
            &s.in_pos,
            &enc_s,
            &dh_enc,
            &mut grads,
        )?;
        if memory_unread {
            no_grad.extend(self.encoder_only_params());
        }
        let tensors = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| {
                g.ok_or_else(|| Error::invalid("params", format!("no gradient for {}", p.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DenoisingOutput {
            loss,
            logits,
            decoder_input_ids: s.decoder_ids,
            grads: Gradients {
                names: self.parameter_names(),
                tensors,
                no_grad: {
                    no_grad.sort_unstable();
                    no_grad.dedup();
                    no_grad
                },
            },
        })
    }
}

/// Saving: a trained model as the folder `save_pretrained` writes.
impl<B: TrainBackend> BartForConditionalGeneration<B> {
    /// Every parameter as host f32 under its Hugging Face name, in list order.
    pub fn to_host(&self, be: &B) -> Result<Vec<(String, HostParam)>> {
        self.params
            .iter()
            .map(|p| {
                let shape = be.shape(&p.value).to_vec();
                Ok((
                    p.name.clone(),
                    HostParam {
                        shape,
                        values: be.to_f32(&p.value)?,
                    },
                ))
            })
            .collect()
    }

    /// `final_logits_bias` `[vocab]` on the host.
    pub fn final_logits_bias(&self, be: &B) -> Result<Vec<f32>> {
        be.to_f32(&self.final_logits_bias)
    }

    /// The `config.json` of the model as Hugging Face reads it back: the loaded file (if the
    /// model came from a folder) with every field [`BartConfig`] holds set from `config`, so a
    /// changed probability is saved too; fields we do not read are carried over, and
    /// transformers' defaults fill in the rest for a model built from host parameters.
    pub fn hf_config(&self) -> serde_json::Value {
        let c = &self.config;
        let mut v = match &self.source_config {
            Some(v @ serde_json::Value::Object(_)) => v.clone(),
            _ => serde_json::json!({}),
        };
        let obj = v.as_object_mut().expect("an object");
        // A float as its shortest f32 spelling (0.1, not 0.10000000149011612), unless the
        // loaded file already spells this value.
        let prob = |obj: &serde_json::Map<String, serde_json::Value>, key: &str, p: f32| match obj
            .get(key)
            .and_then(|x| x.as_f64())
        {
            Some(old) if old as f32 == p => serde_json::json!(old),
            _ => serde_json::json!(p.to_string().parse::<f64>().unwrap_or(p as f64)),
        };
        let activation = match obj.get("activation_function").and_then(|a| a.as_str()) {
            Some(name) if Activation::from_hf_name(name) == Some(c.activation) => name.to_string(),
            _ => hf_activation_name(c.activation).to_string(),
        };
        let id = |x: Option<u32>| x.map_or(serde_json::Value::Null, |x| serde_json::json!(x));
        let fields = [
            (
                "architectures",
                serde_json::json!(["BartForConditionalGeneration"]),
            ),
            ("model_type", serde_json::json!("bart")),
            ("is_encoder_decoder", serde_json::json!(true)),
            ("vocab_size", serde_json::json!(c.vocab_size)),
            ("d_model", serde_json::json!(c.d_model)),
            ("encoder_layers", serde_json::json!(c.encoder_layers)),
            ("decoder_layers", serde_json::json!(c.decoder_layers)),
            (
                "encoder_attention_heads",
                serde_json::json!(c.encoder_attention_heads),
            ),
            (
                "decoder_attention_heads",
                serde_json::json!(c.decoder_attention_heads),
            ),
            ("encoder_ffn_dim", serde_json::json!(c.encoder_ffn_dim)),
            ("decoder_ffn_dim", serde_json::json!(c.decoder_ffn_dim)),
            ("activation_function", serde_json::json!(activation)),
            (
                "max_position_embeddings",
                serde_json::json!(c.max_position_embeddings),
            ),
            ("scale_embedding", serde_json::json!(c.scale_embedding)),
            (
                "tie_word_embeddings",
                serde_json::json!(c.tie_word_embeddings),
            ),
            ("bos_token_id", serde_json::json!(c.bos_token_id)),
            ("pad_token_id", serde_json::json!(c.pad_token_id)),
            ("eos_token_id", serde_json::json!(c.eos_token_id)),
            (
                "decoder_start_token_id",
                serde_json::json!(c.decoder_start_token_id),
            ),
            // null, not absent: transformers' BartConfig defaults forced_eos_token_id to 2.
            ("forced_bos_token_id", id(c.forced_bos_token_id)),
            ("forced_eos_token_id", id(c.forced_eos_token_id)),
            ("dropout", prob(obj, "dropout", c.dropout)),
            (
                "attention_dropout",
                prob(obj, "attention_dropout", c.attention_dropout),
            ),
            (
                "activation_dropout",
                prob(obj, "activation_dropout", c.activation_dropout),
            ),
            (
                "encoder_layerdrop",
                prob(obj, "encoder_layerdrop", c.encoder_layerdrop),
            ),
            (
                "decoder_layerdrop",
                prob(obj, "decoder_layerdrop", c.decoder_layerdrop),
            ),
            // The saved tensors' type.
            ("dtype", serde_json::json!("float32")),
        ];
        for (k, x) in fields {
            obj.insert(k.to_string(), x);
        }
        v
    }

    /// Writes the model into `dir` (created if missing; `config.json` and `model.safetensors`
    /// replaced) as transformers 5's `save_pretrained` does: every parameter in f32 under its
    /// name, `final_logits_bias` `[1, vocab]` (a buffer HF saves), and the token tables as
    /// HF stores them — tied: `model.shared.weight` only (plus an `lm_head.weight` of its
    /// own, if the model has one, which transformers 5.24 loads untied with a warning, as it
    /// does the checkpoint such a model came from); untied: `model.shared.weight`,
    /// `model.encoder.embed_tokens.weight`, `model.decoder.embed_tokens.weight` and
    /// `lm_head.weight`. An untied model's `model.shared` that nothing reads is written back
    /// as it was loaded (a model built by [`Self::from_host`] without it writes the encoder's
    /// table there); an untied stack that reads `model.shared` (its checkpoint had no table
    /// for it) gets that table under its own name, so a reload gives it a table of its own
    /// with the same values. Both loaders here and `BartForConditionalGeneration.from_pretrained`
    /// read the folder back.
    pub fn save_pretrained(&self, be: &B, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let host = self.to_host(be)?;
        let bias = self.final_logits_bias(be)?;
        let mut tensors: Vec<NamedTensor<'_>> = host
            .iter()
            .map(|(name, p)| NamedTensor {
                name: name.clone(),
                shape: p.shape.clone(),
                values: &p.values,
            })
            .collect();
        tensors.push(NamedTensor {
            name: "final_logits_bias".into(),
            shape: vec![1, bias.len()],
            values: &bias,
        });
        // Untied: a stack reading `model.shared` gets it under its own name too, as
        // transformers 5 gives every untied BART four tables (else it would start that
        // stack from a random table).
        if !self.config.tie_word_embeddings {
            for (stack, e) in [("encoder", self.enc_emb), ("decoder", self.dec_emb)] {
                let p = &host[e.tok];
                if p.0 == "model.shared.weight" {
                    tensors.push(NamedTensor {
                        name: format!("model.{stack}.embed_tokens.weight"),
                        shape: p.1.shape.clone(),
                        values: &p.1.values,
                    });
                }
            }
        }
        if !host.iter().any(|(n, _)| n == "model.shared.weight") {
            let shared = match &self.unused_shared {
                Some(p) => p,
                None => &host[self.enc_emb.tok].1,
            };
            tensors.push(NamedTensor {
                name: "model.shared.weight".into(),
                shape: shared.shape.clone(),
                values: &shared.values,
            });
        }
        write_safetensors(&dir.join("model.safetensors"), &tensors)?;
        write_json(&dir.join("config.json"), &self.hf_config())
    }
}

/// The `activation_function` name transformers reads as `a`.
fn hf_activation_name(a: Activation) -> &'static str {
    match a {
        Activation::GeluErf => "gelu",
        Activation::GeluTanh => "gelu_new",
        Activation::Relu => "relu",
        Activation::None => "linear",
        Activation::Tanh => "tanh",
    }
}

/// `slot += g` (or `slot = g` when empty).
fn add_grad<B: TrainBackend>(be: &B, slot: &mut Option<B::Tensor>, g: B::Tensor) -> Result<()> {
    match slot {
        Some(acc) => be.accumulate(acc, &g),
        None => {
            *slot = Some(g);
            Ok(())
        }
    }
}

fn set_lin<T>(grads: &mut [Option<T>], (w, b): Lin, dw: T, db: Option<T>) {
    grads[w] = Some(dw);
    grads[b] = db;
}

fn set_ln<T>(grads: &mut [Option<T>], (g, b): Lin, dg: T, db: T) {
    grads[g] = Some(dg);
    grads[b] = Some(db);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Cpu;

    fn floats<B: TrainBackend>(be: &B, ts: &[&B::Tensor]) -> usize {
        ts.iter()
            .map(|t| be.shape(t).iter().product::<usize>())
            .sum()
    }

    /// The bytes the module doc says recomputation saves per layer are the f32 sizes of what a
    /// layer's cache holds (the tiny fixture, its padded two-sequence batch).
    #[test]
    fn recomputation_saves_the_bytes_the_docs_state() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bart");
        let m = BartForConditionalGeneration::from_folder(&Cpu, &dir).unwrap();
        let c = m.config.clone();
        let (batch, len_in, len_out) = (2usize, 7usize, 5usize);
        let b = DenoisingBatch {
            input_ids: vec![5; batch * len_in],
            input_lens: vec![len_in, 4],
            labels: vec![6; batch * len_out],
        };
        let s = m.shapes(&b).unwrap();
        let masks = m.masks(&s);
        let sites = m.sites(&StepOptions::default());
        let (x, _) = m.embed(&Cpu, m.enc_emb, s.input_ids, &s.in_pos).unwrap();
        let (mem, e) = m
            .enc_layer_forward(&Cpu, &m.enc[0], &sites.enc[0], &x, &masks.enc)
            .unwrap();
        let enc = floats(
            &Cpu,
            &[
                &e.attn.s,
                &e.attn.c.q,
                &e.attn.c.k,
                &e.attn.c.v,
                &e.attn.c.ctx,
                &e.attn.c.lse,
                &e.h1,
                &e.ffn.s,
                &e.ffn.c.z,
                &e.ffn.c.a,
            ],
        );
        let (d, r, m_rows) = (c.d_model, batch * len_in, batch * len_in);
        let (f, h) = (c.encoder_ffn_dim, c.encoder_attention_heads);
        assert_eq!(4 * enc, 4 * r * (7 * d + 2 * f + h));
        let (y, _) = m
            .embed(&Cpu, m.dec_emb, &s.decoder_ids, &s.out_pos)
            .unwrap();
        let (_, k) = m
            .dec_layer_forward(&Cpu, &m.dec[0], &sites.dec[0], &y, &mem, &masks)
            .unwrap();
        let dec = floats(
            &Cpu,
            &[
                &k.attn.s,
                &k.attn.c.q,
                &k.attn.c.k,
                &k.attn.c.v,
                &k.attn.c.ctx,
                &k.attn.c.lse,
                &k.h1,
                &k.cross.s,
                &k.cross.c.q,
                &k.cross.c.k,
                &k.cross.c.v,
                &k.cross.c.ctx,
                &k.cross.c.lse,
                &k.h2,
                &k.ffn.s,
                &k.ffn.c.z,
                &k.ffn.c.a,
            ],
        );
        let (r, f, h) = (
            batch * len_out,
            c.decoder_ffn_dim,
            c.decoder_attention_heads,
        );
        assert_eq!(4 * dec, 4 * (r * (11 * d + 2 * f + 2 * h) + 2 * m_rows * d));
    }
}
