//! f64 references for the transformer runtime's ops ([`crate::runtime::Backend`]): plain loops,
//! f64 arithmetic on the f32 inputs. Both backends are tested against these.

use crate::runtime::backend::{Activation, CausalAlign};

/// The activation in f64 (erf from `libm`, tanh from std).
pub fn activation(act: Activation, x: f64) -> f64 {
    match act {
        Activation::None => x,
        Activation::GeluErf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())
        }
        Activation::Relu => x.max(0.0),
        Activation::Tanh => x.tanh(),
    }
}

/// `act(x·wᵀ + b)`: x `[rows, inp]`, w `[out, inp]`, b `[out]`.
pub fn linear(
    x: &[f32],
    inp: usize,
    w: &[f32],
    out: usize,
    bias: Option<&[f32]>,
    act: Activation,
) -> Vec<f64> {
    let b = bias.map(widen);
    linear_f64(&widen(x), inp, &widen(w), out, b.as_deref(), act)
}

/// The values as f64 (exactly).
pub fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// [`linear`] on f64 inputs (the training tests differentiate the references numerically,
/// so their inputs must be perturbable below f32 resolution).
pub fn linear_f64(
    x: &[f64],
    inp: usize,
    w: &[f64],
    out: usize,
    bias: Option<&[f64]>,
    act: Activation,
) -> Vec<f64> {
    let rows = x.len() / inp.max(1);
    let mut y = vec![0f64; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let mut s = bias.map_or(0.0, |b| b[o]);
            for i in 0..inp {
                s += x[r * inp + i] * w[o * inp + i];
            }
            y[r * out + o] = activation(act, s);
        }
    }
    y
}

/// LayerNorm over rows of `width` of `x + residual` (added in f64).
pub fn layer_norm(
    x: &[f32],
    residual: Option<&[f32]>,
    width: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Vec<f64> {
    let r = residual.map(widen);
    layer_norm_f64(
        &widen(x),
        r.as_deref(),
        width,
        &widen(gamma),
        &widen(beta),
        eps,
    )
}

/// [`layer_norm`] on f64 inputs.
pub fn layer_norm_f64(
    x: &[f64],
    residual: Option<&[f64]>,
    width: usize,
    gamma: &[f64],
    beta: &[f64],
    eps: f32,
) -> Vec<f64> {
    let s: Vec<f64> = match residual {
        Some(r) => x.iter().zip(r).map(|(&a, &b)| a + b).collect(),
        None => x.to_vec(),
    };
    let mut y = vec![0f64; s.len()];
    for (row, out) in s.chunks(width).zip(y.chunks_mut(width)) {
        let mean = row.iter().sum::<f64>() / width as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for c in 0..width {
            out[c] = (row[c] - mean) * rstd * gamma[c] + beta[c];
        }
    }
    y
}

/// Heads inside a row-major `[rows, width]` matrix: columns `col + h·dim ..` (f32 data, or
/// f64 for the training tests' numerical derivatives).
#[derive(Clone, Copy, Debug)]
pub struct HeadsRef<'a, T = f32> {
    pub data: &'a [T],
    pub width: usize,
    pub col: usize,
    pub heads: usize,
    pub dim: usize,
}

impl<T: Copy + Into<f64>> HeadsRef<'_, T> {
    fn at(&self, row: usize, head: usize, d: usize) -> f64 {
        self.data[row * self.width + self.col + head * self.dim + d].into()
    }
}

/// Dropout on attention probabilities: `keep(element)` with element
/// `((b·heads_q + h)·len_q + i)·len_k + j` (the runtime's layout) scales P by `scale`.
pub struct ProbsDropout<'a> {
    pub keep: &'a dyn Fn(u64) -> bool,
    pub scale: f64,
}

/// Sizes and masks of [`attention`] (as [`crate::runtime::AttentionMask`]).
#[derive(Clone, Copy, Debug)]
pub struct AttentionSizes<'a> {
    pub batch: usize,
    pub len_q: usize,
    pub len_k: usize,
    pub key_lens: Option<&'a [usize]>,
    pub causal: Option<CausalAlign>,
    pub scale: f64,
}

/// Per-head softmax(scale·Q·Kᵀ + mask)·V → `[batch·len_q, heads_q·dim_v]`; a query with no
/// admissible key gives zeros.
pub fn attention<T: Copy + Into<f64>>(
    q: HeadsRef<T>,
    k: HeadsRef<T>,
    v: HeadsRef<T>,
    s: &AttentionSizes,
) -> Vec<f64> {
    attention_with(q, k, v, s, None).0
}

/// [`attention`] with optional dropout on the probabilities; also returns each query's
/// log-sum-exp of scaled scores, `[batch, heads_q, len_q]` (−∞ with no admissible key).
pub fn attention_with<T: Copy + Into<f64>>(
    q: HeadsRef<T>,
    k: HeadsRef<T>,
    v: HeadsRef<T>,
    s: &AttentionSizes,
    dropout: Option<&ProbsDropout>,
) -> (Vec<f64>, Vec<f64>) {
    let wo = q.heads * v.dim;
    let group = q.heads / k.heads;
    let mut out = vec![0f64; s.batch * s.len_q * wo];
    let mut lse = vec![f64::NEG_INFINITY; s.batch * q.heads * s.len_q];
    for b in 0..s.batch {
        let key_len = s.key_lens.map_or(s.len_k, |l| l[b]);
        for h in 0..q.heads {
            let hk = h / group;
            for i in 0..s.len_q {
                let keys =
                    crate::reference::attention::admissible_keys(i, s.len_q, key_len, s.causal);
                let scores: Vec<f64> = keys
                    .clone()
                    .map(|j| {
                        (0..q.dim)
                            .map(|d| q.at(b * s.len_q + i, h, d) * k.at(b * s.len_k + j, hk, d))
                            .sum::<f64>()
                            * s.scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                if !scores.is_empty() {
                    lse[(b * q.heads + h) * s.len_q + i] = max + sum.ln();
                }
                let first = (((b * q.heads + h) * s.len_q + i) * s.len_k) as u64;
                let p: Vec<f64> = keys
                    .clone()
                    .zip(&e)
                    .map(|(j, x)| match dropout {
                        Some(d) if !(d.keep)(first + j as u64) => 0.0,
                        Some(d) => x / sum * d.scale,
                        None => x / sum,
                    })
                    .collect();
                for d in 0..v.dim {
                    let o: f64 = keys
                        .clone()
                        .zip(&p)
                        .map(|(j, p)| p * v.at(b * s.len_k + j, hk, d))
                        .sum();
                    out[(b * s.len_q + i) * wo + h * v.dim + d] = o;
                }
            }
        }
    }
    (out, lse)
}

/// Mean softmax cross-entropy of `[rows, classes]` logits over the rows whose label is not
/// `ignore_index`, with label smoothing ε: (1−ε)·(lse − z_y) + ε·(lse − mean z). 0 when no
/// row counts.
pub fn cross_entropy(
    logits: &[f64],
    classes: usize,
    labels: &[i64],
    ignore_index: i64,
    smoothing: f64,
) -> f64 {
    let mut total = 0.0;
    let mut n = 0usize;
    for (z, &y) in logits.chunks(classes).zip(labels) {
        if y == ignore_index {
            continue;
        }
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
        let mean = z.iter().sum::<f64>() / classes as f64;
        total += (1.0 - smoothing) * (lse - z[y as usize]) + smoothing * (lse - mean);
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        total / n as f64
    }
}
