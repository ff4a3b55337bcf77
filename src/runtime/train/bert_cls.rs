//! `BertForSequenceClassification` as Hugging Face defines it, trainable: BERT (embeddings,
//! post-LayerNorm encoder layers, tanh pooler on the first token), dropout, and a linear
//! classifier on the pooled output; forward to logits, and forward + backward to the loss and
//! the gradient of every parameter under its Hugging Face name.
//!
//! Dropout follows the config (`hidden_dropout_prob` after the embeddings and after each
//! attention and feed-forward output, `attention_probs_dropout_prob` on the attention
//! probabilities, `classifier_dropout` (or the hidden one) before the classifier), drawn from
//! the Philox stream of [`crate::rng`]: site s of step t uses offset `t·sites + s`, so a step
//! is a pure function of (weights, batch, seed, step) on either backend.

use super::backend::{CrossEntropy, DropoutSite, TrainBackend};
use super::layers::{
    embeddings_backward, embeddings_forward, feed_forward_backward, feed_forward_forward,
    layer_norm_backward, layer_norm_forward, linear_backward, linear_forward, maybe_dropout,
    self_attention_backward, self_attention_forward, FeedForwardCache, FeedForwardParams,
    LayerNormParams, LinearParams, SelfAttentionCache, SelfAttentionParams,
};
use super::optim::{Gradients, Param};
use crate::error::{Error, Result};
use crate::runtime::backend::{Activation, AttentionMask};
use crate::runtime::bert::BertConfig;
use crate::runtime::checkpoint::{read_json, Checkpoint, HostParam};
use crate::runtime::tokenizer::TokenBatch;
use std::path::Path;

/// A classification BERT's configuration: the encoder's, plus what the head and training use.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierConfig {
    pub bert: BertConfig,
    pub num_labels: usize,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    /// `classifier_dropout`, or `hidden_dropout_prob` when the config has none (as HF).
    pub classifier_dropout: f32,
    pub initializer_range: f32,
    /// Word-embedding row that gets no gradient (`nn.Embedding(padding_idx=pad_token_id)`).
    pub pad_token_id: Option<u32>,
}

impl ClassifierConfig {
    /// Reads `dir/config.json`. `num_labels`: the length of `id2label`, else 2 (HF's default).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let bert = BertConfig::from_folder(dir)?;
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        let prob = |key: &str, default: f64| -> Result<f32> {
            let p = v[key].as_f64().unwrap_or(default);
            if !(0.0..1.0).contains(&p) {
                return Err(Error::Config {
                    file: path.display().to_string(),
                    reason: format!("`{key}` = {p} is not a probability in [0, 1)"),
                });
            }
            Ok(p as f32)
        };
        let hidden = prob("hidden_dropout_prob", 0.1)?;
        Ok(ClassifierConfig {
            num_labels: v["id2label"].as_object().map_or(2, |m| m.len()),
            hidden_dropout_prob: hidden,
            attention_probs_dropout_prob: prob("attention_probs_dropout_prob", 0.1)?,
            classifier_dropout: if v["classifier_dropout"].is_null() {
                hidden
            } else {
                prob("classifier_dropout", 0.1)?
            },
            initializer_range: v["initializer_range"].as_f64().unwrap_or(0.02) as f32,
            pad_token_id: v["pad_token_id"].as_u64().map(|p| p as u32),
            bert,
        })
    }
}

/// How [`BertForSequenceClassification::from_folder`] gets its classification head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// The checkpoint's `classifier.weight`/`classifier.bias` (`[num_labels, hidden]`, with
    /// num_labels from the config's `id2label`).
    FromCheckpoint,
    /// A new head of `num_labels` classes initialised as HF does: weight normal(0,
    /// initializer_range), bias 0, drawn from the Philox stream of `seed`. Any head in the
    /// checkpoint is dropped.
    New { num_labels: usize, seed: u64 },
}

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
}

/// What a training step computes.
pub struct StepOutput<T> {
    pub loss: f32,
    /// `[batch, num_labels]`.
    pub logits: T,
    pub grads: Gradients<T>,
}

/// Parameter names of one encoder layer, after `bert.encoder.layer.{i}.`, in list order.
const LAYER_PARAMS: [&str; 16] = [
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

/// A trainable BERT classifier on backend `B`; parameters in f32.
pub struct BertForSequenceClassification<B: TrainBackend> {
    pub config: ClassifierConfig,
    params: Vec<Param<B::Tensor>>,
}

/// Dropout sites of one step: embeddings, then (probabilities, attention output, FFN output)
/// per layer, then the classifier's input.
fn sites_per_step(layers: usize) -> u64 {
    2 + 3 * layers as u64
}

/// Per-step inputs derived from the batch.
struct Inputs<'a> {
    batch: usize,
    len: usize,
    ids: &'a [u32],
    types: &'a [u32],
    positions: Vec<u32>,
    key_lens: Option<&'a [usize]>,
    /// Row of each sequence's first token.
    cls_rows: Vec<u32>,
}

impl Inputs<'_> {
    fn mask(&self) -> AttentionMask<'_> {
        AttentionMask {
            batch: self.batch,
            len_q: self.len,
            len_k: self.len,
            key_lens: self.key_lens,
            causal: None,
            scale: None,
        }
    }
}

struct LayerCache<T> {
    attn: SelfAttentionCache<T>,
    s1: T,
    h1: T,
    ffn: FeedForwardCache<T>,
    s2: T,
}

struct HeadCache<T> {
    cls: T,
    pooled: T,
    dropped: T,
}

struct Forward<T> {
    /// LayerNorm input of the embeddings.
    emb_s: T,
    /// Input of every layer, then the last layer's output.
    hidden: Vec<T>,
    /// Per layer, unless recomputing.
    caches: Vec<Option<LayerCache<T>>>,
    head: HeadCache<T>,
    logits: T,
}

/// Normal(0, std) values from the Philox stream (seed, offset) by Box–Muller.
fn normal_init(n: usize, std: f32, seed: u64, offset: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let w = |j: u64| crate::rng::random_word(seed, offset, 2 * i as u64 + j) as f64;
            let u1 = (w(0) + 0.5) / 4_294_967_296.0;
            let u2 = (w(1) + 0.5) / 4_294_967_296.0;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std as f64) as f32
        })
        .collect()
}

impl<B: TrainBackend> BertForSequenceClassification<B> {
    /// Loads a BERT folder: a `BertForSequenceClassification` (`bert.`-prefixed keys and
    /// `classifier.*`) or a bare `BertModel` (then `head` must be [`Head::New`]). A missing
    /// pooler is initialised like a new head (seed of the new head, or 0).
    pub fn from_folder(be: &B, dir: &Path, head: Head) -> Result<Self> {
        let mut config = ClassifierConfig::from_folder(dir)?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let h = config.bert.hidden_size;
        // The head's names carry no prefix: read before `bert.` is detected.
        let (classifier, seed) = match head {
            Head::FromCheckpoint => {
                if !ckpt.contains("classifier.weight") {
                    return Err(Error::Checkpoint {
                        file: dir.join("model.safetensors").display().to_string(),
                        reason: "no classification head (`classifier.weight`): a bare BERT \
                                 needs a new head"
                            .into(),
                    });
                }
                let w = ckpt.take("classifier.weight", &[config.num_labels, h])?;
                let b = ckpt.take("classifier.bias", &[config.num_labels])?;
                ((w, b), 0)
            }
            Head::New { num_labels, seed } => {
                if num_labels == 0 {
                    return Err(Error::invalid("num_labels", "a head needs ≥ 1 label"));
                }
                ckpt.discard("classifier.weight");
                ckpt.discard("classifier.bias");
                config.num_labels = num_labels;
                let w = HostParam {
                    shape: vec![num_labels, h],
                    values: normal_init(num_labels * h, config.initializer_range, seed, 1),
                };
                let b = HostParam {
                    shape: vec![num_labels],
                    values: vec![0.0; num_labels],
                };
                ((w, b), seed)
            }
        };
        ckpt.detect_prefix("bert.", "embeddings.word_embeddings.weight");
        let c = &config.bert;
        let inter = c.intermediate_size;
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
            &mut ckpt,
            "embeddings.word_embeddings.weight",
            &[c.vocab_size, h],
        )?;
        take(
            &mut ckpt,
            "embeddings.position_embeddings.weight",
            &[c.max_position_embeddings, h],
        )?;
        take(
            &mut ckpt,
            "embeddings.token_type_embeddings.weight",
            &[c.type_vocab_size, h],
        )?;
        take(&mut ckpt, "embeddings.LayerNorm.weight", &[h])?;
        take(&mut ckpt, "embeddings.LayerNorm.bias", &[h])?;
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
                take(&mut ckpt, &format!("encoder.layer.{l}.{name}"), &shape)?;
            }
        }
        if ckpt.contains("pooler.dense.weight") {
            take(&mut ckpt, "pooler.dense.weight", &[h, h])?;
            take(&mut ckpt, "pooler.dense.bias", &[h])?;
        } else {
            host.push((
                "bert.pooler.dense.weight".into(),
                HostParam {
                    shape: vec![h, h],
                    values: normal_init(h * h, config.initializer_range, seed, 2),
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
        ckpt.finish()?;
        host.push(("classifier.weight".into(), classifier.0));
        host.push(("classifier.bias".into(), classifier.1));
        Self::from_host(be, config, host)
    }

    /// A model from named host parameters in list order (see [`Self::parameter_names`]).
    pub fn from_host(
        be: &B,
        config: ClassifierConfig,
        host: Vec<(String, HostParam)>,
    ) -> Result<Self> {
        let expected = Self::names_for(&config);
        let got: Vec<&str> = host.iter().map(|(n, _)| n.as_str()).collect();
        if got != expected {
            return Err(Error::invalid(
                "params",
                format!("parameter list {got:?} is not the model's {expected:?}"),
            ));
        }
        let params = host
            .into_iter()
            .map(|(name, p)| {
                Ok(Param {
                    decay: !(name.ends_with("bias") || name.contains("LayerNorm")),
                    value: be.upload_as(&p.shape, &p.values, crate::DType::F32)?,
                    name,
                })
            })
            .collect::<Result<_>>()?;
        Ok(BertForSequenceClassification { config, params })
    }

    fn names_for(config: &ClassifierConfig) -> Vec<String> {
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
        for l in 0..config.bert.num_hidden_layers {
            names.extend(
                LAYER_PARAMS
                    .iter()
                    .map(|n| format!("bert.encoder.layer.{l}.{n}")),
            );
        }
        names.extend(
            [
                "bert.pooler.dense.weight",
                "bert.pooler.dense.bias",
                "classifier.weight",
                "classifier.bias",
            ]
            .map(String::from),
        );
        names
    }

    /// Every parameter's Hugging Face name, in list order.
    pub fn parameter_names(&self) -> Vec<String> {
        self.params.iter().map(|p| p.name.clone()).collect()
    }

    /// The parameters (name, value, weight-decay flag), in list order.
    pub fn parameters(&self) -> &[Param<B::Tensor>] {
        &self.params
    }

    /// The parameters, to update in place (an optimizer step).
    pub fn parameters_mut(&mut self) -> &mut [Param<B::Tensor>] {
        &mut self.params
    }

    /// Every parameter as host f32 (name, shape, values): what a checkpoint writer needs.
    pub fn to_host(&self, be: &B) -> Result<Vec<(String, HostParam)>> {
        self.params
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    HostParam {
                        shape: be.shape(&p.value).to_vec(),
                        values: be.to_f32(&p.value)?,
                    },
                ))
            })
            .collect()
    }

    /// Writes every parameter to `path` as f32 safetensors under its HF name (the file
    /// `BertForSequenceClassification.from_pretrained` reads).
    pub fn save_safetensors(&self, be: &B, path: &Path) -> Result<()> {
        let host = self.to_host(be)?;
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = host
            .into_iter()
            .map(|(n, p)| {
                let b = p.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n, p.shape, b)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(n, s, b)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::invalid("params", e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let data = safetensors::serialize(views, None)
            .map_err(|e| Error::invalid("params", e.to_string()))?;
        std::fs::write(path, data).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })
    }

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
            eps: self.config.bert.layer_norm_eps,
        }
    }

    fn layer_base(l: usize) -> usize {
        EMBEDDING_PARAMS + LAYER_PARAMS.len() * l
    }

    fn pooler_ix(&self) -> usize {
        Self::layer_base(self.config.bert.num_hidden_layers)
    }

    fn attention(&self, l: usize) -> SelfAttentionParams<'_, B::Tensor> {
        let b = Self::layer_base(l);
        SelfAttentionParams {
            q: self.lin(b),
            k: self.lin(b + 2),
            v: self.lin(b + 4),
            out: self.lin(b + 6),
            heads: self.config.bert.num_attention_heads,
        }
    }

    fn ffn(&self, l: usize) -> FeedForwardParams<'_, B::Tensor> {
        let b = Self::layer_base(l);
        FeedForwardParams {
            up: self.lin(b + 10),
            down: self.lin(b + 12),
            act: self.config.bert.hidden_act,
        }
    }

    fn inputs<'a>(&self, batch: &'a TokenBatch) -> Result<Inputs<'a>> {
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
        if len > self.config.bert.max_position_embeddings {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{len} tokens exceed the model's {} positions",
                    self.config.bert.max_position_embeddings
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

    /// The dropout site `site` of this step, or none.
    fn site(&self, opts: &StepOptions, site: u64, p: f32) -> Option<DropoutSite> {
        let seed = opts.dropout_seed?;
        (p > 0.0).then_some(DropoutSite {
            p,
            seed,
            offset: opts.step * sites_per_step(self.config.bert.num_hidden_layers) + site,
        })
    }

    fn layer_sites(&self, opts: &StepOptions, l: usize) -> [Option<DropoutSite>; 3] {
        let base = 1 + 3 * l as u64;
        [
            self.site(opts, base, self.config.attention_probs_dropout_prob),
            self.site(opts, base + 1, self.config.hidden_dropout_prob),
            self.site(opts, base + 2, self.config.hidden_dropout_prob),
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
        let base = Self::layer_base(l);
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
        let base = Self::layer_base(l);
        let ln2 = layer_norm_backward(be, self.ln(base + 14), &c.s2, dout)?;
        grads[base + 14] = Some(ln2.dgamma);
        grads[base + 15] = Some(ln2.dbeta);
        let df = maybe_dropout(be, super::layers::copy(be, &ln2.dx)?, ffn_out)?;
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
        let da = maybe_dropout(be, super::layers::copy(be, &ln1.dx)?, attn_out)?;
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

    fn forward_all(
        &self,
        be: &B,
        inp: &Inputs<'_>,
        opts: &StepOptions,
        keep_caches: bool,
    ) -> Result<Forward<B::Tensor>> {
        let last = sites_per_step(self.config.bert.num_hidden_layers) - 1;
        let sum = embeddings_forward(
            be,
            [self.p(0), self.p(1), self.p(2)],
            [inp.ids, &inp.positions, inp.types],
        )?;
        let (e, emb_s) = layer_norm_forward(be, self.ln(3), &sum, None)?;
        let h0 = maybe_dropout(be, e, self.site(opts, 0, self.config.hidden_dropout_prob))?;
        let mut hidden = vec![h0];
        let mut caches = Vec::new();
        for l in 0..self.config.bert.num_hidden_layers {
            let (out, cache) = self.layer_forward(be, l, &hidden[l], inp, opts)?;
            hidden.push(out);
            caches.push(keep_caches.then_some(cache));
        }
        let pi = self.pooler_ix();
        let cls = be.gather_rows(hidden.last().expect("≥ 1 entry"), &inp.cls_rows)?;
        let pooled = be.activate(&linear_forward(be, self.lin(pi), &cls)?, Activation::Tanh)?;
        let dropped = maybe_dropout(
            be,
            super::layers::copy(be, &pooled)?,
            self.site(opts, last, self.config.classifier_dropout),
        )?;
        let logits = linear_forward(be, self.lin(pi + 2), &dropped)?;
        Ok(Forward {
            emb_s,
            hidden,
            caches,
            head: HeadCache {
                cls,
                pooled,
                dropped,
            },
            logits,
        })
    }

    /// Logits `[batch, num_labels]` without dropout (inference).
    pub fn logits(&self, be: &B, batch: &TokenBatch) -> Result<B::Tensor> {
        let inp = self.inputs(batch)?;
        Ok(self
            .forward_all(be, &inp, &StepOptions::default(), false)?
            .logits)
    }

    /// Forward, loss against `labels` (one per sequence; `opts.loss.ignore_index` skips one)
    /// and backward: the gradient of every parameter, in list order.
    pub fn forward_backward(
        &self,
        be: &B,
        batch: &TokenBatch,
        labels: &[i64],
        opts: &StepOptions,
    ) -> Result<StepOutput<B::Tensor>> {
        let inp = self.inputs(batch)?;
        if labels.len() != inp.batch {
            return Err(Error::shape(
                "labels",
                format!("[{}] (one per sequence)", inp.batch),
                &[labels.len()],
            ));
        }
        let fw = self.forward_all(be, &inp, opts, !opts.recompute)?;
        let (loss, dlogits) = be.cross_entropy(&fw.logits, labels, &opts.loss)?;
        let mut grads: Vec<Option<B::Tensor>> = (0..self.params.len()).map(|_| None).collect();
        // Head: classifier, its dropout, tanh pooler, first-token gather.
        let pi = self.pooler_ix();
        let last = sites_per_step(self.config.bert.num_hidden_layers) - 1;
        let cl = linear_backward(be, self.lin(pi + 2), &fw.head.dropped, &dlogits, true)?;
        grads[pi + 2] = Some(cl.dw);
        grads[pi + 3] = cl.db;
        let dpooled = maybe_dropout(
            be,
            cl.dx.expect("asked for dx"),
            self.site(opts, last, self.config.classifier_dropout),
        )?;
        let dz = be.tanh_backward(&fw.head.pooled, &dpooled)?;
        let pl = linear_backward(be, self.lin(pi), &fw.head.cls, &dz, true)?;
        grads[pi] = Some(pl.dw);
        grads[pi + 1] = pl.db;
        let rows = inp.batch * inp.len;
        let mut dh =
            be.gather_rows_backward(&pl.dx.expect("asked for dx"), &inp.cls_rows, rows, None)?;
        // Encoder, last layer first; a recomputed layer's cache lives only for its backward.
        for l in (0..self.config.bert.num_hidden_layers).rev() {
            let h = &fw.hidden[l];
            let recomputed;
            let cache = match &fw.caches[l] {
                Some(c) => c,
                None => {
                    recomputed = self.layer_forward(be, l, h, &inp, opts)?.1;
                    &recomputed
                }
            };
            dh = self.layer_backward(be, l, h, cache, &inp, opts, &dh, &mut grads)?;
        }
        // Embeddings: dropout, LayerNorm, the three tables.
        let de = maybe_dropout(be, dh, self.site(opts, 0, self.config.hidden_dropout_prob))?;
        let ln = layer_norm_backward(be, self.ln(3), &fw.emb_s, &de)?;
        grads[3] = Some(ln.dgamma);
        grads[4] = Some(ln.dbeta);
        let tables = embeddings_backward(
            be,
            [self.p(0), self.p(1), self.p(2)],
            [inp.ids, &inp.positions, inp.types],
            [self.config.pad_token_id, None, None],
            &ln.dx,
        )?;
        for (i, t) in tables.into_iter().enumerate() {
            grads[i] = Some(t);
        }
        let tensors = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| {
                g.ok_or_else(|| Error::invalid("params", format!("no gradient for {}", p.name)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StepOutput {
            loss,
            logits: fw.logits,
            grads: Gradients {
                names: self.parameter_names(),
                tensors,
            },
        })
    }
}
