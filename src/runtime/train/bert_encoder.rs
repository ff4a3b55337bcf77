//! BERT's encoder as every trainable BERT model uses it (`bert_cls` for classification,
//! `bert_pretrain` for MLM + NSP): embeddings (word + position + token type, LayerNorm,
//! dropout), post-LN encoder layers and the tanh pooler on the first token, each with its
//! forward-with-cache and backward. A model keeps one parameter list whose first entries are
//! the encoder's, in Hugging Face's order ([`encoder_names`]), followed by its head; an
//! [`Encoder`] is a borrowed view of that list.
//!
//! Dropout sites of one step: 0 after the embeddings, then (probabilities, attention output,
//! FFN output) per layer; a model's head sites follow. Site s of step t uses Philox offset
//! `t·sites_per_step + s`, so a step is a pure function of (weights, batch, seed, step).

use super::backend::{CrossEntropy, DropoutSite, TrainBackend};
use super::layers::{
    copy, embeddings_backward, embeddings_forward, feed_forward_backward, feed_forward_forward,
    layer_norm_backward, layer_norm_forward, linear_backward, linear_forward, maybe_dropout,
    self_attention_backward, self_attention_forward, FeedForwardCache, FeedForwardParams,
    LayerNormParams, LinearParams, SelfAttentionCache, SelfAttentionParams,
};
use super::optim::Param;
use crate::error::{Error, Result};
use crate::runtime::backend::{Activation, AttentionMask};
use crate::runtime::bert::BertConfig;
use crate::runtime::checkpoint::{Checkpoint, HostParam};
use crate::runtime::tokenizer::TokenBatch;

/// Options of one training forward + backward (default: no dropout, step 0, no
/// recomputation, PyTorch's cross-entropy defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// Dropout seed; `None` runs without dropout (as `model.eval()`).
    pub dropout_seed: Option<u64>,
    /// Step number: picks the dropout streams of this step.
    pub step: u64,
    /// Keep only each layer's input during the forward and recompute the layer in the
    /// backward (less memory, one more forward of the encoder).
    pub recompute: bool,
    pub loss: CrossEntropy,
    /// Multiplies dL/dlogits before the backward (f16's loss scaling: small gradients stay
    /// above f16's underflow); the returned gradients carry the factor, the loss does not.
    /// `None`: 1.
    pub loss_scale: Option<f32>,
}

impl StepOptions {
    /// The loss scale as a factor, checked (1 when unset).
    pub(super) fn scale_factor(&self) -> Result<Option<f32>> {
        match self.loss_scale.filter(|&s| s != 1.0) {
            None => Ok(None),
            Some(s) if s.is_finite() && s > 0.0 => Ok(Some(s)),
            Some(s) => Err(Error::invalid(
                "loss_scale",
                format!("must be finite and > 0, got {s}"),
            )),
        }
    }
}

/// Parameter names of one encoder layer, after `bert.encoder.layer.{i}.`, in list order.
pub(super) const LAYER_PARAMS: [&str; 16] = [
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
];
/// Parameters before the first layer: 3 tables and the embedding LayerNorm.
const EMBEDDING_PARAMS: usize = 5;

/// Index of layer `l`'s first parameter.
fn layer_base(l: usize) -> usize {
    EMBEDDING_PARAMS + LAYER_PARAMS.len() * l
}

/// Index of `bert.pooler.dense.weight` (the bias follows); the encoder's parameters are the
/// first `pooler_index + 2`.
pub(super) fn pooler_index(config: &BertConfig) -> usize {
    layer_base(config.num_hidden_layers)
}

/// The encoder's parameter names (embeddings, layers, pooler), `bert.`-prefixed, in list
/// order.
pub(super) fn encoder_names(config: &BertConfig) -> Vec<String> {
    let mut names: Vec<String> = [
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "LayerNorm.weight",
        "LayerNorm.bias",
    ]
    .iter()
    .map(|n| format!("bert.embeddings.{n}"))
    .collect();
    for l in 0..config.num_hidden_layers {
        names.extend(
            LAYER_PARAMS
                .iter()
                .map(|n| format!("bert.encoder.layer.{l}.{n}")),
        );
    }
    names.push("bert.pooler.dense.weight".into());
    names.push("bert.pooler.dense.bias".into());
    names
}

/// Normal(0, std) values from the Philox stream (seed, offset) by Box–Muller.
pub(super) fn normal_init(n: usize, std: f32, seed: u64, offset: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let w = |j: u64| crate::rng::random_word(seed, offset, 2 * i as u64 + j) as f64;
            let u1 = (w(0) + 0.5) / 4_294_967_296.0;
            let u2 = (w(1) + 0.5) / 4_294_967_296.0;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std as f64) as f32
        })
        .collect()
}

/// Takes the encoder's tensors from a checkpoint whose `bert.` prefix is already detected,
/// in [`encoder_names`] order. A missing pooler is drawn as HF initialises one (weight
/// normal(0, `init_std`) from Philox stream (`seed`, 2), bias 0).
pub(super) fn take_encoder(
    ckpt: &mut Checkpoint,
    c: &BertConfig,
    init_std: f32,
    seed: u64,
) -> Result<Vec<(String, HostParam)>> {
    let (h, inter) = (c.hidden_size, c.intermediate_size);
    let mut host: Vec<(String, HostParam)> = Vec::new();
    let mut take = |ckpt: &mut Checkpoint, name: &str, shape: &[usize]| -> Result<()> {
        // Old checkpoints name LayerNorm's parameters gamma/beta.
        let stored = match name.rsplit_once('.') {
            Some((base, "weight")) if !ckpt.contains(name) && base.ends_with("LayerNorm") => {
                format!("{base}.gamma")
            }
            Some((base, "bias")) if !ckpt.contains(name) && base.ends_with("LayerNorm") => {
                format!("{base}.beta")
            }
            _ => name.to_string(),
        };
        host.push((format!("bert.{name}"), ckpt.take(&stored, shape)?));
        Ok(())
    };
    take(
        ckpt,
        "embeddings.word_embeddings.weight",
        &[c.vocab_size, h],
    )?;
    take(
        ckpt,
        "embeddings.position_embeddings.weight",
        &[c.max_position_embeddings, h],
    )?;
    take(
        ckpt,
        "embeddings.token_type_embeddings.weight",
        &[c.type_vocab_size, h],
    )?;
    take(ckpt, "embeddings.LayerNorm.weight", &[h])?;
    take(ckpt, "embeddings.LayerNorm.bias", &[h])?;
    for l in 0..c.num_hidden_layers {
        for name in LAYER_PARAMS {
            let shape = match name {
                "intermediate.dense.weight" => vec![inter, h],
                "intermediate.dense.bias" => vec![inter],
                "output.dense.weight" => vec![h, inter],
                n if n.ends_with("dense.weight")
                    || n.ends_with("query.weight")
                    || n.ends_with("key.weight")
                    || n.ends_with("value.weight") =>
                {
                    vec![h, h]
                }
                _ => vec![h],
            };
            take(ckpt, &format!("encoder.layer.{l}.{name}"), &shape)?;
        }
    }
    if ckpt.contains("pooler.dense.weight") {
        take(ckpt, "pooler.dense.weight", &[h, h])?;
        take(ckpt, "pooler.dense.bias", &[h])?;
    } else {
        host.push((
            "bert.pooler.dense.weight".into(),
            HostParam {
                shape: vec![h, h],
                values: normal_init(h * h, init_std, seed, 2),
            },
        ));
        host.push((
            "bert.pooler.dense.bias".into(),
            HostParam {
                shape: vec![h],
                values: vec![0.0; h],
            },
        ));
    }
    Ok(host)
}

/// Per-step inputs derived from the batch.
pub(super) struct Inputs<'a> {
    pub batch: usize,
    pub len: usize,
    pub ids: &'a [u32],
    pub types: &'a [u32],
    pub positions: Vec<u32>,
    pub key_lens: Option<&'a [usize]>,
    /// Row of each sequence's first token.
    pub cls_rows: Vec<u32>,
}

impl Inputs<'_> {
    fn mask(&self) -> AttentionMask<'_> {
        AttentionMask {
            batch: self.batch,
            len_q: self.len,
            len_k: self.len,
            key_lens: self.key_lens,
            causal: None,
            window: None,
            scale: None,
        }
    }

    /// Checks a batch against the model's positions.
    pub fn new<'a>(config: &BertConfig, batch: &'a TokenBatch) -> Result<Inputs<'a>> {
        let (n, len) = (batch.batch(), batch.len);
        if n == 0 || len == 0 || batch.ids.len() != n * len || batch.type_ids.len() != n * len {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} ids and {} type ids for {n} sequences of {len}",
                    batch.ids.len(),
                    batch.type_ids.len()
                ),
            ));
        }
        if len > config.max_position_embeddings {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{len} tokens exceed the model's {} positions",
                    config.max_position_embeddings
                ),
            ));
        }
        if let Some(&bad) = batch.lens.iter().find(|&&l| l > len) {
            return Err(Error::invalid(
                "batch",
                format!("a sequence length {bad} exceeds the padded length {len}"),
            ));
        }
        let all_full = batch.lens.iter().all(|&l| l == len);
        Ok(Inputs {
            batch: n,
            len,
            ids: &batch.ids,
            types: &batch.type_ids,
            positions: (0..n).flat_map(|_| 0..len as u32).collect(),
            key_lens: (!all_full).then_some(batch.lens.as_slice()),
            cls_rows: (0..n as u32).map(|b| b * len as u32).collect(),
        })
    }
}

pub(super) struct LayerCache<T> {
    attn: SelfAttentionCache<T>,
    s1: T,
    h1: T,
    ffn: FeedForwardCache<T>,
    s2: T,
}

/// The encoder's forward: what its backward reads.
pub(super) struct EncoderForward<T> {
    /// LayerNorm input of the embeddings.
    emb_s: T,
    /// Input of every layer, then the last layer's output.
    pub hidden: Vec<T>,
    /// Per layer, unless recomputing.
    caches: Vec<Option<LayerCache<T>>>,
}

impl<T> EncoderForward<T> {
    /// The last layer's output `[batch·len, hidden]`.
    pub fn last(&self) -> &T {
        self.hidden.last().expect("≥ 1 entry")
    }
}

/// The pooler's forward: the first-token rows and tanh(dense(rows)).
pub(super) struct Pooled<T> {
    pub cls: T,
    pub pooled: T,
}

/// A borrowed view of a model's encoder parameters (the first entries of `params`).
pub(super) struct Encoder<'a, B: TrainBackend> {
    pub params: &'a [Param<B::Tensor>],
    pub config: &'a BertConfig,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
    /// Word-embedding row that gets no gradient from the lookup.
    pub pad_token_id: Option<u32>,
    /// Dropout sites of the whole model per step (the encoder uses the first `1 + 3·layers`).
    pub sites_per_step: u64,
}

impl<B: TrainBackend> Encoder<'_, B> {
    fn p(&self, i: usize) -> &B::Tensor {
        &self.params[i].value
    }

    fn lin(&self, i: usize) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: self.p(i),
            b: Some(self.p(i + 1)),
        }
    }

    fn ln(&self, i: usize) -> LayerNormParams<'_, B::Tensor> {
        LayerNormParams {
            gamma: self.p(i),
            beta: self.p(i + 1),
            eps: self.config.layer_norm_eps,
        }
    }

    fn attention(&self, l: usize) -> SelfAttentionParams<'_, B::Tensor> {
        let b = layer_base(l);
        SelfAttentionParams {
            q: self.lin(b),
            k: self.lin(b + 2),
            v: self.lin(b + 4),
            out: self.lin(b + 6),
            heads: self.config.num_attention_heads,
        }
    }

    fn ffn(&self, l: usize) -> FeedForwardParams<'_, B::Tensor> {
        let b = layer_base(l);
        FeedForwardParams {
            up: self.lin(b + 10),
            down: self.lin(b + 12),
            act: self.config.hidden_act,
        }
    }

    /// The dropout site `site` of this step, or none.
    pub fn site(&self, opts: &StepOptions, site: u64, p: f32) -> Option<DropoutSite> {
        let seed = opts.dropout_seed?;
        (p > 0.0).then_some(DropoutSite {
            p,
            seed,
            offset: opts.step * self.sites_per_step + site,
        })
    }

    fn layer_sites(&self, opts: &StepOptions, l: usize) -> [Option<DropoutSite>; 3] {
        let base = 1 + 3 * l as u64;
        [
            self.site(opts, base, self.attention_dropout),
            self.site(opts, base + 1, self.hidden_dropout),
            self.site(opts, base + 2, self.hidden_dropout),
        ]
    }

    fn layer_forward(
        &self,
        be: &B,
        l: usize,
        h: &B::Tensor,
        inp: &Inputs<'_>,
        opts: &StepOptions,
    ) -> Result<(B::Tensor, LayerCache<B::Tensor>)> {
        let [probs, attn_out, ffn_out] = self.layer_sites(opts, l);
        let base = layer_base(l);
        let (a, attn) = self_attention_forward(be, self.attention(l), h, &inp.mask(), probs)?;
        let a = maybe_dropout(be, a, attn_out)?;
        let (h1, s1) = layer_norm_forward(be, self.ln(base + 8), &a, Some(h))?;
        let (f, ffn) = feed_forward_forward(be, self.ffn(l), &h1)?;
        let f = maybe_dropout(be, f, ffn_out)?;
        let (out, s2) = layer_norm_forward(be, self.ln(base + 14), &f, Some(&h1))?;
        Ok((
            out,
            LayerCache {
                attn,
                s1,
                h1,
                ffn,
                s2,
            },
        ))
    }

    /// dL/d(layer input) from dL/d(layer output); parameter gradients go into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        be: &B,
        l: usize,
        h: &B::Tensor,
        c: &LayerCache<B::Tensor>,
        inp: &Inputs<'_>,
        opts: &StepOptions,
        dout: &B::Tensor,
        grads: &mut [Option<B::Tensor>],
    ) -> Result<B::Tensor> {
        let [probs, attn_out, ffn_out] = self.layer_sites(opts, l);
        let base = layer_base(l);
        let ln2 = layer_norm_backward(be, self.ln(base + 14), &c.s2, dout)?;
        grads[base + 14] = Some(ln2.dgamma);
        grads[base + 15] = Some(ln2.dbeta);
        let df = maybe_dropout(be, copy(be, &ln2.dx)?, ffn_out)?;
        let f = feed_forward_backward(be, self.ffn(l), &c.h1, &c.ffn, &df)?;
        grads[base + 10] = Some(f.up.dw);
        grads[base + 11] = f.up.db;
        grads[base + 12] = Some(f.down.dw);
        grads[base + 13] = f.down.db;
        let mut dh1 = ln2.dx;
        be.accumulate(&mut dh1, &f.dx)?;
        let ln1 = layer_norm_backward(be, self.ln(base + 8), &c.s1, &dh1)?;
        grads[base + 8] = Some(ln1.dgamma);
        grads[base + 9] = Some(ln1.dbeta);
        let da = maybe_dropout(be, copy(be, &ln1.dx)?, attn_out)?;
        let a =
            self_attention_backward(be, self.attention(l), h, &c.attn, &inp.mask(), probs, &da)?;
        for (i, g) in [a.q, a.k, a.v, a.out].into_iter().enumerate() {
            grads[base + 2 * i] = Some(g.dw);
            grads[base + 2 * i + 1] = g.db;
        }
        let mut dh = ln1.dx;
        be.accumulate(&mut dh, &a.dx)?;
        Ok(dh)
    }

    /// Embeddings and every layer; layer caches kept when `keep_caches`.
    pub fn forward(
        &self,
        be: &B,
        inp: &Inputs<'_>,
        opts: &StepOptions,
        keep_caches: bool,
    ) -> Result<EncoderForward<B::Tensor>> {
        let sum = embeddings_forward(
            be,
            [self.p(0), self.p(1), self.p(2)],
            [inp.ids, &inp.positions, inp.types],
        )?;
        let (e, emb_s) = layer_norm_forward(be, self.ln(3), &sum, None)?;
        let h0 = maybe_dropout(be, e, self.site(opts, 0, self.hidden_dropout))?;
        let mut hidden = vec![h0];
        let mut caches = Vec::new();
        for l in 0..self.config.num_hidden_layers {
            let (out, cache) = self.layer_forward(be, l, &hidden[l], inp, opts)?;
            hidden.push(out);
            caches.push(keep_caches.then_some(cache));
        }
        Ok(EncoderForward {
            emb_s,
            hidden,
            caches,
        })
    }

    /// The tanh pooler on each sequence's first token of the last layer's output.
    pub fn pool(
        &self,
        be: &B,
        fw: &EncoderForward<B::Tensor>,
        inp: &Inputs<'_>,
    ) -> Result<Pooled<B::Tensor>> {
        let pi = pooler_index(self.config);
        let cls = be.gather_rows(fw.last(), &inp.cls_rows)?;
        let pooled = be.activate(&linear_forward(be, self.lin(pi), &cls)?, Activation::Tanh)?;
        Ok(Pooled { cls, pooled })
    }

    /// The pooler's backward from dL/dpooled: its gradients go into `grads`; returns
    /// dL/d(last layer output) `[batch·len, hidden]` (non-zero on the first-token rows).
    pub fn pool_backward(
        &self,
        be: &B,
        p: &Pooled<B::Tensor>,
        inp: &Inputs<'_>,
        dpooled: &B::Tensor,
        grads: &mut [Option<B::Tensor>],
    ) -> Result<B::Tensor> {
        let pi = pooler_index(self.config);
        let dz = be.tanh_backward(&p.pooled, dpooled)?;
        let pl = linear_backward(be, self.lin(pi), &p.cls, &dz, true)?;
        grads[pi] = Some(pl.dw);
        grads[pi + 1] = pl.db;
        be.gather_rows_backward(
            &pl.dx.expect("asked for dx"),
            &inp.cls_rows,
            inp.batch * inp.len,
            None,
        )
    }

    /// The layers' and embeddings' backward from dL/d(last layer output), last layer first
    /// (a recomputed layer's cache lives only for its backward); gradients go into `grads`.
    pub fn backward(
        &self,
        be: &B,
        fw: &EncoderForward<B::Tensor>,
        inp: &Inputs<'_>,
        opts: &StepOptions,
        mut dh: B::Tensor,
        grads: &mut [Option<B::Tensor>],
    ) -> Result<()> {
        for l in (0..self.config.num_hidden_layers).rev() {
            let h = &fw.hidden[l];
            let recomputed;
            let cache = match &fw.caches[l] {
                Some(c) => c,
                None => {
                    recomputed = self.layer_forward(be, l, h, inp, opts)?.1;
                    &recomputed
                }
            };
            dh = self.layer_backward(be, l, h, cache, inp, opts, &dh, grads)?;
        }
        let de = maybe_dropout(be, dh, self.site(opts, 0, self.hidden_dropout))?;
        let ln = layer_norm_backward(be, self.ln(3), &fw.emb_s, &de)?;
        grads[3] = Some(ln.dgamma);
        grads[4] = Some(ln.dbeta);
        let tables = embeddings_backward(
            be,
            [self.p(0), self.p(1), self.p(2)],
            [inp.ids, &inp.positions, inp.types],
            [self.pad_token_id, None, None],
            &ln.dx,
        )?;
        for (i, t) in tables.into_iter().enumerate() {
            grads[i] = Some(t);
        }
        Ok(())
    }
}

/// Every gradient slot filled, in parameter order (a missing one is an error naming it).
pub(super) fn collect_grads<T>(grads: Vec<Option<T>>, params: &[Param<T>]) -> Result<Vec<T>> {
    grads
        .into_iter()
        .zip(params)
        .map(|(g, p)| {
            g.ok_or_else(|| Error::invalid("params", format!("no gradient for {}", p.name)))
        })
        .collect()
}

/// Uploads named host parameters as f32, weight decay on all but biases and LayerNorm
/// weights (Hugging Face's Trainer grouping).
pub(super) fn upload_params<B: TrainBackend>(
    be: &B,
    host: Vec<(String, HostParam)>,
) -> Result<Vec<Param<B::Tensor>>> {
    host.into_iter()
        .map(|(name, p)| {
            Ok(Param {
                decay: !(name.ends_with("bias") || name.contains("LayerNorm")),
                value: be.upload_as(&p.shape, &p.values, crate::DType::F32)?,
                name,
            })
        })
        .collect()
}
