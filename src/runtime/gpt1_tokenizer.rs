//! GPT-1's BPE, as Hugging Face's `OpenAIGPTTokenizer` runs it (transformers 5, on the
//! `tokenizers` library): BERT's normalizer with lower-casing (control characters removed,
//! whitespace unified, CJK characters spaced, accents stripped, lower case), BERT's
//! pre-tokenizer (split on whitespace and around punctuation), then BPE whose word-final
//! pieces end in `</w>`, unknown pieces `<unk>`; decoding joins pieces and turns each `</w>`
//! into a space.
//!
//! Older transformers releases (and OpenAI's code) normalised with `ftfy` and split words with
//! spaCy when those were installed; without them they fell back to BERT's basic tokenizer,
//! which is the pipeline above. So this matches Hugging Face's tokenizer without ftfy/spaCy,
//! not OpenAI's original preprocessing (which also rewrote some punctuation and whitespace).
//!
//! Sources, in this order: `tokenizer.json` (as `save_pretrained` writes it), or
//! `vocab.json` + `merges.txt` with the pipeline built here. Every file is read with a size
//! bound.

use super::folder::{check_file, read_bounded, TOKENIZER_LIMIT};
use super::tokenizer::{check_post_processor, no_panic};
use crate::error::{Error, Result};
use std::path::Path;

/// GPT-1's unknown-piece token.
pub const UNK: &str = "<unk>";
/// The suffix of a word's last piece.
pub const END_OF_WORD: &str = "</w>";

/// A GPT-1 tokenizer (see the module docs).
pub struct Gpt1Tokenizer {
    tok: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Gpt1Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt1Tokenizer").finish_non_exhaustive()
    }
}

impl Gpt1Tokenizer {
    /// The tokenizer of model folder `dir`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let tok = if json.exists() {
            let bytes = read_bounded(&json, TOKENIZER_LIMIT)?;
            check_post_processor(&bytes, &json)?;
            no_panic(|| tokenizers::Tokenizer::from_bytes(&bytes))?
                .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", json.display())))?
        } else if vocab.exists() || merges.exists() {
            Self::from_vocab_merges(&vocab, &merges)?
        } else {
            return Err(Error::Tokenizer(format!(
                "{} has no tokenizer.json nor vocab.json + merges.txt",
                dir.display()
            )));
        };
        Ok(Gpt1Tokenizer { tok })
    }

    /// Hugging Face's `OpenAIGPTTokenizer` pipeline over `vocab.json` + `merges.txt`.
    fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<tokenizers::Tokenizer> {
        use tokenizers::decoders::bpe::BPEDecoder;
        use tokenizers::models::bpe::BPE;
        use tokenizers::normalizers::bert::BertNormalizer;
        use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
        check_file(vocab, TOKENIZER_LIMIT)?;
        check_file(merges, TOKENIZER_LIMIT)?;
        let (v, m) = (vocab.display().to_string(), merges.display().to_string());
        let bpe = no_panic(|| {
            BPE::from_file(&v, &m)
                .unk_token(UNK.into())
                .end_of_word_suffix(END_OF_WORD.into())
                .continuing_subword_prefix(String::new())
                .build()
        })?
        .map_err(|e| Error::Tokenizer(format!("cannot load {v} + {m}: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        // clean_text, handle_chinese_chars, strip_accents (None: as lowercase), lowercase.
        tok.with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_pre_tokenizer(Some(BertPreTokenizer));
        tok.with_decoder(Some(BPEDecoder::new(END_OF_WORD.into())));
        Ok(tok)
    }

    /// Token ids of `text` (GPT-1 adds no special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(no_panic(|| self.tok.encode(text, false))?
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The text of a token sequence: pieces joined, each `</w>` a space (none after the last).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.tok.id_to_token(id).is_none()) {
            return Err(Error::Tokenizer(format!(
                "token id {bad} is not in the vocabulary"
            )));
        }
        no_panic(|| self.tok.decode(ids, false))?.map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of token `id` in running text (for streaming): its piece with `</w>` as a
    /// space, so a word-final piece ends with one (what [`Self::decode`] drops at the very end).
    pub fn token_text(&self, id: u32) -> Result<String> {
        let piece = self
            .tok
            .id_to_token(id)
            .ok_or_else(|| Error::Tokenizer(format!("token id {id} is not in the vocabulary")))?;
        Ok(piece.replace(END_OF_WORD, " "))
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}
