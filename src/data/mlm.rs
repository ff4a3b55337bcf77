//! BERT's masked-language-model corruption (Devlin et al. 2018, §3.1): a share of the
//! positions (15%) is chosen as prediction targets; of those, 80% become `[MASK]`, 10% a random
//! token and 10% stay as they are. Special tokens (`[CLS]`, `[SEP]`, padding) are never chosen.
//! Seeded: the same seed gives the same corruption.

use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Label of a position that is not a target (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlmOptions {
    /// Share of the eligible positions chosen as targets.
    pub mask_prob: f64,
    /// Of the targets: share replaced by `[MASK]`, and share replaced by a random token (the
    /// rest keep their token).
    pub mask_share: f64,
    pub random_share: f64,
    pub mask_token_id: u32,
    /// Random replacements are drawn from 0 .. vocab_size.
    pub vocab_size: usize,
    pub seed: u64,
}

impl MlmOptions {
    /// BERT's 15% with 80/10/10.
    pub fn bert(mask_token_id: u32, vocab_size: usize, seed: u64) -> Self {
        MlmOptions {
            mask_prob: 0.15,
            mask_share: 0.8,
            random_share: 0.1,
            mask_token_id,
            vocab_size,
            seed,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if !unit(self.mask_prob)
            || !unit(self.mask_share)
            || !unit(self.random_share)
            || self.mask_share + self.random_share > 1.0
        {
            return Err(Error::invalid(
                "mlm",
                format!(
                    "mask_prob {} and shares {} + {} must lie in [0, 1] (shares summing to ≤ 1)",
                    self.mask_prob, self.mask_share, self.random_share
                ),
            ));
        }
        if self.vocab_size == 0 || self.mask_token_id as usize >= self.vocab_size {
            return Err(Error::invalid(
                "mlm",
                format!(
                    "mask token {} outside a vocabulary of {}",
                    self.mask_token_id, self.vocab_size
                ),
            ));
        }
        Ok(())
    }
}

/// A corrupted sequence: the model's input and the labels (the original token at targets,
/// [`IGNORE`] elsewhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlmExample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Corrupts `ids`; `special[i]` marks positions never chosen.
pub fn corrupt(ids: &[u32], special: &[bool], opts: &MlmOptions) -> Result<MlmExample> {
    opts.validate()?;
    if special.len() != ids.len() {
        return Err(Error::shape(
            "special",
            format!("[{}] (one per token)", ids.len()),
            &[special.len()],
        ));
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut input_ids = ids.to_vec();
    let mut labels = vec![IGNORE; ids.len()];
    for i in 0..ids.len() {
        // Draw for every position so that a position's fate does not depend on the others.
        let (chosen, how, random) = (
            rng.gen::<f64>(),
            rng.gen::<f64>(),
            rng.gen_range(0..opts.vocab_size as u32),
        );
        if special[i] || chosen >= opts.mask_prob {
            continue;
        }
        labels[i] = ids[i] as i64;
        if how < opts.mask_share {
            input_ids[i] = opts.mask_token_id;
        } else if how < opts.mask_share + opts.random_share {
            input_ids[i] = random;
        }
    }
    Ok(MlmExample { input_ids, labels })
}
