//! LayerNorm on the GPU: forward, fused residual-add forward, and backward
//! (`kernels/layernorm.cu`). The CPU reference is [`crate::reference::layernorm`].
//!
//! The `*_into` functions write into views the caller owns (for embedding in other runtimes);
//! the others allocate their outputs. All of them validate every argument before a launch.

use super::validate::{self, Rows};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, Kernel, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_layernorm_bwd_params, cuattn_layernorm_bwd_reduce_params, cuattn_layernorm_fwd_params,
    CUATTN_LAYERNORM_MAX_HIDDEN,
};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

const MODULE: &str = "layernorm";
/// Largest hidden size accepted.
pub const MAX_HIDDEN: usize = CUATTN_LAYERNORM_MAX_HIDDEN as usize;
/// Threads of a block in the backward reduction kernel.
const REDUCE_THREADS: u32 = 256;

/// Choices the launch makes that do not change the result's meaning; tests force each path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    /// Keep rows in shared memory between passes: `None` decides by size, `Some(false)`
    /// forces the re-read path, `Some(true)` asks for the cache where it fits.
    pub smem_cache: Option<bool>,
    /// Backward: accumulate the dγ/dβ partials in shared memory (`None`: when they fit).
    pub smem_partials: Option<bool>,
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

fn kernel_name(stage: &str, dtype: DType) -> &'static str {
    // Names are a closed set, so leak-free &'static strs via a match.
    match (stage, dtype) {
        ("fwd", DType::F32) => "layernorm_fwd_f32",
        ("fwd", DType::F16) => "layernorm_fwd_f16",
        ("fwd", DType::BF16) => "layernorm_fwd_bf16",
        ("bwd", DType::F32) => "layernorm_bwd_f32",
        ("bwd", DType::F16) => "layernorm_bwd_f16",
        ("bwd", DType::BF16) => "layernorm_bwd_bf16",
        ("reduce", DType::F32) => "layernorm_bwd_reduce_f32",
        ("reduce", DType::F16) => "layernorm_bwd_reduce_f16",
        ("reduce", DType::BF16) => "layernorm_bwd_reduce_bf16",
        _ => unreachable!("unknown layernorm stage {stage}"),
    }
}

/// Threads that share one row: about four 16-byte packs (or elements) each, a power of two
/// between one warp and a full block.
fn threads_per_row(units_per_row: usize) -> u32 {
    (units_per_row.div_ceil(4))
        .next_power_of_two()
        .clamp(32, 1024) as u32
}

fn check_hidden(arg: &'static str, hidden: usize) -> Result<()> {
    if hidden == 0 || hidden > MAX_HIDDEN {
        return Err(Error::invalid(
            arg,
            format!("hidden size (last dim) must be in 1..={MAX_HIDDEN}, got {hidden}"),
        ));
    }
    Ok(())
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
        check_hidden("x", hidden)?;
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
    let c = check_forward(&v)?;
    let (dtype, x, y, vectorized) = (c.dtype, c.x, c.y, c.vectorized);
    let (res, res_out) = (c.residual.map(|r| r.0), c.residual.map(|r| r.1));
    let (gamma, beta, mean, rstd) = (c.gamma, c.beta, c.mean, c.rstd);
    let pack = 16 / dtype.size_bytes();
    let units = if vectorized { x.cols / pack } else { x.cols };
    let tpr = threads_per_row(units);
    let rows_per_block = (256 / tpr).max(1);
    let threads = tpr * rows_per_block;
    let cache_bytes = rows_per_block as usize * x.cols * dtype.size_bytes();
    let kernel = gpu.kernel(MODULE, kernel_name("fwd", dtype))?;
    let cache = tuning.smem_cache.unwrap_or(true) && cache_bytes <= kernel.max_dynamic_smem;
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
    launch(gpu, &kernel, &p, grid, threads, smem)
}

fn launch<P: cudarc::driver::DeviceRepr>(
    gpu: &Gpu,
    kernel: &Kernel,
    params: &P,
    grid: u32,
    threads: u32,
    smem: usize,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (grid.max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the caller validated every pointer in `params` (dtype, shape, strides, alignment,
    // and that each view's layout fits the memory behind it) and sized `smem` within the
    // function's raised dynamic shared-memory limit; the kernel touches nothing else.
    unsafe {
        gpu.stream()
            .launch_builder(&kernel.func)
            .arg(params)
            .launch(cfg)
    }
    .map(|_| ())
    .map_err(|e| Error::driver(format!("launching `{}`", kernel.name), e))
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

/// Launch plan of the backward: blocks of stage 1 and shared-memory use.
struct BackwardPlan {
    threads: u32,
    grid: u32,
    smem: usize,
    partials_in_smem: bool,
    cache: bool,
    vectorized: bool,
}

fn plan_backward(
    gpu: &Gpu,
    kernel: &Kernel,
    dtype: DType,
    rows: usize,
    hidden: usize,
    vectorized: bool,
    tuning: Tuning,
) -> Result<BackwardPlan> {
    let pack = 16 / dtype.size_bytes();
    let units = if vectorized { hidden / pack } else { hidden };
    let threads = threads_per_row(units);
    let budget = kernel.max_dynamic_smem;
    let partial_bytes = 2 * hidden * 4;
    let cache_bytes = 2 * hidden * dtype.size_bytes();
    let partials_in_smem = tuning.smem_partials.unwrap_or(true) && partial_bytes <= budget;
    let used = if partials_in_smem { partial_bytes } else { 0 };
    let cache = tuning.smem_cache.unwrap_or(true) && used + cache_bytes <= budget;
    let smem = used + if cache { cache_bytes } else { 0 };
    let resident = gpu.blocks_per_sm(kernel, threads, smem)?.max(1) * gpu.info().multiprocessors;
    Ok(BackwardPlan {
        threads,
        grid: rows.min(resident as usize) as u32,
        smem,
        partials_in_smem,
        cache,
        vectorized,
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
        check_hidden("x", hidden)?;
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
    let kernel = gpu.kernel(MODULE, kernel_name("bwd", dtype))?;
    let plan = plan_backward(gpu, &kernel, dtype, rows, hidden, false, Tuning::default())?;
    let vec_plan = plan_backward(gpu, &kernel, dtype, rows, hidden, true, Tuning::default())?;
    Ok(plan.grid.max(vec_plan.grid) as usize * 2 * hidden * 4)
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
    let c = check_backward(dy, x, gamma, mean, rstd, dx, dgamma, dbeta)?;
    let (dtype, xr, dyr, dxr, vectorized) = (c.dtype, c.x, c.dy, c.dx, c.vectorized);
    let (gamma_ptr, dgamma_ptr, dbeta_ptr) = (c.gamma, c.dgamma, c.dbeta);
    let kernel = gpu.kernel(MODULE, kernel_name("bwd", dtype))?;
    let plan = plan_backward(gpu, &kernel, dtype, xr.rows, xr.cols, vectorized, tuning)?;
    let ws_bytes = plan.grid as usize * 2 * xr.cols * 4;
    let ws_ptr = match workspace {
        Some(ws) => {
            let info = ws.info("workspace");
            validate::dtype(&info, DType::F32)?;
            validate::memory(&info)?;
            if ws.bytes < ws_bytes || ws.ptr % 4 != 0 {
                return Err(Error::invalid(
                    "workspace",
                    format!(
                        "needs {ws_bytes} bytes (4-byte aligned), got {} bytes",
                        ws.bytes
                    ),
                ));
            }
            ws.ptr
        }
        None => gpu.workspace(ws_bytes)?,
    };

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
        vectorized: plan.vectorized as i32,
        partials_in_smem: plan.partials_in_smem as i32,
        cache_rows_in_smem: plan.cache as i32,
    };
    launch(gpu, &kernel, &p, plan.grid, plan.threads, plan.smem)?;

    if dgamma_ptr != 0 || dbeta_ptr != 0 {
        let reduce = gpu.kernel(MODULE, kernel_name("reduce", dtype))?;
        let rp = cuattn_layernorm_bwd_reduce_params {
            partials: ws_ptr,
            dgamma: dgamma_ptr,
            dbeta: dbeta_ptr,
            num_partials: plan.grid as i32,
            hidden: xr.cols as i32,
        };
        let grid = (xr.cols as u32).div_ceil(REDUCE_THREADS);
        launch(gpu, &reduce, &rp, grid, REDUCE_THREADS, 0)?;
    }
    Ok(())
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

    const BASE: u64 = 0x7f00_0000_0000;

    fn view(dtype: DType, shape: &[usize], at: u64) -> TensorRef<'static> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size_bytes();
        // SAFETY: validation only reads the address as a number; it is never dereferenced.
        unsafe { TensorRef::from_raw(BASE + at, bytes, dtype, layout) }
    }

    fn view_mut(dtype: DType, shape: &[usize], at: u64) -> TensorMut<'static> {
        let layout = Layout::contiguous(shape);
        let bytes = layout.numel() * dtype.size_bytes();
        // SAFETY: as in `view`.
        unsafe { TensorMut::from_raw(BASE + at, bytes, dtype, layout) }
    }

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
        a.x = unsafe { TensorRef::from_raw(BASE, 64 * 4, DType::F32, layout) };
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
        a.x = unsafe { TensorRef::from_raw(BASE, 10, DType::F32, Layout::contiguous(&[4, 16])) };
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
