//! `BertForPreTraining` as Hugging Face defines it, trainable: BERT's encoder
//! ([`super::bert_encoder`]) under two heads, and forward + backward to the pretraining loss
//! and the gradient of every parameter under its Hugging Face name.
//!
//! - Masked LM: the last layer's rows at the masked positions (label ≠ `ignore_index`) go
//!   through the transform (dense, the config's activation, LayerNorm) and the decoder, which
//!   is the word-embedding table E itself (tied) plus a bias: logits = t·Eᵀ + b. Only the
//!   masked rows are transformed and decoded — the other positions add nothing to the loss,
//!   so their logits are never made. The loss is the mean cross-entropy over those rows
//!   (PyTorch's `ignore_index` mean; no masked row at all gives 0, where PyTorch gives NaN).
//! - Next sentence: a 2-way linear layer on the pooled first token.
//! - Total loss = MLM + NSP, as `BertForPreTraining`. E receives gradient from both of its
//!   uses: the lookup's scatter-add (none into the padding row) plus the decoder's dlogitsᵀ·t.
//!
//! The heads have no dropout; the encoder's follows the config ([`super::bert_encoder`]).

use super::backend::TrainBackend;
use super::bert_cls::ClassifierConfig;
use super::bert_encoder::{
    collect_grads, encoder_names, pooler_index, take_encoder, upload_params, Encoder, Inputs,
    StepOptions,
};
use super::layers::{
    layer_norm_backward, layer_norm_forward, linear_backward, linear_forward, LayerNormParams,
    LinearParams,
};
use super::optim::{Gradients, Param};
use crate::error::{Error, Result};
use crate::runtime::bert::BertConfig;
use crate::runtime::checkpoint::{read_json, Checkpoint, HostParam};
use crate::runtime::tokenizer::TokenBatch;
use std::path::Path;

/// What the trainable pretraining model reads from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct PretrainingConfig {
    pub bert: BertConfig,
    pub hidden_dropout_prob: f32,
    pub attention_probs_dropout_prob: f32,
    pub initializer_range: f32,
    /// Word-embedding row that gets no gradient from the lookup (the decoder still gives it
    /// one).
    pub pad_token_id: Option<u32>,
}

impl PretrainingConfig {
    /// Reads `dir/config.json` (the same fields, checked the same way, as the classifier's).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let c = ClassifierConfig::from_folder(dir)?;
        Ok(PretrainingConfig {
            bert: c.bert,
            hidden_dropout_prob: c.hidden_dropout_prob,
            attention_probs_dropout_prob: c.attention_probs_dropout_prob,
            initializer_range: c.initializer_range,
            pad_token_id: c.pad_token_id,
        })
    }
}

/// The heads' parameters after the encoder's, in Hugging Face's `named_parameters` order
/// (the decoder's weight is the word-embedding table and its bias is `cls.predictions.bias`).
const HEAD_PARAMS: [&str; 7] = [
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
];

/// What a pretraining step computes.
pub struct PretrainingOutput<T> {
    /// MLM + NSP.
    pub loss: f32,
    pub mlm_loss: f32,
    pub nsp_loss: f32,
    /// Row index (in the batch's `[batch·len]` layout) of every masked position, in order.
    pub masked_rows: Vec<u32>,
    /// `[masked rows, vocab]`: the MLM logits of those rows only.
    pub mlm_logits: Option<T>,
    /// `[batch, 2]`.
    pub nsp_logits: T,
    pub grads: Gradients<T>,
}

/// A trainable `BertForPreTraining` on backend `B`; parameters in f32.
pub struct BertForPreTraining<B: TrainBackend> {
    pub config: PretrainingConfig,
    params: Vec<Param<B::Tensor>>,
}

impl<B: TrainBackend> BertForPreTraining<B> {
    /// Loads a `BertForPreTraining` folder with a tied decoder (`tie_word_embeddings`, HF's
    /// default); an untied one is refused.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config = PretrainingConfig::from_folder(dir)?;
        let file = dir.join("model.safetensors");
        let v = read_json(&dir.join("config.json"))?;
        if v["tie_word_embeddings"].as_bool() == Some(false) {
            return Err(Error::Config {
                file: dir.join("config.json").display().to_string(),
                reason: "an untied MLM decoder (`tie_word_embeddings: false`) is not trainable \
                         here"
                    .into(),
            });
        }
        let mut ckpt = Checkpoint::open(&file)?;
        let (h, vocab) = (config.bert.hidden_size, config.bert.vocab_size);
        let p = "cls.predictions";
        if !ckpt.contains(&format!("{p}.transform.dense.weight"))
            || !ckpt.contains("cls.seq_relationship.weight")
        {
            return Err(Error::Checkpoint {
                file: file.display().to_string(),
                reason: "not a BertForPreTraining: the MLM head (cls.predictions.*) and the NSP \
                         head (cls.seq_relationship.*) are both needed"
                    .into(),
            });
        }
        // The heads carry no `bert.` prefix: taken before it is detected. A saved copy of the
        // tied decoder weight (and of the decoder bias) is the same tensor; dropped.
        ckpt.discard(&format!("{p}.decoder.weight"));
        let bias = if ckpt.contains(&format!("{p}.bias")) {
            ckpt.discard(&format!("{p}.decoder.bias"));
            ckpt.take(&format!("{p}.bias"), &[vocab])?
        } else {
            ckpt.take(&format!("{p}.decoder.bias"), &[vocab])?
        };
        let mut heads = vec![bias];
        for (name, shape) in [
            ("transform.dense.weight", vec![h, h]),
            ("transform.dense.bias", vec![h]),
            ("transform.LayerNorm.weight", vec![h]),
            ("transform.LayerNorm.bias", vec![h]),
        ] {
            heads.push(ckpt.take(&format!("{p}.{name}"), &shape)?);
        }
        heads.push(ckpt.take("cls.seq_relationship.weight", &[2, h])?);
        heads.push(ckpt.take("cls.seq_relationship.bias", &[2])?);
        ckpt.detect_prefix("bert.", "embeddings.word_embeddings.weight");
        let mut host = take_encoder(&mut ckpt, &config.bert, config.initializer_range, 0)?;
        ckpt.finish()?;
        host.extend(HEAD_PARAMS.iter().map(|n| n.to_string()).zip(heads));
        Self::from_host(be, config, host)
    }

    /// A model from named host parameters in list order (see [`Self::parameter_names`]).
    pub fn from_host(
        be: &B,
        config: PretrainingConfig,
        host: Vec<(String, HostParam)>,
    ) -> Result<Self> {
        let mut expected = encoder_names(&config.bert);
        expected.extend(HEAD_PARAMS.map(String::from));
        let got: Vec<&str> = host.iter().map(|(n, _)| n.as_str()).collect();
        if got != expected {
            return Err(Error::invalid(
                "params",
                format!("parameter list {got:?} is not the model's {expected:?}"),
            ));
        }
        Ok(BertForPreTraining {
            params: upload_params(be, host)?,
            config,
        })
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

    fn encoder(&self) -> Encoder<'_, B> {
        let c = &self.config;
        Encoder {
            params: &self.params,
            config: &c.bert,
            hidden_dropout: c.hidden_dropout_prob,
            attention_dropout: c.attention_probs_dropout_prob,
            pad_token_id: c.pad_token_id,
            // The heads have no dropout: the encoder's sites are all.
            sites_per_step: 1 + 3 * c.bert.num_hidden_layers as u64,
        }
    }

    /// Index of `cls.predictions.bias`; the rest of [`HEAD_PARAMS`] follows.
    fn head_ix(&self) -> usize {
        pooler_index(&self.config.bert) + 2
    }

    fn lin(&self, i: usize) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: &self.params[i].value,
            b: Some(&self.params[i + 1].value),
        }
    }

    /// The decoder: the word embeddings `[vocab, hidden]` with `cls.predictions.bias`.
    fn decoder(&self) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: &self.params[0].value,
            b: Some(&self.params[self.head_ix()].value),
        }
    }

    fn transform_ln(&self) -> LayerNormParams<'_, B::Tensor> {
        let i = self.head_ix() + 3;
        LayerNormParams {
            gamma: &self.params[i].value,
            beta: &self.params[i + 1].value,
            eps: self.config.bert.layer_norm_eps,
        }
    }

    /// Forward, both losses against `mlm_labels` (`[batch·len]`, `opts.loss.ignore_index` on
    /// the positions that are not predicted) and `nsp_labels` (`[batch]`: 0 = B follows A,
    /// 1 = random), and backward: the gradient of every parameter, in list order.
    pub fn forward_backward(
        &self,
        be: &B,
        batch: &TokenBatch,
        mlm_labels: &[i64],
        nsp_labels: &[i64],
        opts: &StepOptions,
    ) -> Result<PretrainingOutput<B::Tensor>> {
        let inp = Inputs::new(&self.config.bert, batch)?;
        let rows = inp.batch * inp.len;
        if mlm_labels.len() != rows {
            return Err(Error::shape(
                "mlm_labels",
                format!("[{rows}] (one per token)"),
                &[mlm_labels.len()],
            ));
        }
        if nsp_labels.len() != inp.batch {
            return Err(Error::shape(
                "nsp_labels",
                format!("[{}] (one per sequence)", inp.batch),
                &[nsp_labels.len()],
            ));
        }
        let scale = opts.scale_factor()?;
        let ignore = opts.loss.ignore_index;
        let masked_rows: Vec<u32> = (0..rows as u32)
            .filter(|&r| mlm_labels[r as usize] != ignore)
            .collect();
        let masked_labels: Vec<i64> = masked_rows
            .iter()
            .map(|&r| mlm_labels[r as usize])
            .collect();
        let enc = self.encoder();
        let fw = enc.forward(be, &inp, opts, !opts.recompute)?;
        let mut grads: Vec<Option<B::Tensor>> = (0..self.params.len()).map(|_| None).collect();
        let hi = self.head_ix();

        // Next sentence: linear on the pooled first token.
        let pooled = enc.pool(be, &fw, &inp)?;
        let nsp_logits = linear_forward(be, self.lin(hi + 5), &pooled.pooled)?;
        let (nsp_loss, mut dnsp) = be.cross_entropy(&nsp_logits, nsp_labels, &opts.loss)?;
        if let Some(s) = scale {
            be.scale(&mut dnsp, s)?;
        }
        let sr = linear_backward(be, self.lin(hi + 5), &pooled.pooled, &dnsp, true)?;
        grads[hi + 5] = Some(sr.dw);
        grads[hi + 6] = sr.db;
        let mut dh =
            enc.pool_backward(be, &pooled, &inp, &sr.dx.expect("asked for dx"), &mut grads)?;

        // Masked LM on the masked rows: gather, transform, tied decoder.
        let (mlm_loss, mlm_logits, ddecoder_w) = if masked_rows.is_empty() {
            let zeros = |i: usize| be.zeros(be.shape(&self.params[i].value));
            for (i, g) in grads.iter_mut().enumerate().skip(hi).take(5) {
                *g = Some(zeros(i)?);
            }
            (0.0, None, None)
        } else {
            let x = be.gather_rows(fw.last(), &masked_rows)?;
            let z = linear_forward(be, self.lin(hi + 1), &x)?;
            let a = be.activate(&z, self.config.bert.hidden_act)?;
            let (t, s) = layer_norm_forward(be, self.transform_ln(), &a, None)?;
            let logits = linear_forward(be, self.decoder(), &t)?;
            let (loss, mut dl) = be.cross_entropy(&logits, &masked_labels, &opts.loss)?;
            if let Some(s) = scale {
                be.scale(&mut dl, s)?;
            }
            let dec = linear_backward(be, self.decoder(), &t, &dl, true)?;
            grads[hi] = dec.db;
            let ln = layer_norm_backward(be, self.transform_ln(), &s, &dec.dx.expect("asked"))?;
            grads[hi + 3] = Some(ln.dgamma);
            grads[hi + 4] = Some(ln.dbeta);
            let dz = be.activation_backward(&z, &ln.dx, self.config.bert.hidden_act)?;
            let tr = linear_backward(be, self.lin(hi + 1), &x, &dz, true)?;
            grads[hi + 1] = Some(tr.dw);
            grads[hi + 2] = tr.db;
            let dx = be.gather_rows_backward(&tr.dx.expect("asked"), &masked_rows, rows, None)?;
            be.accumulate(&mut dh, &dx)?;
            (loss, Some(logits), Some(dec.dw))
        };

        enc.backward(be, &fw, &inp, opts, dh, &mut grads)?;
        // The tied table: the lookup's gradient (just written) plus the decoder's.
        if let (Some(g), Some(d)) = (grads[0].as_mut(), ddecoder_w.as_ref()) {
            be.accumulate(g, d)?;
        }
        Ok(PretrainingOutput {
            loss: mlm_loss + nsp_loss,
            mlm_loss,
            nsp_loss,
            masked_rows,
            mlm_logits,
            nsp_logits,
            grads: Gradients {
                names: self.parameter_names(),
                tensors: collect_grads(grads, &self.params)?,
                no_grad: Vec::new(),
            },
        })
    }
}
