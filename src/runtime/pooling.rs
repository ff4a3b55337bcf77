//! Sentence-transformers' pooling of token vectors into one sentence vector, read from a
//! model folder (`modules.json`, `1_Pooling/config.json`), and its Normalize step.
//!
//! Pooling runs on the host over the hidden states the backend returns: it is a few
//! additions per element, and only the valid (non-padding) tokens of each sentence count.

use super::checkpoint::read_json;
use super::folder::inside;
use crate::error::{Error, Result};
use std::path::Path;

/// How token vectors become a sentence vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's vector ([CLS]).
    Cls,
    /// The mean of the sentence's token vectors.
    Mean,
    /// The elementwise maximum over the sentence's tokens.
    Max,
    /// The sum divided by √(token count).
    MeanSqrtLen,
}

/// The pooling and normalization a sentence-transformers folder asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolingMode,
    /// L2-normalize the pooled vector (modules.json lists `Normalize`).
    pub normalize: bool,
}

impl Pooling {
    /// Reads `modules.json` and the pooling module's `config.json`. A folder without
    /// `modules.json` (a plain Hugging Face model) gets mean pooling without normalization,
    /// sentence-transformers' default for such a model.
    pub fn from_folder(dir: &Path) -> Result<Pooling> {
        let modules_path = dir.join("modules.json");
        if !modules_path.exists() {
            return Ok(Pooling {
                mode: PoolingMode::Mean,
                normalize: false,
            });
        }
        let modules = read_json(&modules_path)?;
        let list = modules.as_array().ok_or_else(|| Error::Config {
            file: modules_path.display().to_string(),
            reason: "expected a list of modules".into(),
        })?;
        let kind = |m: &serde_json::Value| m["type"].as_str().unwrap_or("").to_string();
        let normalize = list.iter().any(|m| kind(m).ends_with(".Normalize"));
        // Every module path must stay inside the folder, used or not.
        for m in list {
            if let Some(p) = m["path"].as_str() {
                inside(dir, p, &modules_path)?;
            }
        }
        let pooling_dir = match list
            .iter()
            .find(|m| kind(m).ends_with(".Pooling"))
            .and_then(|m| m["path"].as_str())
        {
            Some(p) => Some(inside(dir, p, &modules_path)?),
            None => None,
        };
        let mode = match pooling_dir {
            None => PoolingMode::Mean,
            Some(p) => Self::read_mode(&p.join("config.json"))?,
        };
        Ok(Pooling { mode, normalize })
    }

    fn read_mode(path: &Path) -> Result<PoolingMode> {
        let v = read_json(path)?;
        let on = |k: &str| v[k].as_bool().unwrap_or(false);
        let modes: Vec<PoolingMode> = [
            ("pooling_mode_cls_token", PoolingMode::Cls),
            ("pooling_mode_mean_tokens", PoolingMode::Mean),
            ("pooling_mode_max_tokens", PoolingMode::Max),
            (
                "pooling_mode_mean_sqrt_len_tokens",
                PoolingMode::MeanSqrtLen,
            ),
        ]
        .into_iter()
        .filter(|(k, _)| on(k))
        .map(|(_, m)| m)
        .collect();
        match modes[..] {
            [m] => Ok(m),
            _ => Err(Error::Config {
                file: path.display().to_string(),
                reason: format!(
                    "exactly one pooling mode must be on (cls, mean, max, mean_sqrt_len); \
                     found {modes:?}"
                ),
            }),
        }
    }

    /// Pools `hidden` (`[batch·len, width]`, row-major) into `batch` vectors using the
    /// first `lens[b]` tokens of sequence b.
    pub fn apply(&self, hidden: &[f32], lens: &[usize], len: usize, width: usize) -> Vec<Vec<f32>> {
        self.pool(hidden, lens, |b| b * len, width)
    }

    /// [`Pooling::apply`] over packed hidden states: `[Σ lens, width]`, sequence b's tokens
    /// in the rows after those of sequences 0..b, no padding rows.
    pub fn apply_packed(&self, hidden: &[f32], lens: &[usize], width: usize) -> Vec<Vec<f32>> {
        let starts: Vec<usize> = lens
            .iter()
            .scan(0, |at, &n| {
                let s = *at;
                *at += n;
                Some(s)
            })
            .collect();
        self.pool(hidden, lens, |b| starts[b], width)
    }

    /// Pools sequence b from the `lens[b]` rows starting at row `start(b)`.
    fn pool(
        &self,
        hidden: &[f32],
        lens: &[usize],
        start: impl Fn(usize) -> usize,
        width: usize,
    ) -> Vec<Vec<f32>> {
        lens.iter()
            .enumerate()
            .map(|(b, &n)| {
                let row0 = start(b);
                let tok = |t: usize| &hidden[(row0 + t) * width..(row0 + t + 1) * width];
                let mut v = match self.mode {
                    PoolingMode::Cls => tok(0).to_vec(),
                    PoolingMode::Max => (0..width)
                        .map(|c| (0..n).map(|t| tok(t)[c]).fold(f32::NEG_INFINITY, f32::max))
                        .collect(),
                    PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
                        let mut sum = vec![0f64; width];
                        for t in 0..n {
                            for (s, &x) in sum.iter_mut().zip(tok(t)) {
                                *s += x as f64;
                            }
                        }
                        let div = if self.mode == PoolingMode::Mean {
                            n.max(1) as f64
                        } else {
                            (n.max(1) as f64).sqrt()
                        };
                        sum.iter().map(|s| (s / div) as f32).collect()
                    }
                };
                if self.normalize {
                    l2_normalize(&mut v);
                }
                v
            })
            .collect()
    }
}

/// Scales `v` to unit L2 norm (a zero vector stays zero, as torch's `normalize` with its eps).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let norm = norm.max(1e-12);
    for x in v.iter_mut() {
        *x = (*x as f64 / norm) as f32;
    }
}

/// Cosine similarity of two vectors, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}
