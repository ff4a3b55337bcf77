//! Text generation for every model that produces tokens ([`TokenModel`]: GPT-2, GPT-Neo,
//! GPT-1, BART's decoder, …): one decoding loop with greedy choice, temperature/top-k/top-p sampling from a
//! seeded RNG, or beam search ([`super::beam`]), and Hugging Face's logits processors
//! (`min_new_tokens`, `no_repeat_ngram_size`, forced BOS/EOS).
//!
//! A model turns each input into a decoder prompt (GPT-2: the input itself; an
//! encoder-decoder: the decoder start token) and, once per call, into whatever its decoder reads
//! besides its own tokens ([`TokenModel::Memory`]: nothing for GPT-2; the encoder's
//! cross-attention keys and values for BART). The loop then asks it for the logits of the last
//! token of every row: rows are the inputs (greedy, sampling) or inputs × beams (beam search:
//! every beam of every input in one model call per step).
//!
//! Batches of prompts of different lengths: the prefill pads each prompt on the right (causal
//! attention keeps the padding out of every real token's view), and every sequence keeps its
//! own length from then on: its positions count from 0 at its first token and its new token
//! goes to its own next position. A batch therefore gives each prompt what it would get alone
//! (what Hugging Face gets with left padding and position ids taken from the attention mask).
//!
//! Each step after the prefill runs the model on one token per row against a KV cache
//! ([`super::kv_cache`]: host memory on the CPU backend, device memory on the CUDA backend,
//! where the one-token attention runs the split-KV decode kernel), allocated once for the
//! longest sequence the call can reach; beam search reorders it by beam index after every
//! step. A finished row appends nothing, and with `compact_finished` (the default) it leaves
//! the batch: its KV-cache rows and encoder memory are dropped, so later steps run only the
//! live rows ([`Generation::rows_per_step`] counts them). `use_kv_cache: false` recomputes the whole sequence
//! every step instead (same results, quadratic cost; for tests and comparisons).

use super::backend::Backend;
use super::cpu::Cpu;
pub use super::kv_cache::{DecodeStep, HostKvCache, StepKvCache};
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

/// When beam search stops (Hugging Face's `early_stopping`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `true`: as soon as `num_beams` hypotheses are finished.
    Yes,
    /// `false` (the default): when the best running beam, scored at its current length, can no
    /// longer beat the worst finished hypothesis.
    #[default]
    Heuristic,
    /// `"never"`: the same test, but with a positive length penalty the running beam is scored
    /// at the longest length it could reach (the canonical beam search).
    Never,
}

impl std::str::FromStr for EarlyStopping {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "true" => Ok(EarlyStopping::Yes),
            "false" => Ok(EarlyStopping::Heuristic),
            "never" => Ok(EarlyStopping::Never),
            _ => Err(Error::invalid(
                "early_stopping",
                format!("`{s}` is not true, false or never"),
            )),
        }
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
    /// 1: greedy or sampling; more: beam search, choosing greedily at temperature 0 and by
    /// beam sampling otherwise ([`super::beam`]).
    pub num_beams: usize,
    /// Finished beam hypotheses are scored sum(log p) / generated_length^length_penalty.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Hypotheses returned per input (≤ num_beams; 1 without beams).
    pub num_return_sequences: usize,
    /// Never generate an n-gram of this size twice in a sequence (0: off).
    pub no_repeat_ngram_size: usize,
    /// End-of-text is impossible before this many new tokens.
    pub min_new_tokens: usize,
    /// The first generated token is forced to this id (BART's `forced_bos_token_id`).
    pub forced_bos_token_id: Option<u32>,
    /// The last token a sequence can get (at `max_new_tokens`) is forced to this id.
    pub forced_eos_token_id: Option<u32>,
    /// Drop finished rows (a sequence, or a beam search's whole input) from the batch, with
    /// their KV-cache rows and encoder memory, so later steps run only the live ones (false:
    /// every row runs to the end; same tokens, for tests and comparisons).
    pub compact_finished: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 32,
            sampling: Sampling::default(),
            stop_at_eos: true,
            use_kv_cache: true,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::default(),
            num_return_sequences: 1,
            no_repeat_ngram_size: 0,
            min_new_tokens: 0,
            forced_bos_token_id: None,
            forced_eos_token_id: None,
            compact_finished: true,
        }
    }
}

impl GenerateOptions {
    pub fn validate(&self) -> Result<()> {
        self.sampling.validate()?;
        if self.num_beams == 0 {
            return Err(Error::invalid("num_beams", "must be ≥ 1"));
        }
        if self.num_return_sequences == 0 || self.num_return_sequences > self.num_beams {
            return Err(Error::invalid(
                "num_return_sequences",
                format!(
                    "{} is outside 1 ..= num_beams ({})",
                    self.num_return_sequences, self.num_beams
                ),
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::invalid("length_penalty", "must be finite"));
        }
        Ok(())
    }

    /// Hugging Face's logits processors on one row's scores (logits, or log-probabilities in
    /// beam search): `seq` is the row's decoder tokens so far, `prompt_len` how many of them
    /// are its prompt, `max_len` the longest the row may get.
    pub fn process_scores(
        &self,
        seq: &[u32],
        prompt_len: usize,
        max_len: usize,
        eos: u32,
        scores: &mut [f32],
    ) {
        let n = self.no_repeat_ngram_size;
        if n > 0 && seq.len() + 1 >= n {
            let tail = &seq[seq.len() + 1 - n..];
            for w in seq.windows(n) {
                if &w[..n - 1] == tail {
                    if let Some(s) = scores.get_mut(w[n - 1] as usize) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if seq.len() - prompt_len < self.min_new_tokens {
            if let Some(s) = scores.get_mut(eos as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
        let force = |scores: &mut [f32], id: u32| {
            if (id as usize) < scores.len() {
                scores.fill(f32::NEG_INFINITY);
                scores[id as usize] = 0.0;
            }
        };
        if let Some(bos) = self.forced_bos_token_id {
            if seq.len() == 1 {
                force(scores, bos);
            }
        }
        if let Some(eos) = self.forced_eos_token_id {
            if seq.len() + 1 == max_len {
                force(scores, eos);
            }
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
    /// Prompt plus continuation filled the model's context.
    ContextFull,
}

impl StopReason {
    /// `eos`, `max_new_tokens` or `context_full` (the names `generate --json` prints).
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndOfText => "eos",
            StopReason::MaxNewTokens => "max_new_tokens",
            StopReason::ContextFull => "context_full",
        }
    }
}

/// What a generation call returns: per input, `num_return_sequences` sequences in a row
/// (input i's at i·num_return_sequences ..).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated tokens (after the decoder prompt).
    pub generated: Vec<Vec<u32>>,
    pub stop: Vec<StopReason>,
    /// Beam search: each returned hypothesis' score (sum of log-probabilities over
    /// length^length_penalty); empty otherwise.
    pub scores: Vec<f32>,
    /// Model steps run (prefill included).
    pub steps: usize,
    /// Rows each model step ran (prefill included): with `compact_finished` it drops as rows
    /// finish.
    pub rows_per_step: Vec<usize>,
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

/// A model the decoding loop can drive (see the module docs).
pub trait TokenModel<B: Backend> {
    /// What the decoder reads besides its own tokens, made once per call.
    type Memory;
    fn vocab_size(&self) -> usize;
    fn eos_token_id(&self) -> u32;
    /// The id right padding is filled with (never seen by a real token).
    fn pad_token_id(&self) -> u32 {
        self.eos_token_id()
    }
    /// Decoder positions 0 .. max_positions exist.
    fn max_positions(&self) -> usize;
    /// Layers and width (heads·dim) of the decoder's self-attention KV cache.
    fn cache_layout(&self) -> (usize, usize);
    /// Checks input `index` and returns the decoder prompt it starts from.
    fn decoder_prompt(&self, index: usize, input: &[u32]) -> Result<Vec<u32>>;
    /// The memory of `inputs`, each repeated `copies` times in row order (input i's at rows
    /// i·copies ..).
    fn encode(&self, be: &B, inputs: &[Vec<u32>], copies: usize) -> Result<Self::Memory>;
    /// The memory of rows `keep` (indices into `memory`'s rows, in order): what remains when
    /// finished rows leave the batch.
    fn select_memory(&self, be: &B, memory: &Self::Memory, keep: &[usize]) -> Result<Self::Memory>;
    /// A decoding step for `batch` rows of up to `capacity` positions that the backend runs
    /// its own way (the CUDA backend: one CUDA graph replayed per token), used for the
    /// one-token steps after the prefill; `None` (the default): every step goes through
    /// [`TokenModel::decode`].
    fn captured_step<'s>(
        &'s self,
        _be: &'s B,
        _batch: usize,
        _capacity: usize,
    ) -> Result<Option<Box<dyn DecodeStep<B> + 's>>> {
        Ok(None)
    }
    /// Runs the decoder over `batch` rows of `len` tokens (`ids`, `positions` row-major) and
    /// returns the logits `[rows.len(), vocab]` of the hidden-state rows `rows` (b·len + t).
    #[allow(clippy::too_many_arguments)]
    fn decode(
        &self,
        be: &B,
        memory: &Self::Memory,
        ids: &[u32],
        positions: &[u32],
        batch: usize,
        len: usize,
        rows: &[u32],
        caches: Option<&mut [&mut dyn KvCache<B>]>,
    ) -> Result<Vec<f32>>;
}

/// An error naming the first id of input `index` outside a vocabulary of `vocab` tokens.
pub fn check_vocab(index: usize, input: &[u32], vocab: usize) -> Result<()> {
    match input.iter().find(|&&t| t as usize >= vocab) {
        Some(&bad) => Err(Error::invalid(
            "prompt",
            format!("prompt {index}: token id {bad} is outside the vocabulary of {vocab}"),
        )),
        None => Ok(()),
    }
}

/// A step after the prefill: each row's last token and its position (capped to the context).
fn last_tokens<B: Backend, M: TokenModel<B>>(model: &M, run: &[&Vec<u32>]) -> (Vec<u32>, Vec<u32>) {
    let pad = model.pad_token_id();
    let max_pos = model.max_positions().max(1) - 1;
    let ids = run.iter().map(|s| *s.last().unwrap_or(&pad)).collect();
    let positions = run
        .iter()
        .map(|s| (s.len().saturating_sub(1)).min(max_pos) as u32)
        .collect();
    (ids, positions)
}

/// Runs a model step by step for the decoding loops: the KV cache (or full recomputation),
/// padding, positions, which logits come back, and (with `compact`) which rows still run.
pub(crate) struct Stepper<'a, B: GenerateBackend, M: TokenModel<B>> {
    be: &'a B,
    model: &'a M,
    memory: M::Memory,
    cache: Option<Box<dyn StepKvCache<B>>>,
    /// The model's captured step ([`TokenModel::captured_step`]) for the current batch, made
    /// at the first step after the prefill and again when finished rows leave the batch.
    captured: Option<Box<dyn DecodeStep<B> + 'a>>,
    /// Whether to ask for a captured step: greedy and sampling only. Beam search reorders
    /// the cache after every step (new buffers, so a graph captured on the old ones would be
    /// stale each step) and keeps the eager path; so does a model or backend that offers
    /// none (this turns false at the first `None`).
    try_captured: bool,
    capacity: usize,
    prefilled: bool,
    /// The caller's row of each row the model still runs (the identity until rows finish).
    active: Vec<usize>,
    compact: bool,
    pub steps: usize,
    pub rows_per_step: Vec<usize>,
}

impl<'a, B: GenerateBackend, M: TokenModel<B>> Stepper<'a, B, M> {
    /// For `rows` rows that reach at most `capacity` decoder positions.
    pub fn new(
        be: &'a B,
        model: &'a M,
        memory: M::Memory,
        rows: usize,
        capacity: usize,
        opts: &GenerateOptions,
    ) -> Result<Self> {
        let (layers, width) = model.cache_layout();
        let cache = if opts.use_kv_cache {
            be.kv_cache(layers, rows, capacity, width)?
        } else {
            None
        };
        Ok(Stepper {
            be,
            model,
            memory,
            cache,
            captured: None,
            try_captured: opts.num_beams == 1,
            capacity,
            prefilled: false,
            active: (0..rows).collect(),
            compact: opts.compact_finished,
            steps: 0,
            rows_per_step: Vec::new(),
        })
    }

    /// Drops the rows that are no longer `live` (cache rows and memory too).
    fn drop_finished(&mut self, live: &[bool]) -> Result<()> {
        let keep: Vec<usize> = (0..self.active.len())
            .filter(|&j| live[self.active[j]])
            .collect();
        if keep.len() == self.active.len() || keep.is_empty() {
            return Ok(());
        }
        if let Some(c) = self.cache.as_mut() {
            c.reorder(self.be, &keep)?;
        }
        self.memory = self.model.select_memory(self.be, &self.memory, &keep)?;
        self.active = keep.iter().map(|&j| self.active[j]).collect();
        Ok(())
    }

    /// Logits `[rows, vocab]` of the last token of every row of `seqs`. With a cache, every
    /// live row must have grown by exactly one token since the previous call; rows that are
    /// not `live` append nothing and their logits are to be ignored (NaN once compacted away).
    pub fn logits(&mut self, seqs: &[Vec<u32>], live: &[bool]) -> Result<Vec<f32>> {
        if live.len() != seqs.len() {
            return Err(Error::shape(
                "live",
                format!("[{}]", seqs.len()),
                &[live.len()],
            ));
        }
        if self.compact && self.prefilled {
            self.drop_finished(live)?;
        }
        let (be, model) = (self.be, self.model);
        let vocab = model.vocab_size();
        let run: Vec<&Vec<u32>> = self.active.iter().map(|&r| &seqs[r]).collect();
        let run_live: Vec<bool> = self.active.iter().map(|&r| live[r]).collect();
        let batch = run.len();
        let pad = model.pad_token_id();
        self.steps += 1;
        self.rows_per_step.push(batch);
        let captured = if self.prefilled {
            self.captured_logits(&run, &run_live)?
        } else {
            None
        };
        let logits = if let Some(logits) = captured {
            logits
        } else if let Some(cache) = self.cache.as_mut() {
            let (ids, positions, len, valid): (Vec<u32>, Vec<u32>, usize, Vec<usize>) =
                if !self.prefilled {
                    let longest = run.iter().map(|s| s.len()).max().unwrap_or(0);
                    let mut ids = vec![pad; batch * longest];
                    for (b, s) in run.iter().enumerate() {
                        ids[b * longest..b * longest + s.len()].copy_from_slice(s);
                    }
                    let positions = (0..batch * longest).map(|r| (r % longest) as u32).collect();
                    (
                        ids,
                        positions,
                        longest,
                        run.iter().map(|s| s.len()).collect(),
                    )
                } else {
                    let (ids, positions) = last_tokens(model, &run);
                    (
                        ids,
                        positions,
                        1,
                        run_live.iter().map(|&l| usize::from(l)).collect(),
                    )
                };
            cache.begin_step(&valid)?;
            let rows: Vec<u32> = (0..batch)
                .map(|b| (b * len + if self.prefilled { 0 } else { run[b].len() - 1 }) as u32)
                .collect();
            self.prefilled = true;
            let mut layers = cache.layers();
            let mut refs: Vec<&mut dyn KvCache<B>> = layers
                .iter_mut()
                .map(|l| &mut **l as &mut dyn KvCache<B>)
                .collect();
            model.decode(
                be,
                &self.memory,
                &ids,
                &positions,
                batch,
                len,
                &rows,
                Some(&mut refs),
            )?
        } else {
            // Everything so far, right-padded.
            self.prefilled = true;
            let len = run.iter().map(|s| s.len()).max().unwrap_or(1);
            let mut ids = vec![pad; batch * len];
            let positions: Vec<u32> = (0..batch * len).map(|r| (r % len) as u32).collect();
            for (b, s) in run.iter().enumerate() {
                ids[b * len..b * len + s.len()].copy_from_slice(s);
            }
            let rows: Vec<u32> = (0..batch)
                .map(|b| (b * len + run[b].len() - 1) as u32)
                .collect();
            model.decode(be, &self.memory, &ids, &positions, batch, len, &rows, None)?
        };
        if batch == seqs.len() {
            return Ok(logits);
        }
        // Back to the caller's rows; rows no longer run are poisoned.
        let mut full = vec![f32::NAN; seqs.len() * vocab];
        for (j, &r) in self.active.iter().enumerate() {
            full[r * vocab..(r + 1) * vocab].copy_from_slice(&logits[j * vocab..(j + 1) * vocab]);
        }
        Ok(full)
    }

    /// A step after the prefill through the model's captured step, when there is one (see
    /// [`Stepper::try_captured`]); `None`: the caller runs the ordinary path.
    fn captured_logits(&mut self, run: &[&Vec<u32>], live: &[bool]) -> Result<Option<Vec<f32>>> {
        let batch = run.len();
        let Some(cache) = self.cache.as_mut() else {
            return Ok(None);
        };
        if !self.try_captured || cache.step_view().is_none() {
            return Ok(None);
        }
        if self.captured.as_ref().is_some_and(|c| c.batch() != batch) {
            // Finished rows left the batch: the step's buffers are sized for the old one.
            self.captured = None;
        }
        if self.captured.is_none() {
            self.captured = self.model.captured_step(self.be, batch, self.capacity)?;
            if self.captured.is_none() {
                self.try_captured = false;
                return Ok(None);
            }
        }
        let (Some(step), Some(cache)) = (self.captured.as_mut(), self.cache.as_mut()) else {
            return Ok(None);
        };
        let (ids, positions) = last_tokens(self.model, run);
        let valid: Vec<usize> = live.iter().map(|&l| usize::from(l)).collect();
        cache.begin_step_lengths_only(&valid)?;
        let Some(view) = cache.step_view() else {
            return Err(Error::invalid("kv_cache", "the cache lost its step view"));
        };
        step.run(view, &ids, &positions).map(Some)
    }

    /// Row r continues from row `src[r]` (beam search; `src` in the caller's rows): reorders
    /// the cache rows still running.
    pub fn reorder(&mut self, src: &[usize]) -> Result<()> {
        if src.iter().enumerate().all(|(r, &s)| r == s) {
            return Ok(());
        }
        let Some(c) = self.cache.as_mut() else {
            return Ok(());
        };
        let mut at = vec![usize::MAX; src.len()];
        for (j, &r) in self.active.iter().enumerate() {
            at[r] = j;
        }
        let local = self
            .active
            .iter()
            .map(|&r| match src.get(r).and_then(|&s| at.get(s)) {
                Some(&j) if j != usize::MAX => Ok(j),
                _ => Err(Error::invalid(
                    "src",
                    format!("row {r} continues from a row that no longer runs"),
                )),
            })
            .collect::<Result<Vec<usize>>>()?;
        c.reorder(self.be, &local)
    }
}

/// Generates continuations of `inputs` (token ids: GPT-2's prompts, an encoder-decoder's
/// encoder inputs). `on_token(sequence, id)` is called for every generated token as soon as it
/// is chosen (not in beam search, where a hypothesis is known only at the end).
///
/// Errors: no inputs, an input the model rejects (empty, too long, an id outside the
/// vocabulary), invalid options. A decoder prompt that fills the context gets no continuation
/// ([`StopReason::ContextFull`]): prompt plus continuation never exceed the context.
pub fn generate<B: GenerateBackend, M: TokenModel<B>>(
    be: &B,
    model: &M,
    inputs: &[Vec<u32>],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Generation> {
    opts.validate()?;
    if inputs.is_empty() {
        return Err(Error::invalid("prompts", "no prompts to continue"));
    }
    let prompts = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| model.decoder_prompt(i, x))
        .collect::<Result<Vec<_>>>()?;
    if opts.num_beams > 1 {
        return super::beam::beam_search(be, model, inputs, &prompts, opts);
    }
    let ctx = model.max_positions();
    let eos = model.eos_token_id();
    let vocab = model.vocab_size();
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = ctx.min(longest.saturating_add(opts.max_new_tokens)).max(1);
    let memory = model.encode(be, inputs, 1)?;
    let mut stepper = Stepper::new(be, model, memory, batch, capacity, opts)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.sampling.seed);
    let mut seqs: Vec<Vec<u32>> = prompts.clone();
    let mut generated = vec![Vec::new(); batch];
    let mut stop: Vec<Option<StopReason>> = vec![None; batch];
    for (b, s) in stop.iter_mut().enumerate() {
        if opts.max_new_tokens == 0 {
            *s = Some(StopReason::MaxNewTokens);
        } else if prompts[b].len() >= ctx {
            *s = Some(StopReason::ContextFull);
        }
    }
    while stop.iter().any(Option::is_none) {
        let live: Vec<bool> = stop.iter().map(Option::is_none).collect();
        let mut logits = stepper.logits(&seqs, &live)?;
        for b in 0..batch {
            if stop[b].is_some() {
                continue;
            }
            let row = &mut logits[b * vocab..(b + 1) * vocab];
            let max_len = ctx.min(prompts[b].len() + opts.max_new_tokens);
            opts.process_scores(&seqs[b], prompts[b].len(), max_len, eos, row);
            let token = opts.sampling.sample(row, &mut rng)?;
            seqs[b].push(token);
            generated[b].push(token);
            on_token(b, token);
            stop[b] = if opts.stop_at_eos && token == eos {
                Some(StopReason::EndOfText)
            } else if generated[b].len() >= opts.max_new_tokens {
                Some(StopReason::MaxNewTokens)
            } else if seqs[b].len() >= ctx {
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
        scores: Vec::new(),
        steps: stepper.steps,
        rows_per_step: stepper.rows_per_step,
    })
}
