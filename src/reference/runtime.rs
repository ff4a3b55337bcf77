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
    let rows = x.len() / inp.max(1);
    let mut y = vec![0f64; rows * out];
    for r in 0..rows {
        for o in 0..out {
            let mut s = bias.map_or(0.0, |b| b[o] as f64);
            for i in 0..inp {
                s += x[r * inp + i] as f64 * w[o * inp + i] as f64;
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
    let s: Vec<f64> = match residual {
        Some(r) => x
            .iter()
            .zip(r)
            .map(|(&a, &b)| a as f64 + b as f64)
            .collect(),
        None => x.iter().map(|&a| a as f64).collect(),
    };
    let mut y = vec![0f64; s.len()];
    for (row, out) in s.chunks(width).zip(y.chunks_mut(width)) {
        let mean = row.iter().sum::<f64>() / width as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for c in 0..width {
            out[c] = (row[c] - mean) * rstd * gamma[c] as f64 + beta[c] as f64;
        }
    }
    y
}

/// Heads inside a row-major `[rows, width]` matrix: columns `col + h·dim ..`.
#[derive(Clone, Copy, Debug)]
pub struct HeadsRef<'a> {
    pub data: &'a [f32],
    pub width: usize,
    pub col: usize,
    pub heads: usize,
    pub dim: usize,
}

impl HeadsRef<'_> {
    fn at(&self, row: usize, head: usize, d: usize) -> f64 {
        self.data[row * self.width + self.col + head * self.dim + d] as f64
    }
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
pub fn attention(q: HeadsRef, k: HeadsRef, v: HeadsRef, s: &AttentionSizes) -> Vec<f64> {
    let wo = q.heads * v.dim;
    let group = q.heads / k.heads;
    let mut out = vec![0f64; s.batch * s.len_q * wo];
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
                for d in 0..v.dim {
                    let o: f64 = keys
                        .clone()
                        .zip(&e)
                        .map(|(j, p)| p / sum * v.at(b * s.len_k + j, hk, d))
                        .sum();
                    out[(b * s.len_q + i) * wo + h * v.dim + d] = o;
                }
            }
        }
    }
    out
}
