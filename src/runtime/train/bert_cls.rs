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

use super::backend::TrainBackend;
use super::bert_encoder::{
    collect_grads, encoder_names, normal_init, pooler_index, take_encoder, upload_params, Encoder,
    EncoderForward, Inputs, Pooled, StepOptions,
};
use super::layers::{copy, linear_backward, linear_forward, maybe_dropout, LinearParams};
use super::optim::{Gradients, Param};
use crate::error::{Error, Result};
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

/// What a training step computes.
pub struct StepOutput<T> {
    pub loss: f32,
    /// `[batch, num_labels]`.
    pub logits: T,
    pub grads: Gradients<T>,
}

/// A trainable BERT classifier on backend `B`; parameters in f32.
pub struct BertForSequenceClassification<B: TrainBackend> {
    pub config: ClassifierConfig,
    params: Vec<Param<B::Tensor>>,
}

/// Dropout sites of one step: the encoder's (embeddings, then three per layer), then the
/// classifier's input.
fn sites_per_step(layers: usize) -> u64 {
    2 + 3 * layers as u64
}

struct Forward<T> {
    enc: EncoderForward<T>,
    pooled: Pooled<T>,
    /// The classifier's input (the pooled output after dropout).
    dropped: T,
    logits: T,
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
        let mut host = take_encoder(&mut ckpt, &config.bert, config.initializer_range, seed)?;
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
        let params = upload_params(be, host)?;
        Ok(BertForSequenceClassification { config, params })
    }

    fn names_for(config: &ClassifierConfig) -> Vec<String> {
        let mut names = encoder_names(&config.bert);
        names.extend(["classifier.weight", "classifier.bias"].map(String::from));
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

    fn lin(&self, i: usize) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: &self.params[i].value,
            b: Some(&self.params[i + 1].value),
        }
    }

    /// Index of `classifier.weight`.
    fn classifier_ix(&self) -> usize {
        pooler_index(&self.config.bert) + 2
    }

    fn encoder(&self) -> Encoder<'_, B> {
        let c = &self.config;
        Encoder {
            params: &self.params,
            config: &c.bert,
            hidden_dropout: c.hidden_dropout_prob,
            attention_dropout: c.attention_probs_dropout_prob,
            pad_token_id: c.pad_token_id,
            sites_per_step: sites_per_step(c.bert.num_hidden_layers),
        }
    }

    /// The classifier's dropout site (the step's last).
    fn classifier_site(&self, opts: &StepOptions) -> Option<super::backend::DropoutSite> {
        let last = sites_per_step(self.config.bert.num_hidden_layers) - 1;
        self.encoder()
            .site(opts, last, self.config.classifier_dropout)
    }

    fn forward_all(
        &self,
        be: &B,
        inp: &Inputs<'_>,
        opts: &StepOptions,
        keep_caches: bool,
    ) -> Result<Forward<B::Tensor>> {
        let enc = self.encoder();
        let fw = enc.forward(be, inp, opts, keep_caches)?;
        let pooled = enc.pool(be, &fw, inp)?;
        let dropped = maybe_dropout(be, copy(be, &pooled.pooled)?, self.classifier_site(opts))?;
        let logits = linear_forward(be, self.lin(self.classifier_ix()), &dropped)?;
        Ok(Forward {
            enc: fw,
            pooled,
            dropped,
            logits,
        })
    }

    /// Logits `[batch, num_labels]` without dropout (inference).
    pub fn logits(&self, be: &B, batch: &TokenBatch) -> Result<B::Tensor> {
        let inp = Inputs::new(&self.config.bert, batch)?;
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
        let inp = Inputs::new(&self.config.bert, batch)?;
        if labels.len() != inp.batch {
            return Err(Error::shape(
                "labels",
                format!("[{}] (one per sequence)", inp.batch),
                &[labels.len()],
            ));
        }
        let fw = self.forward_all(be, &inp, opts, !opts.recompute)?;
        let (loss, mut dlogits) = be.cross_entropy(&fw.logits, labels, &opts.loss)?;
        if let Some(s) = opts.scale_factor()? {
            be.scale(&mut dlogits, s)?;
        }
        let mut grads: Vec<Option<B::Tensor>> = (0..self.params.len()).map(|_| None).collect();
        // Head: classifier, its dropout, then the encoder's pooler and layers.
        let ci = self.classifier_ix();
        let cl = linear_backward(be, self.lin(ci), &fw.dropped, &dlogits, true)?;
        grads[ci] = Some(cl.dw);
        grads[ci + 1] = cl.db;
        let dpooled = maybe_dropout(be, cl.dx.expect("asked for dx"), self.classifier_site(opts))?;
        let enc = self.encoder();
        let dh = enc.pool_backward(be, &fw.pooled, &inp, &dpooled, &mut grads)?;
        enc.backward(be, &fw.enc, &inp, opts, dh, &mut grads)?;
        Ok(StepOutput {
            loss,
            logits: fw.logits,
            grads: Gradients {
                names: self.parameter_names(),
                tensors: collect_grads(grads, &self.params)?,
                no_grad: Vec::new(),
            },
        })
    }
}
