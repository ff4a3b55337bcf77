//! f64 references of the training ops (`kernels/training_ops.cu`): bias + GELU forward and
//! backward, column sums, softmax cross-entropy, the embedding backward, AdamW, the global
//! gradient norm with its clip coefficient, and dropout. Inputs are the values the kernels
//! read (already rounded to their dtype), as f32; everything after that is f64.

use crate::rng::Dropout;

/// The two GELU forms of BERT (`gelu`, exact erf) and GPT-2 (`gelu_new`, tanh approximation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Gelu {
    Erf,
    Tanh,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const TANH_CUBIC: f64 = 0.044715;

/// gelu(u): u·Φ(u) (erf) or 0.5·u·(1 + tanh(√(2/π)(u + 0.044715 u³))).
pub fn gelu(u: f64, kind: Gelu) -> f64 {
    match kind {
        Gelu::Erf => 0.5 * u * (1.0 + libm::erf(u / std::f64::consts::SQRT_2)),
        Gelu::Tanh => 0.5 * u * (1.0 + (SQRT_2_OVER_PI * (u + TANH_CUBIC * u * u * u)).tanh()),
    }
}

/// d gelu(u) / du.
pub fn gelu_grad(u: f64, kind: Gelu) -> f64 {
    match kind {
        Gelu::Erf => {
            let cdf = 0.5 * (1.0 + libm::erf(u / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + u * pdf
        }
        Gelu::Tanh => {
            let t = (SQRT_2_OVER_PI * (u + TANH_CUBIC * u * u * u)).tanh();
            0.5 * (1.0 + t)
                + 0.5 * u * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * TANH_CUBIC * u * u)
        }
    }
}

fn biased(x: f32, bias: Option<&[f32]>, col: usize) -> f64 {
    x as f64 + bias.map_or(0.0, |b| b[col] as f64)
}

/// y = gelu(x + bias) over `[rows, cols]` row-major `x`.
pub fn bias_gelu_forward(x: &[f32], bias: Option<&[f32]>, cols: usize, kind: Gelu) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| gelu(biased(v, bias, i % cols), kind))
        .collect()
}

/// Backward of [`bias_gelu_forward`]: dx = dy·gelu'(x + bias), dbias = Σ_rows dx.
pub fn bias_gelu_backward(
    dy: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    cols: usize,
    kind: Gelu,
) -> (Vec<f64>, Vec<f64>) {
    let dx: Vec<f64> = dy
        .iter()
        .zip(x)
        .enumerate()
        .map(|(i, (&g, &v))| g as f64 * gelu_grad(biased(v, bias, i % cols), kind))
        .collect();
    let dbias = column_sums_f64(&dx, cols);
    (dx, dbias)
}

fn column_sums_f64(v: &[f64], cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; cols];
    for row in v.chunks(cols) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
    out
}

/// Σ over rows of a `[rows, cols]` row-major matrix: the bias gradient of a linear layer.
pub fn column_sums(v: &[f32], cols: usize) -> Vec<f64> {
    let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    column_sums_f64(&v, cols)
}

/// Softmax cross-entropy with PyTorch's `F.cross_entropy(..., ignore_index, label_smoothing,
/// reduction="mean")` semantics: target t = (1−ε)·onehot + ε/classes, row loss
/// −Σ_j t_j log softmax(x)_j, mean over the rows whose label is not `ignore_index` (NaN when
/// there are none, as in PyTorch). Returns (loss, dloss/dlogits); ignored rows get zero
/// gradients.
pub fn cross_entropy(
    logits: &[f32],
    classes: usize,
    labels: &[i32],
    ignore_index: i32,
    smoothing: f64,
) -> (f64, Vec<f64>) {
    let valid = labels.iter().filter(|&&l| l != ignore_index).count();
    let mut loss = 0.0;
    let mut dlogits = vec![0.0; logits.len()];
    for ((row, &label), drow) in logits
        .chunks(classes)
        .zip(labels)
        .zip(dlogits.chunks_mut(classes))
    {
        if label == ignore_index {
            continue;
        }
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        for (j, (&v, d)) in row.iter().zip(drow.iter_mut()).enumerate() {
            let t = smoothing / classes as f64
                + if j == label as usize {
                    1.0 - smoothing
                } else {
                    0.0
                };
            loss -= t * (v as f64 - lse);
            *d = ((v as f64 - lse).exp() - t) / valid as f64;
        }
    }
    (loss / valid as f64, dlogits)
}

/// Gradient of an embedding lookup `y[t] = table[ids[t]]`: dtable[v] = Σ_{t: ids[t] = v} dy[t].
pub fn embedding_backward(dy: &[f32], width: usize, ids: &[u32], vocab: usize) -> Vec<f64> {
    let mut out = vec![0.0; vocab * width];
    for (row, &id) in dy.chunks(width).zip(ids) {
        for (o, &g) in out[id as usize * width..][..width].iter_mut().zip(row) {
            *o += g as f64;
        }
    }
    out
}

/// Hyper-parameters of AdamW (PyTorch's names and defaults for betas and eps).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// One AdamW step (step counts from 1) on one tensor, as `torch.optim.AdamW`: decoupled
/// decay p ← p·(1 − lr·wd) (when `decay`), moments m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g²,
/// p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + eps).
pub fn adamw_step(
    cfg: &AdamWConfig,
    step: u32,
    decay: bool,
    param: &mut [f64],
    grad: &[f64],
    exp_avg: &mut [f64],
    exp_avg_sq: &mut [f64],
) {
    let bc1 = 1.0 - cfg.beta1.powi(step as i32);
    let bc2 = 1.0 - cfg.beta2.powi(step as i32);
    for i in 0..param.len() {
        if decay {
            param[i] *= 1.0 - cfg.lr * cfg.weight_decay;
        }
        exp_avg[i] = cfg.beta1 * exp_avg[i] + (1.0 - cfg.beta1) * grad[i];
        exp_avg_sq[i] = cfg.beta2 * exp_avg_sq[i] + (1.0 - cfg.beta2) * grad[i] * grad[i];
        let denom = exp_avg_sq[i].sqrt() / bc2.sqrt() + cfg.eps;
        param[i] -= cfg.lr / bc1 * exp_avg[i] / denom;
    }
}

/// ‖(g_1, …, g_n)‖₂ over all tensors together.
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| v as f64 * v as f64)
        .sum::<f64>()
        .sqrt()
}

/// PyTorch's `clip_grad_norm_` factor: min(1, max_norm / (norm + 1e-6)).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Dropout of `x` (logical indices 0..) with the mask of stream (seed, offset): kept elements
/// times 1/(1 − p) in f64, dropped ones 0.
pub fn dropout(x: &[f32], dropout: &Dropout, seed: u64, offset: u64) -> Vec<f64> {
    let scale = if dropout.p() < 1.0 {
        1.0 / (1.0 - dropout.p() as f64)
    } else {
        0.0
    };
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            if dropout.keeps(seed, offset, i as u64) {
                v as f64 * scale
            } else {
                0.0
            }
        })
        .collect()
}
