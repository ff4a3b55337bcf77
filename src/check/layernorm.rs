//! LayerNorm forward, fused residual forward and backward against
//! [`crate::reference::layernorm`].
//!
//! Tolerances: [`crate::tolerance::layernorm`].

use super::{expect_close, random_values, read_vec, upload_vec, CheckResult, Placement, RowTensor};
use crate::dtype::DType;
use crate::gpu::Gpu;
use crate::ops::layernorm::{self as ln, Tuning};
use crate::reference::layernorm as reference;
use crate::tolerance::layernorm as tolerances;
use rand::SeedableRng;
use std::sync::Arc;

/// One randomized LayerNorm check.
#[derive(Clone, Debug)]
pub struct Case {
    pub dtype: DType,
    pub rows: usize,
    pub hidden: usize,
    pub gamma: bool,
    pub beta: bool,
    pub eps: f32,
    /// Placement of the inputs (x, residual, dy).
    pub in_at: Placement,
    /// Placement of the row outputs (y, residual_out, dx).
    pub out_at: Placement,
    pub tuning: Tuning,
    /// x is drawn uniformly from center ± spread.
    pub center: f32,
    pub spread: f32,
    pub seed: u64,
}

impl Case {
    /// Dense rows, γ and β present, moderately conditioned values.
    pub fn plain(dtype: DType, rows: usize, hidden: usize) -> Case {
        Case {
            dtype,
            rows,
            hidden,
            gamma: true,
            beta: true,
            eps: 1e-5,
            in_at: Placement::DENSE,
            out_at: Placement::DENSE,
            tuning: Tuning::default(),
            center: 0.5,
            spread: 2.0,
            seed: 0x1234_5678 ^ (rows * 31 + hidden) as u64,
        }
    }
}

/// The inputs of a case, rounded to its dtype.
pub struct Inputs {
    pub x: Vec<f32>,
    pub residual: Vec<f32>,
    pub gamma: Option<Vec<f32>>,
    pub beta: Option<Vec<f32>>,
    pub dy: Vec<f32>,
}

pub fn inputs(c: &Case) -> Inputs {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(c.seed);
    let n = c.rows * c.hidden;
    Inputs {
        x: random_values(&mut rng, c.dtype, n, c.center, c.spread),
        residual: random_values(&mut rng, c.dtype, n, 0.0, c.spread),
        gamma: c
            .gamma
            .then(|| random_values(&mut rng, c.dtype, c.hidden, 1.0, 0.5)),
        beta: c
            .beta
            .then(|| random_values(&mut rng, c.dtype, c.hidden, 0.0, 1.0)),
        dy: random_values(&mut rng, c.dtype, n, 0.0, 1.0),
    }
}

/// Runs the forward (fused with a residual add when `fused`) and checks y, mean, rstd and,
/// fused, residual_out (bitwise). Returns the GPU's mean and rstd.
pub fn forward(gpu: &Arc<Gpu>, c: &Case, fused: bool) -> CheckResult<(Vec<f32>, Vec<f32>)> {
    let inp = inputs(c);
    let (rows, hidden, dt) = (c.rows, c.hidden, c.dtype);
    let e = |e: crate::Error| format!("{c:?}: {e}");
    let x = RowTensor::upload(gpu, dt, c.in_at, rows, hidden, &inp.x)?;
    let res = RowTensor::upload(gpu, dt, c.in_at, rows, hidden, &inp.residual)?;
    let gamma = upload_vec(gpu, dt, inp.gamma.as_deref())?;
    let beta = upload_vec(gpu, dt, inp.beta.as_deref())?;
    let mut y = RowTensor::poisoned(gpu, dt, c.out_at, rows, hidden)?;
    let mut s_out = RowTensor::poisoned(gpu, dt, c.out_at, rows, hidden)?;
    let mut mean = gpu.full(DType::F32, &[rows], f32::NAN).map_err(e)?;
    let mut rstd = gpu.full(DType::F32, &[rows], f32::NAN).map_err(e)?;
    let (gv, bv) = (
        gamma.as_ref().map(|t| t.view()),
        beta.as_ref().map(|t| t.view()),
    );
    let (mut mv, mut rv) = (mean.view_mut(), rstd.view_mut());
    let launched = if fused {
        let (xv, resv) = (x.view(), res.view());
        ln::add_forward_into(
            gpu,
            &xv,
            &resv,
            gv.as_ref(),
            bv.as_ref(),
            c.eps,
            &mut s_out.view_mut(),
            &mut y.view_mut(),
            Some(&mut mv),
            Some(&mut rv),
            c.tuning,
        )
    } else {
        ln::forward_into(
            gpu,
            &x.view(),
            gv.as_ref(),
            bv.as_ref(),
            c.eps,
            &mut y.view_mut(),
            Some(&mut mv),
            Some(&mut rv),
            c.tuning,
        )
    };
    launched.map_err(e)?;

    let s = if fused {
        reference::residual_add(&inp.x, &inp.residual, dt).map_err(|e| e.to_string())?
    } else {
        inp.x.clone()
    };
    let want = reference::forward(&s, hidden, inp.gamma.as_deref(), inp.beta.as_deref(), c.eps)
        .map_err(|e| e.to_string())?;
    let ctx = |what: &str| format!("{what} for {c:?} (fused: {fused})");
    let y_out = y.read("y")?;
    if fused {
        let got = s_out.read("residual_out")?;
        // x + residual added in f32 and rounded once: bitwise what the reference computes.
        if let Some(i) = (0..s.len()).find(|&i| got[i].to_bits() != s[i].to_bits()) {
            return Err(format!(
                "{}: element {i} is {} not {}",
                ctx("residual_out"),
                got[i],
                s[i]
            ));
        }
    }
    let tol = tolerances::forward(
        dt,
        &s,
        hidden,
        inp.gamma.as_deref(),
        inp.beta.as_deref(),
        &want,
    );
    expect_close(&ctx("y"), &y_out, &want.y, tol.y)?;
    let mean_out = read_vec(&mean)?;
    expect_close(&ctx("mean"), &mean_out, &want.mean, tol.mean)?;
    let rstd_out = read_vec(&rstd)?;
    expect_close(&ctx("rstd"), &rstd_out, &want.rstd, tol.rstd)?;
    Ok((mean_out, rstd_out))
}

/// Runs the forward, then the backward on its statistics, and checks dx, dγ, dβ.
pub fn backward(gpu: &Arc<Gpu>, c: &Case) -> CheckResult {
    let (mean_f32, rstd_f32) = forward(gpu, c, false)?;
    let inp = inputs(c);
    let (rows, hidden, dt) = (c.rows, c.hidden, c.dtype);
    let e = |e: crate::Error| format!("{c:?}: {e}");
    let x = RowTensor::upload(gpu, dt, c.in_at, rows, hidden, &inp.x)?;
    let dy = RowTensor::upload(gpu, dt, c.in_at, rows, hidden, &inp.dy)?;
    let gamma = upload_vec(gpu, dt, inp.gamma.as_deref())?;
    let mean = upload_vec(gpu, DType::F32, Some(&mean_f32))?.expect("some");
    let rstd = upload_vec(gpu, DType::F32, Some(&rstd_f32))?.expect("some");
    let mut dx = RowTensor::poisoned(gpu, dt, c.out_at, rows, hidden)?;
    let mut dgamma = gpu.full(dt, &[hidden], f32::NAN).map_err(e)?;
    let mut dbeta = gpu.full(dt, &[hidden], f32::NAN).map_err(e)?;
    let gv = gamma.as_ref().map(|t| t.view());
    ln::backward_into(
        gpu,
        &dy.view(),
        &x.view(),
        gv.as_ref(),
        &mean.view(),
        &rstd.view(),
        &mut dx.view_mut(),
        Some(&mut dgamma.view_mut()),
        Some(&mut dbeta.view_mut()),
        None,
        c.tuning,
    )
    .map_err(e)?;

    let want = reference::backward(&inp.dy, &inp.x, hidden, inp.gamma.as_deref(), c.eps)
        .map_err(|e| e.to_string())?;
    let tol = tolerances::backward(dt, &inp.dy, &inp.x, hidden, inp.gamma.as_deref(), c.eps);
    let ctx = |what: &str| format!("{what} for {c:?}");
    expect_close(&ctx("dx"), &dx.read("dx")?, &want.dx, tol.dx)?;
    expect_close(
        &ctx("dgamma"),
        &read_vec(&dgamma)?,
        &want.dgamma,
        tol.dgamma,
    )?;
    expect_close(&ctx("dbeta"), &read_vec(&dbeta)?, &want.dbeta, tol.dbeta)?;
    Ok(())
}

/// The fixed list `cuattn check` runs: every dtype at the sizes users hit, dense and strided.
pub fn standard_cases() -> Vec<(String, Case)> {
    let mut out = Vec::new();
    for dt in DType::ALL {
        for (rows, hidden) in [
            (37, 1),
            (64, 768),
            (65, 1600),
            (33, 4097),
            (9, 16384),
            (3, 65536),
        ] {
            out.push((
                format!("{dt} {rows}x{hidden}"),
                Case::plain(dt, rows, hidden),
            ));
        }
        let strided = Case {
            in_at: Placement {
                row_pad: 9,
                offset: 1,
            },
            out_at: Placement {
                row_pad: 8,
                offset: 0,
            },
            ..Case::plain(dt, 50, 1024)
        };
        out.push((format!("{dt} 50x1024 strided+misaligned"), strided));
    }
    out
}
