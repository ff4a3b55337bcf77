//! Text generation with a [`Gpt2`]: prefill the prompts, then one token per step, sampled
//! greedily or from the temperature/top-k/top-p filtered distribution with a seeded RNG.
//!
//! Batches of prompts of different lengths: the prefill pads each prompt on the right (causal
//! attention keeps the padding out of every real token's view), and every sequence keeps its
//! own length from then on: its positions count from 0 at its first token and its new token
//! goes to its own next position. A batch therefore gives each prompt what it would get alone
//! (what Hugging Face gets with left padding and position ids taken from the attention mask).
//!
//! Each step after the prefill runs the model on one token per sequence against a KV cache
//! ([`super::kv_cache`]: host memory on the CPU backend, device memory on the CUDA backend,
//! where the one-token attention runs the split-KV decode kernel), allocated once for the
//! longest sequence the call can reach. `use_kv_cache: false` recomputes the whole sequence
//! every step instead (same results, quadratic cost; for tests and comparisons).

use super::backend::Backend;
use super::cpu::Cpu;
use super::gpt2::Gpt2;
pub use super::kv_cache::{HostKvCache, StepKvCache};
use super::layers::KvCache;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};

/// How the next token is chosen from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0: greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1]
    /// (1: no limit).
    pub top_p: f32,
    /// Seed of the RNG (one RNG per call, drawn from in sequence order at each step).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("{} is not a finite number ≥ 0", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("{} is outside (0, 1]", self.top_p),
            ));
        }
        Ok(())
    }

    /// Chooses a token from one row of logits.
    pub fn sample(&self, logits: &[f32], rng: &mut impl Rng) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::invalid("logits", "no logits to sample from"));
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(Error::invalid(
                "logits",
                format!("logit {i} is NaN (the model's arithmetic overflowed?)"),
            ));
        }
        // A +Inf logit is certain: sampling picks it as greedy does (the limit of the softmax
        // puts all the mass there, split evenly between several). Without this the softmax
        // below would compute Inf − Inf.
        let certain: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] == f32::INFINITY)
            .collect();
        if !certain.is_empty() {
            if self.temperature == 0.0 || self.top_k == 1 || certain.len() == 1 {
                return Ok(certain[0]);
            }
            let n = match self.top_k {
                0 => certain.len(),
                k => k.min(certain.len()),
            };
            return Ok(certain[rng.gen_range(0..n)]);
        }
        if logits.iter().all(|&x| x == f32::NEG_INFINITY) {
            return Err(Error::invalid(
                "logits",
                "every logit is -Inf: no token can be chosen",
            ));
        }
        let argmax = || {
            let mut best = 0;
            for (i, &x) in logits.iter().enumerate() {
                if x > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature == 0.0 || self.top_k == 1 {
            return Ok(argmax());
        }
        // Candidates by decreasing logit (ties by id), cut to top-k.
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let key = |&i: &u32| (std::cmp::Reverse(OrdF32(logits[i as usize])), i);
        let k = if self.top_k == 0 {
            order.len()
        } else {
            self.top_k.min(order.len())
        };
        if k < order.len() {
            order.select_nth_unstable_by_key(k - 1, key);
            order.truncate(k);
        }
        order.sort_unstable_by_key(key);
        // Softmax over the survivors in f64.
        // Differences first, then the division: a tiny temperature gives -Inf (probability
        // 0), never Inf − Inf.
        let t = self.temperature as f64;
        let top = logits[order[0] as usize] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i as usize] as f64 - top) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Nucleus: the shortest prefix whose mass reaches top_p (at least one token).
        if self.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.top_p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = rng.gen::<f64>() * total;
        for (n, p) in probs.iter().enumerate() {
            if u < *p {
                return Ok(order[n]);
            }
            u -= p;
        }
        Ok(order[probs.len() - 1])
    }
}

/// f32 with a total order (NaN is rejected before sorting).
#[derive(Clone, Copy)]
struct OrdF32(f32);
impl PartialEq for OrdF32 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF32 {}
impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Options of a generation call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop a sequence when it generates the end-of-text token (which is kept as its last
    /// generated id).
    pub stop_at_eos: bool,
    /// Use the backend's KV cache when it has one (false: recompute every step; for tests
    /// and comparisons).
    pub use_kv_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: Sampling::default(),
            stop_at_eos: true,
            use_kv_cache: true,
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// It generated the end-of-text token.
    EndOfText,
    /// `max_new_tokens` reached.
    MaxNewTokens,
    /// Prompt plus continuation filled the model's `n_positions`.
    ContextFull,
}

/// What a generation call returns, per prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub generated: Vec<Vec<u32>>,
    pub stop: Vec<StopReason>,
    /// Model steps run (prefill included).
    pub steps: usize,
}

/// Backends generation runs on, and how (see the module docs).
pub trait GenerateBackend: Backend + Sized {
    /// A cache of `layers` layers for `batch` sequences of up to `capacity` positions, rows
    /// `width` wide, or `None` when this backend recomputes instead.
    fn kv_cache(
        &self,
        layers: usize,
        batch: usize,
        capacity: usize,
        width: usize,
    ) -> Result<Option<Box<dyn StepKvCache<Self>>>>;
}

impl GenerateBackend for Cpu {
    fn kv_cache(
        &self,
        layers: usize,
        batch: usize,
        capacity: usize,
        width: usize,
    ) -> Result<Option<Box<dyn StepKvCache<Self>>>> {
        Ok(Some(Box::new(HostKvCache::new(
            layers, batch, capacity, width,
        )?)))
    }
}

#[cfg(feature = "cuda")]
impl GenerateBackend for super::cuda::Cuda {
    fn kv_cache(
        &self,
        layers: usize,
        batch: usize,
        capacity: usize,
        width: usize,
    ) -> Result<Option<Box<dyn StepKvCache<Self>>>> {
        Ok(Some(Box::new(super::kv_cache::DeviceKvCache::new(
            self, layers, batch, capacity, width,
        )?)))
    }
}

/// Generates continuations of `prompts` (token ids). `on_token(sequence, id)` is called for
/// every generated token as soon as it is chosen.
///
/// Errors: no prompts, an empty prompt, a prompt longer than `n_positions`, an id outside the
/// vocabulary, invalid sampling options. A prompt of exactly `n_positions` tokens gets no
/// continuation ([`StopReason::ContextFull`]): prompt plus continuation never exceed the context.
pub fn generate<B: GenerateBackend>(
    be: &B,
    model: &Gpt2<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Generation> {
    opts.sampling.validate()?;
    let c = &model.config;
    if prompts.is_empty() {
        return Err(Error::invalid("prompts", "no prompts to continue"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::invalid(
                "prompt",
                format!("prompt {i} is empty: GPT-2 needs at least one token to continue"),
            ));
        }
        if p.len() > c.n_positions {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "prompt {i} has {} tokens, more than the model's context of {}",
                    p.len(),
                    c.n_positions
                ),
            ));
        }
        if let Some(&bad) = p.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "prompt {i}: token id {bad} is outside the vocabulary of {}",
                    c.vocab_size
                ),
            ));
        }
    }
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = c
        .n_positions
        .min(longest.saturating_add(opts.max_new_tokens));
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.sampling.seed);
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut generated = vec![Vec::new(); batch];
    let mut stop: Vec<Option<StopReason>> = vec![None; batch];
    for (b, s) in stop.iter_mut().enumerate() {
        if opts.max_new_tokens == 0 {
            *s = Some(StopReason::MaxNewTokens);
        } else if prompts[b].len() >= c.n_positions {
            *s = Some(StopReason::ContextFull);
        }
    }
    let mut cache = if opts.use_kv_cache {
        be.kv_cache(c.n_layer, batch, capacity, c.n_embd)?
    } else {
        None
    };
    let mut steps = 0;
    while stop.iter().any(Option::is_none) {
        // Logits of each sequence's last token.
        let logits = match cache.as_mut() {
            Some(cache) => {
                let (ids, positions, len, valid) = if steps == 0 {
                    let mut ids = vec![c.eos_token_id; batch * longest];
                    let mut positions = vec![0u32; batch * longest];
                    for (b, p) in prompts.iter().enumerate() {
                        ids[b * longest..b * longest + p.len()].copy_from_slice(p);
                        for t in 0..longest {
                            positions[b * longest + t] = t as u32;
                        }
                    }
                    let valid = prompts.iter().map(Vec::len).collect::<Vec<_>>();
                    (ids, positions, longest, valid)
                } else {
                    // One token per sequence at its next position; finished ones append
                    // nothing and their output is ignored.
                    let ids = seqs.iter().map(|s| *s.last().unwrap_or(&0)).collect();
                    let positions = seqs
                        .iter()
                        .map(|s| ((s.len() - 1).min(c.n_positions - 1)) as u32)
                        .collect();
                    let valid = stop.iter().map(|s| usize::from(s.is_none())).collect();
                    (ids, positions, 1, valid)
                };
                cache.begin_step(&valid)?;
                let mut layers = cache.layers();
                let mut refs: Vec<&mut dyn KvCache<B>> = layers
                    .iter_mut()
                    .map(|l| &mut **l as &mut dyn KvCache<B>)
                    .collect();
                let hidden = model.forward(be, &ids, &positions, batch, len, Some(&mut refs))?;
                let rows: Vec<u32> = (0..batch)
                    .map(|b| (b * len + if steps == 0 { prompts[b].len() - 1 } else { 0 }) as u32)
                    .collect();
                be.to_f32(&model.logits(be, &hidden, &rows)?)?
            }
            None => {
                // Everything so far, right-padded.
                let len = seqs.iter().map(Vec::len).max().unwrap_or(1);
                let mut ids = vec![c.eos_token_id; batch * len];
                let positions: Vec<u32> = (0..batch * len).map(|r| (r % len) as u32).collect();
                for (b, s) in seqs.iter().enumerate() {
                    ids[b * len..b * len + s.len()].copy_from_slice(s);
                }
                let hidden = model.forward(be, &ids, &positions, batch, len, None)?;
                let rows: Vec<u32> = (0..batch)
                    .map(|b| (b * len + seqs[b].len() - 1) as u32)
                    .collect();
                be.to_f32(&model.logits(be, &hidden, &rows)?)?
            }
        };
        steps += 1;
        for b in 0..batch {
            if stop[b].is_some() {
                continue;
            }
            let row = &logits[b * c.vocab_size..(b + 1) * c.vocab_size];
            let token = opts.sampling.sample(row, &mut rng)?;
            seqs[b].push(token);
            generated[b].push(token);
            on_token(b, token);
            stop[b] = if opts.stop_at_eos && token == c.eos_token_id {
                Some(StopReason::EndOfText)
            } else if generated[b].len() >= opts.max_new_tokens {
                Some(StopReason::MaxNewTokens)
            } else if seqs[b].len() >= c.n_positions {
                Some(StopReason::ContextFull)
            } else {
                None
            };
        }
    }
    Ok(Generation {
        generated,
        stop: stop
            .into_iter()
            .map(|s| s.unwrap_or(StopReason::MaxNewTokens))
            .collect(),
        steps,
    })
}
