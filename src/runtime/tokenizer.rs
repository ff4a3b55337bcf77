//! Text to token ids with a model folder's `tokenizer.json` (the `tokenizers` crate, built
//! without C code), batched the way sentence-transformers batches: each batch padded to its
//! longest sentence (whatever padding the file asks for is ignored), every sentence truncated
//! at `max_len` tokens (special tokens included).

use super::folder::{read_bounded, TOKENIZER_LIMIT};
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
        let bytes = read_bounded(path, TOKENIZER_LIMIT)?;
        check_post_processor(&bytes, path)?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
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

    /// The part of `text` that truncation can keep tokens from, so a long text is not
    /// tokenized beyond it (a 20 MB line costs what its first `max_len` tokens cost).
    ///
    /// Prefixes of growing length are cut at whitespace, after which a word tokenizer
    /// (WordPiece, byte-level BPE, SentencePiece: pre-tokenizers that split at whitespace and
    /// normalizers that work per character) gives the prefix's tokens exactly as the first
    /// tokens of the whole text. Once a prefix has more than `max_len` tokens, the truncated
    /// prefix therefore equals the truncated text, and it is what gets encoded.
    fn kept_prefix<'t>(&self, text: &'t str) -> Result<&'t str> {
        let mut budget = (64 * self.max_len).max(4096);
        while budget < text.len() {
            let mut cut = budget;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            if let Some(space) = text[..cut].rfind(char::is_whitespace) {
                let prefix = &text[..space];
                let e = no_panic(|| self.inner.encode(prefix, true))?
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                if !e.get_overflowing().is_empty() {
                    return Ok(prefix);
                }
            }
            budget = budget.saturating_mul(4);
        }
        Ok(text)
    }

    /// Tokenizes `texts` (with the model's special tokens) and pads them to the longest.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(Error::invalid("texts", "no sentences to tokenize"));
        }
        let kept = texts
            .iter()
            .map(|t| self.kept_prefix(t))
            .collect::<Result<Vec<&str>>>()?;
        let encodings = no_panic(|| self.inner.encode_batch(kept, true))?
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

/// Runs a call into the `tokenizers` crate, turning a panic (which a malformed file can cause
/// deep inside it) into an error instead of the end of the process. A backstop only: the
/// known causes are checked at load time ([`check_post_processor`]).
pub(crate) fn no_panic<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
        Error::Tokenizer("the tokenizer failed on this input (a malformed tokenizer file?)".into())
    })
}

/// Checks what the `tokenizers` crate trusts in a `tokenizer.json` and panics on at encode
/// time: a template post-processor must name only special tokens it defines (with as many
/// ids as tokens), and its single-sequence template may only use sequence `A`.
pub(crate) fn check_post_processor(bytes: &[u8], path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Tokenizer(format!("{}: {reason}", path.display()));
    // Malformed JSON must be refused here: the tokenizers crate panics (an `expect` in its
    // decoder deserializer) on a syntax error inside the `decoder` value.
    let v = serde_json::from_slice::<serde_json::Value>(bytes)
        .map_err(|e| bad(format!("not valid JSON: {e}")))?;
    fn walk(p: &serde_json::Value, bad: &dyn Fn(String) -> Error) -> Result<()> {
        match p["type"].as_str() {
            Some("Sequence") => {
                for q in p["processors"].as_array().into_iter().flatten() {
                    walk(q, bad)?;
                }
                Ok(())
            }
            Some("TemplateProcessing") => {
                let specials = &p["special_tokens"];
                for (name, t) in specials.as_object().into_iter().flatten() {
                    let n = |k: &str| t[k].as_array().map(Vec::len);
                    if n("ids").is_none() || n("ids") != n("tokens") {
                        return Err(bad(format!(
                            "post-processor special token `{name}` needs as many ids as tokens"
                        )));
                    }
                }
                for (template, only_a) in [("single", true), ("pair", false)] {
                    for piece in p[template].as_array().into_iter().flatten() {
                        if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                            if specials.get(id).is_none() {
                                return Err(bad(format!(
                                    "post-processor template `{template}` uses special token \
                                     `{id}`, which it does not define"
                                )));
                            }
                        }
                        if only_a && piece["Sequence"]["id"].as_str().is_some_and(|s| s != "A") {
                            return Err(bad(format!(
                                "post-processor template `{template}` uses a second sequence"
                            )));
                        }
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    walk(&v["post_processor"], &bad)
}
