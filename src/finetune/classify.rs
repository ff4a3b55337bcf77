//! Inference with a `BertForSequenceClassification` folder on any [`Backend`]: the BERT
//! encoder and pooler of [`crate::runtime::bert`] (so the GPU path is the same one that embeds
//! sentences), then the classifier `logits = W·pooled + b` and a softmax on the host. Dropout
//! is off at inference, as in `model.eval()`.
//!
//! [`HeadConfig`] reads what a classification folder's `config.json` says about the head
//! (labels, dropout); `cuattn finetune` uses it too, to decide between a new head and one that
//! is trained further.

use super::data::LabelSet;
use crate::error::{Error, Result};
use crate::runtime::backend::{Activation, Backend};
use crate::runtime::bert::{Bert, BertConfig};
use crate::runtime::checkpoint::{read_json, Checkpoint};
use crate::runtime::layers::Linear;
use crate::runtime::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::Path;

/// What a config says about a classification head.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadConfig {
    /// The labels of `id2label` (Hugging Face's default of two, `LABEL_0` and `LABEL_1`, when
    /// the config has none).
    pub labels: LabelSet,
    /// Whether the config named its labels (a bare encoder's config does not).
    pub has_id2label: bool,
}

impl HeadConfig {
    /// Reads `id2label` from a parsed `config.json` (`file` names it in errors).
    pub fn from_json(file: &Path, v: &serde_json::Value) -> Result<HeadConfig> {
        let err = |reason: String| Error::Config {
            file: file.display().to_string(),
            reason,
        };
        let Some(map) = v.get("id2label").filter(|m| !m.is_null()) else {
            let n = v["num_labels"].as_u64().unwrap_or(2) as usize;
            return Ok(HeadConfig {
                labels: LabelSet::from_id2label(&BTreeMap::new(), n),
                has_id2label: false,
            });
        };
        let obj = map
            .as_object()
            .ok_or_else(|| err("`id2label` is not an object".into()))?;
        let mut id2label = BTreeMap::new();
        for (k, name) in obj {
            let id: usize = k
                .parse()
                .map_err(|_| err(format!("`id2label` key `{k}` is not an integer")))?;
            let name = name
                .as_str()
                .ok_or_else(|| err(format!("`id2label[{k}]` is not a string")))?;
            id2label.insert(id, name.to_string());
        }
        let n = id2label.len();
        if n == 0 || id2label.keys().copied().ne(0..n) {
            return Err(err(format!(
                "`id2label` must number its labels 0..{n} (keys: {:?})",
                id2label.keys().collect::<Vec<_>>()
            )));
        }
        Ok(HeadConfig {
            labels: LabelSet::from_id2label(&id2label, n),
            has_id2label: true,
        })
    }
}

/// The longest input the tokenizer keeps: `tokenizer_config.json`'s `model_max_length` when
/// it is a sane number, never beyond the model's positions.
pub fn tokenizer_max_len(dir: &Path, positions: usize) -> usize {
    let path = dir.join("tokenizer_config.json");
    let from_config = read_json(&path)
        .ok()
        .and_then(|v| v["model_max_length"].as_u64())
        .map(|m| m as usize);
    from_config.unwrap_or(positions).min(positions)
}

/// Checks that a model folder has the tokenizer `cuattn` reads.
pub fn require_tokenizer(dir: &Path) -> Result<()> {
    if dir.join("tokenizer.json").exists() {
        Ok(())
    } else {
        Err(Error::Tokenizer(format!(
            "{} has no tokenizer.json (a fast tokenizer file is required; save one with \
             `AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`)",
            dir.display()
        )))
    }
}

/// A loaded `BertForSequenceClassification` on backend `B`, for inference.
pub struct SequenceClassifier<B: Backend> {
    pub bert: Bert<B>,
    pub classifier: Linear<B>,
    pub tokenizer: Tokenizer,
    pub head: HeadConfig,
}

/// Class probabilities (and the logits they come from) per input, in input order.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    pub logits: Vec<Vec<f32>>,
    pub probabilities: Vec<Vec<f32>>,
}

impl Predictions {
    /// The most probable class of input `i` (the first on a tie).
    pub fn argmax(&self, i: usize) -> usize {
        let p = &self.probabilities[i];
        (0..p.len()).fold(0, |best, j| if p[j] > p[best] { j } else { best })
    }
}

/// Softmax of one row in f64 (exact enough that a probability of 1 − 1e-9 does not become 1
/// before it is rounded to f32).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

impl<B: Backend> SequenceClassifier<B> {
    /// Loads `dir`: config.json, model.safetensors (`bert.`-prefixed encoder, pooler,
    /// `classifier.weight/bias`), tokenizer.json. A folder without a classifier (a bare
    /// encoder) or without a pooler is an error that says so.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_json = read_json(&config_path)?;
        let config = BertConfig::from_folder(dir)?;
        let head = HeadConfig::from_json(&config_path, &config_json)?;
        require_tokenizer(dir)?;
        let st_path = dir.join("model.safetensors");
        let mut ckpt = Checkpoint::open(&st_path)?;
        if !ckpt.names().any(|n| n == "classifier.weight") {
            return Err(Error::Checkpoint {
                file: st_path.display().to_string(),
                reason: "no `classifier.weight`: not a sequence-classification model (fine-tune \
                         it first with `cuattn finetune`)"
                    .into(),
            });
        }
        // The head's names carry no prefix: take them before the encoder sets `bert.`.
        let (n, hidden) = (head.labels.len(), config.hidden_size);
        let w = ckpt.take("classifier.weight", &[n, hidden])?;
        let b = ckpt.take("classifier.bias", &[n])?;
        let bert = Bert::from_checkpoint(be, config, &mut ckpt)?;
        if !bert.has_pooler() {
            return Err(Error::Checkpoint {
                file: st_path.display().to_string(),
                reason: "no pooler (`bert.pooler.dense.*`); a BERT classifier reads the pooled \
                         [CLS] vector"
                    .into(),
            });
        }
        ckpt.finish()?;
        let classifier = Linear::new(be, &w, Some(&b))?;
        let max_len = tokenizer_max_len(dir, bert.config.max_position_embeddings);
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), max_len)?;
        Ok(SequenceClassifier {
            bert,
            classifier,
            tokenizer,
            head,
        })
    }

    /// Logits and probabilities of `texts`, in batches of `batch_size` (sorted by length so
    /// each batch pads little; the key-padding mask makes every result independent of its
    /// batch-mates).
    pub fn predict(&self, be: &B, texts: &[&str], batch_size: usize) -> Result<Predictions> {
        if texts.is_empty() {
            return Err(Error::invalid("texts", "no texts to classify"));
        }
        if batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be ≥ 1"));
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut logits = vec![Vec::new(); texts.len()];
        let n = self.head.labels.len();
        for chunk in order.chunks(batch_size) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let tokens = self.tokenizer.encode_batch(&batch_texts)?;
            let out = self.bert.forward(be, &tokens)?;
            let pooled = out
                .pooled
                .ok_or_else(|| Error::invalid("model", "the encoder returned no pooled output"))?;
            let z = be.to_f32(&self.classifier.forward(be, &pooled, Activation::None)?)?;
            for (row, &i) in chunk.iter().enumerate() {
                logits[i] = z[row * n..(row + 1) * n].to_vec();
            }
        }
        let probabilities = logits.iter().map(|z| softmax(z)).collect();
        Ok(Predictions {
            logits,
            probabilities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_is_stable_and_normalised() {
        let p = softmax(&[0.0, 2f32.ln()]);
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6);
        // Large logits must not overflow exp.
        assert_eq!(softmax(&[1000.0, 1000.0, 1000.0 - 1e4]), [0.5, 0.5, 0.0]);
    }

    #[test]
    fn head_config_reads_id2label_or_defaults_to_two() {
        let f = Path::new("config.json");
        let h = HeadConfig::from_json(f, &serde_json::json!({"id2label": {"1": "b", "0": "a"}}))
            .unwrap();
        assert_eq!(h.labels.names, ["a", "b"]);
        assert!(h.has_id2label);
        let h = HeadConfig::from_json(f, &serde_json::json!({})).unwrap();
        assert_eq!(h.labels.names, ["LABEL_0", "LABEL_1"]);
        assert!(!h.has_id2label);
        let e = HeadConfig::from_json(f, &serde_json::json!({"id2label": {"0": "a", "2": "c"}}))
            .unwrap_err();
        assert!(e.to_string().contains("0..2"), "{e}");
    }
}
