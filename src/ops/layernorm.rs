//! LayerNorm on the GPU: forward, fused residual-add forward, and backward
//! (`kernels/layernorm.cu`). The CPU reference is [`crate::reference::layernorm`].
//!
//! The `*_into` functions write into views the caller owns (for embedding in other runtimes);
//! the others allocate their outputs. All of them validate every argument before a launch.

use super::launch;
use super::validate::{self, Rows};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, LoadedKernel, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_layernorm_bwd_columns_params, cuattn_layernorm_bwd_params,
    cuattn_layernorm_bwd_reduce_params, cuattn_layernorm_fwd_params, CUATTN_LAYERNORM_MAX_HIDDEN,
    CUATTN_LN_PARTIALS_GLOBAL, CUATTN_LN_PARTIALS_NONE, CUATTN_LN_PARTIALS_REGISTERS,
    CUATTN_LN_PARTIALS_SHARED,
};
use std::sync::Arc;

const MODULE: &str = "layernorm";
/// Largest hidden size accepted.
pub const MAX_HIDDEN: usize = CUATTN_LAYERNORM_MAX_HIDDEN as usize;
/// Threads of a block in the backward reduction kernel.
const REDUCE_THREADS: u32 = 256;

/// Choices the launch makes that do not change the result's meaning; tests force each path.
/// `None` everywhere (the default) lets the planner decide by size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Keep each thread's share of a row in registers when the row is narrow enough.
    /// `None`: the planner's measured choice (f32 forward and every backward); `Some(true)`:
    /// whenever the row fits; `Some(false)`: always the generic loop path.
    pub registers: Option<bool>,
    /// Generic path: keep rows in shared memory between passes where they fit
    /// (`Some(false)`: re-read them from global memory).
    pub smem_cache: Option<bool>,
    /// Generic backward path: where the dγ/dβ partial sums are formed.
    pub param_grads: Option<ParamGrads>,
    /// Register paths: packs per thread to aim for (1, 2 or 4 forward; 1 or 2 backward);
    /// fewer means more threads per row.
    pub packs_per_thread: Option<usize>,
}

/// How the generic backward path forms dγ/dβ partial sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamGrads {
    /// Per block, in shared memory (needs 8·hidden bytes).
    Shared,
    /// Per block, read-modify-write in the block's slice of the workspace.
    Global,
    /// A separate column kernel re-reads x and dy (any hidden size).
    Columns,
}

/// Outputs of the forward.
#[derive(Debug)]
pub struct ForwardOutput {
    pub y: DeviceTensor,
    /// Per-row mean, f32, shape = x's shape without its last dim.
    pub mean: DeviceTensor,
    /// Per-row 1/√(var+eps), f32, same shape as `mean`.
    pub rstd: DeviceTensor,
}

/// Gradients from the backward.
#[derive(Debug)]
pub struct Gradients {
    pub dx: DeviceTensor,
    /// Present when γ was given.
    pub dgamma: Option<DeviceTensor>,
    pub dbeta: DeviceTensor,
}

/// Every kernel of the module, by stage, for [f32, f16, bf16].
const KERNELS: &[(&str, [&str; 3])] = &[
    (
        "fwd",
        [
            "layernorm_fwd_f32",
            "layernorm_fwd_f16",
            "layernorm_fwd_bf16",
        ],
    ),
    (
        "fwd_regs1",
        [
            "layernorm_fwd_regs1_f32",
            "layernorm_fwd_regs1_f16",
            "layernorm_fwd_regs1_bf16",
        ],
    ),
    (
        "fwd_regs2",
        [
            "layernorm_fwd_regs2_f32",
            "layernorm_fwd_regs2_f16",
            "layernorm_fwd_regs2_bf16",
        ],
    ),
    (
        "fwd_regs4",
        [
            "layernorm_fwd_regs4_f32",
            "layernorm_fwd_regs4_f16",
            "layernorm_fwd_regs4_bf16",
        ],
    ),
    (
        "bwd",
        [
            "layernorm_bwd_f32",
            "layernorm_bwd_f16",
            "layernorm_bwd_bf16",
        ],
    ),
    (
        "bwd_regs1",
        [
            "layernorm_bwd_regs1_f32",
            "layernorm_bwd_regs1_f16",
            "layernorm_bwd_regs1_bf16",
        ],
    ),
    (
        "bwd_regs2",
        [
            "layernorm_bwd_regs2_f32",
            "layernorm_bwd_regs2_f16",
            "layernorm_bwd_regs2_bf16",
        ],
    ),
    (
        "bwd_columns",
        [
            "layernorm_bwd_columns_f32",
            "layernorm_bwd_columns_f16",
            "layernorm_bwd_columns_bf16",
        ],
    ),
    (
        "reduce",
        [
            "layernorm_bwd_reduce_f32",
            "layernorm_bwd_reduce_f16",
            "layernorm_bwd_reduce_bf16",
        ],
    ),
];

fn kernel_name(stage: &str, dtype: DType) -> &'static str {
    let names = KERNELS
        .iter()
        .find(|(s, _)| *s == stage)
        .unwrap_or_else(|| unreachable!("unknown layernorm stage {stage}"))
        .1;
    match dtype {
        DType::F32 => names[0],
        DType::F16 => names[1],
        DType::BF16 => names[2],
    }
}

/// Most threads a register-path block may have (the kernels' `__launch_bounds__`).
const REGS_MAX_THREADS: usize = 512;
/// Most packs per thread on the register paths: forward, backward (whose dγ/dβ partials live
/// in registers too).
const FWD_REGS_MAX_PACKS: usize = 4;
const BWD_REGS_MAX_PACKS: usize = 2;
/// Packs per thread the planner aims for by default (see `cuattn bench layernorm --sweep`).
const FWD_PACKS_TARGET: usize = 4;
const BWD_PACKS_TARGET: usize = 2;
/// Generic backward: widest row whose partials go to shared memory by default.
const SHARED_PARTIALS_MAX_HIDDEN: usize = 2048;
/// Column kernel tile: 32 packs wide, 8 threads down (`layernorm_bwd_columns`).
const COLUMN_TILE_PACKS: usize = 32;
const COLUMN_THREADS_Y: u32 = 8;

/// A row group of `tpr` threads with `packs` packs each, for a row of `units` packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RowSplit {
    tpr: u32,
    packs: usize,
    rows_per_block: u32,
}

/// Splits a row of `units` packs over a power-of-two group of 32..=`max_tpr` threads with
/// about `target_packs` packs each; `rows_per_block` fills a block of about 256 threads.
fn split_row(units: usize, target_packs: usize, max_tpr: usize) -> RowSplit {
    let tpr = units
        .div_ceil(target_packs)
        .next_power_of_two()
        .clamp(32, max_tpr);
    let packs = units.div_ceil(tpr).next_power_of_two();
    RowSplit {
        tpr: tpr as u32,
        packs,
        rows_per_block: (256 / tpr as u32).max(1),
    }
}

fn check_eps(eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            "eps",
            format!("must be finite and ≥ 0, got {eps}"),
        ));
    }
    Ok(())
}

/// Checks γ or β: same dtype as x, `hidden` contiguous elements.
fn check_param(
    v: Option<&TensorRef>,
    arg: &'static str,
    dtype: DType,
    hidden: usize,
) -> Result<u64> {
    let Some(v) = v else { return Ok(0) };
    let info = v.info(arg);
    validate::dtype(&info, dtype)?;
    validate::vector(&info, hidden, "one per hidden element")?;
    Ok(v.ptr)
}

/// Checks a per-row statistic output: f32, `rows` contiguous elements.
fn check_stat(v: Option<&TensorMut>, arg: &'static str, rows: usize) -> Result<u64> {
    let Some(v) = v else { return Ok(0) };
    let info = v.info(arg);
    validate::dtype(&info, DType::F32)?;
    validate::vector(&info, rows, "one per row")?;
    Ok(v.ptr)
}

/// A row tensor with the same shape and dtype as `like`.
fn check_rows_like(like: &validate::ViewInfo, v: &validate::ViewInfo) -> Result<Rows> {
    validate::dtype(v, like.dtype)?;
    validate::same_shape(like, v)?;
    validate::rows(v)
}

struct ForwardViews<'v, 'a> {
    x: &'v TensorRef<'a>,
    residual: Option<(&'v TensorRef<'a>, &'v mut TensorMut<'a>)>,
    gamma: Option<&'v TensorRef<'a>>,
    beta: Option<&'v TensorRef<'a>>,
    y: &'v mut TensorMut<'a>,
    mean: Option<&'v mut TensorMut<'a>>,
    rstd: Option<&'v mut TensorMut<'a>>,
    eps: f32,
}

/// Forward arguments after validation: every pointer checked against its view's memory.
#[derive(Debug)]
struct CheckedForward {
    dtype: DType,
    x: Rows,
    y: Rows,
    residual: Option<(Rows, Rows)>,
    gamma: u64,
    beta: u64,
    mean: u64,
    rstd: u64,
    eps: f32,
    vectorized: bool,
}

fn check_forward(v: &ForwardViews) -> Result<CheckedForward> {
    let dtype = v.x.dtype;
    let x_info = v.x.info("x");
    if let Some(&hidden) = v.x.shape().last() {
        validate::size_in("x", "hidden size (last dim)", hidden, MAX_HIDDEN)?;
    }
    let x = validate::rows(&x_info)?;
    check_eps(v.eps)?;
    let y = check_rows_like(&x_info, &v.y.info("y"))?;
    let residual = match &v.residual {
        Some((r, ro)) => Some((
            check_rows_like(&x_info, &r.info("residual"))?,
            check_rows_like(&x_info, &ro.info("residual_out"))?,
        )),
        None => None,
    };
    let gamma = check_param(v.gamma, "gamma", dtype, x.cols)?;
    let beta = check_param(v.beta, "beta", dtype, x.cols)?;
    let mean = check_stat(v.mean.as_deref(), "mean", x.rows)?;
    let rstd = check_stat(v.rstd.as_deref(), "rstd", x.rows)?;
    let pack = 16 / dtype.size_bytes();
    let mut row_views = vec![x, y];
    if let Some((r, ro)) = residual {
        row_views.extend([r, ro]);
    }
    let vectorized = x.cols % pack == 0
        && row_views.iter().all(|r| r.rows_16b_aligned(dtype))
        && [gamma, beta].iter().all(|&p| p % 16 == 0);
    Ok(CheckedForward {
        dtype,
        x,
        y,
        residual,
        gamma,
        beta,
        mean,
        rstd,
        eps: v.eps,
        vectorized,
    })
}

fn forward_impl(gpu: &Gpu, v: ForwardViews, tuning: Tuning) -> Result<()> {
    let contexts = [
        Some(("x", v.x.ctx)),
        v.residual.as_ref().map(|r| ("residual", r.0.ctx)),
        v.residual.as_ref().map(|r| ("residual_out", r.1.ctx)),
        v.gamma.map(|t| ("gamma", t.ctx)),
        v.beta.map(|t| ("beta", t.ctx)),
        Some(("y", v.y.ctx)),
        v.mean.as_ref().map(|t| ("mean", t.ctx)),
        v.rstd.as_ref().map(|t| ("rstd", t.ctx)),
    ];
    gpu.check_contexts(contexts.into_iter().flatten())?;
    let c = check_forward(&v)?;
    let (dtype, x, y, vectorized) = (c.dtype, c.x, c.y, c.vectorized);
    let (res, res_out) = (c.residual.map(|r| r.0), c.residual.map(|r| r.1));
    let (gamma, beta, mean, rstd) = (c.gamma, c.beta, c.mean, c.rstd);
    let pack = 16 / dtype.size_bytes();
    let units = if vectorized { x.cols / pack } else { x.cols };
    let target = tuning
        .packs_per_thread
        .unwrap_or(FWD_PACKS_TARGET)
        .clamp(1, FWD_REGS_MAX_PACKS);
    let regs = split_row(units, target, REGS_MAX_THREADS);
    // Measured on an H200 (docs/gpu-runs, `cuattn bench layernorm --sweep`): the register path
    // wins for f32 rows (82% of copy bandwidth vs 65% at hidden 768), the generic path for
    // f16/bf16 rows (77% vs 64%), so 2-byte dtypes take it unless asked otherwise.
    let regs_by_default = dtype.size_bytes() == 4;
    let use_regs = tuning.registers.unwrap_or(regs_by_default) && regs.packs <= FWD_REGS_MAX_PACKS;
    let (split, stage) = if use_regs {
        (
            regs,
            ["fwd_regs1", "fwd_regs2", "fwd_regs4"][regs.packs.trailing_zeros() as usize],
        )
    } else {
        (split_row(units, 4, 1024), "fwd")
    };
    let (tpr, rows_per_block) = (split.tpr, split.rows_per_block);
    let threads = tpr * rows_per_block;
    let kernel = gpu.kernel(MODULE, kernel_name(stage, dtype))?;
    let cache_bytes = rows_per_block as usize * x.cols * dtype.size_bytes();
    let cache =
        !use_regs && tuning.smem_cache.unwrap_or(true) && cache_bytes <= kernel.max_dynamic_smem;
    let smem = if cache { cache_bytes } else { 0 };

    let groups = x.rows.div_ceil(rows_per_block as usize);
    let resident = gpu.blocks_per_sm(&kernel, threads, smem)?.max(1) * gpu.info().multiprocessors;
    let grid = groups.min(resident as usize) as u32;

    let p = cuattn_layernorm_fwd_params {
        x: x.ptr,
        residual: res.map_or(0, |r| r.ptr),
        residual_out: res_out.map_or(0, |r| r.ptr),
        gamma,
        beta,
        y: y.ptr,
        mean,
        rstd,
        rows: x.rows as i64,
        x_row_stride: x.row_stride as i64,
        residual_row_stride: res.map_or(0, |r| r.row_stride as i64),
        residual_out_row_stride: res_out.map_or(0, |r| r.row_stride as i64),
        y_row_stride: y.row_stride as i64,
        hidden: x.cols as i32,
        threads_per_row: tpr as i32,
        rows_per_block: rows_per_block as i32,
        vectorized: vectorized as i32,
        cache_rows_in_smem: cache as i32,
        eps: c.eps,
    };
    // SAFETY: `check_forward` validated every pointer in `p` against its view (dtype, shape,
    // row strides, alignment, memory size), `vectorized` only where 16-byte access is aligned,
    // and `smem` is within the kernel's limit (`cache` checked it).
    unsafe { launch(gpu, &kernel, &p, (grid, 1), (threads, 1), smem) }
}

/// LayerNorm forward into caller-owned views: `y = (x − mean)·rstd·γ + β` over the last dim.
/// `gamma`/`beta` may be absent (1 and 0); `mean`/`rstd` (f32, one per row) are written when given.
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a>(
    gpu: &Gpu,
    x: &TensorRef<'a>,
    gamma: Option<&TensorRef<'a>>,
    beta: Option<&TensorRef<'a>>,
    eps: f32,
    y: &mut TensorMut<'a>,
    mean: Option<&mut TensorMut<'a>>,
    rstd: Option<&mut TensorMut<'a>>,
    tuning: Tuning,
) -> Result<()> {
    let views = ForwardViews {
        x,
        residual: None,
        gamma,
        beta,
        y,
        mean,
        rstd,
        eps,
    };
    forward_impl(gpu, views, tuning)
}

/// Fused residual add + LayerNorm into caller-owned views: `s = x + residual` (added in f32,
/// stored in the dtype to `residual_out`), then `y = LayerNorm(s)`. `x`, `residual`,
/// `residual_out` and `y` share one shape and dtype.
#[allow(clippy::too_many_arguments)]
pub fn add_forward_into<'a>(
    gpu: &Gpu,
    x: &TensorRef<'a>,
    residual: &TensorRef<'a>,
    gamma: Option<&TensorRef<'a>>,
    beta: Option<&TensorRef<'a>>,
    eps: f32,
    residual_out: &mut TensorMut<'a>,
    y: &mut TensorMut<'a>,
    mean: Option<&mut TensorMut<'a>>,
    rstd: Option<&mut TensorMut<'a>>,
    tuning: Tuning,
) -> Result<()> {
    let views = ForwardViews {
        x,
        residual: Some((residual, residual_out)),
        gamma,
        beta,
        y,
        mean,
        rstd,
        eps,
    };
    forward_impl(gpu, views, tuning)
}

/// Everything of a LayerNorm forward call but x and y ([`forward_with`]): the optional
/// parameters, residual and statistics views, and the settings. `Default`: no γ/β (1 and 0),
/// no residual, no statistics, eps = 1e-5, the planner's tuning.
pub struct ForwardOptions<'v, 'a> {
    pub gamma: Option<&'v TensorRef<'a>>,
    pub beta: Option<&'v TensorRef<'a>>,
    /// Fused residual add: `(residual, residual_out)`; y = LayerNorm(x + residual), and the
    /// sum (added in f32, stored in the dtype) is written to `residual_out`.
    pub residual: Option<(&'v TensorRef<'a>, &'v mut TensorMut<'a>)>,
    /// Per-row mean and 1/√(var+eps), f32, written when given.
    pub mean: Option<&'v mut TensorMut<'a>>,
    pub rstd: Option<&'v mut TensorMut<'a>>,
    pub eps: f32,
    pub tuning: Tuning,
}

impl Default for ForwardOptions<'_, '_> {
    fn default() -> Self {
        ForwardOptions {
            gamma: None,
            beta: None,
            residual: None,
            mean: None,
            rstd: None,
            eps: 1e-5,
            tuning: Tuning::default(),
        }
    }
}

/// LayerNorm forward (optionally with the fused residual add) into caller-owned views, in the
/// one calling convention of the ops: the tensors, then one options struct.
///
/// ```rust,ignore
/// layernorm::forward_with(&gpu, &x, &mut y, layernorm::ForwardOptions { gamma: Some(&g), ..Default::default() })?;
/// ```
pub fn forward_with<'v, 'a>(
    gpu: &Gpu,
    x: &'v TensorRef<'a>,
    y: &'v mut TensorMut<'a>,
    opts: ForwardOptions<'v, 'a>,
) -> Result<()> {
    let views = ForwardViews {
        x,
        residual: opts.residual,
        gamma: opts.gamma,
        beta: opts.beta,
        y,
        mean: opts.mean,
        rstd: opts.rstd,
        eps: opts.eps,
    };
    forward_impl(gpu, views, opts.tuning)
}

/// Everything of a LayerNorm backward call but dy, x, the statistics and dx
/// ([`backward_with`]). `Default`: no γ, no parameter gradients, the handle's own scratch.
#[derive(Default)]
pub struct BackwardOptions<'v, 'a> {
    pub gamma: Option<&'v TensorRef<'a>>,
    /// dγ and dβ (summed over rows, deterministically), written when given.
    pub dgamma: Option<&'v mut TensorMut<'a>>,
    pub dbeta: Option<&'v mut TensorMut<'a>>,
    /// f32 scratch of at least [`backward_workspace_bytes`]; `None`: the Gpu handle's.
    pub workspace: Option<&'v mut TensorMut<'a>>,
    pub tuning: Tuning,
}

/// LayerNorm backward into caller-owned views: the tensors, then one options struct (see
/// [`backward_into`] for the meaning of each).
pub fn backward_with<'v, 'a>(
    gpu: &Gpu,
    dy: &'v TensorRef<'a>,
    x: &'v TensorRef<'a>,
    mean: &'v TensorRef<'a>,
    rstd: &'v TensorRef<'a>,
    dx: &'v mut TensorMut<'a>,
    opts: BackwardOptions<'v, 'a>,
) -> Result<()> {
    backward_into(
        gpu,
        dy,
        x,
        opts.gamma,
        mean,
        rstd,
        dx,
        opts.dgamma,
        opts.dbeta,
        opts.workspace,
        opts.tuning,
    )
}

fn stats_shape(x: &DeviceTensor) -> Vec<usize> {
    let s = x.shape();
    s[..s.len().saturating_sub(1)].to_vec()
}

fn alloc_like(gpu: &Arc<Gpu>, dtype: DType, shape: &[usize]) -> Result<DeviceTensor> {
    gpu.full(dtype, shape, 0.0)
}

/// LayerNorm forward, allocating y (contiguous, x's shape and dtype) and the row statistics.
pub fn forward(
    x: &DeviceTensor,
    gamma: Option<&DeviceTensor>,
    beta: Option<&DeviceTensor>,
    eps: f32,
) -> Result<ForwardOutput> {
    let gpu = x.gpu();
    let mut y = alloc_like(gpu, x.dtype(), x.shape())?;
    let mut mean = alloc_like(gpu, DType::F32, &stats_shape(x))?;
    let mut rstd = alloc_like(gpu, DType::F32, &stats_shape(x))?;
    let (g, b) = (gamma.map(|t| t.view()), beta.map(|t| t.view()));
    forward_into(
        gpu,
        &x.view(),
        g.as_ref(),
        b.as_ref(),
        eps,
        &mut y.view_mut(),
        Some(&mut mean.view_mut()),
        Some(&mut rstd.view_mut()),
        Tuning::default(),
    )?;
    Ok(ForwardOutput { y, mean, rstd })
}

/// Fused residual add + LayerNorm, allocating; returns (residual_out = x + residual, forward outputs).
pub fn add_forward(
    x: &DeviceTensor,
    residual: &DeviceTensor,
    gamma: Option<&DeviceTensor>,
    beta: Option<&DeviceTensor>,
    eps: f32,
) -> Result<(DeviceTensor, ForwardOutput)> {
    let gpu = x.gpu();
    let mut s = alloc_like(gpu, x.dtype(), x.shape())?;
    let mut y = alloc_like(gpu, x.dtype(), x.shape())?;
    let mut mean = alloc_like(gpu, DType::F32, &stats_shape(x))?;
    let mut rstd = alloc_like(gpu, DType::F32, &stats_shape(x))?;
    let (g, b) = (gamma.map(|t| t.view()), beta.map(|t| t.view()));
    add_forward_into(
        gpu,
        &x.view(),
        &residual.view(),
        g.as_ref(),
        b.as_ref(),
        eps,
        &mut s.view_mut(),
        &mut y.view_mut(),
        Some(&mut mean.view_mut()),
        Some(&mut rstd.view_mut()),
        Tuning::default(),
    )?;
    Ok((s, ForwardOutput { y, mean, rstd }))
}

/// Launch plan of the backward.
#[derive(Debug)]
struct BackwardPlan {
    kernel: LoadedKernel,
    split: RowSplit,
    grid: u32,
    smem: usize,
    partials_mode: u32,
    cache: bool,
    /// Column kernel launch, when dγ/dβ come from it: (grid x, grid y, rows per chunk).
    columns: Option<(u32, u32, usize)>,
    /// Partial rows stage 2 sums.
    num_partials: usize,
    workspace_bytes: usize,
}

fn plan_backward(
    gpu: &Gpu,
    dtype: DType,
    rows: usize,
    hidden: usize,
    vectorized: bool,
    tuning: Tuning,
) -> Result<BackwardPlan> {
    let pack = 16 / dtype.size_bytes();
    let units = if vectorized { hidden / pack } else { hidden };
    let target = tuning
        .packs_per_thread
        .unwrap_or(BWD_PACKS_TARGET)
        .clamp(1, BWD_REGS_MAX_PACKS);
    let regs = split_row(units, target, REGS_MAX_THREADS);
    if tuning.registers != Some(false) && regs.packs <= BWD_REGS_MAX_PACKS {
        let kernel = gpu.kernel(
            MODULE,
            kernel_name(["bwd_regs1", "bwd_regs2"][regs.packs - 1], dtype),
        )?;
        let threads = regs.tpr * regs.rows_per_block;
        let smem = regs.rows_per_block as usize * 2 * hidden * 4;
        let resident =
            gpu.blocks_per_sm(&kernel, threads, smem)?.max(1) * gpu.info().multiprocessors;
        let grid = rows
            .div_ceil(regs.rows_per_block as usize)
            .min(resident as usize) as u32;
        return Ok(BackwardPlan {
            kernel,
            split: regs,
            grid,
            smem,
            partials_mode: CUATTN_LN_PARTIALS_REGISTERS,
            cache: false,
            columns: None,
            num_partials: grid as usize,
            workspace_bytes: grid as usize * 2 * hidden * 4,
        });
    }

    let kernel = gpu.kernel(MODULE, kernel_name("bwd", dtype))?;
    let split = RowSplit {
        rows_per_block: 1,
        ..split_row(units, 4, 1024)
    };
    let budget = kernel.max_dynamic_smem;
    let partial_bytes = 2 * hidden * 4;
    let grads = tuning
        .param_grads
        .unwrap_or(if hidden <= SHARED_PARTIALS_MAX_HIDDEN {
            ParamGrads::Shared
        } else {
            ParamGrads::Columns
        });
    let grads = if grads == ParamGrads::Shared && partial_bytes > budget {
        ParamGrads::Columns
    } else {
        grads
    };
    let used = if grads == ParamGrads::Shared {
        partial_bytes
    } else {
        0
    };
    let cache_bytes = 2 * hidden * dtype.size_bytes();
    let cache = tuning.smem_cache.unwrap_or(true) && used + cache_bytes <= budget;
    let smem = used + if cache { cache_bytes } else { 0 };
    let resident = gpu.blocks_per_sm(&kernel, split.tpr, smem)?.max(1) * gpu.info().multiprocessors;
    let grid = rows.min(resident as usize) as u32;
    let (partials_mode, columns, num_partials) = match grads {
        ParamGrads::Shared => (CUATTN_LN_PARTIALS_SHARED, None, grid as usize),
        ParamGrads::Global => (CUATTN_LN_PARTIALS_GLOBAL, None, grid as usize),
        ParamGrads::Columns => {
            // Enough row chunks that the column kernel fills the GPU about four blocks deep.
            let grid_x = units.div_ceil(COLUMN_TILE_PACKS);
            let want = (4 * gpu.info().multiprocessors as usize).div_ceil(grid_x);
            let chunks = want.clamp(1, rows.div_ceil(COLUMN_THREADS_Y as usize).max(1));
            let rows_per_chunk = rows.div_ceil(chunks);
            let grid_y = rows.div_ceil(rows_per_chunk);
            (
                CUATTN_LN_PARTIALS_NONE,
                Some((grid_x as u32, grid_y as u32, rows_per_chunk)),
                grid_y,
            )
        }
    };
    Ok(BackwardPlan {
        kernel,
        split,
        grid,
        smem,
        partials_mode,
        cache,
        columns,
        num_partials,
        workspace_bytes: num_partials * 2 * hidden * 4,
    })
}

/// Backward arguments after validation.
#[derive(Debug)]
struct CheckedBackward {
    dtype: DType,
    x: Rows,
    dy: Rows,
    dx: Rows,
    gamma: u64,
    dgamma: u64,
    dbeta: u64,
    vectorized: bool,
}

#[allow(clippy::too_many_arguments)]
fn check_backward(
    dy: &TensorRef,
    x: &TensorRef,
    gamma: Option<&TensorRef>,
    mean: &TensorRef,
    rstd: &TensorRef,
    dx: &TensorMut,
    dgamma: Option<&mut TensorMut>,
    dbeta: Option<&mut TensorMut>,
) -> Result<CheckedBackward> {
    let dtype = x.dtype;
    let x_info = x.info("x");
    if let Some(&hidden) = x.shape().last() {
        validate::size_in("x", "hidden size (last dim)", hidden, MAX_HIDDEN)?;
    }
    let xr = validate::rows(&x_info)?;
    let dyr = check_rows_like(&x_info, &dy.info("dy"))?;
    let dxr = check_rows_like(&x_info, &dx.info("dx"))?;
    let gamma_ptr = check_param(gamma, "gamma", dtype, xr.cols)?;
    for (v, arg) in [(mean, "mean"), (rstd, "rstd")] {
        let info = v.info(arg);
        validate::dtype(&info, DType::F32)?;
        validate::vector(&info, xr.rows, "one per row")?;
    }
    let param_grad = |v: Option<&mut TensorMut>, arg: &'static str| -> Result<u64> {
        let Some(v) = v else { return Ok(0) };
        let info = v.info(arg);
        validate::dtype(&info, dtype)?;
        validate::vector(&info, xr.cols, "one per hidden element")?;
        Ok(v.ptr)
    };
    let dgamma_ptr = param_grad(dgamma, "dgamma")?;
    let dbeta_ptr = param_grad(dbeta, "dbeta")?;
    let pack = 16 / dtype.size_bytes();
    let vectorized = xr.cols % pack == 0
        && [xr, dyr, dxr].iter().all(|r| r.rows_16b_aligned(dtype))
        && gamma_ptr % 16 == 0;
    Ok(CheckedBackward {
        dtype,
        x: xr,
        dy: dyr,
        dx: dxr,
        gamma: gamma_ptr,
        dgamma: dgamma_ptr,
        dbeta: dbeta_ptr,
        vectorized,
    })
}

/// Bytes of workspace [`backward_into`] needs for these sizes on this GPU (it uses the
/// Gpu's own scratch buffer when the caller passes none).
pub fn backward_workspace_bytes(
    gpu: &Gpu,
    dtype: DType,
    rows: usize,
    hidden: usize,
) -> Result<usize> {
    let mut most = 0;
    for vectorized in [false, true] {
        most = most.max(
            plan_backward(gpu, dtype, rows, hidden, vectorized, Tuning::default())?.workspace_bytes,
        );
    }
    Ok(most)
}

/// LayerNorm backward into caller-owned views. `x` is the forward's input (its `residual_out`
/// for the fused form), `mean`/`rstd` the forward's row statistics. Writes `dx`, and `dgamma` /
/// `dbeta` when given (summed over rows, deterministically). `workspace`: f32 scratch of at
/// least [`backward_workspace_bytes`], or `None` to use the Gpu's own.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<'a>(
    gpu: &Gpu,
    dy: &TensorRef<'a>,
    x: &TensorRef<'a>,
    gamma: Option<&TensorRef<'a>>,
    mean: &TensorRef<'a>,
    rstd: &TensorRef<'a>,
    dx: &mut TensorMut<'a>,
    dgamma: Option<&mut TensorMut<'a>>,
    dbeta: Option<&mut TensorMut<'a>>,
    workspace: Option<&mut TensorMut<'a>>,
    tuning: Tuning,
) -> Result<()> {
    let contexts = [
        Some(("dy", dy.ctx)),
        Some(("x", x.ctx)),
        gamma.map(|t| ("gamma", t.ctx)),
        Some(("mean", mean.ctx)),
        Some(("rstd", rstd.ctx)),
        Some(("dx", dx.ctx)),
        dgamma.as_ref().map(|t| ("dgamma", t.ctx)),
        dbeta.as_ref().map(|t| ("dbeta", t.ctx)),
        workspace.as_ref().map(|t| ("workspace", t.ctx)),
    ];
    gpu.check_contexts(contexts.into_iter().flatten())?;
    let c = check_backward(dy, x, gamma, mean, rstd, dx, dgamma, dbeta)?;
    let (dtype, xr, dyr, dxr, vectorized) = (c.dtype, c.x, c.dy, c.dx, c.vectorized);
    let (gamma_ptr, dgamma_ptr, dbeta_ptr) = (c.gamma, c.dgamma, c.dbeta);
    let plan = plan_backward(gpu, dtype, xr.rows, xr.cols, vectorized, tuning)?;
    let launch_all = |ws_ptr: u64| -> Result<()> {
        let p = cuattn_layernorm_bwd_params {
            dy: dyr.ptr,
            x: xr.ptr,
            gamma: gamma_ptr,
            mean: mean.ptr,
            rstd: rstd.ptr,
            dx: dxr.ptr,
            partials: ws_ptr,
            rows: xr.rows as i64,
            dy_row_stride: dyr.row_stride as i64,
            x_row_stride: xr.row_stride as i64,
            dx_row_stride: dxr.row_stride as i64,
            hidden: xr.cols as i32,
            threads_per_row: plan.split.tpr as i32,
            rows_per_block: plan.split.rows_per_block as i32,
            vectorized: vectorized as i32,
            partials_mode: plan.partials_mode as i32,
            cache_rows_in_smem: plan.cache as i32,
        };
        let threads = plan.split.tpr * plan.split.rows_per_block;
        // SAFETY: `check_backward` validated every view; the workspace holds
        // `plan.workspace_bytes` (the Gpu's own, or checked above); `plan.smem` is within the
        // kernel's limit by construction in `plan_backward`.
        unsafe {
            launch(
                gpu,
                &plan.kernel,
                &p,
                (plan.grid, 1),
                (threads, 1),
                plan.smem,
            )?
        };
        if dgamma_ptr == 0 && dbeta_ptr == 0 {
            return Ok(());
        }

        if let Some((grid_x, grid_y, rows_per_chunk)) = plan.columns {
            let cp = cuattn_layernorm_bwd_columns_params {
                dy: dyr.ptr,
                x: xr.ptr,
                mean: mean.ptr,
                rstd: rstd.ptr,
                partials: ws_ptr,
                rows: xr.rows as i64,
                dy_row_stride: dyr.row_stride as i64,
                x_row_stride: xr.row_stride as i64,
                rows_per_chunk: rows_per_chunk as i64,
                hidden: xr.cols as i32,
                vectorized: vectorized as i32,
            };
            let columns = gpu.kernel(MODULE, kernel_name("bwd_columns", dtype))?;
            let block = (COLUMN_TILE_PACKS as u32, COLUMN_THREADS_Y);
            // SAFETY: as stage 1; the column kernel writes partial rows 0..grid_y, which the
            // workspace size counts (`num_partials`).
            unsafe { launch(gpu, &columns, &cp, (grid_x, grid_y), block, 0)? };
        }
        let reduce = gpu.kernel(MODULE, kernel_name("reduce", dtype))?;
        let rp = cuattn_layernorm_bwd_reduce_params {
            partials: ws_ptr,
            dgamma: dgamma_ptr,
            dbeta: dbeta_ptr,
            num_partials: plan.num_partials as i32,
            hidden: xr.cols as i32,
        };
        let grid = (xr.cols as u32).div_ceil(REDUCE_THREADS);
        // SAFETY: reads the `num_partials` partial rows stage 1 wrote; dγ/dβ were validated.
        unsafe { launch(gpu, &reduce, &rp, (grid, 1), (REDUCE_THREADS, 1), 0) }
    };
    match workspace {
        Some(ws) => {
            let info = ws.info("workspace");
            validate::dtype(&info, DType::F32)?;
            validate::memory(&info)?;
            if ws.bytes < plan.workspace_bytes {
                return Err(Error::invalid(
                    "workspace",
                    format!(
                        "needs {} bytes, got {} bytes",
                        plan.workspace_bytes, ws.bytes
                    ),
                ));
            }
            launch_all(ws.ptr)
        }
        None => gpu.with_workspace(plan.workspace_bytes, launch_all),
    }
}

/// LayerNorm backward, allocating dx (x's shape), dγ (when γ is given) and dβ.
pub fn backward(
    dy: &DeviceTensor,
    x: &DeviceTensor,
    gamma: Option<&DeviceTensor>,
    mean: &DeviceTensor,
    rstd: &DeviceTensor,
) -> Result<Gradients> {
    let gpu = x.gpu();
    let hidden = *x.shape().last().unwrap_or(&0);
    let mut dx = alloc_like(gpu, x.dtype(), x.shape())?;
    let mut dgamma = match gamma {
        Some(_) => Some(alloc_like(gpu, x.dtype(), &[hidden])?),
        None => None,
    };
    let mut dbeta = alloc_like(gpu, x.dtype(), &[hidden])?;
    let g = gamma.map(|t| t.view());
    let mut dg_view = dgamma.as_mut().map(|t| t.view_mut());
    backward_into(
        gpu,
        &dy.view(),
        &x.view(),
        g.as_ref(),
        &mean.view(),
        &rstd.view(),
        &mut dx.view_mut(),
        dg_view.as_mut(),
        Some(&mut dbeta.view_mut()),
        None,
        Tuning::default(),
    )?;
    drop(dg_view);
    Ok(Gradients { dx, dgamma, dbeta })
}

#[cfg(test)]
mod tests {
    //! Argument validation, checked without a GPU: the views point at fake addresses that are
    //! never dereferenced, because every check runs before anything touches a device.
    use super::*;
    use crate::tensor::Layout;

    use crate::ops::fake_views::{fake_mut as view_mut, fake_ref as view, BASE};

    struct Args {
        x: TensorRef<'static>,
        gamma: TensorRef<'static>,
        beta: TensorRef<'static>,
        y: TensorMut<'static>,
    }

    fn good(dtype: DType, rows: usize, hidden: usize) -> Args {
        Args {
            x: view(dtype, &[rows, hidden], 0),
            gamma: view(dtype, &[hidden], 1 << 30),
            beta: view(dtype, &[hidden], 2 << 30),
            y: view_mut(dtype, &[rows, hidden], 3 << 30),
        }
    }

    fn check(a: &mut Args) -> Result<CheckedForward> {
        check_forward(&ForwardViews {
            x: &a.x,
            residual: None,
            gamma: Some(&a.gamma),
            beta: Some(&a.beta),
            y: &mut a.y,
            mean: None,
            rstd: None,
            eps: 1e-5,
        })
    }

    #[test]
    fn good_arguments_pass_and_pick_the_vector_path() {
        let c = check(&mut good(DType::F16, 4, 64)).unwrap();
        assert!(c.vectorized);
        assert_eq!((c.x.rows, c.x.cols), (4, 64));
    }

    #[test]
    fn odd_hidden_takes_the_scalar_path() {
        assert!(!check(&mut good(DType::BF16, 3, 1601)).unwrap().vectorized);
    }

    #[test]
    fn hidden_zero_is_an_error_naming_x() {
        let err = check(&mut good(DType::F32, 4, 0)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { arg: "x", .. }),
            "{err}"
        );
    }

    #[test]
    fn hidden_above_the_maximum_is_an_error() {
        let err = check(&mut good(DType::F32, 1, MAX_HIDDEN + 1)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { arg: "x", .. }),
            "{err}"
        );
    }

    #[test]
    fn empty_tensor_is_an_error() {
        let err = check(&mut good(DType::F16, 0, 8)).unwrap_err();
        assert!(matches!(err, Error::Empty { arg: "x", .. }), "{err}");
    }

    #[test]
    fn gamma_of_the_wrong_length_is_an_error_naming_gamma() {
        let mut a = good(DType::F32, 4, 16);
        a.gamma = view(DType::F32, &[15], 1 << 30);
        let err = check(&mut a).unwrap_err();
        assert!(matches!(err, Error::Shape { arg: "gamma", .. }), "{err}");
    }

    #[test]
    fn beta_of_the_wrong_length_is_an_error_naming_beta() {
        let mut a = good(DType::F32, 4, 16);
        a.beta = view(DType::F32, &[17], 2 << 30);
        let err = check(&mut a).unwrap_err();
        assert!(matches!(err, Error::Shape { arg: "beta", .. }), "{err}");
    }

    #[test]
    fn mismatched_dtypes_are_an_error() {
        let mut a = good(DType::F16, 4, 16);
        a.gamma = view(DType::F32, &[16], 1 << 30);
        let err = check(&mut a).unwrap_err();
        assert!(
            matches!(
                err,
                Error::DType {
                    arg: "gamma",
                    expected: DType::F16,
                    got: DType::F32
                }
            ),
            "{err}"
        );
        let mut a = good(DType::F16, 4, 16);
        a.y = view_mut(DType::BF16, &[4, 16], 3 << 30);
        assert!(matches!(
            check(&mut a).unwrap_err(),
            Error::DType { arg: "y", .. }
        ));
    }

    #[test]
    fn non_contiguous_rows_are_an_error() {
        let mut a = good(DType::F32, 4, 16);
        let layout = Layout::strided("x", &[4, 16], &[1, 4]).unwrap();
        // SAFETY: never dereferenced.
        a.x = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE,
                64 * 4,
                DType::F32,
                layout,
            )
        };
        let err = check(&mut a).unwrap_err();
        assert!(matches!(err, Error::Layout { arg: "x", .. }), "{err}");
    }

    #[test]
    fn output_shape_mismatch_is_an_error() {
        let mut a = good(DType::F32, 4, 16);
        a.y = view_mut(DType::F32, &[4, 17], 3 << 30);
        assert!(matches!(
            check(&mut a).unwrap_err(),
            Error::Shape { arg: "y", .. }
        ));
    }

    #[test]
    fn a_view_larger_than_its_memory_is_an_error() {
        let mut a = good(DType::F32, 4, 16);
        // SAFETY: never dereferenced.
        a.x = unsafe {
            TensorRef::from_raw(
                crate::ops::fake_views::fake_ctx(),
                BASE,
                10,
                DType::F32,
                Layout::contiguous(&[4, 16]),
            )
        };
        assert!(matches!(
            check(&mut a).unwrap_err(),
            Error::Layout { arg: "x", .. }
        ));
    }

    #[test]
    fn a_misaligned_pointer_is_an_error() {
        let mut a = good(DType::F32, 4, 16);
        a.x = view(DType::F32, &[4, 16], 2);
        assert!(matches!(
            check(&mut a).unwrap_err(),
            Error::Alignment { arg: "x", .. }
        ));
    }

    #[test]
    fn negative_or_nan_eps_is_an_error() {
        let mut a = good(DType::F32, 4, 16);
        for eps in [-1.0, f32::NAN, f32::INFINITY] {
            let err = check_forward(&ForwardViews {
                x: &a.x,
                residual: None,
                gamma: None,
                beta: None,
                y: &mut a.y,
                mean: None,
                rstd: None,
                eps,
            })
            .unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { arg: "eps", .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn row_statistics_must_be_f32_with_one_per_row() {
        let mut a = good(DType::F16, 4, 16);
        let mut mean = view_mut(DType::F16, &[4], 4 << 30);
        let err = check_forward(&ForwardViews {
            x: &a.x,
            residual: None,
            gamma: None,
            beta: None,
            y: &mut a.y,
            mean: Some(&mut mean),
            rstd: None,
            eps: 1e-5,
        })
        .unwrap_err();
        assert!(matches!(err, Error::DType { arg: "mean", .. }), "{err}");
    }

    #[test]
    fn backward_checks_dy_shape_and_stats() {
        let x = view(DType::F32, &[4, 16], 0);
        let dy = view(DType::F32, &[4, 15], 1 << 30);
        let mean = view(DType::F32, &[4], 2 << 30);
        let rstd = view(DType::F32, &[3], 3 << 30);
        let dx = view_mut(DType::F32, &[4, 16], 4 << 30);
        let err = check_backward(&dy, &x, None, &mean, &mean, &dx, None, None).unwrap_err();
        assert!(matches!(err, Error::Shape { arg: "dy", .. }), "{err}");
        let dy = view(DType::F32, &[4, 16], 1 << 30);
        let err = check_backward(&dy, &x, None, &mean, &rstd, &dx, None, None).unwrap_err();
        assert!(matches!(err, Error::Shape { arg: "rstd", .. }), "{err}");
        assert!(check_backward(&dy, &x, None, &mean, &mean, &dx, None, None).is_ok());
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    #[test]
    fn split_row_covers_every_pack_with_power_of_two_groups() {
        for (target, max_tpr) in [
            (FWD_REGS_MAX_PACKS, REGS_MAX_THREADS),
            (BWD_REGS_MAX_PACKS, REGS_MAX_THREADS),
            (4, 1024),
        ] {
            for units in 1..=70_000usize {
                let s = split_row(units, target, max_tpr);
                assert!(
                    s.tpr.is_power_of_two() && (32..=max_tpr as u32).contains(&s.tpr),
                    "{units}: {s:?}"
                );
                assert!(
                    s.packs.is_power_of_two() && s.packs * s.tpr as usize >= units,
                    "{units}: {s:?}"
                );
                assert!(s.rows_per_block * s.tpr <= 256.max(s.tpr), "{units}: {s:?}");
                // Never more than one pack beyond what the row needs per thread, rounded up.
                assert!(
                    s.packs < 2 * units.div_ceil(s.tpr as usize),
                    "{units}: {s:?}"
                );
            }
        }
    }

    #[test]
    fn register_paths_take_the_rows_they_can_hold() {
        // Forward: up to 512 threads × 4 packs; backward: 512 × 2.
        assert!(split_row(2048, FWD_REGS_MAX_PACKS, REGS_MAX_THREADS).packs <= FWD_REGS_MAX_PACKS);
        assert!(split_row(2049, FWD_REGS_MAX_PACKS, REGS_MAX_THREADS).packs > FWD_REGS_MAX_PACKS);
        assert!(split_row(1024, BWD_REGS_MAX_PACKS, REGS_MAX_THREADS).packs <= BWD_REGS_MAX_PACKS);
        assert!(split_row(1025, BWD_REGS_MAX_PACKS, REGS_MAX_THREADS).packs > BWD_REGS_MAX_PACKS);
    }

    #[test]
    fn every_kernel_stage_names_a_kernel_for_each_dtype() {
        for (stage, names) in KERNELS {
            for (dt, name) in DType::ALL.iter().zip(names) {
                assert_eq!(kernel_name(stage, *dt), *name);
                assert!(name.ends_with(dt.kernel_suffix()), "{name}");
            }
        }
    }

    #[test]
    fn every_named_kernel_was_compiled_for_sm80_and_sm90_without_spills() {
        let built = crate::kernels::resources();
        for (_, names) in KERNELS {
            for name in names {
                for arch in ["sm_80", "sm_90"] {
                    let r = built.iter().find(|r| r.kernel == *name && r.arch == arch);
                    let r = r.unwrap_or_else(|| panic!("{name} was not compiled for {arch}"));
                    assert_eq!(
                        (r.spill_store_bytes, r.spill_load_bytes),
                        (0, 0),
                        "{name} spills on {arch}"
                    );
                }
            }
        }
    }
}
