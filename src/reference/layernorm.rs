//! LayerNorm over the last dimension, in f64.
//!
//! For a row x of length n: mean = Σx/n, var = Σ(x−mean)²/n (biased, as PyTorch),
//! rstd = 1/√(var+eps), x̂ = (x−mean)·rstd, y = x̂·γ + β. γ = 1 and β = 0 where absent.
//!
//! Backward, with g = dy·γ: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)), dγ = Σ_rows dy·x̂,
//! dβ = Σ_rows dy.
//!
//! Inputs are f32 slices holding values already rounded to the kernel's input dtype, so the
//! reference sees exactly what the kernel reads. Rows are contiguous: `x.len() = rows·hidden`.

use crate::dtype::DType;
use crate::error::{Error, Result};

/// `x` must be whole rows of `hidden` (> 0) values and γ/β `hidden` values each.
fn check_rows(x: &[f32], hidden: usize, params: [(&'static str, Option<&[f32]>); 2]) -> Result<()> {
    if hidden == 0 || !x.len().is_multiple_of(hidden) {
        return Err(Error::shape(
            "x",
            format!("whole rows of hidden = {hidden} values"),
            &[x.len()],
        ));
    }
    for (arg, p) in params {
        if let Some(p) = p {
            if p.len() != hidden {
                return Err(Error::shape(arg, format!("{hidden} values"), &[p.len()]));
            }
        }
    }
    Ok(())
}

/// Forward outputs: y (rows·hidden), and per-row mean and rstd.
#[derive(Clone, Debug)]
pub struct ForwardOutput {
    pub y: Vec<f64>,
    pub mean: Vec<f64>,
    pub rstd: Vec<f64>,
}

/// Backward outputs: dx (rows·hidden), dγ and dβ (hidden each).
#[derive(Clone, Debug)]
pub struct BackwardOutput {
    pub dx: Vec<f64>,
    pub dgamma: Vec<f64>,
    pub dbeta: Vec<f64>,
}

/// Row statistics (mean, rstd) of one row, two-pass in f64.
pub fn row_stats(row: &[f32], eps: f32) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

/// LayerNorm forward of `x` viewed as rows of `hidden` elements. Slices that disagree in
/// length are an [`Error`].
pub fn forward(
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) -> Result<ForwardOutput> {
    check_rows(x, hidden, [("gamma", gamma), ("beta", beta)])?;
    let rows = x.len() / hidden;
    let mut out = ForwardOutput {
        y: Vec::with_capacity(x.len()),
        mean: Vec::with_capacity(rows),
        rstd: Vec::with_capacity(rows),
    };
    for row in x.chunks_exact(hidden) {
        let (mean, rstd) = row_stats(row, eps);
        for (j, &v) in row.iter().enumerate() {
            let g = gamma.map_or(1.0, |g| g[j] as f64);
            let b = beta.map_or(0.0, |b| b[j] as f64);
            out.y.push((v as f64 - mean) * rstd * g + b);
        }
        out.mean.push(mean);
        out.rstd.push(rstd);
    }
    Ok(out)
}

/// The residual stream a fused residual-add LayerNorm writes: x + residual added in f32 and
/// stored in `dtype`. The fused kernel normalises this stored value, so the reference for its
/// LayerNorm output is `forward(&residual_add(..), ..)`.
pub fn residual_add(x: &[f32], residual: &[f32], dtype: DType) -> Result<Vec<f32>> {
    if x.len() != residual.len() {
        return Err(Error::shape(
            "residual",
            format!("{} values (as x)", x.len()),
            &[residual.len()],
        ));
    }
    Ok(x.iter()
        .zip(residual)
        .map(|(&a, &b)| dtype.round(a + b))
        .collect())
}

/// LayerNorm backward: gradients of Σ dy·y with respect to x, γ and β. Row statistics are
/// recomputed from x in f64.
pub fn backward(
    dy: &[f32],
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    eps: f32,
) -> Result<BackwardOutput> {
    check_rows(x, hidden, [("gamma", gamma), ("beta", None)])?;
    if dy.len() != x.len() {
        return Err(Error::shape(
            "dy",
            format!("{} values (as x)", x.len()),
            &[dy.len()],
        ));
    }
    let n = hidden as f64;
    let mut out = BackwardOutput {
        dx: Vec::with_capacity(x.len()),
        dgamma: vec![0.0; hidden],
        dbeta: vec![0.0; hidden],
    };
    let mut xhat = vec![0.0f64; hidden];
    let mut g = vec![0.0f64; hidden];
    for (xr, dyr) in x.chunks_exact(hidden).zip(dy.chunks_exact(hidden)) {
        let (mean, rstd) = row_stats(xr, eps);
        let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
        for j in 0..hidden {
            xhat[j] = (xr[j] as f64 - mean) * rstd;
            g[j] = dyr[j] as f64 * gamma.map_or(1.0, |gm| gm[j] as f64);
            sum_g += g[j];
            sum_gx += g[j] * xhat[j];
            out.dgamma[j] += dyr[j] as f64 * xhat[j];
            out.dbeta[j] += dyr[j] as f64;
        }
        let (mean_g, mean_gx) = (sum_g / n, sum_gx / n);
        for j in 0..hidden {
            out.dx.push(rstd * (g[j] - mean_g - xhat[j] * mean_gx));
        }
    }
    Ok(out)
}
