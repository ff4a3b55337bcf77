//! [`TrainBackend`] for the CUDA backend: every op through cuattn's kernels and cuBLAS, queued
//! on the [`crate::gpu::Gpu`]'s one stream; only the loss and the sums of squares come back to
//! the host (the trait returns them as numbers), so nothing else waits for the device.
//!
//! Precision (`docs/training.md`, "The CUDA backend"):
//! - parameters and AdamW's moments are f32 (`upload_as(.., F32)`); an op that reads a
//!   parameter stored in another dtype than the backend's (linear weights and biases,
//!   LayerNorm's γ, embedding tables) reads it converted to the backend's dtype;
//! - activations and their gradients are stored in the backend's dtype (f32, f16 or bf16);
//!   every op computes in f32 (cuBLAS with f32 accumulation, f32 arithmetic in the kernels)
//!   and rounds once on store;
//! - the ops whose result is a parameter's gradient — a sum over the token rows — write f32:
//!   [`TrainBackend::matmul`] with `op_a = T` (dW = dYᵀ·X), [`TrainBackend::sum_rows`],
//!   LayerNorm's dγ and dβ, and [`TrainBackend::gather_rows_backward`];
//! - an op given an input in another dtype than it computes in converts it first, so f32
//!   gradients and bf16 activations mix freely.
//!
//! Attention runs on the fused kernels (forward with its log-sum-exp, and the deterministic
//! FlashAttention-2 backward); with dropout on the probabilities, which the fused kernels do
//! not take, it runs unfused ([`attention`]): cuBLAS products around a row-softmax kernel and
//! the Philox dropout kernel, with the probabilities materialised per call. The recurrent
//! models' GRU step and additive attention run fused ([`rnn`]).
//!
//! Every entry that takes tensors first refuses one of another context than the backend's
//! (`Cuda::check_contexts`: [`Error::Device`] naming the argument, as the ops do): a
//! [`DeviceTensor`] carries the `Gpu` that made it, and a caller may hold tensors of several
//! contexts, while the conversions and copies below launch on raw addresses before any op of
//! `crate::ops` would see a view.

mod attention;
mod rnn;

use super::backend::{check_attention, Activation, AttentionMask, Backend, Heads};
use super::cuda::Cuda;
use super::train::backend::{
    check_cross_entropy, AdamWStep, AttentionGrads, CrossEntropy, DropoutSite, LayerNormGrads, Op,
    TrainBackend,
};
use super::train::rnn_ops::{AdditiveGrads, GruCellGrads, LstmCellGrads};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::DeviceTensor;
use crate::kernels::params::{
    cuattn_cast_params, cuattn_copy2d_params, cuattn_ew_params, CUATTN_EW_ACT_BWD, CUATTN_EW_AXPY,
    CUATTN_EW_MUL, CUATTN_EW_SCALE, CUATTN_EW_SIGMOID, CUATTN_EW_SIGMOID_BWD, CUATTN_EW_TANH_BWD,
};
use crate::ops::attention::{self as attn, Sequences};
use crate::ops::attention_backward::{self as attn_bwd, Mode};
use crate::ops::elementwise::act_code;
use crate::ops::launch;
use crate::ops::layernorm::{self as ln, Tuning};
use crate::ops::training::bias_gelu::{column_sums_into, ColumnSumOptions};
use crate::ops::training::cross_entropy::{cross_entropy_into, CrossEntropyOptions};
use crate::ops::training::dropout::{dropout_into, DropoutOptions};
use crate::ops::training::embedding::{embedding_backward_into, EmbeddingBackwardOptions};
use crate::ops::training::optimizer::{adamw_step, grad_norm, AdamWOptions, AdamWTensor};
use crate::tensor::{HostTensor, Layout};
use cudarc::cublas::{result as blas, sys as blas_sys};
use std::ffi::c_void;

const MODULE: &str = "training_ops";
const THREADS: u32 = 256;

fn dims2(arg: &'static str, t: &DeviceTensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(Error::shape(arg, "2 dims [rows, cols]", s)),
    }
}

fn same_shape(arg: &'static str, a: &DeviceTensor, b: &DeviceTensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(
            arg,
            format!("{:?} (the other operand's shape)", a.shape()),
            b.shape(),
        ));
    }
    Ok(())
}

fn numel(t: &DeviceTensor) -> usize {
    t.shape().iter().product()
}

fn ptr(t: &DeviceTensor) -> u64 {
    t.view().device_ptr()
}

fn cuda_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

fn int(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(arg, format!("{v} exceeds cuBLAS's 32-bit sizes")))
}

/// Refused rather than ignored, as on the CPU backend: the training attention has no band yet.
fn refuse_window(mask: &AttentionMask<'_>) -> Result<()> {
    if mask.window.is_some() {
        return Err(Error::invalid(
            "window",
            "sliding-window attention is not supported in training yet",
        ));
    }
    Ok(())
}

/// One operand of [`Cuda::gemm_rm`]: a row-major matrix at `ptr` with row stride `ld`
/// (elements), read transposed or not, `stride` elements apart between batch entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub trans: bool,
    pub stride: usize,
}

impl Cuda {
    fn stride_grid(&self, items: usize) -> u32 {
        let resident = self.gpu().info().multiprocessors as usize * 8;
        items.div_ceil(THREADS as usize).clamp(1, resident) as u32
    }

    /// `t` itself when stored in the backend's dtype, else a converted copy kept in `slot`:
    /// how the ops read f32 parameters (and f32 gradients) on a 16-bit backend.
    pub(crate) fn in_compute_dtype<'t>(
        &self,
        t: &'t DeviceTensor,
        slot: &'t mut Option<DeviceTensor>,
    ) -> Result<&'t DeviceTensor> {
        if t.dtype() == self.dtype() {
            return Ok(t);
        }
        Ok(slot.insert(self.converted(t, self.dtype())?))
    }

    /// A copy of `t` in `dtype` (a plain copy when it is already stored so).
    pub(crate) fn converted(&self, t: &DeviceTensor, dtype: DType) -> Result<DeviceTensor> {
        let out = self.gpu().zeros(dtype, t.shape())?;
        let n = numel(t);
        if n == 0 {
            return Ok(out);
        }
        if t.dtype() == dtype {
            self.copy2d(t, 0, n, (ptr(&out), n), 1, n)?;
            return Ok(out);
        }
        let name: &'static str = match (t.dtype(), dtype) {
            (DType::F32, DType::F16) => "cast_f32_to_f16",
            (DType::F32, DType::BF16) => "cast_f32_to_bf16",
            (DType::F16, DType::F32) => "cast_f16_to_f32",
            (DType::F16, DType::BF16) => "cast_f16_to_bf16",
            (DType::BF16, DType::F32) => "cast_bf16_to_f32",
            _ => "cast_bf16_to_f16",
        };
        let k = self.gpu().kernel(MODULE, name)?;
        let p = cuattn_cast_params {
            src: ptr(t),
            dst: ptr(&out),
            n: n as i64,
        };
        // SAFETY: t and out are distinct contiguous tensors of n elements of their dtypes.
        unsafe {
            launch(
                self.gpu(),
                &k,
                &p,
                (self.stride_grid(n), 1),
                (THREADS, 1),
                0,
            )
        }?;
        Ok(out)
    }

    /// Copies `rows` × `width` elements of `src` (row stride `src_stride`, from element
    /// `src_start`) to `dst` = (address, row stride), same dtype. Callers check the ranges.
    fn copy2d(
        &self,
        src: &DeviceTensor,
        src_start: usize,
        src_stride: usize,
        (dst, dst_stride): (u64, usize),
        rows: usize,
        width: usize,
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let size = src.dtype().size_bytes();
        // Rows of 32-bit elements either way: an f16/bf16 block moves as u16.
        let name = if size == 4 {
            "copy2d_b32"
        } else {
            "copy2d_b16"
        };
        let k = self.gpu().kernel(MODULE, name)?;
        let p = cuattn_copy2d_params {
            src: ptr(src) + (src_start * size) as u64,
            dst,
            rows: rows as i64,
            width: width as i64,
            src_stride: src_stride as i64,
            dst_stride: dst_stride as i64,
        };
        // SAFETY: the callers (slice_cols, concat_cols, converted) derive the block from
        // checked shapes: rows·width elements inside src from src_start with its row stride,
        // and inside the freshly allocated destination, which is a different buffer.
        unsafe {
            launch(
                self.gpu(),
                &k,
                &p,
                (self.stride_grid(rows * width), 1),
                (THREADS, 1),
                0,
            )
        }
    }

    /// `out = f(a, b)` elementwise (`CUATTN_EW_*`), all three of `dtype` and of one shape
    /// (checked by the callers); `out` may be `a` (in place).
    #[allow(clippy::too_many_arguments)]
    fn ew(
        &self,
        dtype: DType,
        op: u32,
        act: i32,
        alpha: f32,
        a: u64,
        b: u64,
        out: u64,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let name: &'static str = match dtype {
            DType::F32 => "ew_f32",
            DType::F16 => "ew_f16",
            DType::BF16 => "ew_bf16",
        };
        let k = self.gpu().kernel(MODULE, name)?;
        let p = cuattn_ew_params {
            a,
            b,
            out,
            n: n as i64,
            op: op as i32,
            act,
            alpha,
        };
        // SAFETY: a, b (when not 0) and out hold n contiguous elements of `dtype` (the callers
        // checked shapes and converted dtypes); each element is read and then written by one
        // thread, so out may be a.
        unsafe {
            launch(
                self.gpu(),
                &k,
                &p,
                (self.stride_grid(n), 1),
                (THREADS, 1),
                0,
            )
        }
    }

    /// A fresh tensor `f(a, b)` of `a`'s shape in the backend's dtype.
    fn ew_new(
        &self,
        op: u32,
        act: i32,
        a: &DeviceTensor,
        b: Option<&DeviceTensor>,
    ) -> Result<DeviceTensor> {
        if let Some(b) = b {
            same_shape("b", a, b)?;
        }
        let (mut sa, mut sb) = (None, None);
        let a = self.in_compute_dtype(a, &mut sa)?;
        let b = match b {
            Some(b) => Some(self.in_compute_dtype(b, &mut sb)?),
            None => None,
        };
        let out = self.gpu().zeros(self.dtype(), a.shape())?;
        self.ew(
            self.dtype(),
            op,
            act,
            1.0,
            ptr(a),
            b.map_or(0, ptr),
            ptr(&out),
            numel(a),
        )?;
        Ok(out)
    }

    /// Row-major `C[m, n] = op(A)[m, k]·op(B)[k, n] (+ C when `accumulate`)` over `batch`
    /// entries, cuBLAS with f32 accumulation: A and B of `in_dtype`, C of `out_dtype` with row
    /// stride `c.ld`. (Column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, so B goes first.)
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_rm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: (u64, usize, usize),
        (in_dtype, out_dtype): (DType, DType),
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: every caller derives the pointers, leading dims and batch strides from
        // tensors whose shapes it checked, so each of the `batch` products reads and writes
        // inside its buffers; α and β are host f32 scalars as cuBLAS' default pointer mode
        // with COMPUTE_32F expects; the handle's stream is the Gpu's stream, which orders the
        // GEMM after the writes of its inputs. k = 0 writes β·C (zeros when not accumulating).
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas().handle(),
                op(b.trans),
                op(a.trans),
                int("n", n)?,
                int("m", m)?,
                int("k", k)?,
                (&alpha as *const f32).cast::<c_void>(),
                b.ptr as *const c_void,
                cuda_type(in_dtype),
                int("ldb", b.ld.max(1))?,
                b.stride as i64,
                a.ptr as *const c_void,
                cuda_type(in_dtype),
                int("lda", a.ld.max(1))?,
                a.stride as i64,
                (&beta as *const f32).cast::<c_void>(),
                c.0 as *mut c_void,
                cuda_type(out_dtype),
                int("ldc", c.1.max(1))?,
                c.2 as i64,
                int("batch", batch)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::blas("cublasGemmStridedBatchedEx", e))
    }

    fn require_compute(&self, arg: &'static str, t: &DeviceTensor) -> Result<()> {
        if t.dtype() != self.dtype() {
            return Err(Error::DType {
                arg,
                expected: self.dtype(),
                got: t.dtype(),
            });
        }
        Ok(())
    }

    /// The `[B, H, L, D]` view of heads laid side by side in a `[B·L, width]` tensor.
    fn heads_layout(batch: usize, len: usize, h: &Heads<'_, DeviceTensor>) -> Result<Layout> {
        let width = h.tensor.shape()[1];
        Layout::strided(
            "heads",
            &[batch, h.heads, len, h.dim],
            &[len * width, h.dim, width, 1],
        )
    }
}

impl TrainBackend for Cuda {
    fn tensor_dtype(&self, t: &DeviceTensor) -> DType {
        t.dtype()
    }

    fn upload_as(&self, shape: &[usize], values: &[f32], dtype: DType) -> Result<DeviceTensor> {
        self.gpu()
            .upload(&HostTensor::from_f32(dtype, shape, values)?)
    }

    fn zeros(&self, shape: &[usize]) -> Result<DeviceTensor> {
        self.gpu().zeros(self.dtype(), shape)
    }

    fn cast(&self, t: &DeviceTensor, dtype: DType) -> Result<DeviceTensor> {
        self.check_contexts([("t", t)])?;
        self.converted(t, dtype)
    }

    fn accumulate(&self, acc: &mut DeviceTensor, x: &DeviceTensor) -> Result<()> {
        self.check_contexts([("acc", &*acc), ("x", x)])?;
        same_shape("x", acc, x)?;
        let n = numel(acc);
        if n == 0 {
            return Ok(());
        }
        // In acc's own dtype (an f32 gradient stays f32); x converted to it when it differs.
        let slot;
        let x = if x.dtype() == acc.dtype() {
            x
        } else {
            slot = self.converted(x, acc.dtype())?;
            &slot
        };
        let (a, b) = (ptr(acc), ptr(x));
        self.ew(acc.dtype(), CUATTN_EW_AXPY, 0, 1.0, a, b, a, n)
    }

    fn scale(&self, x: &mut DeviceTensor, s: f32) -> Result<()> {
        self.check_contexts([("x", &*x)])?;
        let a = ptr(x);
        self.ew(x.dtype(), CUATTN_EW_SCALE, 0, s, a, 0, a, numel(x))
    }

    fn matmul(
        &self,
        a: &DeviceTensor,
        op_a: Op,
        b: &DeviceTensor,
        op_b: Op,
    ) -> Result<DeviceTensor> {
        self.check_contexts([("a", a), ("b", b)])?;
        let (ar, ac) = dims2("a", a)?;
        let (br, bc) = dims2("b", b)?;
        let (m, k) = match op_a {
            Op::N => (ar, ac),
            Op::T => (ac, ar),
        };
        let (kb, n) = match op_b {
            Op::N => (br, bc),
            Op::T => (bc, br),
        };
        if kb != k {
            return Err(Error::shape(
                "b",
                format!("op(b) with {k} rows (op(a) is [{m}, {k}])"),
                b.shape(),
            ));
        }
        // A sum over a's rows (the weight-gradient GEMM dW = dYᵀ·X) is a parameter's
        // gradient: f32.
        let out_dtype = if op_a == Op::T {
            DType::F32
        } else {
            self.dtype()
        };
        let c = self.gpu().zeros(out_dtype, &[m, n])?;
        if m == 0 || n == 0 || k == 0 {
            return Ok(c);
        }
        let (mut sa, mut sb) = (None, None);
        let a = self.in_compute_dtype(a, &mut sa)?;
        let b = self.in_compute_dtype(b, &mut sb)?;
        self.gemm_rm(
            (m, n, k),
            Operand {
                ptr: ptr(a),
                ld: ac,
                trans: op_a == Op::T,
                stride: 0,
            },
            Operand {
                ptr: ptr(b),
                ld: bc,
                trans: op_b == Op::T,
                stride: 0,
            },
            (ptr(&c), n, 0),
            (self.dtype(), out_dtype),
            1,
            false,
        )?;
        Ok(c)
    }

    fn sum_rows(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        self.check_contexts([("x", x)])?;
        let (rows, cols) = dims2("x", x)?;
        let mut out = self.gpu().zeros(DType::F32, &[cols])?;
        if rows == 0 || cols == 0 {
            return Ok(out);
        }
        column_sums_into(
            self.gpu(),
            &ColumnSumOptions::default(),
            &x.view(),
            &mut out.view_mut(),
        )?;
        Ok(out)
    }

    fn sum_squares(&self, x: &DeviceTensor) -> Result<f64> {
        self.check_contexts([("x", x)])?;
        self.sum_squares_all(&[x])
    }

    /// One deterministic two-stage pass per dtype present (f32 partial sums per chunk of
    /// 64 Ki elements, added in chunk order), one wait for the device.
    fn sum_squares_all(&self, xs: &[&DeviceTensor]) -> Result<f64> {
        self.check_contexts(xs.iter().map(|&t| ("xs", t)))?;
        let mut norms = Vec::new();
        for dtype in DType::ALL {
            let views: Vec<_> = xs
                .iter()
                .filter(|t| t.dtype() == dtype && numel(t) > 0)
                .map(|t| t.view())
                .collect();
            if !views.is_empty() {
                norms.push(grad_norm(self.gpu(), &views, 1.0)?);
            }
        }
        let mut total = 0f64;
        for n in norms {
            let norm = n.to_f32_vec()?[0] as f64;
            total += norm * norm;
        }
        Ok(total)
    }

    fn mul(&self, a: &DeviceTensor, b: &DeviceTensor) -> Result<DeviceTensor> {
        self.check_contexts([("a", a), ("b", b)])?;
        self.ew_new(CUATTN_EW_MUL, 0, a, Some(b))
    }

    fn activate(&self, x: &DeviceTensor, act: Activation) -> Result<DeviceTensor> {
        self.check_contexts([("x", x)])?;
        let mut y = self.converted(x, self.dtype())?;
        if numel(&y) > 0 && act != Activation::None {
            self.bias_act(&mut y, None, act)?;
        }
        Ok(y)
    }

    fn activation_backward(
        &self,
        x: &DeviceTensor,
        dy: &DeviceTensor,
        act: Activation,
    ) -> Result<DeviceTensor> {
        self.check_contexts([("x", x), ("dy", dy)])?;
        self.ew_new(CUATTN_EW_ACT_BWD, act_code(act), x, Some(dy))
    }

    fn sigmoid(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        self.check_contexts([("x", x)])?;
        self.ew_new(CUATTN_EW_SIGMOID, 0, x, None)
    }

    fn sigmoid_backward(&self, y: &DeviceTensor, dy: &DeviceTensor) -> Result<DeviceTensor> {
        self.check_contexts([("y", y), ("dy", dy)])?;
        self.ew_new(CUATTN_EW_SIGMOID_BWD, 0, y, Some(dy))
    }

    fn tanh_backward(&self, y: &DeviceTensor, dy: &DeviceTensor) -> Result<DeviceTensor> {
        self.check_contexts([("y", y), ("dy", dy)])?;
        self.ew_new(CUATTN_EW_TANH_BWD, 0, y, Some(dy))
    }

    fn slice_cols(&self, x: &DeviceTensor, start: usize, width: usize) -> Result<DeviceTensor> {
        self.check_contexts([("x", x)])?;
        let (rows, cols) = dims2("x", x)?;
        if start.checked_add(width).is_none_or(|end| end > cols) {
            return Err(Error::invalid(
                "start",
                format!("columns {start}..+{width} of a tensor with {cols} columns"),
            ));
        }
        let out = self.gpu().zeros(x.dtype(), &[rows, width])?;
        self.copy2d(x, start, cols, (ptr(&out), width), rows, width)?;
        Ok(out)
    }

    fn concat_cols(&self, parts: &[&DeviceTensor]) -> Result<DeviceTensor> {
        self.check_contexts(parts.iter().map(|&p| ("parts", p)))?;
        let Some(first) = parts.first() else {
            return Err(Error::invalid("parts", "nothing to concatenate"));
        };
        let (rows, _) = dims2("parts", first)?;
        let dtype = first.dtype();
        let mut total = 0;
        for p in parts {
            let (r, c) = dims2("parts", p)?;
            if r != rows {
                return Err(Error::shape("parts", format!("[{rows}, _]"), p.shape()));
            }
            if p.dtype() != dtype {
                return Err(Error::DType {
                    arg: "parts",
                    expected: dtype,
                    got: p.dtype(),
                });
            }
            total += c;
        }
        let out = self.gpu().zeros(dtype, &[rows, total])?;
        let size = dtype.size_bytes() as u64;
        let mut col = 0;
        for p in parts {
            let c = p.shape()[1];
            self.copy2d(p, 0, c, (ptr(&out) + col as u64 * size, total), rows, c)?;
            col += c;
        }
        Ok(out)
    }

    fn layer_norm_backward(
        &self,
        x: &DeviceTensor,
        gamma: &DeviceTensor,
        eps: f32,
        dy: &DeviceTensor,
    ) -> Result<LayerNormGrads<DeviceTensor>> {
        self.check_contexts([("x", x), ("gamma", gamma), ("dy", dy)])?;
        let (rows, width) = dims2("x", x)?;
        same_shape("dy", x, dy)?;
        if gamma.shape() != [width] {
            return Err(Error::shape("gamma", format!("[{width}]"), gamma.shape()));
        }
        if width == 0 {
            return Err(Error::Empty {
                arg: "x",
                shape: x.shape().to_vec(),
            });
        }
        let dt = self.dtype();
        if rows == 0 {
            return Ok(LayerNormGrads {
                dx: self.gpu().zeros(dt, x.shape())?,
                dgamma: self.gpu().zeros(DType::F32, &[width])?,
                dbeta: self.gpu().zeros(DType::F32, &[width])?,
            });
        }
        let (mut sx, mut sg, mut sd) = (None, None, None);
        let x = self.in_compute_dtype(x, &mut sx)?;
        let gamma = self.in_compute_dtype(gamma, &mut sg)?;
        let dy = self.in_compute_dtype(dy, &mut sd)?;
        // The trait passes no statistics: the forward runs again for the row means and
        // 1/σ (its output is discarded).
        let gpu = self.gpu();
        let mut scratch = gpu.zeros(dt, x.shape())?;
        let mut mean = gpu.zeros(DType::F32, &[rows])?;
        let mut rstd = gpu.zeros(DType::F32, &[rows])?;
        ln::forward_into(
            gpu,
            &x.view(),
            Some(&gamma.view()),
            None,
            eps,
            &mut scratch.view_mut(),
            Some(&mut mean.view_mut()),
            Some(&mut rstd.view_mut()),
            Tuning::default(),
        )?;
        let mut dx = gpu.zeros(dt, x.shape())?;
        let mut dgamma = gpu.zeros(dt, &[width])?;
        let mut dbeta = gpu.zeros(dt, &[width])?;
        ln::backward_into(
            gpu,
            &dy.view(),
            &x.view(),
            Some(&gamma.view()),
            &mean.view(),
            &rstd.view(),
            &mut dx.view_mut(),
            Some(&mut dgamma.view_mut()),
            Some(&mut dbeta.view_mut()),
            None,
            Tuning::default(),
        )?;
        // Parameter gradients in f32 (the kernel sums in f32 and rounds once to its dtype).
        let (dgamma, dbeta) = if dt == DType::F32 {
            (dgamma, dbeta)
        } else {
            (
                self.converted(&dgamma, DType::F32)?,
                self.converted(&dbeta, DType::F32)?,
            )
        };
        Ok(LayerNormGrads { dx, dgamma, dbeta })
    }

    fn gather_rows_backward(
        &self,
        dy: &DeviceTensor,
        ids: &[u32],
        rows: usize,
        padding_idx: Option<u32>,
    ) -> Result<DeviceTensor> {
        self.check_contexts([("dy", dy)])?;
        let (n, width) = dims2("dy", dy)?;
        if n != ids.len() {
            return Err(Error::shape(
                "dy",
                format!("[{}, width] (one row per id)", ids.len()),
                dy.shape(),
            ));
        }
        if let Some(p) = padding_idx.filter(|&p| p as usize >= rows) {
            return Err(Error::invalid(
                "padding_idx",
                format!("row {p} is outside the table's {rows} rows"),
            ));
        }
        let mut out = self.gpu().zeros(DType::F32, &[rows, width])?;
        if n == 0 || width == 0 || rows == 0 {
            return Ok(out);
        }
        embedding_backward_into(
            self.gpu(),
            &EmbeddingBackwardOptions { accumulate: false },
            &dy.view(),
            ids,
            &mut out.view_mut(),
        )?;
        if let Some(p) = padding_idx {
            if ids.contains(&p) {
                // The padding row's sum is discarded: zero it.
                let gpu = self.gpu();
                gpu.context()
                    .bind_to_thread()
                    .map_err(|e| Error::driver("binding the context", e))?;
                // SAFETY: row p < rows (checked above) of the contiguous [rows, width] f32
                // tensor `out`: width·4 bytes from p·width·4 lie inside it; queued on the Gpu's
                // stream after the scatter kernel that wrote them.
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        ptr(&out) + (p as usize * width * 4) as u64,
                        0,
                        width * 4,
                        gpu.stream().cu_stream(),
                    )
                }
                .map_err(|e| Error::driver("zeroing the padding row", e))?;
            }
        }
        Ok(out)
    }

    fn attention_with_lse(
        &self,
        q: Heads<'_, DeviceTensor>,
        k: Heads<'_, DeviceTensor>,
        v: Heads<'_, DeviceTensor>,
        mask: &AttentionMask<'_>,
        dropout: Option<DropoutSite>,
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        self.check_contexts([("q", q.tensor), ("k", k.tensor), ("v", v.tensor)])?;
        let widths = check_attention(&q, &k, &v, mask)?;
        for (arg, h) in [("q", &q), ("k", &k), ("v", &v)] {
            self.require_compute(arg, h.tensor)?;
        }
        refuse_window(mask)?;
        if let Some(site) = dropout.filter(|s| s.p > 0.0) {
            return attention::forward(self, &q, &k, &v, mask, widths, site);
        }
        if let Some(site) = dropout {
            crate::rng::Dropout::new(site.p)?; // p = 0 runs fused, but a bad p is still an error
        }
        let m = *mask;
        let gpu = self.gpu();
        let mut out = gpu.zeros(self.dtype(), &[m.batch * m.len_q, q.heads * v.dim])?;
        let mut lse = gpu.full(DType::F32, &[m.batch, q.heads, m.len_q], f32::NEG_INFINITY)?;
        if m.batch == 0 || m.len_q == 0 || m.len_k == 0 {
            return Ok((out, lse));
        }
        let key_lens: Option<Vec<i32>> = m.key_lens.map(|l| l.iter().map(|&x| x as i32).collect());
        let opts = attn::Options {
            scale: m.scale,
            causal: m.causal,
            sequences: Sequences::Dense {
                key_lens: key_lens.as_deref(),
            },
            ..attn::Options::default()
        };
        let qv = q
            .tensor
            .view_at(q.col, Self::heads_layout(m.batch, m.len_q, &q)?)?;
        let kv = k
            .tensor
            .view_at(k.col, Self::heads_layout(m.batch, m.len_k, &k)?)?;
        let vv = v
            .tensor
            .view_at(v.col, Self::heads_layout(m.batch, m.len_k, &v)?)?;
        let o_layout = Self::heads_layout(
            m.batch,
            m.len_q,
            &Heads {
                tensor: &out,
                col: 0,
                heads: q.heads,
                dim: v.dim,
            },
        )?;
        let mut ov = out.view_mut_at(0, o_layout)?;
        attn::forward_into(
            gpu,
            &qv,
            &kv,
            &vv,
            &mut ov,
            Some(&mut lse.view_mut()),
            &opts,
        )?;
        drop(ov);
        Ok((out, lse))
    }

    fn attention_backward(
        &self,
        q: Heads<'_, DeviceTensor>,
        k: Heads<'_, DeviceTensor>,
        v: Heads<'_, DeviceTensor>,
        o: &DeviceTensor,
        lse: &DeviceTensor,
        dout: &DeviceTensor,
        mask: &AttentionMask<'_>,
        dropout: Option<DropoutSite>,
    ) -> Result<AttentionGrads<DeviceTensor>> {
        self.check_contexts([
            ("q", q.tensor),
            ("k", k.tensor),
            ("v", v.tensor),
            ("o", o),
            ("lse", lse),
            ("dout", dout),
        ])?;
        let widths = check_attention(&q, &k, &v, mask)?;
        for (arg, h) in [("q", &q), ("k", &k), ("v", &v)] {
            self.require_compute(arg, h.tensor)?;
        }
        refuse_window(mask)?;
        let m = *mask;
        let o_shape = [m.batch * m.len_q, q.heads * v.dim];
        if o.shape() != o_shape {
            return Err(Error::shape("o", format!("{o_shape:?}"), o.shape()));
        }
        if dout.shape() != o_shape {
            return Err(Error::shape("dout", format!("{o_shape:?}"), dout.shape()));
        }
        if lse.shape() != [m.batch, q.heads, m.len_q] || lse.dtype() != DType::F32 {
            return Err(Error::shape(
                "lse",
                format!("[{}, {}, {}] f32", m.batch, q.heads, m.len_q),
                lse.shape(),
            ));
        }
        self.require_compute("o", o)?;
        let mut sd = None;
        let dout = self.in_compute_dtype(dout, &mut sd)?;
        if let Some(site) = dropout.filter(|s| s.p > 0.0) {
            return attention::backward(self, &q, &k, &v, o, lse, dout, mask, widths, site);
        }
        if let Some(site) = dropout {
            crate::rng::Dropout::new(site.p)?;
        }
        let gpu = self.gpu();
        let dt = self.dtype();
        let mut dq = gpu.zeros(dt, &[m.batch * m.len_q, q.heads * q.dim])?;
        let mut dk = gpu.zeros(dt, &[m.batch * m.len_k, k.heads * k.dim])?;
        let mut dv = gpu.zeros(dt, &[m.batch * m.len_k, v.heads * v.dim])?;
        if m.batch == 0 || m.len_q == 0 || m.len_k == 0 {
            return Ok(AttentionGrads { dq, dk, dv });
        }
        let key_lens: Option<Vec<i32>> = m.key_lens.map(|l| l.iter().map(|&x| x as i32).collect());
        let opts = attn_bwd::Options {
            forward: attn::Options {
                scale: m.scale,
                causal: m.causal,
                sequences: Sequences::Dense {
                    key_lens: key_lens.as_deref(),
                },
                ..attn::Options::default()
            },
            mode: Mode::Deterministic,
        };
        let like = |t: &DeviceTensor, len: usize, heads: usize, dim: usize| {
            Self::heads_layout(
                m.batch,
                len,
                &Heads {
                    tensor: t,
                    col: 0,
                    heads,
                    dim,
                },
            )
        };
        let qv = q
            .tensor
            .view_at(q.col, Self::heads_layout(m.batch, m.len_q, &q)?)?;
        let kv = k
            .tensor
            .view_at(k.col, Self::heads_layout(m.batch, m.len_k, &k)?)?;
        let vv = v
            .tensor
            .view_at(v.col, Self::heads_layout(m.batch, m.len_k, &v)?)?;
        let ov = o.view_at(0, like(o, m.len_q, q.heads, v.dim)?)?;
        let dov = dout.view_at(0, like(dout, m.len_q, q.heads, v.dim)?)?;
        let (lq, lk) = (
            like(&dq, m.len_q, q.heads, q.dim)?,
            like(&dk, m.len_k, k.heads, k.dim)?,
        );
        let lv = like(&dv, m.len_k, v.heads, v.dim)?;
        attn_bwd::backward_into(
            gpu,
            &qv,
            &kv,
            &vv,
            &ov,
            &lse.view(),
            &dov,
            &mut dq.view_mut_at(0, lq)?,
            &mut dk.view_mut_at(0, lk)?,
            &mut dv.view_mut_at(0, lv)?,
            &opts,
        )?;
        Ok(AttentionGrads { dq, dk, dv })
    }

    fn dropout(&self, x: &DeviceTensor, site: DropoutSite) -> Result<DeviceTensor> {
        self.check_contexts([("x", x)])?;
        crate::rng::Dropout::new(site.p)?;
        if site.p == 0.0 || numel(x) == 0 {
            return self.converted(x, x.dtype());
        }
        let mut y = self.gpu().zeros(x.dtype(), x.shape())?;
        // The kernel sees [rows, last dim]: a 1-D tensor is one row.
        let flat = Layout::contiguous(&[1, numel(x)]);
        dropout_into(
            self.gpu(),
            &DropoutOptions {
                p: site.p,
                seed: site.seed,
                offset: site.offset,
            },
            &x.view_at(0, flat.clone())?,
            &mut y.view_mut_at(0, flat)?,
        )?;
        Ok(y)
    }

    fn cross_entropy(
        &self,
        logits: &DeviceTensor,
        labels: &[i64],
        opts: &CrossEntropy,
    ) -> Result<(f32, DeviceTensor)> {
        self.check_contexts([("logits", logits)])?;
        let (rows, classes) = dims2("logits", logits)?;
        check_cross_entropy(rows, classes, labels, opts)?;
        let eps = opts.label_smoothing;
        let mut sl = None;
        let logits = self.in_compute_dtype(logits, &mut sl)?;
        let mut grad = self.gpu().zeros(logits.dtype(), logits.shape())?;
        if labels.iter().all(|&l| l == opts.ignore_index) {
            return Ok((0.0, grad));
        }
        // Labels as i32: a valid label is below `classes`; an ignore index that i32 cannot
        // hold becomes i32::MIN, which no valid label equals.
        let ignore = i32::try_from(opts.ignore_index).unwrap_or(i32::MIN);
        let labels32: Vec<i32> = labels
            .iter()
            .map(|&l| {
                if l == opts.ignore_index {
                    ignore
                } else {
                    l as i32
                }
            })
            .collect();
        let out = cross_entropy_into(
            self.gpu(),
            &CrossEntropyOptions {
                ignore_index: ignore,
                label_smoothing: eps,
                grad_scale: 1.0,
            },
            &logits.view(),
            &labels32,
            Some(&mut grad.view_mut()),
        )?;
        let loss = out.loss.to_f32_vec()?[0];
        Ok((loss, grad))
    }

    fn adamw_step(
        &self,
        param: &mut DeviceTensor,
        grad: &DeviceTensor,
        m: &mut DeviceTensor,
        v: &mut DeviceTensor,
        hp: &AdamWStep,
    ) -> Result<()> {
        self.check_contexts([("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)])?;
        same_shape("grad", param, grad)?;
        same_shape("m", param, m)?;
        same_shape("v", param, v)?;
        for (arg, t) in [("param", &*param), ("m", &*m), ("v", &*v)] {
            if t.dtype() != DType::F32 {
                return Err(Error::DType {
                    arg,
                    expected: DType::F32,
                    got: t.dtype(),
                });
            }
        }
        if hp.step == 0 {
            return Err(Error::invalid("step", "AdamW steps count from 1"));
        }
        let step = u32::try_from(hp.step)
            .map_err(|_| Error::invalid("step", format!("{} exceeds u32", hp.step)))?;
        let flat = Layout::contiguous(&[numel(param)]);
        let mut tensors = [AdamWTensor {
            param: param.view_mut_at(0, flat.clone())?,
            grad: grad.view_at(0, flat.clone())?,
            exp_avg: m.view_mut_at(0, flat.clone())?,
            exp_avg_sq: v.view_mut_at(0, flat)?,
            model: None,
            weight_decay: hp.weight_decay != 0.0,
        }];
        adamw_step(
            self.gpu(),
            &AdamWOptions {
                lr: hp.lr,
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                weight_decay: hp.weight_decay,
            },
            step,
            &mut tensors,
            None,
        )
    }

    fn gru_cell(
        &self,
        gi: &DeviceTensor,
        gh: &DeviceTensor,
        h: &DeviceTensor,
        active: Option<&[bool]>,
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        self.check_contexts([("gi", gi), ("gh", gh), ("h", h)])?;
        rnn::gru_cell(self, gi, gh, h, active)
    }

    fn gru_cell_backward(
        &self,
        cache: &DeviceTensor,
        h: &DeviceTensor,
        dout: &DeviceTensor,
        active: Option<&[bool]>,
    ) -> Result<GruCellGrads<DeviceTensor>> {
        self.check_contexts([("cache", cache), ("h", h), ("dout", dout)])?;
        rnn::gru_cell_backward(self, cache, h, dout, active)
    }

    fn lstm_cell(
        &self,
        gi: &DeviceTensor,
        gh: &DeviceTensor,
        h: &DeviceTensor,
        c: &DeviceTensor,
        active: Option<&[bool]>,
    ) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
        self.check_contexts([("gi", gi), ("gh", gh), ("h", h), ("c", c)])?;
        rnn::lstm_cell(self, gi, gh, h, c, active)
    }

    fn lstm_cell_backward(
        &self,
        cache: &DeviceTensor,
        c: &DeviceTensor,
        dh_out: &DeviceTensor,
        dc_out: &DeviceTensor,
        active: Option<&[bool]>,
    ) -> Result<LstmCellGrads<DeviceTensor>> {
        self.check_contexts([
            ("cache", cache),
            ("c", c),
            ("dh_out", dh_out),
            ("dc_out", dc_out),
        ])?;
        rnn::lstm_cell_backward(self, cache, c, dh_out, dc_out, active)
    }

    fn additive_attention(
        &self,
        q: &DeviceTensor,
        keys: &DeviceTensor,
        v: &DeviceTensor,
        values: &DeviceTensor,
        key_lens: Option<&[usize]>,
    ) -> Result<(DeviceTensor, DeviceTensor)> {
        self.check_contexts([("q", q), ("keys", keys), ("v", v), ("values", values)])?;
        rnn::additive_attention(self, q, keys, v, values, key_lens)
    }

    fn additive_attention_backward(
        &self,
        q: &DeviceTensor,
        keys: &DeviceTensor,
        v: &DeviceTensor,
        values: &DeviceTensor,
        alpha: &DeviceTensor,
        dctx: &DeviceTensor,
        key_lens: Option<&[usize]>,
    ) -> Result<AdditiveGrads<DeviceTensor>> {
        self.check_contexts([
            ("q", q),
            ("keys", keys),
            ("v", v),
            ("values", values),
            ("alpha", alpha),
            ("dctx", dctx),
        ])?;
        rnn::additive_attention_backward(self, q, keys, v, values, alpha, dctx, key_lens)
    }
}
