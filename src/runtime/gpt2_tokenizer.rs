//! GPT-2's byte-level BPE, from whichever source a model folder offers, in this order:
//! `tokenizer.json` (the `tokenizers` crate), `vocab.json` + `merges.txt` (the same crate's BPE
//! model with GPT-2's byte-level pre-tokenizer), or, when the folder has neither, the BPE that
//! `tiktoken-rs` embeds (`r50k_base`, GPT-2's own), accepted only for a vocabulary of 50257.
//!
//! Prompts are encoded as Hugging Face encodes them: GPT-2 adds no special tokens, and
//! `<|endoftext|>` written in a prompt is the end-of-text token (id 50256), from every source.
//! Every file is read with a size bound (`super::folder`). Decoding works on bytes: a token is a byte
//! string, and the bytes of a continuation may end inside a UTF-8 character until the next
//! token completes it.

use super::folder::{check_file, read_bounded, TOKENIZER_LIMIT};
use super::tokenizer::{check_post_processor, no_panic};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// GPT-2's end-of-text token, the one special token of its vocabulary.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// GPT-2's vocabulary size, the only one the embedded fallback serves.
pub const GPT2_VOCAB_SIZE: usize = 50257;

enum Source {
    Hf(Box<tokenizers::Tokenizer>),
    Tiktoken(&'static tiktoken_rs::CoreBPE),
}

/// A GPT-2 tokenizer (see the module docs for where it comes from).
pub struct Gpt2Tokenizer {
    source: Source,
    /// GPT-2's printable stand-ins for bytes (`Ġ` for a space), mapped back.
    unicode_to_byte: HashMap<char, u8>,
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Tokenizer")
            .field("source", &self.source_name())
            .finish_non_exhaustive()
    }
}

/// GPT-2's `bytes_to_unicode`: every byte gets a printable character, the printable Latin-1
/// bytes themselves and the rest 256, 257, … in byte order.
pub fn byte_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

impl Gpt2Tokenizer {
    /// The tokenizer of model folder `dir` whose model has `vocab_size` tokens.
    pub fn from_folder(dir: &Path, vocab_size: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let source = if json.exists() {
            let bytes = read_bounded(&json, TOKENIZER_LIMIT)?;
            check_post_processor(&bytes, &json)?;
            Source::Hf(Box::new(
                tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
                    Error::Tokenizer(format!("cannot load {}: {e}", json.display()))
                })?,
            ))
        } else if vocab.exists() || merges.exists() {
            Source::Hf(Box::new(Self::from_vocab_merges(&vocab, &merges)?))
        } else if vocab_size == GPT2_VOCAB_SIZE {
            Source::Tiktoken(tiktoken_rs::r50k_base_singleton())
        } else {
            return Err(Error::Tokenizer(format!(
                "{} has no tokenizer.json nor vocab.json + merges.txt, and its vocabulary of \
                 {vocab_size} tokens is not GPT-2's {GPT2_VOCAB_SIZE}, so GPT-2's embedded BPE \
                 cannot stand in",
                dir.display()
            )));
        };
        let unicode_to_byte = byte_to_unicode()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Ok(Gpt2Tokenizer {
            source,
            unicode_to_byte,
        })
    }

    fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<tokenizers::Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::{decoders::byte_level::ByteLevel, Tokenizer};
        check_file(vocab, TOKENIZER_LIMIT)?;
        check_file(merges, TOKENIZER_LIMIT)?;
        let (v, m) = (vocab.display().to_string(), merges.display().to_string());
        let bpe = BPE::from_file(&v, &m)
            .build()
            .map_err(|e| Error::Tokenizer(format!("cannot load {v} + {m}: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        tok.with_pre_tokenizer(Some(byte_level));
        tok.with_decoder(Some(byte_level));
        // Hugging Face's GPT-2 tokenizer treats its end-of-text token as special: written in
        // a prompt, `<|endoftext|>` is that one token, not its characters.
        if tok.token_to_id(END_OF_TEXT).is_some() {
            tok.add_special_tokens([tokenizers::AddedToken::from(END_OF_TEXT, true)])
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        Ok(tok)
    }

    /// Where the vocabulary came from: `tokenizer.json`, `vocab.json + merges.txt` or
    /// `tiktoken-rs r50k_base`.
    pub fn source_name(&self) -> &'static str {
        match &self.source {
            Source::Hf(_) => "tokenizers",
            Source::Tiktoken(_) => "tiktoken-rs r50k_base",
        }
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.source {
            Source::Hf(t) => Ok(no_panic(|| t.encode(text, false))?
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .get_ids()
                .to_vec()),
            Source::Tiktoken(bpe) => Ok(bpe.encode_with_special_tokens(text)),
        }
    }

    /// The bytes token `id` stands for.
    pub fn token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        let unknown = || Error::Tokenizer(format!("token id {id} is not in the vocabulary"));
        match &self.source {
            Source::Hf(t) => {
                let s = t.id_to_token(id).ok_or_else(unknown)?;
                // Byte-level pieces map back char by char; an added token that is not
                // byte-level text (none in GPT-2's files) keeps its UTF-8.
                let mapped: Option<Vec<u8>> = s
                    .chars()
                    .map(|c| self.unicode_to_byte.get(&c).copied())
                    .collect();
                Ok(mapped.unwrap_or_else(|| s.into_bytes()))
            }
            Source::Tiktoken(bpe) => bpe.decode_bytes(&[id]).map_err(|_| unknown()),
        }
    }

    /// The bytes of a token sequence.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend(self.token_bytes(id)?);
        }
        Ok(out)
    }

    /// The text of a token sequence (invalid UTF-8, e.g. half a character, becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}

/// Turns a stream of token bytes into text pieces, holding back the bytes of a character that
/// a later token completes (so a streamed emoji prints whole, not as replacement characters).
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes` and returns the text that is complete so far. Bytes that can never start
    /// valid UTF-8 come out as U+FFFD at once.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held (an unfinished character), lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}
