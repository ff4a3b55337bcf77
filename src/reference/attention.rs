//! Scaled dot-product attention in f64: O = softmax(Q·Kᵀ·scale + mask)·V, with the per-row
//! log-sum-exp.
//!
//! Layout: Q is [B, Hq, Lq, D], K is [B, Hkv, Lk, D], V is [B, Hkv, Lk, Dv], O is
//! [B, Hq, Lq, Dv], LSE is [B, Hq, Lq], all contiguous in that order (callers with other
//! layouts gather into it first). Query head h reads key/value head h / (Hq / Hkv)
//! (multi-query and grouped-query attention).
//!
//! Masks: query i of a sequence may attend to key j iff j < key_len (key padding; key_len = Lk
//! without it) and, when causal, j ≤ i + offset, with offset 0 for top-left alignment and
//! key_len − Lq for bottom-right alignment (the KV-cache convention: the last query sees every
//! key). A masked key contributes nothing: its score, K row and V row are never read, so NaN
//! there cannot reach the output. A row with no admissible key (fully masked) gives O = 0 and
//! LSE = −inf.
//!
//! A sliding window ([`Window`]) narrows each row further to a band around the diagonal; with
//! the causal mask and the key length it leaves every row one contiguous run of keys
//! ([`KeyBand`]). [`forward_masked`] takes, on top of these, an arbitrary element mask (what a
//! block-sparse layout expands to).
//!
//! LSE is in natural-log units: LSE_i = ln Σ_j exp(scale·s_ij) over admissible j.

use crate::error::{Error, Result};
pub use crate::key_band::{KeyBand, Window};

/// A slice argument must hold exactly `want` values.
fn length(arg: &'static str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::shape(arg, format!("{want} values"), &[got]));
    }
    Ok(())
}

/// The checks every reference call makes before it indexes anything: slice lengths, the head
/// grouping and the key lengths.
fn check_call(q: &[f32], k: &[f32], v: &[f32], s: &Shape, opts: &Options) -> Result<()> {
    length("q", q.len(), s.q_len())?;
    length("k", k.len(), s.k_len())?;
    length("v", v.len(), s.v_len())?;
    if s.heads_kv == 0 || !s.heads_q.is_multiple_of(s.heads_kv) {
        return Err(Error::invalid(
            "heads_kv",
            format!(
                "query heads ({}) must be a multiple of key/value heads ({})",
                s.heads_q, s.heads_kv
            ),
        ));
    }
    if let Some(l) = &opts.key_lens {
        length("key_lens", l.len(), s.batch)?;
    }
    Ok(())
}

pub use crate::attention_types::{CausalAlign, Shape};

/// Options of one attention call.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Multiplies Q·Kᵀ; conventionally 1/√D.
    pub scale: f64,
    pub causal: Option<CausalAlign>,
    /// Per-sequence number of valid keys (key padding); `None`: all `len_k` keys.
    pub key_lens: Option<Vec<usize>>,
    /// Sliding-window band (tokens left and right of the diagonal); `None`: no window.
    pub window: Option<Window>,
}

impl Options {
    /// Unmasked attention with scale 1/√D.
    pub fn new(dim_qk: usize) -> Self {
        Options {
            scale: 1.0 / (dim_qk as f64).sqrt(),
            causal: None,
            key_lens: None,
            window: None,
        }
    }

    /// The admissible-key band of batch entry `b` of a call of `shape`.
    pub fn key_band(&self, shape: &Shape, b: usize) -> KeyBand {
        let key_len = self
            .key_lens
            .as_ref()
            .map_or(shape.len_k, |l| l[b].min(shape.len_k));
        KeyBand::new(shape.len_q, key_len, self.causal, self.window)
    }
}

/// O and LSE.
#[derive(Clone, Debug)]
pub struct Output {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
}

/// The admissible keys of query `i` without a window: `0..end` (end ≤ key_len), empty when
/// the row is fully masked. (With a window: [`KeyBand::keys`].)
pub fn admissible_keys(
    i: usize,
    len_q: usize,
    key_len: usize,
    causal: Option<CausalAlign>,
) -> std::ops::Range<usize> {
    KeyBand::new(len_q, key_len, causal, None).keys(i)
}

/// Attention over the BHSD-contiguous inputs described in the module docs.
///
/// Panics if the slices do not match `shape` or Hq is not a multiple of Hkv (callers are
/// tests and checks, which build the inputs; the GPU ops validate user input).
///
/// Slices whose lengths disagree with `shape`, a head count that does not divide, or key
/// lengths not one per sequence are an [`Error`], as in every function here.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], shape: &Shape, opts: &Options) -> Result<Output> {
    forward_masked(q, k, v, shape, opts, &|_, _, _, _| true)
}

/// [`forward`] with an element mask on top of `opts`' masks: query `i` of batch entry `b`,
/// head `h` attends to key `j` iff `opts` admits it and `keep(b, h, i, j)`. Keys the mask
/// removes are never read, and a row left with no key gives O = 0, LSE = −inf, as in
/// [`forward`].
pub fn forward_masked(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    opts: &Options,
    keep: &dyn Fn(usize, usize, usize, usize) -> bool,
) -> Result<Output> {
    let s = shape;
    check_call(q, k, v, s, opts)?;
    let group = s.heads_q / s.heads_kv;
    let mut out = Output {
        o: vec![0.0; s.o_len()],
        lse: vec![f64::NEG_INFINITY; s.lse_len()],
    };
    let mut scores = vec![0.0f64; s.len_k];
    let mut keys = Vec::with_capacity(s.len_k);
    for b in 0..s.batch {
        let band = opts.key_band(s, b);
        for h in 0..s.heads_q {
            let hk = h / group;
            let q_base = ((b * s.heads_q + h) * s.len_q) * s.dim_qk;
            let k_base = ((b * s.heads_kv + hk) * s.len_k) * s.dim_qk;
            let v_base = ((b * s.heads_kv + hk) * s.len_k) * s.dim_v;
            let o_base = ((b * s.heads_q + h) * s.len_q) * s.dim_v;
            for i in 0..s.len_q {
                keys.clear();
                keys.extend(band.keys(i).filter(|&j| keep(b, h, i, j)));
                if keys.is_empty() {
                    continue; // O = 0, LSE = −inf
                }
                let qi = &q[q_base + i * s.dim_qk..q_base + (i + 1) * s.dim_qk];
                let mut max = f64::NEG_INFINITY;
                for &j in &keys {
                    let kj = &k[k_base + j * s.dim_qk..k_base + (j + 1) * s.dim_qk];
                    let dot: f64 = qi.iter().zip(kj).map(|(&a, &b)| a as f64 * b as f64).sum();
                    scores[j] = dot * opts.scale;
                    max = max.max(scores[j]);
                }
                let mut sum = 0.0f64;
                let o_row = &mut out.o[o_base + i * s.dim_v..o_base + (i + 1) * s.dim_v];
                for &j in &keys {
                    let p = (scores[j] - max).exp();
                    sum += p;
                    let vj = &v[v_base + j * s.dim_v..v_base + (j + 1) * s.dim_v];
                    for (o, &vv) in o_row.iter_mut().zip(vj) {
                        *o += p * vv as f64;
                    }
                }
                o_row.iter_mut().for_each(|o| *o /= sum);
                out.lse[(b * s.heads_q + h) * s.len_q + i] = max + sum.ln();
            }
        }
    }
    Ok(out)
}

/// Packed variable-length batches: sequence b owns query rows `cu_q[b]..cu_q[b+1]` and key rows
/// `cu_k[b]..cu_k[b+1]` of Q [total_q, Hq, D], K [total_k, Hkv, D], V [total_k, Hkv, Dv] (the
/// packed "THD" layout); O is [total_q, Hq, Dv] and LSE [Hq, total_q]. Each sequence is
/// attended independently, its causal alignment using its own lengths. `opts.key_lens` is
/// ignored (the offsets give each sequence's keys).
#[allow(clippy::too_many_arguments)]
pub fn forward_varlen(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_q: &[usize],
    cu_k: &[usize],
    heads_q: usize,
    heads_kv: usize,
    dim_qk: usize,
    dim_v: usize,
    opts: &Options,
) -> Result<Output> {
    length("cu_k", cu_k.len(), cu_q.len())?;
    for (arg, cu) in [("cu_q", cu_q), ("cu_k", cu_k)] {
        if cu.first().is_some_and(|&x| x != 0) || cu.windows(2).any(|w| w[1] < w[0]) {
            return Err(Error::invalid(
                arg,
                "offsets must start at 0 and never decrease",
            ));
        }
    }
    let total_q = *cu_q.last().unwrap_or(&0);
    let total_k = *cu_k.last().unwrap_or(&0);
    length("q", q.len(), total_q * heads_q * dim_qk)?;
    length("k", k.len(), total_k * heads_kv * dim_qk)?;
    length("v", v.len(), total_k * heads_kv * dim_v)?;
    let mut out = Output {
        o: vec![0.0; total_q * heads_q * dim_v],
        lse: vec![f64::NEG_INFINITY; heads_q * total_q],
    };
    let opts = Options {
        key_lens: None,
        ..opts.clone()
    };
    for b in 0..cu_q.len().saturating_sub(1) {
        let (q0, q1, k0, k1) = (cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]);
        let shape = Shape {
            batch: 1,
            heads_q,
            heads_kv,
            len_q: q1 - q0,
            len_k: k1 - k0,
            dim_qk,
            dim_v,
        };
        // Gather THD rows into BHSD for one sequence.
        let gather = |src: &[f32], r0: usize, r1: usize, heads: usize, d: usize| -> Vec<f32> {
            let mut dst = Vec::with_capacity((r1 - r0) * heads * d);
            for h in 0..heads {
                for r in r0..r1 {
                    let at = (r * heads + h) * d;
                    dst.extend_from_slice(&src[at..at + d]);
                }
            }
            dst
        };
        let seq = forward(
            &gather(q, q0, q1, heads_q, dim_qk),
            &gather(k, k0, k1, heads_kv, dim_qk),
            &gather(v, k0, k1, heads_kv, dim_v),
            &shape,
            &opts,
        )?;
        for h in 0..heads_q {
            for (i, r) in (q0..q1).enumerate() {
                let src = (h * shape.len_q + i) * dim_v;
                let dst = (r * heads_q + h) * dim_v;
                out.o[dst..dst + dim_v].copy_from_slice(&seq.o[src..src + dim_v]);
                out.lse[h * total_q + r] = seq.lse[h * shape.len_q + i];
            }
        }
    }
    Ok(out)
}
