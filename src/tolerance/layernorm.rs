//! Tolerances of the LayerNorm outputs under the rule of [`crate::tolerance`].
//!
//! f32 error in a row's mean is about √n·u·max|x|; normalising multiplies it by rstd, so every
//! output's absolute budget scales with the row's conditioning κ = max|x|·rstd.

use super::Tolerance;
use crate::dtype::DType;
use crate::reference::layernorm as reference;

fn max_abs(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Per-row conditioning κ = max|x|·rstd.
fn kappas(x: &[f32], hidden: usize, rstd: &[f64]) -> Vec<f64> {
    x.chunks(hidden)
        .zip(rstd)
        .map(|(row, r)| max_abs(row.iter().map(|&v| v as f64)) * r)
        .collect()
}

/// Bounds for y (stored in `dtype`), mean and rstd (f32).
#[derive(Clone, Copy, Debug)]
pub struct ForwardTolerances {
    pub y: Tolerance,
    pub mean: Tolerance,
    pub rstd: Tolerance,
}

/// Bounds of the forward of `s` (the normalised input: x, or x + residual as stored), given
/// the reference's output `want`.
pub fn forward(
    dtype: DType,
    s: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    want: &reference::ForwardOutput,
) -> ForwardTolerances {
    let kappa = kappas(s, hidden, &want.rstd);
    let kappa_max = kappa.iter().cloned().fold(0.0, f64::max);
    let max_gamma = gamma.map_or(1.0, |g| max_abs(g.iter().map(|&v| v as f64)));
    let max_beta = beta.map_or(0.0, |b| max_abs(b.iter().map(|&v| v as f64)));
    let max_x = max_abs(s.iter().map(|&v| v as f64));
    let rstd_scale = want
        .rstd
        .iter()
        .zip(&kappa)
        .map(|(r, k)| 2.0 * r * k)
        .fold(0.0, f64::max);
    ForwardTolerances {
        y: Tolerance::for_output(dtype, hidden, max_gamma * kappa_max + max_beta),
        mean: Tolerance::for_output(DType::F32, hidden, max_x),
        rstd: Tolerance::for_output(DType::F32, hidden, rstd_scale),
    }
}

/// Bounds for dx, dγ and dβ (stored in `dtype`).
#[derive(Clone, Copy, Debug)]
pub struct BackwardTolerances {
    pub dx: Tolerance,
    pub dgamma: Tolerance,
    pub dbeta: Tolerance,
}

/// Bounds of the backward of rows `x` with upstream gradient `dy`.
pub fn backward(
    dtype: DType,
    dy: &[f32],
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    eps: f32,
) -> BackwardTolerances {
    let rows = x.len() / hidden;
    let stats = reference::forward(x, hidden, None, None, eps)
        .expect("x must be whole rows of hidden values");
    let kappa = kappas(x, hidden, &stats.rstd);
    let gamma_at = |j: usize| gamma.map_or(1.0, |g| g[j] as f64);
    // dx = rstd·(g − mean(g) − x̂·mean(g·x̂)): terms of size rstd·|g|·(1 + κ)², with the error
    // in x̂ amplified by κ.
    let dx_scale = (0..rows)
        .map(|r| {
            let g = max_abs((0..hidden).map(|j| dy[r * hidden + j] as f64 * gamma_at(j)));
            stats.rstd[r] * g * (1.0 + kappa[r]).powi(2)
        })
        .fold(0.0, f64::max);
    // dγ and dβ are column sums over rows; their budget scales with the sum of |terms|.
    let col_sum_max = |f: &dyn Fn(usize, usize) -> f64| {
        (0..hidden)
            .map(|j| (0..rows).map(|r| f(r, j)).sum::<f64>())
            .fold(0.0, f64::max)
    };
    let dgamma_scale = col_sum_max(&|r, j| {
        let xhat = (x[r * hidden + j] as f64 - stats.mean[r]) * stats.rstd[r];
        (dy[r * hidden + j] as f64).abs() * (xhat.abs() + kappa[r])
    });
    let dbeta_scale = col_sum_max(&|r, j| (dy[r * hidden + j] as f64).abs());
    BackwardTolerances {
        dx: Tolerance::for_output(dtype, hidden, dx_scale),
        dgamma: Tolerance::for_output(dtype, rows.max(hidden), dgamma_scale),
        dbeta: Tolerance::for_output(dtype, rows, dbeta_scale),
    }
}
