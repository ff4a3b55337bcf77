//! Beam search with Hugging Face's semantics (`transformers` 5, `GenerationMixin._beam_search`),
//! for any [`TokenModel`].
//!
//! Per input, `num_beams` running hypotheses (all the prompt at first; only the first counts,
//! the others start at −1e9 so that the first step expands one beam) and a list of the
//! `num_beams` best finished ones. Each step:
//! 1. one model call for every running beam of every unfinished input (rows input·beams + j);
//! 2. per beam, log-softmax of its logits, the logits processors, plus the beam's score;
//! 3. the 2·num_beams best (beam, token) continuations over all beams of the input;
//! 4. a continuation that ends in end-of-text or reaches the maximum length *finishes*: if it
//!    ranks among the first num_beams it is scored sum(log p)/new_len^length_penalty and
//!    competes for the finished list; either way it leaves the running set;
//! 5. the num_beams best unfinished continuations run on; the KV cache rows are reordered to
//!    their parents;
//! 6. the input is done when no continuation can run, when `early_stopping` is `true` and
//!    num_beams hypotheses are finished, or when the best running score (at the current
//!    length; at the maximum length for `"never"` with a positive penalty) cannot beat the
//!    worst finished one.
//!
//! Scores are f32 and excluded entries get −1e9 added, exactly as Hugging Face does, so that
//! the same candidates win. Inputs that are done append nothing to the cache afterwards.
//!
//! Beam sampling (`do_sample` with `num_beams > 1`: a temperature > 0 here) differs in two
//! places, as in Hugging Face: in step 2 the sampling warpers (temperature, top-k, top-p, each
//! keeping at least 2 tokens) follow the processors, so beam scores accumulate the warped
//! log-probabilities; in step 3 the 2·num_beams continuations are drawn without replacement
//! from the softmax of the input's scores over all beams, in draw order (the first num_beams
//! drawn are the ones that may finish). Draws come from one seeded RNG per call, inputs in
//! order; Hugging Face's torch RNG cannot be reproduced, so only the semantics match, not the
//! samples. Should fewer candidates than 2·num_beams have non-zero probability (the first step
//! expands one beam; a small top-k), the rest are the best remaining by score.

use super::generate::{
    EarlyStopping, GenerateBackend, GenerateOptions, Generation, Sampling, Stepper, StopReason,
    TokenModel,
};
use crate::error::Result;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

const EXCLUDED: f32 = -1.0e9;

#[derive(Clone)]
struct Hypothesis {
    seq: Vec<u32>,
    score: f32,
    finished: bool,
}

struct Search {
    prompt_len: usize,
    max_len: usize,
    running: Vec<Hypothesis>,
    finished: Vec<Hypothesis>,
    heuristic_unsatisfied: bool,
    done: bool,
}

/// Up to this many, [`top_k`] keeps its candidates in one pass (a beam step asks for
/// 2·beams of batch·beams·vocab scores); more go through a selection.
const SCAN_K: usize = 64;

/// Indices of the `k` largest `scores`, largest first (ties: lower index first).
fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let key = |&i: &usize| (std::cmp::Reverse(OrdF(scores[i])), i);
    if (1..=SCAN_K).contains(&k) {
        // The k best so far, in order; almost every score fails the first comparison.
        let mut best: Vec<usize> = Vec::with_capacity(k + 1);
        for i in 0..scores.len() {
            if best.len() == k && best.last().is_some_and(|last| key(&i) > key(last)) {
                continue;
            }
            let at = best.partition_point(|j| key(j) < key(&i));
            best.insert(at, i);
            best.truncate(k);
        }
        return best;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(idx.len());
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by_key(k - 1, key);
        idx.truncate(k);
    }
    idx.sort_unstable_by_key(key);
    idx
}

#[derive(Clone, Copy)]
struct OrdF(f32);
impl PartialEq for OrdF {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF {}
impl PartialOrd for OrdF {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// log-softmax of one row in f64, rounded to f32 (−∞ stays −∞).
fn log_softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter_mut().for_each(|x| *x = (*x as f64 - lse) as f32);
}

/// Tokens Hugging Face's top-k and top-p warpers keep at least, with beams.
const MIN_TOKENS_TO_KEEP: usize = 2;

/// Hugging Face's sampling warpers on one row of scores, in its order: temperature, then
/// top-k (scores below the k-th largest become −∞), then top-p (ascending by score, the tokens
/// whose cumulative probability stays ≤ 1 − top_p become −∞).
fn warp(row: &mut [f32], s: &Sampling) {
    if s.temperature != 1.0 {
        row.iter_mut().for_each(|x| *x /= s.temperature);
    }
    if s.top_k > 0 {
        let k = s.top_k.max(MIN_TOKENS_TO_KEEP);
        if k < row.len() {
            let kth = row[*top_k(row, k).last().expect("k ≥ 1")];
            row.iter_mut()
                .filter(|x| **x < kth)
                .for_each(|x| *x = f32::NEG_INFINITY);
        }
    }
    if s.top_p < 1.0 {
        let mut asc: Vec<usize> = (0..row.len()).collect();
        asc.sort_by(|&a, &b| row[a].total_cmp(&row[b]).then(a.cmp(&b)));
        let max = row[*asc.last().expect("a row")] as f64;
        let w: Vec<f64> = asc.iter().map(|&i| (row[i] as f64 - max).exp()).collect();
        let total: f64 = w.iter().sum();
        let removable = asc.len().saturating_sub(MIN_TOKENS_TO_KEEP);
        let mut cum = 0.0;
        for (n, &i) in asc.iter().enumerate().take(removable) {
            cum += w[n] / total;
            if cum > 1.0 - s.top_p as f64 {
                break;
            }
            row[i] = f32::NEG_INFINITY;
        }
    }
}

/// `k` indices drawn without replacement with probability ∝ exp(score), in draw order; once
/// the remaining mass is zero, the best remaining by score.
fn sample_without_replacement(scores: &[f32], k: usize, rng: &mut impl Rng) -> Vec<usize> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut w: Vec<f64> = scores
        .iter()
        .map(|&x| {
            if max.is_finite() {
                (x as f64 - max).exp()
            } else {
                0.0
            }
        })
        .collect();
    let mut out = Vec::with_capacity(k);
    let mut taken = vec![false; scores.len()];
    while out.len() < k.min(scores.len()) {
        let total: f64 = w.iter().sum();
        let pick = if total > 0.0 && total.is_finite() {
            let mut u = rng.gen::<f64>() * total;
            let mut pick = None;
            for (i, &p) in w.iter().enumerate() {
                if p > 0.0 {
                    pick = Some(i);
                    if u < p {
                        break;
                    }
                    u -= p;
                }
            }
            pick.expect("positive mass")
        } else {
            // The best not yet taken (−∞ included; ties: lowest index).
            (0..scores.len())
                .filter(|&i| !taken[i])
                .fold(None, |best: Option<usize>, i| match best {
                    Some(b) if scores[b].total_cmp(&scores[i]).is_ge() => Some(b),
                    _ => Some(i),
                })
                .expect("k ≤ len leaves one")
        };
        taken[pick] = true;
        w[pick] = 0.0;
        out.push(pick);
    }
    out
}

pub(crate) fn beam_search<B: GenerateBackend, M: TokenModel<B>>(
    be: &B,
    model: &M,
    inputs: &[Vec<u32>],
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Generation> {
    let beams = opts.num_beams;
    let keep = 2 * beams;
    let vocab = model.vocab_size();
    let eos = model.eos_token_id();
    let ctx = model.max_positions();
    let batch = prompts.len();
    let mut searches: Vec<Search> = prompts
        .iter()
        .map(|p| {
            let start = |i: usize| Hypothesis {
                seq: p.clone(),
                score: if i == 0 { 0.0 } else { EXCLUDED },
                finished: false,
            };
            let max_len = ctx.min(p.len() + opts.max_new_tokens);
            Search {
                prompt_len: p.len(),
                max_len,
                running: (0..beams).map(start).collect(),
                finished: (0..beams)
                    .map(|_| Hypothesis {
                        score: EXCLUDED,
                        ..start(0)
                    })
                    .collect(),
                heuristic_unsatisfied: true,
                done: p.len() >= max_len,
            }
        })
        .collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = ctx.min(longest.saturating_add(opts.max_new_tokens)).max(1);
    let memory = model.encode(be, inputs, beams)?;
    let mut stepper = Stepper::new(be, model, memory, batch * beams, capacity, opts)?;
    let sampling = opts.sampling.temperature > 0.0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.sampling.seed);
    while searches.iter().any(|s| !s.done) {
        let seqs: Vec<Vec<u32>> = searches
            .iter()
            .flat_map(|s| s.running.iter().map(|h| h.seq.clone()))
            .collect();
        let live: Vec<bool> = searches
            .iter()
            .flat_map(|s| std::iter::repeat_n(!s.done, beams))
            .collect();
        let mut logits = stepper.logits(&seqs, &live)?;
        // Every live row's log-softmax in parallel: at 4 beams × batch 4 it is 16 rows of the
        // vocabulary each step, the largest serial part of scoring.
        logits
            .par_chunks_mut(vocab)
            .enumerate()
            .filter(|(r, _)| live[*r])
            .for_each(|(_, row)| log_softmax(row));
        let mut src: Vec<usize> = (0..batch * beams).collect();
        for (b, s) in searches.iter_mut().enumerate() {
            if s.done {
                continue;
            }
            let cur_len = s.running[0].seq.len();
            let rows = &mut logits[b * beams * vocab..(b + 1) * beams * vocab];
            for (j, h) in s.running.iter().enumerate() {
                let row = &mut rows[j * vocab..(j + 1) * vocab];
                opts.process_scores(&h.seq, s.prompt_len, s.max_len, eos, row);
                if sampling {
                    warp(row, &opts.sampling);
                }
                row.iter_mut().for_each(|x| *x += h.score);
            }
            let top = if sampling {
                sample_without_replacement(rows, keep, &mut rng)
            } else {
                top_k(rows, keep)
            };
            // Continuations, their scores, and whether they finish.
            let cands: Vec<(usize, u32, f32, bool)> = top
                .iter()
                .map(|&i| {
                    let (beam, token) = (i / vocab, (i % vocab) as u32);
                    let hits = (opts.stop_at_eos && token == eos) || cur_len + 1 >= s.max_len;
                    (beam, token, rows[i], hits)
                })
                .collect();
            // Running beams of the next step.
            let run_scores: Vec<f32> = cands
                .iter()
                .map(|&(_, _, sc, hits)| if hits { sc + EXCLUDED } else { sc })
                .collect();
            let next: Vec<Hypothesis> = top_k(&run_scores, beams)
                .into_iter()
                .enumerate()
                .map(|(j, r)| {
                    let (beam, token, _, _) = cands[r];
                    src[b * beams + j] = b * beams + beam;
                    let mut seq = s.running[beam].seq.clone();
                    seq.push(token);
                    Hypothesis {
                        seq,
                        score: run_scores[r],
                        finished: false,
                    }
                })
                .collect();
            // Finished hypotheses.
            let full =
                s.finished.iter().all(|h| h.finished) && opts.early_stopping == EarlyStopping::Yes;
            let new_len = (cur_len + 1 - s.prompt_len) as f32;
            let mut merged = s.finished.clone();
            for (r, &(beam, token, sc, hits)) in cands.iter().enumerate() {
                let just_finished = hits && r < beams;
                let mut score = sc / new_len.powf(opts.length_penalty);
                if full {
                    score += EXCLUDED;
                }
                if !s.heuristic_unsatisfied {
                    score += EXCLUDED;
                }
                if !just_finished {
                    score += EXCLUDED;
                }
                let mut seq = s.running[beam].seq.clone();
                seq.push(token);
                merged.push(Hypothesis {
                    seq,
                    score,
                    finished: just_finished,
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|h| h.score).collect();
            s.finished = top_k(&merged_scores, beams)
                .into_iter()
                .map(|i| merged[i].clone())
                .collect();
            let all_hit = cands.iter().all(|c| c.3);
            s.running = next;
            // Can the running beams still improve on the finished ones?
            let cur_len = cur_len + 1;
            if s.heuristic_unsatisfied {
                let length =
                    if opts.early_stopping == EarlyStopping::Never && opts.length_penalty > 0.0 {
                        s.max_len - s.prompt_len
                    } else {
                        cur_len - s.prompt_len
                    };
                let best = s.running[0].score / (length as f32).powf(opts.length_penalty);
                let worst = s
                    .finished
                    .iter()
                    .map(|h| h.score)
                    .fold(f32::INFINITY, f32::min);
                s.heuristic_unsatisfied = s
                    .finished
                    .iter()
                    .any(|h| best > if h.finished { worst } else { EXCLUDED });
            }
            let all_finished = s.finished.iter().all(|h| h.finished);
            s.done = !s.heuristic_unsatisfied
                || (all_finished && opts.early_stopping == EarlyStopping::Yes)
                || all_hit;
        }
        stepper.reorder(&src)?;
    }
    let mut out = Generation {
        generated: Vec::new(),
        stop: Vec::new(),
        scores: Vec::new(),
        steps: stepper.steps,
        rows_per_step: std::mem::take(&mut stepper.rows_per_step),
    };
    for s in &searches {
        for h in s.finished.iter().take(opts.num_return_sequences) {
            let gen = h.seq[s.prompt_len.min(h.seq.len())..].to_vec();
            let reason = if gen.last() == Some(&eos) && opts.stop_at_eos {
                StopReason::EndOfText
            } else if s.max_len < s.prompt_len + opts.max_new_tokens {
                StopReason::ContextFull
            } else {
                StopReason::MaxNewTokens
            };
            out.generated.push(gen);
            out.stop.push(reason);
            out.scores.push(h.score);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass top-k equals a full sort by (score descending, index ascending) on rows
    /// with ties, −∞ and NaN, for every k on both sides of [`SCAN_K`].
    #[test]
    fn top_k_equals_a_full_sort_with_ties_infinities_and_nan() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for len in [1usize, 7, 300, 5000] {
            let scores: Vec<f32> = (0..len)
                .map(|_| match rng.gen_range(0..10) {
                    0 => f32::NEG_INFINITY,
                    1 => f32::NAN,
                    2 => 0.5,
                    _ => rng.gen_range(-3.0..3.0),
                })
                .collect();
            let mut sorted: Vec<usize> = (0..len).collect();
            sorted.sort_by_key(|&i| (std::cmp::Reverse(OrdF(scores[i])), i));
            for k in [1, 2, 8, SCAN_K, SCAN_K + 1, len] {
                let want = &sorted[..k.min(len)];
                assert_eq!(top_k(&scores, k), want, "len {len} k {k}");
            }
        }
    }
}
