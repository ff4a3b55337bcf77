//! BART's noising transforms (Lewis et al. 2019, §2.2), which corrupt a document that the model
//! then learns to restore: token masking, token deletion, text infilling, sentence permutation
//! and document rotation. Every transform is seeded (the same seed gives the same output) and
//! works on any token type; `word_starts[i]` says whether token i begins a word, so that masking
//! and infilling take whole words and rotation starts at a word (give every token `true` for
//! token-level noise).
//!
//! - Masking: whole words are chosen at random until `ratio` of the tokens are covered; each
//!   of their tokens becomes `<mask>` (the length is kept).
//! - Deletion: each token is dropped with probability `ratio`; the survivors keep their order.
//! - Infilling: span lengths (in words) are drawn from Poisson(λ) until they cover `ratio` of
//!   the words; each span, a zero-length one included, is replaced by a single `<mask>` at a
//!   distinct random word position (spans are cut short where the next one starts, so they never
//!   overlap).
//! - Permutation: the sentences are shuffled (Fisher–Yates).
//! - Rotation: a word start is chosen uniformly and the document is rotated to begin there.

use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The five transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    Mask,
    Delete,
    Infill,
    Permute,
    Rotate,
}

impl std::str::FromStr for Transform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "mask" => Transform::Mask,
            "delete" => Transform::Delete,
            "infill" => Transform::Infill,
            "permute" => Transform::Permute,
            "rotate" => Transform::Rotate,
            _ => {
                return Err(Error::invalid(
                    "transform",
                    format!("`{s}` is not mask, delete, infill, permute or rotate"),
                ))
            }
        })
    }
}

/// Rates of the transforms (the paper's: 30% masked, λ = 3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseOptions {
    /// Share of tokens (words for infilling) masked, deleted or infilled, in [0, 1].
    pub ratio: f64,
    /// Mean span length of text infilling.
    pub poisson_lambda: f64,
    pub seed: u64,
}

impl Default for NoiseOptions {
    fn default() -> Self {
        NoiseOptions {
            ratio: 0.3,
            poisson_lambda: 3.0,
            seed: 0,
        }
    }
}

impl NoiseOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(Error::invalid(
                "ratio",
                format!("{} is outside [0, 1]", self.ratio),
            ));
        }
        if !(self.poisson_lambda.is_finite()
            && self.poisson_lambda >= 0.0
            && self.poisson_lambda <= 64.0)
        {
            return Err(Error::invalid(
                "poisson_lambda",
                format!("{} is outside [0, 64]", self.poisson_lambda),
            ));
        }
        Ok(())
    }

    fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.seed)
    }
}

/// The words of a token sequence: `[start, end)` token ranges. Token 0 always starts one.
pub fn words(word_starts: &[bool]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &s) in word_starts.iter().enumerate() {
        if s || i == 0 {
            if let Some(last) = out.last_mut() {
                last.1 = i;
            }
            out.push((i, word_starts.len()));
        }
    }
    out
}

fn check_lens<T>(tokens: &[T], word_starts: &[bool]) -> Result<()> {
    if tokens.len() != word_starts.len() {
        return Err(Error::shape(
            "word_starts",
            format!("[{}] (one per token)", tokens.len()),
            &[word_starts.len()],
        ));
    }
    Ok(())
}

/// Token masking (length kept): whole words until `ratio` of the tokens are masked.
pub fn mask_tokens<T: Clone>(
    tokens: &[T],
    word_starts: &[bool],
    mask: &T,
    opts: &NoiseOptions,
) -> Result<Vec<T>> {
    opts.validate()?;
    check_lens(tokens, word_starts)?;
    let mut rng = opts.rng();
    let mut ws = words(word_starts);
    ws.shuffle(&mut rng);
    let target = (opts.ratio * tokens.len() as f64).round() as usize;
    let mut out = tokens.to_vec();
    let mut masked = 0;
    for (s, e) in ws {
        if masked >= target {
            break;
        }
        out[s..e].iter_mut().for_each(|t| *t = mask.clone());
        masked += e - s;
    }
    Ok(out)
}

/// Token deletion: each token dropped with probability `ratio`.
pub fn delete_tokens<T: Clone>(tokens: &[T], opts: &NoiseOptions) -> Result<Vec<T>> {
    opts.validate()?;
    let mut rng = opts.rng();
    Ok(tokens
        .iter()
        .filter(|_| !rng.gen_bool(opts.ratio))
        .cloned()
        .collect())
}

/// One infilled span: `len` tokens from token `start` of the input became one mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// Poisson(λ) by counting uniform products (Knuth; λ ≤ 64 keeps e^−λ a normal f64).
fn poisson(rng: &mut impl Rng, lambda: f64) -> usize {
    let limit = (-lambda).exp();
    let (mut k, mut p) = (0, rng.gen::<f64>());
    while p > limit {
        k += 1;
        p *= rng.gen::<f64>();
    }
    k
}

/// Text infilling: the output and the spans it replaced (sorted by start).
pub fn infill<T: Clone>(
    tokens: &[T],
    word_starts: &[bool],
    mask: &T,
    opts: &NoiseOptions,
) -> Result<(Vec<T>, Vec<Span>)> {
    opts.validate()?;
    check_lens(tokens, word_starts)?;
    let mut rng = opts.rng();
    let ws = words(word_starts);
    let target = (opts.ratio * ws.len() as f64).ceil() as usize;
    // Span lengths (words) until they cover the target; at most one span per word start.
    let mut lens = Vec::new();
    let mut covered = 0;
    while covered < target && lens.len() < ws.len() {
        let l = poisson(&mut rng, opts.poisson_lambda);
        covered += l;
        lens.push(l);
    }
    let mut starts: Vec<usize> =
        rand::seq::index::sample(&mut rng, ws.len(), lens.len()).into_vec();
    starts.sort_unstable();
    let mut spans = Vec::with_capacity(lens.len());
    for (i, (&w, &l)) in starts.iter().zip(&lens).enumerate() {
        let next = starts.get(i + 1).copied().unwrap_or(ws.len());
        let end_word = (w + l).min(next);
        let start = ws[w].0;
        let end = if end_word > w {
            ws[end_word - 1].1
        } else {
            start
        };
        spans.push(Span {
            start,
            len: end - start,
        });
    }
    let mut out = Vec::with_capacity(tokens.len());
    let mut at = 0;
    for s in &spans {
        out.extend_from_slice(&tokens[at..s.start]);
        out.push(mask.clone());
        at = s.start + s.len;
    }
    out.extend_from_slice(&tokens[at..]);
    Ok((out, spans))
}

/// Sentence permutation: the sentences in a random order, and that order (output sentence i is
/// input sentence `order[i]`).
pub fn permute_sentences<T: Clone>(
    sentences: &[Vec<T>],
    opts: &NoiseOptions,
) -> Result<(Vec<Vec<T>>, Vec<usize>)> {
    opts.validate()?;
    let mut order: Vec<usize> = (0..sentences.len()).collect();
    order.shuffle(&mut opts.rng());
    Ok((order.iter().map(|&i| sentences[i].clone()).collect(), order))
}

/// Document rotation: the document rotated to begin at a random word start; returns it and
/// that token index.
pub fn rotate<T: Clone>(
    tokens: &[T],
    word_starts: &[bool],
    opts: &NoiseOptions,
) -> Result<(Vec<T>, usize)> {
    opts.validate()?;
    check_lens(tokens, word_starts)?;
    let ws = words(word_starts);
    if ws.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let k = ws[opts.rng().gen_range(0..ws.len())].0;
    let mut out = tokens[k..].to_vec();
    out.extend_from_slice(&tokens[..k]);
    Ok((out, k))
}

/// Sentences of a text: split after `.`, `!` or `?` followed by whitespace (each sentence
/// keeps its punctuation; whitespace between sentences is dropped).
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        cur.push(c);
        if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace()) {
            let s = cur.trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    let s = cur.trim().to_string();
    if !s.is_empty() {
        out.push(s);
    }
    out
}
