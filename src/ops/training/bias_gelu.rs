//! Fused bias + GELU (forward and backward) and column sums (a linear layer's bias gradient).
//! The backward and the column sums share two kernels: per-chunk column partials, then one
//! thread per column adding the chunks in order (deterministic).

use super::{by_dtype, contiguous_rows, kernel, same_or_disjoint, stride_grid};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_bias_gelu_fwd_params, cuattn_colsum_params, cuattn_colsum_reduce_params,
    CUATTN_ACT_GELU_ERF, CUATTN_ACT_GELU_TANH, CUATTN_ACT_NONE,
};
use crate::ops::launch;
use crate::ops::validate::{self, Rows};
use crate::reference::training::Gelu;
use crate::training::{colsum_split, COLSUM_BLOCKS_PER_SM, COLSUM_COLS, COLSUM_ROWS};

const THREADS: u32 = 256;

/// Options of the fused bias + GELU forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BiasGeluOptions {
    /// Exact erf (BERT) or tanh approximation (GPT-2).
    pub gelu: Gelu,
    /// Backward: add the bias gradient to `dbias` instead of overwriting it (gradient
    /// accumulation over micro-batches).
    pub accumulate_dbias: bool,
}

impl Default for BiasGeluOptions {
    fn default() -> Self {
        BiasGeluOptions {
            gelu: Gelu::Erf,
            accumulate_dbias: false,
        }
    }
}

/// Options of [`column_sums_into`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColumnSumOptions {
    /// Add to `out` instead of overwriting it.
    pub accumulate: bool,
}

fn act(g: Gelu) -> i32 {
    match g {
        Gelu::Erf => CUATTN_ACT_GELU_ERF as i32,
        Gelu::Tanh => CUATTN_ACT_GELU_TANH as i32,
    }
}

/// Checks the bias: `cols` contiguous elements of `dtype`.
fn check_bias(bias: Option<&TensorRef>, dtype: DType, cols: usize) -> Result<u64> {
    let Some(b) = bias else { return Ok(0) };
    let info = b.info("bias");
    validate::dtype(&info, dtype)?;
    validate::vector(&info, cols, "one per column")?;
    Ok(b.ptr)
}

/// y = gelu(x + bias) over the last dim of `x` (any leading dims, contiguous; f32/f16/bf16).
/// `y` has x's shape and dtype; it may be the very same view as `x` (in place, via
/// `from_raw` views) but not overlap it otherwise.
pub fn bias_gelu_forward_into(
    gpu: &Gpu,
    opts: &BiasGeluOptions,
    x: &TensorRef,
    bias: Option<&TensorRef>,
    y: &mut TensorMut,
) -> Result<()> {
    gpu.check_contexts(
        [("x", x.ctx), ("y", y.ctx)]
            .into_iter()
            .chain(bias.map(|b| ("bias", b.ctx))),
    )?;
    let dtype = x.dtype;
    let xi = x.info("x");
    let yi = y.info("y");
    let xr = contiguous_rows(&xi, dtype)?;
    validate::same_shape(&xi, &yi)?;
    contiguous_rows(&yi, dtype)?;
    same_or_disjoint(&xi, &yi)?;
    let bias_ptr = check_bias(bias, dtype, xr.cols)?;
    let pack = 16 / dtype.size_bytes();
    let vectorized = x.ptr.is_multiple_of(16)
        && y.ptr.is_multiple_of(16)
        && bias_ptr % 16 == 0
        && xr.cols % pack == 0;
    let p = cuattn_bias_gelu_fwd_params {
        x: x.ptr,
        bias: bias_ptr,
        y: y.ptr,
        rows: xr.rows as i64,
        cols: xr.cols as i64,
        act: act(opts.gelu),
        vectorized: vectorized as i32,
    };
    let items = if vectorized {
        xr.rows * xr.cols / pack
    } else {
        xr.rows * xr.cols
    };
    let k = kernel(
        gpu,
        by_dtype(
            dtype,
            [
                "bias_gelu_fwd_f32",
                "bias_gelu_fwd_f16",
                "bias_gelu_fwd_bf16",
            ],
        ),
    )?;
    // SAFETY: x and y are contiguous [rows, cols] views of `dtype` inside their memory (checked
    // above), the same view or disjoint; bias holds cols elements; `vectorized` is set only
    // when every pointer is 16-byte aligned and rows hold whole packs.
    unsafe {
        launch(
            gpu,
            &k,
            &p,
            (stride_grid(gpu, items, THREADS), 1),
            (THREADS, 1),
            0,
        )
    }
}

/// Scratch bytes [`column_sums_into`] and [`bias_gelu_backward_into`] take from the Gpu's
/// workspace for a `[rows, cols]` input (`gpu.reserve_workspace` it before capturing a graph).
pub fn column_sums_workspace_bytes(gpu: &Gpu, rows: usize, cols: usize) -> usize {
    crate::training::colsum_workspace_bytes(rows, cols, gpu.info().multiprocessors as usize)
}

/// Stage 1 and 2 of the column sums over a contiguous [rows, cols] `dy`, with the GELU
/// backward fused in when `gelu` = (x, bias, dx, kind).
fn column_pass(
    gpu: &Gpu,
    dy: Rows,
    dtype: DType,
    gelu: Option<(u64, u64, u64, Gelu)>,
    out: &TensorMut,
    accumulate: bool,
) -> Result<()> {
    let oi = out.info("dbias");
    if out.dtype != DType::F32 && out.dtype != dtype {
        return Err(Error::DType {
            arg: "dbias",
            expected: dtype,
            got: out.dtype,
        });
    }
    validate::vector(&oi, dy.cols, "one per column")?;
    let target_blocks = gpu.info().multiprocessors as usize * COLSUM_BLOCKS_PER_SM;
    let (chunks, rows_per_chunk) = colsum_split(dy.rows, dy.cols, target_blocks);
    let col_tiles = dy.cols.div_ceil(COLSUM_COLS);
    if chunks > 65535 || col_tiles > i32::MAX as usize {
        return Err(Error::invalid(
            "dy",
            format!("{} columns in {chunks} row chunks exceed the grid", dy.cols),
        ));
    }
    let (x, bias, dx, g) = gelu.unwrap_or((0, 0, 0, Gelu::Erf));
    let partials = kernel(
        gpu,
        by_dtype(
            dtype,
            [
                "colsum_partials_f32",
                "colsum_partials_f16",
                "colsum_partials_bf16",
            ],
        ),
    )?;
    let reduce = kernel(
        gpu,
        by_dtype(
            out.dtype,
            [
                "colsum_reduce_f32",
                "colsum_reduce_f16",
                "colsum_reduce_bf16",
            ],
        ),
    )?;
    let out_ptr = out.ptr;
    gpu.with_workspace(chunks * dy.cols * 4, |ws| {
        let p1 = cuattn_colsum_params {
            dy: dy.ptr,
            x,
            bias,
            dx,
            partials: ws,
            rows: dy.rows as i64,
            cols: dy.cols as i64,
            rows_per_chunk: rows_per_chunk as i64,
            act: if gelu.is_some() {
                act(g)
            } else {
                CUATTN_ACT_NONE as i32
            },
        };
        let p2 = cuattn_colsum_reduce_params {
            partials: ws,
            out: out_ptr,
            chunks: chunks as i64,
            cols: dy.cols as i64,
            accumulate: accumulate as i32,
        };
        // SAFETY: dy (and x, dx when fused) are contiguous [rows, cols] views checked by the
        // caller; the workspace holds chunks·cols f32, every one written by stage 1 (each
        // (chunk, column) has exactly one owning block) before stage 2 reads it in stream
        // order; out holds cols elements of its dtype.
        unsafe {
            launch(
                gpu,
                &partials,
                &p1,
                (col_tiles as u32, chunks as u32),
                (COLSUM_COLS as u32, COLSUM_ROWS as u32),
                0,
            )?;
            launch(
                gpu,
                &reduce,
                &p2,
                (stride_grid(gpu, dy.cols, THREADS), 1),
                (THREADS, 1),
                0,
            )
        }
    })
}

/// Backward of [`bias_gelu_forward_into`]: dx = dy·gelu'(x + bias) (x's shape and dtype; may
/// be the same view as dy) and dbias = Σ_rows dx (`[cols]`, f32 or dy's dtype; summed in f32
/// before dx is rounded, in a fixed order). `x` and `bias` are the forward's inputs.
pub fn bias_gelu_backward_into(
    gpu: &Gpu,
    opts: &BiasGeluOptions,
    dy: &TensorRef,
    x: &TensorRef,
    bias: Option<&TensorRef>,
    dx: &mut TensorMut,
    dbias: &mut TensorMut,
) -> Result<()> {
    gpu.check_contexts(
        [
            ("dy", dy.ctx),
            ("x", x.ctx),
            ("dx", dx.ctx),
            ("dbias", dbias.ctx),
        ]
        .into_iter()
        .chain(bias.map(|b| ("bias", b.ctx))),
    )?;
    let dtype = dy.dtype;
    let (dyi, xi, dxi) = (dy.info("dy"), x.info("x"), dx.info("dx"));
    let rows = contiguous_rows(&dyi, dtype)?;
    for v in [&xi, &dxi] {
        validate::same_shape(&dyi, v)?;
        contiguous_rows(v, dtype)?;
    }
    same_or_disjoint(&dyi, &dxi)?;
    // Each element is read (dy, x) and then written (dx) by one thread: dx may be either
    // input exactly.
    same_or_disjoint(&xi, &dxi)?;
    let bias_ptr = check_bias(bias, dtype, rows.cols)?;
    same_or_disjoint(&dxi, &dbias.info("dbias"))?;
    column_pass(
        gpu,
        rows,
        dtype,
        Some((x.ptr, bias_ptr, dx.ptr, opts.gelu)),
        dbias,
        opts.accumulate_dbias,
    )
}

/// out[c] = Σ_rows v[r, c] over a contiguous `v` seen as [rows, last dim] (f32/f16/bf16):
/// a linear layer's bias gradient. `out` is `[cols]`, f32 or v's dtype. Deterministic.
pub fn column_sums_into(
    gpu: &Gpu,
    opts: &ColumnSumOptions,
    v: &TensorRef,
    out: &mut TensorMut,
) -> Result<()> {
    gpu.check_contexts([("v", v.ctx), ("out", out.ctx)])?;
    let rows = contiguous_rows(&v.info("v"), v.dtype)?;
    same_or_disjoint(&v.info("v"), &out.info("out"))?;
    column_pass(gpu, rows, v.dtype, None, out, opts.accumulate)
}
