//! Sentence embeddings from a sentence-transformers folder: tokenizer, BERT, pooling,
//! normalization, batched like sentence-transformers (sentences sorted by length so each
//! batch pads little, results returned in input order).

use super::backend::Backend;
use super::bert::Bert;
use super::checkpoint::read_json;
use super::config::{Fields, MAX_COUNT};
use super::pooling::Pooling;
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use std::path::Path;

/// Most tokens (padding included) one forward pass of [`SentenceEmbedder::embed`] holds.
pub const FORWARD_TOKENS: usize = 8192;

/// Fewest bytes of freed CPU activation buffers kept for reuse while a list is embedded
/// (see [`kept_bytes`]).
const EMBED_KEPT_MIN: usize = 32 << 20;

/// Bytes of freed CPU activation buffers to keep while batches of at most `tokens` tokens go
/// through an encoder of width `hidden`. This is what one layer gives back to the pool: its
/// fused QKV output (3·hidden values per token) and four hidden-width outputs, each in a
/// buffer reserved at twice its size (`recycle`'s fresh buffers). It is never below
/// [`EMBED_KEPT_MIN`].
///
/// Measured on the 512 mixed sentences of `bench-embed-cpu.py` (first batch 3081 tokens):
/// - a fixed 32 MiB freed the largest buffers of every layer and faulted them in again:
///   1.3 GB of new pages per run;
/// - this rule keeps 63 MiB, and 0.45 GB of new pages are faulted in;
/// - past ~70 MiB the peak RSS rises with no further gain.
fn kept_bytes(tokens: usize, hidden: usize) -> usize {
    let layer = tokens.saturating_mul(hidden).saturating_mul(2 * 7 * 4);
    layer.max(EMBED_KEPT_MIN)
}

/// A sentence-embedding model on backend `B`.
pub struct SentenceEmbedder<B: Backend> {
    pub bert: Bert<B>,
    pub tokenizer: Tokenizer,
    pub pooling: Pooling,
}

/// Embeddings of a list of sentences, in input order.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub dim: usize,
    /// Inputs (indices) cut at the model's maximum sequence length.
    pub truncated: Vec<usize>,
}

impl<B: Backend> SentenceEmbedder<B> {
    /// Loads the model, `tokenizer.json` and the pooling configuration from `dir`. Sentences
    /// are truncated at `max_seq_length` from `sentence_bert_config.json` when present, never
    /// beyond the model's positions.
    pub fn from_folder(be: &B, dir: &Path) -> Result<Self> {
        let bert = Bert::from_folder(be, dir)?;
        let positions = bert.config.max_position_embeddings;
        let st_config = dir.join("sentence_bert_config.json");
        let max_len = if st_config.exists() {
            let v = read_json(&st_config)?;
            let file = st_config.display().to_string();
            Fields::new(&v, &file)?.int_or("max_seq_length", positions, 2..=MAX_COUNT)?
        } else {
            positions
        }
        .min(positions);
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"), max_len)?;
        let pooling = Pooling::from_folder(dir)?;
        Ok(SentenceEmbedder {
            bert,
            tokenizer,
            pooling,
        })
    }

    pub fn dim(&self) -> usize {
        self.bert.config.hidden_size
    }

    /// Embeds `texts` in batches of `batch_size` (at most [`FORWARD_TOKENS`] tokens each:
    /// larger batches are cut); `progress` is called with the number of
    /// sentences done after each batch. An empty list is an error, and so is an embedding
    /// with a NaN or infinite value ([`Error::NonFinite`], naming the input).
    ///
    /// Where the backend has several lanes ([`Backend::lanes`]: the CPU's threads), whole
    /// rounds of batches go through them at once, each batch on its own lane, with at most
    /// [`LANE_TOKENS`] tokens in flight; the batches left over run one after another with
    /// every op spread over the threads. The results do not depend on which way a batch ran.
    pub fn embed(
        &self,
        be: &B,
        texts: &[&str],
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Embeddings>
    where
        B: Sync,
        B::Tensor: Sync,
    {
        if texts.is_empty() {
            return Err(Error::invalid("texts", "no sentences to embed"));
        }
        if batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be ≥ 1"));
        }
        // Longest first, as sentence-transformers sorts (by characters): batches of similar
        // lengths pad little. The mask makes each result independent of its batch-mates.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].chars().count()));
        let width = self.dim();
        // Memory bound: a forward pass holds at most FORWARD_TOKENS tokens (the batch is cut
        // further when it would exceed that; results do not depend on the batching).
        let rows = (FORWARD_TOKENS / self.tokenizer.max_len()).clamp(1, batch_size);
        let chunks: Vec<&[usize]> = order.chunks(rows).collect();
        let batch_texts =
            |chunk: &[usize]| -> Vec<&str> { chunk.iter().map(|&i| texts[i]).collect() };
        // The first batch is the longest: its size sets the lanes and the kept buffers.
        let first = self.tokenizer.encode_batch(&batch_texts(chunks[0]))?;
        let first_tokens: usize = first.lens.iter().sum();
        let lanes = lanes_for(be.lanes(), chunks.len(), first_tokens);
        let first = std::sync::Mutex::new(Some(first));
        // The CPU backend reuses freed activation buffers across layers and batches instead
        // of faulting fresh pages in for every op (see `KeepOpBuffers`; each lane keeps
        // its own). Later batches are shorter, so they fit in the first's buffers.
        let _keep = crate::runtime::cpu::KeepOpBuffers::with_limit(kept_bytes(first_tokens, width));
        let run = |i: usize| -> Result<BatchOut> {
            let chunk = chunks[i];
            let taken = if i == 0 {
                first.lock().unwrap_or_else(|e| e.into_inner()).take()
            } else {
                None
            };
            let tokens = match taken {
                Some(t) => t,
                None => self.tokenizer.encode_batch(&batch_texts(chunk))?,
            };
            let truncated = tokens.truncated.iter().map(|&j| chunk[j]).collect();
            // Packed: no GEMM row is spent on padding (the pooling reads real tokens only).
            let hidden = be.to_f32(&self.bert.forward_packed(be, &tokens)?)?;
            let pooled = self.pooling.apply_packed(&hidden, &tokens.lens, width);
            for (&i, v) in chunk.iter().zip(&pooled) {
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    return Err(Error::NonFinite {
                        input: i + 1,
                        reason: format!(
                            "its embedding has {bad} values (corrupt weights, or the model's \
                             arithmetic overflowed)"
                        ),
                    });
                }
            }
            Ok((pooled, truncated))
        };
        let mut vectors = vec![Vec::new(); texts.len()];
        let mut truncated = Vec::new();
        let mut done = 0;
        let mut keep_result = |i: usize, (pooled, cut): BatchOut| {
            for (&j, v) in chunks[i].iter().zip(pooled) {
                vectors[j] = v;
            }
            truncated.extend(cut);
            done += chunks[i].len();
            progress(done);
        };
        // Whole rounds of `lanes` batches go through the lanes; the rest (fewer than the
        // lanes) one at a time below, with every thread on each op.
        let in_lanes = if lanes > 1 {
            chunks.len() / lanes * lanes
        } else {
            0
        };
        if in_lanes > 0 {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let failed = std::sync::atomic::AtomicBool::new(false);
            let (tx, rx) = std::sync::mpsc::channel();
            let mut first_error: Option<(usize, Error)> = None;
            std::thread::scope(|s| {
                let (next, failed, run) = (&next, &failed, &run);
                // Batches are taken in order, so when batch i fails every earlier batch has
                // been started, and the error reported is the one a serial run would give.
                let work = move || {
                    use std::sync::atomic::Ordering::Relaxed;
                    while !failed.load(Relaxed) {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= in_lanes {
                            break;
                        }
                        let r = run(i);
                        failed.fetch_or(r.is_err(), Relaxed);
                        if tx.send((i, r)).is_err() {
                            break;
                        }
                    }
                };
                // `tx` lives in `work`, dropped when every lane is done, which ends `rx`.
                s.spawn(move || be.run_lanes(lanes, &work));
                for (i, r) in rx {
                    match r {
                        Ok(out) => keep_result(i, out),
                        Err(e) => {
                            if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                                first_error = Some((i, e));
                            }
                        }
                    }
                }
            });
            if let Some((_, e)) = first_error {
                return Err(e);
            }
        }
        for i in in_lanes..chunks.len() {
            let out = run(i)?;
            keep_result(i, out);
        }
        truncated.sort_unstable();
        Ok(Embeddings {
            vectors,
            dim: width,
            truncated,
        })
    }
}

/// One batch's pooled vectors (in the batch's order) and the inputs it truncated.
type BatchOut = (Vec<Vec<f32>>, Vec<usize>);

/// Most tokens in flight at once over the lanes of [`SentenceEmbedder::embed`]: each lane
/// holds one forward pass's activations.
pub const LANE_TOKENS: usize = 2 * FORWARD_TOKENS;

/// Lanes for `batches` batches whose longest has `longest` tokens, on a backend with `lanes`:
/// at most one per batch, and no more than [`LANE_TOKENS`] tokens in flight.
fn lanes_for(lanes: usize, batches: usize, longest: usize) -> usize {
    let by_memory = LANE_TOKENS / longest.max(1);
    lanes.min(batches).min(by_memory).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_bytes_follow_the_first_batch() {
        // Short batches keep the floor.
        assert_eq!(kept_bytes(0, 384), EMBED_KEPT_MIN);
        assert_eq!(kept_bytes(900, 384), EMBED_KEPT_MIN);
        // Long batches keep what one layer frees: QKV and four hidden-width outputs, each at
        // twice its size (the mixed benchmark's first batch: 3081 tokens through MiniLM).
        assert_eq!(kept_bytes(3081, 384), 3081 * 384 * (3 + 4) * 2 * 4);
        // Saturates instead of overflowing; the pool caps it at its own bound.
        assert_eq!(kept_bytes(usize::MAX, 384), usize::MAX);
    }

    #[test]
    fn lanes_are_bounded_by_batches_and_tokens_in_flight() {
        // One per thread when there are batches for them and the tokens fit.
        assert_eq!(lanes_for(2, 16, 3081), 2);
        assert_eq!(lanes_for(16, 16, 1000), 16);
        // No more lanes than batches.
        assert_eq!(lanes_for(8, 3, 100), 3);
        // Long batches: LANE_TOKENS in flight at most, but always one lane.
        assert_eq!(lanes_for(16, 16, 3081), LANE_TOKENS / 3081);
        assert_eq!(lanes_for(4, 16, LANE_TOKENS), 1);
        assert_eq!(lanes_for(4, 16, usize::MAX), 1);
        assert_eq!(lanes_for(0, 0, 0), 1);
    }
}
