//! BERT's pretraining heads (Hugging Face `BertForPreTraining` / `BertForMaskedLM`) on top of
//! [`Bert`]: the masked-LM head — a transform (dense, activation, LayerNorm) and a decoder tied
//! to the word embeddings plus a bias — and the next-sentence head (a 2-way linear layer on the
//! pooled `[CLS]` state); their cross-entropy losses, computed in f64 from the logits.

use super::backend::{Activation, Backend};
use super::bert::{Bert, BertConfig};
use super::checkpoint::{Checkpoint, HostParam};
use super::layers::{LayerNorm, Linear};
use super::tokenizer::TokenBatch;
use crate::data::mlm::IGNORE;
use crate::error::{Error, Result};
use std::path::Path;

/// BERT with its masked-LM head, and the next-sentence head when the checkpoint has one.
pub struct BertPretraining<B: Backend> {
    pub bert: Bert<B>,
    transform: Linear<B>,
    transform_norm: LayerNorm<B>,
    act: Activation,
    /// `[vocab, hidden]` (the word embeddings, or a saved decoder weight) + bias `[vocab]`.
    decoder: Linear<B>,
    nsp: Option<Linear<B>>,
}

impl<B: Backend> BertPretraining<B> {
    /// Loads `dir/config.json` and `dir/model.safetensors` of a `BertForPreTraining` or
    /// `BertForMaskedLM`.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config = BertConfig::from_folder(dir)?;
        let mut ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        let model = Self::from_checkpoint(be, config, &mut ckpt)?;
        ckpt.finish()?;
        Ok(model)
    }

    pub fn from_checkpoint(be: &B, config: BertConfig, ckpt: &mut Checkpoint) -> Result<Self> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let eps = config.layer_norm_eps;
        let act = config.hidden_act;
        // The heads live outside the `bert.` prefix: take them before the encoder picks it.
        let p = "cls.predictions";
        if !ckpt.contains(&format!("{p}.transform.dense.weight")) {
            return Err(Error::invalid(
                "checkpoint",
                "no masked-LM head (cls.predictions.*): not a BertForPreTraining / BertForMaskedLM",
            ));
        }
        let dense_w = ckpt.take(&format!("{p}.transform.dense.weight"), &[h, h])?;
        let dense_b = ckpt.take(&format!("{p}.transform.dense.bias"), &[h])?;
        let ln_w = ckpt.take(&format!("{p}.transform.LayerNorm.weight"), &[h])?;
        let ln_b = ckpt.take(&format!("{p}.transform.LayerNorm.bias"), &[h])?;
        let bias = if ckpt.contains(&format!("{p}.bias")) {
            ckpt.discard(&format!("{p}.decoder.bias"));
            ckpt.take(&format!("{p}.bias"), &[v])?
        } else {
            ckpt.take(&format!("{p}.decoder.bias"), &[v])?
        };
        let own_decoder = if ckpt.contains(&format!("{p}.decoder.weight")) {
            Some(ckpt.take(&format!("{p}.decoder.weight"), &[v, h])?)
        } else {
            None
        };
        let nsp = if ckpt.contains("cls.seq_relationship.weight") {
            let w = ckpt.take("cls.seq_relationship.weight", &[2, h])?;
            let b = ckpt.take("cls.seq_relationship.bias", &[2])?;
            Some(Linear::new(be, &w, Some(&b))?)
        } else {
            None
        };
        let bert = Bert::from_checkpoint(be, config, ckpt)?;
        if nsp.is_some() && !bert.has_pooler() {
            return Err(Error::invalid(
                "checkpoint",
                "a next-sentence head without a pooler",
            ));
        }
        let word: HostParam = match own_decoder {
            Some(w) => w,
            None => ckpt.take("embeddings.word_embeddings.weight", &[v, h])?,
        };
        Ok(BertPretraining {
            bert,
            transform: Linear::new(be, &dense_w, Some(&dense_b))?,
            transform_norm: LayerNorm::new(be, &ln_w, &ln_b, eps)?,
            act,
            decoder: Linear::new(be, &word, Some(&bias))?,
            nsp,
        })
    }

    pub fn has_nsp_head(&self) -> bool {
        self.nsp.is_some()
    }

    /// Masked-LM logits `[rows.len(), vocab]` at hidden-state rows `rows` (b·len + t).
    pub fn mlm_logits(&self, be: &B, hidden: &B::Tensor, rows: &[u32]) -> Result<B::Tensor> {
        let x = be.gather_rows(hidden, rows)?;
        let x = self.transform.forward(be, &x, self.act)?;
        let x = self.transform_norm.forward(be, &x, None)?;
        self.decoder.forward(be, &x, Activation::None)
    }

    /// Next-sentence logits `[batch, 2]` (0: B follows A, 1: B is random), from the pooled
    /// output of a forward pass.
    pub fn nsp_logits(&self, be: &B, pooled: &B::Tensor) -> Result<B::Tensor> {
        match &self.nsp {
            Some(l) => l.forward(be, pooled, Activation::None),
            None => Err(Error::invalid(
                "nsp",
                "this checkpoint has no next-sentence head",
            )),
        }
    }

    /// The pretraining losses of a batch: mean masked-LM cross-entropy over positions whose
    /// label is not [`IGNORE`] (`mlm_labels` `[batch·len]`), and, with `nsp_labels` `[batch]`,
    /// the mean next-sentence cross-entropy. Returns (mlm, nsp, mlm + nsp).
    pub fn losses(
        &self,
        be: &B,
        batch: &TokenBatch,
        mlm_labels: &[i64],
        nsp_labels: Option<&[i64]>,
    ) -> Result<(f64, Option<f64>, f64)> {
        let vocab = self.bert.config.vocab_size as i64;
        if mlm_labels.len() != batch.ids.len() {
            return Err(Error::shape(
                "mlm_labels",
                format!("[{}]", batch.ids.len()),
                &[mlm_labels.len()],
            ));
        }
        let targets: Vec<(u32, i64)> = mlm_labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != IGNORE)
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if let Some(&(_, bad)) = targets.iter().find(|(_, l)| !(0..vocab).contains(l)) {
            return Err(Error::invalid(
                "mlm_labels",
                format!("label {bad} is neither {IGNORE} nor a token id"),
            ));
        }
        let out = self.bert.forward(be, batch)?;
        let mlm = if targets.is_empty() {
            f64::NAN // as PyTorch: a mean over no targets
        } else {
            let rows: Vec<u32> = targets.iter().map(|t| t.0).collect();
            let logits = be.to_f32(&self.mlm_logits(be, &out.hidden, &rows)?)?;
            let labels: Vec<i64> = targets.iter().map(|t| t.1).collect();
            cross_entropy(&logits, vocab as usize, &labels)
        };
        let nsp = match nsp_labels {
            None => None,
            Some(labels) => {
                if labels.len() != batch.batch() || labels.iter().any(|l| !(0..2).contains(l)) {
                    return Err(Error::invalid(
                        "nsp_labels",
                        format!(
                            "{} labels for {} sequences, each 0 or 1",
                            labels.len(),
                            batch.batch()
                        ),
                    ));
                }
                let pooled = out
                    .pooled
                    .as_ref()
                    .ok_or_else(|| Error::invalid("nsp", "no pooler"))?;
                let logits = be.to_f32(&self.nsp_logits(be, pooled)?)?;
                Some(cross_entropy(&logits, 2, labels))
            }
        };
        Ok((mlm, nsp, mlm + nsp.unwrap_or(0.0)))
    }
}

/// Mean cross-entropy of rows of `logits` (`width` wide) against class labels, in f64.
pub fn cross_entropy(logits: &[f32], width: usize, labels: &[i64]) -> f64 {
    let total: f64 = logits
        .chunks_exact(width)
        .zip(labels)
        .map(|(row, &l)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            lse - row[l as usize] as f64
        })
        .sum();
    total / labels.len() as f64
}

/// One proposal of [`fill_mask`] (Hugging Face's fill-mask pipeline fields).
#[derive(Clone, Debug, PartialEq)]
pub struct FillMaskProposal {
    /// Softmax probability of the token at the mask.
    pub score: f64,
    pub token: u32,
    /// The token decoded alone.
    pub token_str: String,
    /// The text with the mask replaced: special tokens left out when there is one mask, kept
    /// (so the other masks show) when there are several.
    pub sequence: String,
}

/// Hugging Face's fill-mask pipeline: the `top_k` most likely tokens at every `[MASK]` of
/// `text` (one list per mask, in text order).
pub fn fill_mask<B: Backend>(
    be: &B,
    model: &BertPretraining<B>,
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    top_k: usize,
) -> Result<Vec<Vec<FillMaskProposal>>> {
    let tok_err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mask_id = tokenizer
        .token_to_id("[MASK]")
        .ok_or_else(|| Error::Tokenizer("the tokenizer has no [MASK] token".into()))?;
    let pad_id = tokenizer.token_to_id("[PAD]");
    let enc = tokenizer.encode(text, true).map_err(tok_err)?;
    let ids = enc.get_ids().to_vec();
    let masks: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
    if masks.is_empty() {
        return Err(Error::invalid("text", "no [MASK] token in the text"));
    }
    let len = ids.len();
    if len > model.bert.config.max_position_embeddings {
        return Err(Error::invalid(
            "text",
            format!(
                "{len} tokens exceed the model's {} positions",
                model.bert.config.max_position_embeddings
            ),
        ));
    }
    let batch = TokenBatch {
        ids: ids.clone(),
        type_ids: vec![0; len],
        lens: vec![len],
        len,
        truncated: vec![0],
    };
    let out = model.bert.forward(be, &batch)?;
    let rows: Vec<u32> = masks.iter().map(|&i| i as u32).collect();
    let logits = be.to_f32(&model.mlm_logits(be, &out.hidden, &rows)?)?;
    let vocab = model.bert.config.vocab_size;
    let single = masks.len() == 1;
    let mut result = Vec::with_capacity(masks.len());
    for (m, row) in masks.iter().zip(logits.chunks_exact(vocab)) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let probs: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut proposals = Vec::new();
        for &p in order.iter().take(top_k) {
            let mut filled = ids.clone();
            filled[*m] = p as u32;
            filled.retain(|&t| Some(t) != pad_id);
            proposals.push(FillMaskProposal {
                score: probs[p] / total,
                token: p as u32,
                token_str: tokenizer.decode(&[p as u32], false).map_err(tok_err)?,
                sequence: tokenizer.decode(&filled, single).map_err(tok_err)?,
            });
        }
        result.push(proposals);
    }
    Ok(result)
}
