//! LayerNorm benchmark: forward, fused residual forward and backward on tensors well above L2,
//! in GB/s and as a share of the measured copy bandwidth.
//!
//! Bytes counted (the fewest any implementation must move): forward reads x and writes y
//! (+ γ, β, and the f32 mean/rstd); the fused form also reads the residual and writes the sum;
//! backward reads x and dy and writes dx (+ γ, mean/rstd, dγ, dβ).

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::{DeviceTensor, Gpu};
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

/// The tensors of one benchmark shape (inputs random, never zeros), and one launch per op.
pub struct Workload {
    pub dtype: DType,
    pub rows: usize,
    pub hidden: usize,
    pub eps: f32,
    x: DeviceTensor,
    residual: DeviceTensor,
    dy: DeviceTensor,
    gamma: DeviceTensor,
    beta: DeviceTensor,
    y: DeviceTensor,
    residual_out: DeviceTensor,
    dx: DeviceTensor,
    mean: DeviceTensor,
    rstd: DeviceTensor,
    dgamma: DeviceTensor,
    dbeta: DeviceTensor,
}

impl Workload {
    /// Allocates the tensors and runs one forward, so `mean`/`rstd` hold x's statistics.
    pub fn new(gpu: &Arc<Gpu>, dtype: DType, rows: usize, hidden: usize) -> Result<Self> {
        let shape = [rows, hidden];
        let mut w = Workload {
            dtype,
            rows,
            hidden,
            eps: 1e-5,
            x: gpu.random(dtype, &shape, 1, 0.3, 2.0)?,
            residual: gpu.random(dtype, &shape, 2, 0.0, 1.0)?,
            dy: gpu.random(dtype, &shape, 3, 0.0, 1.0)?,
            gamma: gpu.random(dtype, &[hidden], 4, 1.0, 0.5)?,
            beta: gpu.random(dtype, &[hidden], 5, 0.0, 1.0)?,
            y: gpu.full(dtype, &shape, 0.0)?,
            residual_out: gpu.full(dtype, &shape, 0.0)?,
            dx: gpu.full(dtype, &shape, 0.0)?,
            mean: gpu.full(DType::F32, &[rows], 0.0)?,
            rstd: gpu.full(DType::F32, &[rows], 0.0)?,
            dgamma: gpu.full(dtype, &[hidden], 0.0)?,
            dbeta: gpu.full(dtype, &[hidden], 0.0)?,
        };
        w.forward(gpu, Tuning::default())?;
        Ok(w)
    }

    /// y, mean, rstd = LayerNorm(x).
    pub fn forward(&mut self, gpu: &Gpu, tuning: Tuning) -> Result<()> {
        let (x, g, b) = (self.x.view(), self.gamma.view(), self.beta.view());
        let (mut y, mut m, mut r) = (
            self.y.view_mut(),
            self.mean.view_mut(),
            self.rstd.view_mut(),
        );
        ln::forward_into(
            gpu,
            &x,
            Some(&g),
            Some(&b),
            self.eps,
            &mut y,
            Some(&mut m),
            Some(&mut r),
            tuning,
        )
    }

    /// residual_out = x + residual; y, mean, rstd = LayerNorm(residual_out).
    pub fn residual_forward(&mut self, gpu: &Gpu, tuning: Tuning) -> Result<()> {
        let (x, res, g, b) = (
            self.x.view(),
            self.residual.view(),
            self.gamma.view(),
            self.beta.view(),
        );
        let (mut s, mut y) = (self.residual_out.view_mut(), self.y.view_mut());
        let (mut m, mut r) = (self.mean.view_mut(), self.rstd.view_mut());
        ln::add_forward_into(
            gpu,
            &x,
            &res,
            Some(&g),
            Some(&b),
            self.eps,
            &mut s,
            &mut y,
            Some(&mut m),
            Some(&mut r),
            tuning,
        )
    }

    /// dx, dγ, dβ from dy and x's statistics (left in mean/rstd by `new`; a residual forward in
    /// between would change them).
    pub fn backward(&mut self, gpu: &Gpu, tuning: Tuning) -> Result<()> {
        let (dy, x, g) = (self.dy.view(), self.x.view(), self.gamma.view());
        let (m, r) = (self.mean.view(), self.rstd.view());
        let (mut dx, mut dg, mut db) = (
            self.dx.view_mut(),
            self.dgamma.view_mut(),
            self.dbeta.view_mut(),
        );
        ln::backward_into(
            gpu,
            &dy,
            &x,
            Some(&g),
            &m,
            &r,
            &mut dx,
            Some(&mut dg),
            Some(&mut db),
            None,
            tuning,
        )
    }
}

/// Runs every (dtype, shape, op) and returns the rows.
pub fn run(gpu: &Arc<Gpu>, dtypes: &[DType], quick: bool, copy_gbs: f64) -> Result<Vec<Row>> {
    let (warmup, iters) = if quick { (2, 5) } else { (5, 25) };
    let mut out = Vec::new();
    for &dt in dtypes {
        for (rows, hidden) in shapes(dt, quick) {
            let mut w = Workload::new(gpu, dt, rows, hidden)?;
            let eps = w.eps;
            let row = |op, bytes: u64, us: f64| {
                let gbs = bytes as f64 / (us * 1e-6) / 1e9;
                let pct_copy = 100.0 * gbs / copy_gbs;
                Row {
                    op,
                    dtype: dt,
                    rows,
                    hidden,
                    eps,
                    bytes,
                    time_us: us,
                    gbs,
                    pct_copy,
                }
            };
            let tuning = Tuning::default();
            let fwd = super::time_us(gpu, warmup, iters, || w.forward(gpu, tuning))?;
            let bwd = super::time_us(gpu, warmup, iters, || w.backward(gpu, tuning))?;
            let fused = super::time_us(gpu, warmup, iters, || w.residual_forward(gpu, tuning))?;
            out.push(row("forward", forward_bytes(dt, rows, hidden, false), fwd));
            out.push(row(
                "residual_forward",
                forward_bytes(dt, rows, hidden, true),
                fused,
            ));
            out.push(row("backward", backward_bytes(dt, rows, hidden), bwd));
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
    let mut out = Vec::new();
    for &dt in dtypes {
        for (rows, hidden) in shapes(dt, false) {
            let mut w = Workload::new(gpu, dt, rows, hidden)?;
            for (variant, tuning) in sweep_variants() {
                let fwd = super::time_us(gpu, 3, 15, || w.forward(gpu, tuning))?;
                let bwd = super::time_us(gpu, 3, 15, || w.backward(gpu, tuning))?;
                for (op, bytes, us) in [
                    ("forward", forward_bytes(dt, rows, hidden, false), fwd),
                    ("backward", backward_bytes(dt, rows, hidden), bwd),
                ] {
                    let gbs = bytes as f64 / (us * 1e-6) / 1e9;
                    out.push(SweepRow {
                        op,
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
    }
    Ok(out)
}
