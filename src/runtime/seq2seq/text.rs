//! A text corpus as byte-level language-modelling data for [`super::gpt3::Gpt3`]: the file's
//! UTF-8 bytes are the tokens ([`super::hf_export::encode_bytes`]), the last tenth is held
//! out for validation, and a batch is `batch` windows of `len + 1` bytes at random offsets:
//! the first `len` are the input, the last `len` the next-token labels.

use super::hf_export::encode_bytes;
use crate::error::{Error, Result};
use rand::rngs::SmallRng;
use rand::Rng;
use std::path::Path;

/// The largest corpus read (the committed one is about 200 KB).
pub const CORPUS_LIMIT: u64 = 64 << 20;

/// Training and validation token streams.
pub struct TextCorpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// One language-modelling batch: ids and labels `[batch·len]`, batch-major.
pub struct TextBatch {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub batch: usize,
    pub len: usize,
}

impl TextCorpus {
    /// Reads a UTF-8 text file (at most [`CORPUS_LIMIT`] bytes).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::runtime::folder::read_bounded(path, CORPUS_LIMIT)?;
        let text = String::from_utf8(bytes).map_err(|e| Error::Data {
            file: path.display().to_string(),
            line: None,
            reason: format!("not UTF-8: {e}"),
        })?;
        Ok(Self::from_text(&text))
    }

    /// The corpus of `text`: the first nine tenths train, the rest validates.
    pub fn from_text(text: &str) -> Self {
        let ids = encode_bytes(text);
        let split = ids.len() - ids.len() / 10;
        TextCorpus {
            train: ids[..split].to_vec(),
            val: ids[split..].to_vec(),
        }
    }

    /// `batch` random windows of `len + 1` tokens of the training (`val: false`) or
    /// validation stream.
    pub fn batch(
        &self,
        rng: &mut SmallRng,
        val: bool,
        batch: usize,
        len: usize,
    ) -> Result<TextBatch> {
        let stream = if val { &self.val } else { &self.train };
        if batch == 0 || len == 0 || stream.len() < len + 1 {
            return Err(Error::invalid(
                "len",
                format!(
                    "{batch} windows of {} tokens from a stream of {}",
                    len + 1,
                    stream.len()
                ),
            ));
        }
        let mut ids = Vec::with_capacity(batch * len);
        let mut labels = Vec::with_capacity(batch * len);
        for _ in 0..batch {
            let start = rng.gen_range(0..=stream.len() - (len + 1));
            let w = &stream[start..start + len + 1];
            ids.extend_from_slice(&w[..len]);
            labels.extend(w[1..].iter().map(|&t| t as i64));
        }
        Ok(TextBatch {
            ids,
            labels,
            batch,
            len,
        })
    }
}
