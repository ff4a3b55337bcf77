//! LayerNorm benchmark: forward, fused residual forward and backward on tensors well above L2,
//! in GB/s and as a share of the measured copy bandwidth.
//!
//! Bytes counted (the fewest any implementation must move): forward reads x and writes y
//! (+ γ, β, and the f32 mean/rstd); the fused form also reads the residual and writes the sum;
//! backward reads x and dy and writes dx (+ γ, mean/rstd, dγ, dβ).

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::layernorm::{self as ln, Tuning};
use serde::Serialize;
use std::sync::Arc;

/// One benchmark row; the JSON of `cuattn bench layernorm --json` is a list of these.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub op: &'static str,
    pub dtype: DType,
    pub rows: usize,
    pub hidden: usize,
    pub eps: f32,
    pub bytes: u64,
    pub time_us: f64,
    pub gbs: f64,
    pub pct_copy: f64,
}

/// The headline shapes: every tensor 256 MiB (above any GPU's L2), at the hidden sizes of
/// common models (BERT-base, GPT-2 XL, 7B, 70B-class) plus the largest we accept.
pub fn shapes(dtype: DType, quick: bool) -> Vec<(usize, usize)> {
    let tensor_bytes = if quick { 16 << 20 } else { 256 << 20 };
    let hiddens: &[usize] = if quick {
        &[768, 4096]
    } else {
        &[768, 1600, 4096, 8192, 16384, 65536]
    };
    hiddens
        .iter()
        .map(|&h| (tensor_bytes / (h * dtype.size_bytes()), h))
        .collect()
}

pub fn forward_bytes(dtype: DType, rows: usize, hidden: usize, fused: bool) -> u64 {
    let t = (rows * hidden * dtype.size_bytes()) as u64;
    let params = 2 * (hidden * dtype.size_bytes()) as u64;
    let stats = 2 * 4 * rows as u64;
    if fused {
        4 * t + params + stats
    } else {
        2 * t + params + stats
    }
}

pub fn backward_bytes(dtype: DType, rows: usize, hidden: usize) -> u64 {
    let t = (rows * hidden * dtype.size_bytes()) as u64;
    3 * t + 3 * (hidden * dtype.size_bytes()) as u64 + 2 * 4 * rows as u64
}

/// Runs every (dtype, shape, op) and returns the rows.
pub fn run(gpu: &Arc<Gpu>, dtypes: &[DType], quick: bool, copy_gbs: f64) -> Result<Vec<Row>> {
    let eps = 1e-5f32;
    let (warmup, iters) = if quick { (2, 5) } else { (5, 25) };
    let mut out = Vec::new();
    for &dt in dtypes {
        for (rows, hidden) in shapes(dt, quick) {
            let shape = [rows, hidden];
            let x = gpu.random(dt, &shape, 1, 0.3, 2.0)?;
            let res = gpu.random(dt, &shape, 2, 0.0, 1.0)?;
            let dy = gpu.random(dt, &shape, 3, 0.0, 1.0)?;
            let gamma = gpu.random(dt, &[hidden], 4, 1.0, 0.5)?;
            let beta = gpu.random(dt, &[hidden], 5, 0.0, 1.0)?;
            let mut y = gpu.full(dt, &shape, 0.0)?;
            let mut s = gpu.full(dt, &shape, 0.0)?;
            let mut dx = gpu.full(dt, &shape, 0.0)?;
            let mut mean = gpu.full(DType::F32, &[rows], 0.0)?;
            let mut rstd = gpu.full(DType::F32, &[rows], 0.0)?;
            let mut dgamma = gpu.full(dt, &[hidden], 0.0)?;
            let mut dbeta = gpu.full(dt, &[hidden], 0.0)?;
            let (xv, rv, dyv, gv, bv) =
                (x.view(), res.view(), dy.view(), gamma.view(), beta.view());
            let mut push = |op: &'static str, bytes: u64, us: f64| {
                let gbs = bytes as f64 / (us * 1e-6) / 1e9;
                out.push(Row {
                    op,
                    dtype: dt,
                    rows,
                    hidden,
                    eps,
                    bytes,
                    time_us: us,
                    gbs,
                    pct_copy: 100.0 * gbs / copy_gbs,
                });
            };

            let us = super::time_us(gpu, warmup, iters, || {
                ln::forward_into(
                    gpu,
                    &xv,
                    Some(&gv),
                    Some(&bv),
                    eps,
                    &mut y.view_mut(),
                    Some(&mut mean.view_mut()),
                    Some(&mut rstd.view_mut()),
                    Tuning::default(),
                )
            })?;
            push("forward", forward_bytes(dt, rows, hidden, false), us);

            let us = super::time_us(gpu, warmup, iters, || {
                ln::add_forward_into(
                    gpu,
                    &xv,
                    &rv,
                    Some(&gv),
                    Some(&bv),
                    eps,
                    &mut s.view_mut(),
                    &mut y.view_mut(),
                    Some(&mut mean.view_mut()),
                    Some(&mut rstd.view_mut()),
                    Tuning::default(),
                )
            })?;
            push(
                "residual_forward",
                forward_bytes(dt, rows, hidden, true),
                us,
            );

            // Fresh statistics of x for the backward.
            ln::forward_into(
                gpu,
                &xv,
                Some(&gv),
                Some(&bv),
                eps,
                &mut y.view_mut(),
                Some(&mut mean.view_mut()),
                Some(&mut rstd.view_mut()),
                Tuning::default(),
            )?;
            let (mv, sv) = (mean.view(), rstd.view());
            let us = super::time_us(gpu, warmup, iters, || {
                ln::backward_into(
                    gpu,
                    &dyv,
                    &xv,
                    Some(&gv),
                    &mv,
                    &sv,
                    &mut dx.view_mut(),
                    Some(&mut dgamma.view_mut()),
                    Some(&mut dbeta.view_mut()),
                    None,
                    Tuning::default(),
                )
            })?;
            push("backward", backward_bytes(dt, rows, hidden), us);
        }
    }
    Ok(out)
}

/// One row of the launch-path sweep: the same op and shape under one forced [`Tuning`].
#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    pub op: &'static str,
    pub variant: &'static str,
    pub dtype: DType,
    pub rows: usize,
    pub hidden: usize,
    pub time_us: f64,
    pub pct_copy: f64,
}

/// The launch variants the sweep compares (the default is the planner's choice).
pub fn sweep_variants() -> Vec<(&'static str, Tuning)> {
    let regs = |p| Tuning {
        registers: Some(true),
        packs_per_thread: Some(p),
        ..Tuning::default()
    };
    let generic = |cache| Tuning {
        registers: Some(false),
        smem_cache: Some(cache),
        ..Tuning::default()
    };
    vec![
        ("default", Tuning::default()),
        ("regs-p1", regs(1)),
        ("regs-p2", regs(2)),
        ("regs-p4", regs(4)),
        ("generic", generic(true)),
        ("generic-nocache", generic(false)),
    ]
}

/// Times forward and backward of every headline shape under every variant, to choose the
/// planner's defaults from measurements.
pub fn sweep(gpu: &Arc<Gpu>, dtypes: &[DType], copy_gbs: f64) -> Result<Vec<SweepRow>> {
    let eps = 1e-5f32;
    let mut out = Vec::new();
    for &dt in dtypes {
        for (rows, hidden) in shapes(dt, false) {
            let shape = [rows, hidden];
            let x = gpu.random(dt, &shape, 1, 0.3, 2.0)?;
            let dy = gpu.random(dt, &shape, 3, 0.0, 1.0)?;
            let gamma = gpu.random(dt, &[hidden], 4, 1.0, 0.5)?;
            let beta = gpu.random(dt, &[hidden], 5, 0.0, 1.0)?;
            let mut y = gpu.full(dt, &shape, 0.0)?;
            let mut dx = gpu.full(dt, &shape, 0.0)?;
            let mut dgamma = gpu.full(dt, &[hidden], 0.0)?;
            let mut dbeta = gpu.full(dt, &[hidden], 0.0)?;
            let fwd = ln::forward(&x, Some(&gamma), Some(&beta), eps)?;
            let (xv, dyv, gv, bv) = (x.view(), dy.view(), gamma.view(), beta.view());
            let (mv, sv) = (fwd.mean.view(), fwd.rstd.view());
            for (variant, tuning) in sweep_variants() {
                let us = super::time_us(gpu, 3, 15, || {
                    ln::forward_into(
                        gpu,
                        &xv,
                        Some(&gv),
                        Some(&bv),
                        eps,
                        &mut y.view_mut(),
                        None,
                        None,
                        tuning,
                    )
                })?;
                let gbs = forward_bytes(dt, rows, hidden, false) as f64 / (us * 1e-6) / 1e9;
                out.push(SweepRow {
                    op: "forward",
                    variant,
                    dtype: dt,
                    rows,
                    hidden,
                    time_us: us,
                    pct_copy: 100.0 * gbs / copy_gbs,
                });
                let us = super::time_us(gpu, 3, 15, || {
                    ln::backward_into(
                        gpu,
                        &dyv,
                        &xv,
                        Some(&gv),
                        &mv,
                        &sv,
                        &mut dx.view_mut(),
                        Some(&mut dgamma.view_mut()),
                        Some(&mut dbeta.view_mut()),
                        None,
                        tuning,
                    )
                })?;
                let gbs = backward_bytes(dt, rows, hidden) as f64 / (us * 1e-6) / 1e9;
                out.push(SweepRow {
                    op: "backward",
                    variant,
                    dtype: dt,
                    rows,
                    hidden,
                    time_us: us,
                    pct_copy: 100.0 * gbs / copy_gbs,
                });
            }
        }
    }
    Ok(out)
}
