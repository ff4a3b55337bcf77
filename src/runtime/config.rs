//! Typed, range-checked fields of a Hugging Face `config.json`. A field of the wrong JSON type
//! is an error (never the default silently), and a number outside its range is an error
//! naming the field, the value and the range: a config is checked before anything
//! proportional to it is allocated. The checkpoint then cross-checks the sizes against its
//! tensors (the models' `from_checkpoint`), so a config cannot ask for more than the file holds.

use crate::error::{Error, Result};
use serde_json::Value;
use std::ops::RangeInclusive;

/// Sizes no model of this runtime comes near; a config beyond them is corrupt.
pub const MAX_WIDTH: usize = 1 << 20;
/// Layers of the deepest model accepted.
pub const MAX_LAYERS: usize = 1 << 12;
/// Vocabulary and position counts: token ids and positions are u32 on the device.
pub const MAX_COUNT: usize = 1 << 31;

/// The fields of one JSON object, read with their types and ranges checked.
pub struct Fields<'a> {
    v: &'a serde_json::Map<String, Value>,
    file: &'a str,
}

impl<'a> Fields<'a> {
    /// `v` must be a JSON object; `file` names it in errors.
    pub fn new(v: &'a Value, file: &'a str) -> Result<Self> {
        let v = v.as_object().ok_or_else(|| Error::Config {
            file: file.to_string(),
            reason: "expected a JSON object".into(),
        })?;
        Ok(Fields { v, file })
    }

    pub fn err(&self, reason: impl Into<String>) -> Error {
        Error::Config {
            file: self.file.to_string(),
            reason: reason.into(),
        }
    }

    /// The field, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    /// A required integer in `range`.
    pub fn int(&self, key: &str, range: RangeInclusive<usize>) -> Result<usize> {
        match self.get(key) {
            None => Err(self.err(format!("missing `{key}`"))),
            Some(x) => self.int_value(key, x, range),
        }
    }

    /// An optional integer in `range` (`default` when absent or null).
    pub fn int_or(&self, key: &str, default: usize, range: RangeInclusive<usize>) -> Result<usize> {
        match self.get(key) {
            // A default can fall outside a range that depends on other fields (GPT-2's EOS
            // 50256 with a small `vocab_size`): refused like a stored value would be.
            None if range.contains(&default) => Ok(default),
            None => Err(self.err(format!(
                "`{key}` is absent and its default {default} is outside {}..={}",
                range.start(),
                range.end()
            ))),
            Some(x) => self.int_value(key, x, range),
        }
    }

    fn int_value(&self, key: &str, x: &Value, range: RangeInclusive<usize>) -> Result<usize> {
        let n = x
            .as_u64()
            .ok_or_else(|| self.err(format!("`{key}` is {x}, not a non-negative integer")))?;
        match usize::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.err(format!(
                "`{key}` is {n}, outside {}..={}",
                range.start(),
                range.end()
            ))),
        }
    }

    /// An optional positive, finite number below 1 that is still positive and finite in f32
    /// (LayerNorm's epsilon).
    pub fn epsilon_or(&self, key: &str, default: f32) -> Result<f32> {
        let Some(x) = self.get(key) else {
            return Ok(default);
        };
        let f = x
            .as_f64()
            .ok_or_else(|| self.err(format!("`{key}` is {x}, not a number")))?;
        let f32v = f as f32;
        if !(f32v.is_finite() && f32v > 0.0 && f < 1.0) {
            return Err(self.err(format!(
                "`{key}` is {f}; LayerNorm's epsilon must be in (0, 1) and representable in f32"
            )));
        }
        Ok(f32v)
    }

    /// An optional string (`default` when absent or null).
    pub fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_str()
                .ok_or_else(|| self.err(format!("`{key}` is {x}, not a string"))),
        }
    }

    /// An optional boolean.
    pub fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` is {x}, not true or false"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_types_and_ranges_are_errors_naming_the_field() {
        let v = json!({"n": 1e18, "big": 1_000_000_000_000u64, "s": "x", "neg": -1, "eps": -1.0,
                       "tiny": 1e-60, "act": 5, "b": "yes", "null": null, "ok": 3});
        let f = Fields::new(&v, "config.json").unwrap();
        for (key, want) in [
            ("n", "not a non-negative integer"),
            ("big", "outside"),
            ("s", "not a non-negative integer"),
            ("neg", "not a non-negative integer"),
            ("missing", "missing"),
            ("null", "missing"),
        ] {
            let e = f.int(key, 1..=MAX_WIDTH).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(want), "{key}: {e}");
        }
        assert_eq!(f.int("ok", 1..=MAX_WIDTH).unwrap(), 3);
        assert_eq!(f.int_or("null", 7, 1..=8).unwrap(), 7);
        assert!(f.int_or("absent_key", 50256, 0..=319).is_err());
        assert!(f.epsilon_or("eps", 1e-5).is_err());
        assert!(
            f.epsilon_or("tiny", 1e-5).is_err(),
            "underflows to 0 in f32"
        );
        assert_eq!(f.epsilon_or("absent", 1e-5).unwrap(), 1e-5);
        assert!(f.str_or("act", "gelu").is_err());
        assert_eq!(f.str_or("absent", "gelu").unwrap(), "gelu");
        assert!(f.bool_opt("b").is_err());
        assert!(Fields::new(&json!([1]), "c").is_err());
    }
}
