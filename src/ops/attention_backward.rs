//! Scaled dot-product attention backward on the GPU: dQ, dK, dV from Q, K, V, the forward's O
//! and LSE, and dO = ∂L/∂O. The CPU reference is [`crate::reference::attention_backward`];
//! the kernels are `kernels/attention_bwd.cu` (FlashAttention-2's backward on tensor cores for
//! f16/bf16 with head dims ≤ 256 — above 128 with the columns of dK/dV/dQ split across CTAs —
//! and an exact f32 path for every dtype and head dim ≤ 256). Block-sparse layouts
//! ([`super::sparse_attention`]) run on the same tensor-core kernels for every head dim up to
//! 256 and every block size: the kernels' tile is [`SPARSE_TC_BLOCK_SIZE`], and a layout of
//! another block size runs re-blocked to it ([`crate::sparse::BlockLayout::reblocked`]).
//!
//! The call takes the forward's [`attention::Options`] unchanged (scale, causal alignment,
//! sliding window, key padding or packed sequences) and the same layouts: dO is laid out like O
//! (any strides with a contiguous last dim), dQ like Q, dK like K, dV like V, and LSE is the
//! forward's ([B, Hq, Lq] dense, [Hq, total_q] packed). With GQA/MQA, dK and dV of a K/V head
//! are the sums over the query heads of its group. Every element of dQ, dK and dV is written.
//!
//! Usage (what a training step does after [`attention::forward`]):
//! ```ignore
//! let (o, lse) = attention::forward(&q, &k, &v, &fwd_opts)?;
//! // ... loss, dO ...
//! let (dq, dk, dv) = attention_backward::backward(&q, &k, &v, &o, &lse, &d_o,
//!     &attention_backward::Options { forward: fwd_opts, mode: Mode::Deterministic })?;
//! ```
//!
//! Workspace: D = rowsum(dO∘O) (f32, one per query row and head), and in [`Mode::Fast`] an f32
//! dQ accumulator of Q's size; both are allocated per call. Memory is O(L): no L×L matrix.

use super::attention::{
    self, check_views, fwd_params, Checked, Kernel, SequenceArrays, Sequences, SparseArgs, Strides,
};
use super::sparse_attention::DeviceBlockLayout;
use super::validate;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_attention_bwd_params, CUATTN_ATTN_BWD_BM, CUATTN_ATTN_BWD_BN, CUATTN_ATTN_BWD_COLS,
    CUATTN_ATTN_BWD_ROWS_PER_BLOCK, CUATTN_ATTN_BWD_SPARSE_BS, CUATTN_ATTN_BWD_THREADS,
};
use std::sync::Arc;

const MODULE: &str = "attention_bwd";
/// Largest (padded) head dim of the tensor-core backward; larger ones take the exact path.
/// Head dims 129–256 pad to the 256 tile (any size: the tiles zero-fill past D and Dv).
pub const TC_MAX_HEAD_DIM: usize = 256;
/// Largest head dim of the tensor-core block-sparse backward (HD 256 entries with the dense
/// column split).
pub const SPARSE_TC_MAX_HEAD_DIM: usize = 256;
/// Gradient columns per CTA of the HD 256 kernels (column blocks of dK/dV and dQ).
const COLS: usize = CUATTN_ATTN_BWD_COLS as usize;
const ROWS: usize = CUATTN_ATTN_BWD_ROWS_PER_BLOCK as usize;
const BN: usize = CUATTN_ATTN_BWD_BN as usize;
const BM: usize = CUATTN_ATTN_BWD_BM as usize;
/// The layout block size the tensor-core block-sparse kernels read (one tile of each pass);
/// layouts of other block sizes are re-blocked to it on the host.
pub const SPARSE_TC_BLOCK_SIZE: usize = CUATTN_ATTN_BWD_SPARSE_BS as usize;

/// How dQ is summed over the key blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// No float atomics: dQ by its own pass over the key tiles (two more GEMMs); gradients
    /// are bitwise identical from run to run.
    #[default]
    Deterministic,
    /// dQ added by the dK/dV kernel into an f32 accumulator with atomics (run-to-run
    /// differences in the last bits). The exact path is always deterministic.
    Fast,
}

/// Options of one backward call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Options<'s> {
    /// The forward's options, exactly as the forward ran.
    pub forward: attention::Options<'s>,
    pub mode: Mode,
}

/// Validated call: the forward's checks plus dO, dQ, dK, dV.
struct CheckedBwd {
    c: Checked,
    d_o: Strides,
    dq: Strides,
    dk: Strides,
    dv: Strides,
    lse_rows: usize,
}

/// A gradient view must have its twin's shape and dtype; returns its strides.
fn like(g: &crate::ops::ViewInfo, twin: &crate::ops::ViewInfo, packed: bool) -> Result<Strides> {
    validate::dtype(g, twin.dtype)?;
    let rank = if packed { 3 } else { 4 };
    let (_, st) = validate::strided(g, rank, "like its tensor")?;
    validate::same_shape(twin, g)?;
    Ok(if packed {
        Strides {
            batch: 0,
            head: st[1] as i64,
            row: st[0] as i64,
        }
    } else {
        Strides {
            batch: st[0] as i64,
            head: st[1] as i64,
            row: st[2] as i64,
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn check(
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorRef,
    lse: &TensorRef,
    d_o: &TensorRef,
    dq: &TensorMut,
    dk: &TensorMut,
    dv: &TensorMut,
    opts: &Options,
) -> Result<CheckedBwd> {
    let (qi, ki, vi, oi, li) = (
        q.info("q"),
        k.info("k"),
        v.info("v"),
        o.info("o"),
        lse.info("lse"),
    );
    let c = check_views(&qi, &ki, &vi, &oi, Some(&li), &opts.forward)?;
    let packed = matches!(opts.forward.sequences, Sequences::Packed { .. });
    let d_o_s = like(&d_o.info("d_o"), &oi, packed)?;
    let dq_s = like(&dq.info("dq"), &qi, packed)?;
    let dk_s = like(&dk.info("dk"), &ki, packed)?;
    let dv_s = like(&dv.info("dv"), &vi, packed)?;
    Ok(CheckedBwd {
        c,
        d_o: d_o_s,
        dq: dq_s,
        dk: dk_s,
        dv: dv_s,
        lse_rows: lse.layout().numel(),
    })
}

/// Whether the call runs on tensor cores: f16/bf16 with both head dims ≤ 256 (dense) or ≤
/// [`SPARSE_TC_MAX_HEAD_DIM`] (block-sparse) unless the exact kernel is asked for; asking for
/// tensor cores with f32 or larger head dims is an error.
fn use_tensor_cores(c: &Checked, kernel: Kernel, sparse: bool) -> Result<bool> {
    let max = if sparse {
        SPARSE_TC_MAX_HEAD_DIM
    } else {
        TC_MAX_HEAD_DIM
    };
    let fits = c.shape.dim_qk.max(c.shape.dim_v) <= max;
    match kernel {
        Kernel::Auto => Ok(c.dtype != DType::F32 && fits),
        Kernel::Exact => Ok(false),
        Kernel::TensorCore if c.dtype == DType::F32 => Err(Error::DType {
            arg: "q",
            expected: DType::BF16,
            got: DType::F32,
        }),
        Kernel::TensorCore if !fits => Err(Error::invalid(
            "q",
            format!(
                "the tensor-core {}backward takes head dims up to {max}, got {} and {}",
                if sparse { "block-sparse " } else { "" },
                c.shape.dim_qk,
                c.shape.dim_v
            ),
        )),
        Kernel::TensorCore => Ok(true),
        Kernel::Hopper => Err(Error::invalid(
            "kernel",
            "Kernel::Hopper is a forward kernel; the backward runs with Auto, Exact or TensorCore",
        )),
    }
}

fn suffix(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

/// Kernel names by dtype (f32, f16, bf16).
const DELTA: [&str; 3] = [
    "attention_bwd_delta_f32",
    "attention_bwd_delta_f16",
    "attention_bwd_delta_bf16",
];
const CONVERT: [&str; 3] = [
    "attention_bwd_dq_convert_f32",
    "attention_bwd_dq_convert_f16",
    "attention_bwd_dq_convert_bf16",
];
const EXACT_DQ: [&str; 3] = [
    "attention_bwd_exact_dq_f32",
    "attention_bwd_exact_dq_f16",
    "attention_bwd_exact_dq_bf16",
];
const EXACT_DKDV: [&str; 3] = [
    "attention_bwd_exact_dkdv_f32",
    "attention_bwd_exact_dkdv_f16",
    "attention_bwd_exact_dkdv_bf16",
];

/// Tensor-core kernels for (f16 | bf16, head dim tile 64 | 128 | 256): dK/dV, dK/dV + atomic
/// dQ, dQ.
fn tc_names(dtype: DType, hd: usize) -> [&'static str; 3] {
    match (dtype, hd) {
        (DType::F16, 64) => [
            "attention_bwd_dkdv_hd64_f16",
            "attention_bwd_dkdv_dq_hd64_f16",
            "attention_bwd_dq_hd64_f16",
        ],
        (DType::F16, 256) => [
            "attention_bwd_dkdv_hd256_f16",
            "attention_bwd_dkdv_dq_hd256_f16",
            "attention_bwd_dq_hd256_f16",
        ],
        (DType::F16, _) => [
            "attention_bwd_dkdv_hd128_f16",
            "attention_bwd_dkdv_dq_hd128_f16",
            "attention_bwd_dq_hd128_f16",
        ],
        (_, 64) => [
            "attention_bwd_dkdv_hd64_bf16",
            "attention_bwd_dkdv_dq_hd64_bf16",
            "attention_bwd_dq_hd64_bf16",
        ],
        (_, 256) => [
            "attention_bwd_dkdv_hd256_bf16",
            "attention_bwd_dkdv_dq_hd256_bf16",
            "attention_bwd_dq_hd256_bf16",
        ],
        _ => [
            "attention_bwd_dkdv_hd128_bf16",
            "attention_bwd_dkdv_dq_hd128_bf16",
            "attention_bwd_dq_hd128_bf16",
        ],
    }
}

/// The block-sparse entries, as [`tc_names`].
fn sparse_tc_names(dtype: DType, hd: usize) -> [&'static str; 3] {
    match (dtype, hd) {
        (DType::F16, 64) => [
            "attention_bwd_sparse_dkdv_hd64_f16",
            "attention_bwd_sparse_dkdv_dq_hd64_f16",
            "attention_bwd_sparse_dq_hd64_f16",
        ],
        (DType::F16, 256) => [
            "attention_bwd_sparse_dkdv_hd256_f16",
            "attention_bwd_sparse_dkdv_dq_hd256_f16",
            "attention_bwd_sparse_dq_hd256_f16",
        ],
        (DType::F16, _) => [
            "attention_bwd_sparse_dkdv_hd128_f16",
            "attention_bwd_sparse_dkdv_dq_hd128_f16",
            "attention_bwd_sparse_dq_hd128_f16",
        ],
        (_, 64) => [
            "attention_bwd_sparse_dkdv_hd64_bf16",
            "attention_bwd_sparse_dkdv_dq_hd64_bf16",
            "attention_bwd_sparse_dq_hd64_bf16",
        ],
        (_, 256) => [
            "attention_bwd_sparse_dkdv_hd256_bf16",
            "attention_bwd_sparse_dkdv_dq_hd256_bf16",
            "attention_bwd_sparse_dq_hd256_bf16",
        ],
        _ => [
            "attention_bwd_sparse_dkdv_hd128_bf16",
            "attention_bwd_sparse_dkdv_dq_hd128_bf16",
            "attention_bwd_sparse_dq_hd128_bf16",
        ],
    }
}

/// Every kernel of the backward, for `cuattn info` and the build checks.
pub fn kernel_names() -> Vec<&'static str> {
    let mut v: Vec<&str> = [DELTA, CONVERT, EXACT_DQ, EXACT_DKDV].concat();
    for dt in [DType::F16, DType::BF16] {
        for hd in [64, 128, 256] {
            v.extend(tc_names(dt, hd));
            v.extend(sparse_tc_names(dt, hd));
        }
    }
    v
}

/// Dynamic shared memory of the tensor-core kernels (attention_bwd.cu's header).
fn shared_bytes(hd: usize, atomic_dq: bool) -> (usize, usize) {
    let pitch = hd + 8;
    let dkdv =
        (2 * BN + 2 * BM) * pitch * 2 + 2 * BM * 4 + if atomic_dq { BN * (BM + 8) * 2 } else { 0 };
    let dq = (2 * BM + 2 * BN) * pitch * 2;
    (dkdv, dq)
}

/// The head-dim tile of a call: max(D, Dv) padded to 64, 128 or 256.
fn head_dim_tile(dim_qk: usize, dim_v: usize) -> usize {
    match dim_qk.max(dim_v) {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    }
}

/// Column blocks per key block of the dK/dV grid and per query block of the dQ grid: one up
/// to the 128 tile; at 256, ⌈max(D, Dv)/COLS⌉ and ⌈D/COLS⌉ (attention_bwd.cu's header).
fn column_blocks(hd: usize, dim_qk: usize, dim_v: usize) -> (usize, usize) {
    if hd <= COLS {
        (1, 1)
    } else {
        (dim_qk.max(dim_v).div_ceil(COLS), dim_qk.div_ceil(COLS))
    }
}

/// Dynamic shared memory within the function's (raised) limit.
fn check_smem(bytes: usize, kernel: &crate::gpu::LoadedKernel) -> Result<()> {
    if bytes > kernel.max_dynamic_smem {
        return Err(Error::invalid(
            "q",
            format!(
                "needs {bytes} bytes of shared memory, the GPU allows {}",
                kernel.max_dynamic_smem
            ),
        ));
    }
    Ok(())
}

/// A grid of `rows_per_block`-row blocks over `len` rows × `heads` × `batch`, checked.
fn grid(len: usize, rows_per_block: usize, heads: usize, batch: usize) -> Result<u32> {
    let blocks = len.div_ceil(rows_per_block) as u64 * heads as u64 * batch as u64;
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::invalid("q", format!("{blocks} blocks exceed the grid")))
}

/// Attention backward into caller-owned views (see the module docs for layouts).
#[allow(clippy::too_many_arguments)]
pub fn backward_into(
    gpu: &Arc<Gpu>,
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorRef,
    lse: &TensorRef,
    d_o: &TensorRef,
    dq: &mut TensorMut,
    dk: &mut TensorMut,
    dv: &mut TensorMut,
    opts: &Options,
) -> Result<()> {
    launch_backward(gpu, q, k, v, o, lse, d_o, dq, dk, dv, opts, None)
}

/// The dense backward, or with `sparse` the block-sparse one (whose options the caller,
/// [`super::sparse_attention::backward_into`], has checked).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_backward(
    gpu: &Arc<Gpu>,
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorRef,
    lse: &TensorRef,
    d_o: &TensorRef,
    dq: &mut TensorMut,
    dk: &mut TensorMut,
    dv: &mut TensorMut,
    opts: &Options,
    sparse: Option<&DeviceBlockLayout>,
) -> Result<()> {
    let cb = check(q, k, v, o, lse, d_o, dq, dk, dv, opts)?;
    gpu.check_contexts([
        ("q", q.ctx),
        ("k", k.ctx),
        ("v", v.ctx),
        ("o", o.ctx),
        ("lse", lse.ctx),
        ("d_o", d_o.ctx),
        ("dq", dq.ctx),
        ("dk", dk.ctx),
        ("dv", dv.ctx),
    ])?;
    let c = &cb.c;
    let s = &c.shape;
    let hd = head_dim_tile(s.dim_qk, s.dim_v);
    let mut tensor_cores = use_tensor_cores(c, opts.forward.kernel, sparse.is_some())?;
    if tensor_cores && hd > COLS && opts.forward.kernel == Kernel::Auto {
        // A GPU whose shared memory cannot hold the tiles (HD 256 needs ~136-145 KB: sm_80/90
        // have it, sm_86/89 do not) runs the exact path instead of failing.
        let names = if sparse.is_some() {
            sparse_tc_names(c.dtype, hd)
        } else {
            tc_names(c.dtype, hd)
        };
        let (name, bytes) = if opts.mode == Mode::Fast {
            (names[1], shared_bytes(hd, true).0)
        } else {
            (names[0], shared_bytes(hd, false).0)
        };
        tensor_cores = bytes <= gpu.kernel(MODULE, name)?.max_dynamic_smem;
    }
    let sparse_args = match sparse {
        Some(layout) => {
            let bs = layout.layout().block_size();
            layout.layout().check_call(&c.shape, bs)?;
            // Tensor cores: the layout in the kernels' tiles (re-blocked once if need be); the
            // exact kernels walk any block size key by key.
            Some(if tensor_cores {
                layout.tile_args(gpu, SPARSE_TC_BLOCK_SIZE)?
            } else {
                layout.args(gpu)?
            })
        }
        None => None,
    };
    let fwd_sparse: Option<&SparseArgs> = sparse_args.as_ref().map(|(f, _)| f);
    let fast = tensor_cores && opts.mode == Mode::Fast;
    let (dkdv_cols, dq_cols) = column_blocks(hd, s.dim_qk, s.dim_v);

    let mut delta = gpu.zeros(DType::F32, &[cb.lse_rows])?;
    let mut accum = if fast {
        Some(gpu.zeros(DType::F32, &[cb.lse_rows * s.dim_qk])?)
    } else {
        None
    };
    // 16-byte tile loads need every row of Q, K, V and dO aligned.
    let vectorized = [
        q.device_ptr(),
        k.device_ptr(),
        v.device_ptr(),
        d_o.device_ptr(),
    ]
    .iter()
    .all(|p| p % 16 == 0)
        && [c.q, c.k, c.v, cb.d_o]
            .iter()
            .all(|st| [st.batch, st.head, st.row].iter().all(|x| x % 8 == 0))
        && s.dim_qk % 8 == 0
        && s.dim_v % 8 == 0;
    let seqs = SequenceArrays::upload(gpu, &opts.forward)?;
    let fwd = fwd_params(
        gpu,
        [
            q.device_ptr(),
            k.device_ptr(),
            v.device_ptr(),
            o.device_ptr(),
            lse.device_ptr(),
        ],
        &opts.forward,
        c,
        &seqs,
        fwd_sparse,
        ROWS,
        vectorized,
    );
    let cols = sparse_args.as_ref().map(|(_, c)| *c);
    let p = cuattn_attention_bwd_params {
        fwd,
        d_o: d_o.device_ptr(),
        dq: dq.device_ptr(),
        dk: dk.device_ptr(),
        dv: dv.device_ptr(),
        delta: delta.view_mut().device_ptr(),
        dq_accum: accum.as_mut().map_or(0, |a| a.view_mut().device_ptr()),
        do_batch_stride: cb.d_o.batch,
        do_head_stride: cb.d_o.head,
        do_row_stride: cb.d_o.row,
        dq_batch_stride: cb.dq.batch,
        dq_head_stride: cb.dq.head,
        dq_row_stride: cb.dq.row,
        dk_batch_stride: cb.dk.batch,
        dk_head_stride: cb.dk.head,
        dk_row_stride: cb.dk.row,
        dv_batch_stride: cb.dv.batch,
        dv_head_stride: cb.dv.head,
        dv_row_stride: cb.dv.row,
        atomic_dq: fast as i32,
        sp_col_offsets: cols.map_or(0, |c| c.ptrs[0]),
        sp_col_q_blocks: cols.map_or(0, |c| c.ptrs[1]),
        sp_col_blocks: cols.map_or(0, |c| c.ptrs[2]),
        sp_k_blocks: cols.map_or(0, |c| c.k_blocks),
    };
    let dt = suffix(c.dtype);
    let row_threads = (32 * ROWS) as u32;
    let q_rows = grid(s.len_q, ROWS, s.heads_q, s.batch)?;
    let k_rows = grid(s.len_k, ROWS, s.heads_kv, s.batch)?;
    // SAFETY (every launch below): `check` validated all views (dtypes, shapes, contiguous
    // last dims, layouts inside their memory, alignment) and the sequence arrays, so every
    // address the kernels form from these strides and lengths is inside its view; the
    // workspaces have one f32 per LSE row (times dim_qk for the accumulator); 16-byte loads
    // are used only when `vectorized` established their alignment; dynamic shared memory is
    // checked against the function's limit before each tensor-core launch.
    let delta_k = gpu.kernel(MODULE, DELTA[dt])?;
    unsafe { super::launch(gpu, &delta_k, &p, (q_rows, 1), (row_threads, 1), 0)? };
    if !tensor_cores {
        let dq_k = gpu.kernel(MODULE, EXACT_DQ[dt])?;
        let dkdv_k = gpu.kernel(MODULE, EXACT_DKDV[dt])?;
        // SAFETY: as above.
        unsafe {
            super::launch(gpu, &dq_k, &p, (q_rows, 1), (row_threads, 1), 0)?;
            super::launch(gpu, &dkdv_k, &p, (k_rows, 1), (row_threads, 1), 0)?;
        }
    } else {
        let [dkdv_name, dkdv_dq_name, dq_name] = if sparse.is_some() {
            sparse_tc_names(c.dtype, hd)
        } else {
            tc_names(c.dtype, hd)
        };
        let (smem_dkdv, smem_dq) = shared_bytes(hd, fast);
        let dkdv_k = gpu.kernel(MODULE, if fast { dkdv_dq_name } else { dkdv_name })?;
        check_smem(smem_dkdv, &dkdv_k)?;
        let threads = CUATTN_ATTN_BWD_THREADS;
        // SAFETY: as above.
        unsafe {
            super::launch(
                gpu,
                &dkdv_k,
                &p,
                (grid(s.len_k, BN, s.heads_kv * dkdv_cols, s.batch)?, 1),
                (threads, 1),
                smem_dkdv,
            )?
        };
        if fast {
            let conv = gpu.kernel(MODULE, CONVERT[dt])?;
            // SAFETY: as above.
            unsafe { super::launch(gpu, &conv, &p, (q_rows, 1), (row_threads, 1), 0)? };
        } else {
            let dq_k = gpu.kernel(MODULE, dq_name)?;
            check_smem(smem_dq, &dq_k)?;
            // SAFETY: as above.
            unsafe {
                super::launch(
                    gpu,
                    &dq_k,
                    &p,
                    (grid(s.len_q, BM, s.heads_q * dq_cols, s.batch)?, 1),
                    (threads, 1),
                    smem_dq,
                )?
            };
        }
    }
    // The workspaces are freed when dropped; the stream orders that after the kernels.
    drop((delta, accum));
    Ok(())
}

/// Attention backward, allocating dQ, dK, dV (contiguous, shaped like Q, K, V).
pub fn backward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    d_o: &DeviceTensor,
    opts: &Options,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let gpu: &Arc<Gpu> = q.gpu();
    let mut dq = gpu.zeros(q.dtype(), q.shape())?;
    let mut dk = gpu.zeros(k.dtype(), k.shape())?;
    let mut dv = gpu.zeros(v.dtype(), v.shape())?;
    backward_into(
        gpu,
        &q.view(),
        &k.view(),
        &v.view(),
        &o.view(),
        &lse.view(),
        &d_o.view(),
        &mut dq.view_mut(),
        &mut dk.view_mut(),
        &mut dv.view_mut(),
        opts,
    )?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    //! Argument validation and the build without a GPU: fake addresses, never dereferenced.
    use super::*;
    use crate::ops::fake_views::{fake_mut as w, fake_ref as r};

    #[test]
    fn the_backward_kernels_were_compiled_for_sm80_and_sm90_within_their_spill_budget() {
        let built = crate::kernels::resources();
        for name in kernel_names() {
            // Same budget as the forward's tensor-core tiles: a small spill at 255 registers,
            // none for the exact and row kernels.
            let budget = if name.contains("_hd") { 256 } else { 0 };
            for arch in ["sm_80", "sm_90"] {
                let r = built.iter().find(|r| r.kernel == name && r.arch == arch);
                let r = r.unwrap_or_else(|| panic!("{name} was not compiled for {arch}"));
                assert!(
                    r.spill_store_bytes <= budget && r.spill_load_bytes <= budget,
                    "{name} on {arch}: spills {} / {} bytes (budget {budget})",
                    r.spill_store_bytes,
                    r.spill_load_bytes
                );
            }
        }
    }

    #[test]
    fn no_backward_kernel_spills_on_sm80_or_sm90() {
        // Every entry, both architectures. The tensor-core dK/dV entries sit at 241-255
        // registers and used to spill: on sm_80 the per-tile Q/dO loads' offsets (HD 128 and
        // 256), on sm_90 at HD 128 the Pᵀ floats across the masking (attention_bwd.cu:
        // qdo_row_step and pack_early choose, per entry and architecture, the forms that fit).
        let built = crate::kernels::resources();
        let mut checked = 0;
        for name in kernel_names() {
            for arch in ["sm_80", "sm_90"] {
                let r = built.iter().find(|r| r.kernel == name && r.arch == arch);
                let r = r.unwrap_or_else(|| panic!("{name} was not compiled for {arch}"));
                assert_eq!(
                    (r.spill_store_bytes, r.spill_load_bytes, r.stack_bytes),
                    (0, 0, 0),
                    "{name} on {arch}: spill stores, spill loads, stack frame (bytes)"
                );
                checked += 1;
            }
        }
        // 2 archs × (4 row and exact kernels × 3 dtypes + 2 dtypes × 3 head-dim tiles × 6
        // tensor-core entries: dK/dV, dK/dV + dQ, dQ, dense and sparse).
        assert_eq!(checked, 2 * (4 * 3 + 2 * 3 * 6));
    }

    struct Views {
        q: TensorRef<'static>,
        k: TensorRef<'static>,
        v: TensorRef<'static>,
        o: TensorRef<'static>,
        lse: TensorRef<'static>,
        d_o: TensorRef<'static>,
        dq: TensorMut<'static>,
        dk: TensorMut<'static>,
        dv: TensorMut<'static>,
    }

    #[allow(clippy::too_many_arguments)]
    fn views(
        dt: DType,
        b: usize,
        hq: usize,
        hkv: usize,
        lq: usize,
        lk: usize,
        d: usize,
        dv: usize,
    ) -> Views {
        Views {
            q: r(dt, &[b, hq, lq, d], 0),
            k: r(dt, &[b, hkv, lk, d], 1 << 32),
            v: r(dt, &[b, hkv, lk, dv], 2 << 32),
            o: r(dt, &[b, hq, lq, dv], 3 << 32),
            lse: r(DType::F32, &[b, hq, lq], 4 << 32),
            d_o: r(dt, &[b, hq, lq, dv], 5 << 32),
            dq: w(dt, &[b, hq, lq, d], 6 << 32),
            dk: w(dt, &[b, hkv, lk, d], 7 << 32),
            dv: w(dt, &[b, hkv, lk, dv], 8 << 32),
        }
    }

    fn run_check(x: &Views, opts: &Options) -> Result<CheckedBwd> {
        check(
            &x.q, &x.k, &x.v, &x.o, &x.lse, &x.d_o, &x.dq, &x.dk, &x.dv, opts,
        )
    }

    #[test]
    fn good_arguments_pass_with_gqa_and_unequal_head_dims() {
        let x = views(DType::BF16, 2, 8, 2, 5, 7, 72, 40);
        let cb = run_check(&x, &Options::default()).unwrap();
        assert_eq!((cb.c.shape.heads_kv, cb.c.shape.dim_v), (2, 40));
        assert_eq!(cb.lse_rows, 2 * 8 * 5);
        assert!(use_tensor_cores(&cb.c, Kernel::Auto, false).unwrap());
    }

    #[test]
    fn gradient_views_must_match_their_tensors() {
        let mut x = views(DType::F16, 1, 2, 1, 4, 6, 16, 8);
        x.dk = w(DType::F16, &[1, 2, 6, 16], 7 << 32);
        assert!(matches!(
            run_check(&x, &Options::default()),
            Err(Error::Shape { arg: "dk", .. })
        ));
        let mut x = views(DType::F16, 1, 2, 1, 4, 6, 16, 8);
        x.dq = w(DType::BF16, &[1, 2, 4, 16], 6 << 32);
        assert!(matches!(
            run_check(&x, &Options::default()),
            Err(Error::DType { arg: "dq", .. })
        ));
        let mut x = views(DType::F16, 1, 2, 1, 4, 6, 16, 8);
        x.d_o = r(DType::F16, &[1, 2, 4, 9], 5 << 32);
        assert!(matches!(
            run_check(&x, &Options::default()),
            Err(Error::Shape { arg: "d_o", .. })
        ));
    }

    #[test]
    fn lse_must_be_f32_with_one_value_per_row() {
        let mut x = views(DType::F16, 1, 2, 1, 4, 6, 16, 8);
        x.lse = r(DType::F32, &[1, 2, 3], 4 << 32);
        assert!(matches!(
            run_check(&x, &Options::default()),
            Err(Error::Shape { arg: "lse", .. })
        ));
        x.lse = r(DType::F16, &[1, 2, 4], 4 << 32);
        assert!(matches!(
            run_check(&x, &Options::default()),
            Err(Error::DType { arg: "lse", .. })
        ));
    }

    #[test]
    fn tensor_cores_take_f16_and_bf16_up_to_head_dim_256_dense_and_sparse() {
        for (d, dv) in [(192, 64), (256, 256), (64, 129), (136, 200)] {
            let big = run_check(
                &views(DType::BF16, 1, 1, 1, 4, 4, d, dv),
                &Options::default(),
            )
            .unwrap();
            assert!(use_tensor_cores(&big.c, Kernel::Auto, false).unwrap());
            assert!(use_tensor_cores(&big.c, Kernel::TensorCore, false).unwrap());
            assert_eq!(head_dim_tile(d, dv), 256);
            assert!(use_tensor_cores(&big.c, Kernel::Auto, true).unwrap());
            assert!(use_tensor_cores(&big.c, Kernel::TensorCore, true).unwrap());
        }
        let f32c = run_check(
            &views(DType::F32, 1, 1, 1, 4, 4, 64, 64),
            &Options::default(),
        )
        .unwrap();
        assert!(!use_tensor_cores(&f32c.c, Kernel::Auto, false).unwrap());
        assert!(matches!(
            use_tensor_cores(&f32c.c, Kernel::TensorCore, false),
            Err(Error::DType { .. })
        ));
    }

    #[test]
    fn head_dims_pick_their_tile_and_column_blocks() {
        assert_eq!(head_dim_tile(64, 8), 64);
        assert_eq!(head_dim_tile(72, 128), 128);
        assert_eq!(head_dim_tile(129, 1), 256);
        assert_eq!(column_blocks(128, 128, 96), (1, 1));
        assert_eq!(column_blocks(256, 256, 256), (2, 2));
        // Only the wider side has a second block; dQ has D's.
        assert_eq!(column_blocks(256, 256, 128), (2, 2));
        assert_eq!(column_blocks(256, 128, 256), (2, 1));
        assert_eq!(column_blocks(256, 136, 8), (2, 2));
    }

    #[cfg(feature = "testing")]
    #[test]
    fn the_column_split_and_sparse_tile_match_the_twin_and_the_kernel_header() {
        use crate::twin::attention_backward as twin;
        assert_eq!(COLS, twin::KERNEL_COLUMNS);
        assert_eq!(SPARSE_TC_BLOCK_SIZE, twin::KERNEL_SPARSE_TILE);
        for (d, dv) in [(256, 256), (256, 100), (100, 256), (130, 129)] {
            let cols = twin::Columns::blocks(twin::KERNEL_COLUMNS);
            assert_eq!(
                column_blocks(head_dim_tile(d, dv), d, dv),
                (
                    twin::dkdv_column_blocks(d, dv, cols),
                    twin::dq_column_blocks(d, cols)
                )
            );
        }
    }

    #[test]
    fn shared_memory_of_the_tensor_core_kernels_follows_the_kernel_header() {
        assert_eq!(shared_bytes(128, false), (70_144, 69_632));
        assert_eq!(shared_bytes(128, true).0, 79_360);
        assert_eq!(shared_bytes(256, false), (135_680, 135_168));
        assert_eq!(shared_bytes(256, true).0, 144_896);
    }
}
