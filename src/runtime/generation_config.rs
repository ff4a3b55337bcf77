//! A model folder's `generation_config.json` (Hugging Face's `GenerationConfig`): the defaults
//! of a generation call, which explicit options (command-line flags) override.

use super::checkpoint::read_json;
use super::generate::{EarlyStopping, GenerateOptions};
use crate::error::{Error, Result};
use std::path::Path;

/// The fields the decoding loop understands; `None`: not set in the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub decoder_start_token_id: Option<u32>,
    pub forced_bos_token_id: Option<u32>,
    pub forced_eos_token_id: Option<u32>,
    /// Decoder prompt plus new tokens.
    pub max_length: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub min_new_tokens: Option<usize>,
    /// Decoder prompt plus new tokens before end-of-text is allowed.
    pub min_length: Option<usize>,
    pub num_beams: Option<usize>,
    pub num_return_sequences: Option<usize>,
    pub length_penalty: Option<f32>,
    pub early_stopping: Option<EarlyStopping>,
    pub no_repeat_ngram_size: Option<usize>,
}

impl GenerationConfig {
    /// `dir/generation_config.json`, or all `None` when the folder has none.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        Self::from_json(&read_json(&path)?, &path.display().to_string())
    }

    pub fn from_json(v: &serde_json::Value, file: &str) -> Result<Self> {
        let err = |key: &str, what: &str| Error::Config {
            file: file.to_string(),
            reason: format!("`{key}` is not {what}"),
        };
        let uint = |key: &str| -> Result<Option<u64>> {
            match &v[key] {
                serde_json::Value::Null => Ok(None),
                x => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| err(key, "a non-negative integer")),
            }
        };
        let id = |key: &str| -> Result<Option<u32>> {
            uint(key)?
                .map(|x| u32::try_from(x).map_err(|_| err(key, "a token id")))
                .transpose()
        };
        let size = |key: &str| -> Result<Option<usize>> { Ok(uint(key)?.map(|x| x as usize)) };
        let early_stopping = match &v["early_stopping"] {
            serde_json::Value::Null => None,
            serde_json::Value::Bool(true) => Some(EarlyStopping::Yes),
            serde_json::Value::Bool(false) => Some(EarlyStopping::Heuristic),
            serde_json::Value::String(s) if s == "never" => Some(EarlyStopping::Never),
            _ => return Err(err("early_stopping", "true, false or \"never\"")),
        };
        let length_penalty = match &v["length_penalty"] {
            serde_json::Value::Null => None,
            x => Some(
                x.as_f64()
                    .ok_or_else(|| err("length_penalty", "a number"))? as f32,
            ),
        };
        Ok(GenerationConfig {
            decoder_start_token_id: id("decoder_start_token_id")?,
            forced_bos_token_id: id("forced_bos_token_id")?,
            forced_eos_token_id: id("forced_eos_token_id")?,
            max_length: size("max_length")?,
            max_new_tokens: size("max_new_tokens")?,
            min_new_tokens: size("min_new_tokens")?,
            min_length: size("min_length")?,
            num_beams: size("num_beams")?,
            num_return_sequences: size("num_return_sequences")?,
            length_penalty,
            early_stopping,
            no_repeat_ngram_size: size("no_repeat_ngram_size")?,
        })
    }

    /// Options with this file's values where it sets them (over `base`); `max_length` and
    /// `min_length` become `max_new_tokens` and `min_new_tokens` for a decoder prompt of
    /// `prompt_len` tokens unless those are set.
    pub fn apply(&self, base: GenerateOptions, prompt_len: usize) -> GenerateOptions {
        let mut o = base;
        if let Some(n) = self.max_new_tokens {
            o.max_new_tokens = n;
        } else if let Some(m) = self.max_length {
            o.max_new_tokens = m.saturating_sub(prompt_len);
        }
        o.min_new_tokens = match (self.min_new_tokens, self.min_length) {
            (Some(n), _) => n,
            (None, Some(m)) => m.saturating_sub(prompt_len),
            (None, None) => o.min_new_tokens,
        };
        o.num_beams = self.num_beams.unwrap_or(o.num_beams);
        o.num_return_sequences = self.num_return_sequences.unwrap_or(o.num_return_sequences);
        o.length_penalty = self.length_penalty.unwrap_or(o.length_penalty);
        o.early_stopping = self.early_stopping.unwrap_or(o.early_stopping);
        o.no_repeat_ngram_size = self.no_repeat_ngram_size.unwrap_or(o.no_repeat_ngram_size);
        o.forced_bos_token_id = self.forced_bos_token_id.or(o.forced_bos_token_id);
        o.forced_eos_token_id = self.forced_eos_token_id.or(o.forced_eos_token_id);
        o
    }
}
