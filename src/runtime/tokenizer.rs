//! Text to token ids with a model folder's `tokenizer.json` (the `tokenizers` crate, built
//! without C code), batched the way sentence-transformers batches: each batch padded to its
//! longest sentence (whatever padding the file asks for is ignored), every sentence truncated
//! at `max_len` tokens (special tokens included).

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::{TruncationDirection, TruncationParams, TruncationStrategy};

/// A batch of tokenized sentences, padded to the longest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    /// `[batch·len]`, row-major; padding positions hold the pad id.
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// Tokens of each sentence (the rest of its row is padding).
    pub lens: Vec<usize>,
    /// Padded length.
    pub len: usize,
    /// Indices (in this batch) of the sentences cut at `max_len`.
    pub truncated: Vec<usize>,
}

impl TokenBatch {
    pub fn batch(&self) -> usize {
        self.lens.len()
    }
}

/// A `tokenizer.json` tokenizer with sentence-transformers' batching rules.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    max_len: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `path` (a `tokenizer.json`), truncating at `max_len` tokens (≥ 2).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Tokenizer> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
        let pad_id = inner.get_padding().map_or(0, |p| p.pad_id);
        inner.with_padding(None);
        if max_len < 2 {
            return Err(Error::invalid("max_len", format!("{max_len} < 2 tokens")));
        }
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Tokenizer {
            inner,
            pad_id,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Tokenizes `texts` (with the model's special tokens) and pads them to the longest.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(Error::invalid("texts", "no sentences to tokenize"));
        }
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let len = encodings.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut batch = TokenBatch {
            ids: vec![self.pad_id; texts.len() * len],
            type_ids: vec![0; texts.len() * len],
            lens: Vec::with_capacity(texts.len()),
            len,
            truncated: Vec::new(),
        };
        for (i, e) in encodings.iter().enumerate() {
            let n = e.len();
            batch.ids[i * len..i * len + n].copy_from_slice(e.get_ids());
            batch.type_ids[i * len..i * len + n].copy_from_slice(e.get_type_ids());
            batch.lens.push(n);
            if !e.get_overflowing().is_empty() {
                batch.truncated.push(i);
            }
        }
        Ok(batch)
    }
}
