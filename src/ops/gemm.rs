//! The three GEMMs of a linear layer y = x·Wᵀ (+ b), on cuBLAS with f32 accumulation:
//! forward y = x·Wᵀ, input gradient dx = dy·W, weight gradient dW = dyᵀ·x (optionally
//! accumulated into dW). Row-major views; W is `[out, in]` as in PyTorch's `nn.Linear`.
//! (The bias gradient is [`super::training::bias_gelu::column_sums_into`].)
//!
//! cuBLAS's own scratch: left alone, the handle draws a workspace from a pool cuBLAS manages
//! (it may allocate when a call needs one). [`Gemm::reserve_workspace`] (our allocation, once)
//! or [`Gemm::use_workspace`] (the caller's memory) give the handle a fixed workspace instead
//! (`cublasSetWorkspace`), so a GEMM allocates nothing and can be captured in a CUDA graph.
//! [`workspace_bytes`] is the size to give (see `ops::cublas`, shared with the CUDA runtime
//! backend).

use super::cublas::BlasHandle;
pub use super::cublas::{workspace_bytes, MIN_WORKSPACE_BYTES, WORKSPACE_ALIGN};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, TensorMut, TensorRef};
use crate::ops::validate::{self, ViewInfo};
use cudarc::cublas::{result as blas, sys as blas_sys};
use std::ffi::c_void;
use std::sync::Arc;

/// A cuBLAS handle on a Gpu's stream, for the linear-layer GEMMs.
pub struct Gemm {
    gpu: Arc<Gpu>,
    blas: BlasHandle,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm").finish_non_exhaustive()
    }
}

/// Options of the weight-gradient GEMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightGradOptions {
    /// dW += dyᵀ·x instead of dW = dyᵀ·x (gradient accumulation).
    pub accumulate: bool,
}

fn blas_err(context: &str, e: blas::CublasError) -> Error {
    Error::blas(context, e)
}

fn int(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(arg, format!("{v} exceeds cuBLAS's 32-bit sizes")))
}

/// A contiguous matrix of `dtype`: (rows, cols) with outer dims collapsed into rows.
fn matrix(v: &ViewInfo, dtype: DType) -> Result<(usize, usize)> {
    validate::dtype(v, dtype)?;
    let r = validate::rows(v)?;
    if !v.layout.is_contiguous() {
        return Err(Error::layout(v.arg, "must be contiguous"));
    }
    Ok((r.rows, r.cols))
}

fn expect(arg: &'static str, got: (usize, usize), want: (usize, usize)) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            arg,
            format!("[{}, {}]", want.0, want.1),
            &[got.0, got.1],
        ));
    }
    Ok(())
}

impl Gemm {
    /// Loads cuBLAS (it must be on the library path) on the Gpu's stream: for a stream of
    /// your own, make the Gemm from `gpu.on_stream(stream)`. Every GEMM refuses views of
    /// another context than the Gpu's ([`Error::Device`]).
    pub fn new(gpu: &Arc<Gpu>) -> Result<Gemm> {
        Ok(Gemm {
            gpu: gpu.clone(),
            blas: BlasHandle::new(gpu)?,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The size of the fixed workspace the handle uses, or `None` while it draws from cuBLAS's
    /// own pool.
    pub fn workspace(&self) -> Option<usize> {
        self.blas.workspace()
    }

    /// Allocates `bytes` of device memory (at least [`MIN_WORKSPACE_BYTES`]; [`workspace_bytes`]
    /// is the recommended size) and makes it the handle's workspace: later GEMMs allocate
    /// nothing, so they can be captured in a CUDA graph. A workspace this Gemm allocated before
    /// is freed in stream order, after the GEMMs already queued.
    pub fn reserve_workspace(&mut self, bytes: usize) -> Result<()> {
        self.blas.reserve_workspace(bytes)
    }

    /// Makes `bytes` at `ptr` (the caller's device memory) the handle's workspace: later GEMMs
    /// allocate nothing and use no other scratch, so they can be captured in a CUDA graph.
    /// `bytes` must be at least [`MIN_WORKSPACE_BYTES`] ([`Error::InvalidArgument`];
    /// [`workspace_bytes`] is the recommended size), `ptr` 256-byte aligned
    /// ([`WORKSPACE_ALIGN`], [`Error::Alignment`]) and device memory of the Gemm's context or
    /// device: NULL, host memory and memory of another context are [`Error::Device`]
    /// ([`Gpu::check_device_pointer`]).
    ///
    /// # Safety
    /// `ptr` must be device memory usable by this Gemm's context, valid for reads and writes
    /// of `bytes` bytes for as long as this Gemm is used (or until another workspace replaces
    /// it), and touched by nothing else while GEMMs of this Gemm's stream may use it.
    pub unsafe fn use_workspace(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract above, which is the handle's.
        unsafe { self.blas.use_workspace(ptr, bytes) }
    }

    /// Column-major C[m, n] = α·op(A)·op(B) + β·C, f32 accumulation, all of `dtype`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        dtype: DType,
        (transa, transb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        (c, ldc): (u64, usize),
        beta: f32,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let dt = match dtype {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        };
        let alpha = 1.0f32;
        // SAFETY: the callers derive every pointer and leading dimension from contiguous views
        // whose shapes they checked against (m, n, k), inside their memory; α and β are host
        // f32 scalars as cuBLAS' default pointer mode with COMPUTE_32F expects; the handle's
        // stream is the Gpu's stream, ordering the GEMM after earlier writes.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(transa),
                op(transb),
                int("m", m)?,
                int("n", n)?,
                int("k", k)?,
                (&alpha as *const f32).cast::<c_void>(),
                a as *const c_void,
                dt,
                int("lda", lda)?,
                b as *const c_void,
                dt,
                int("ldb", ldb)?,
                (&beta as *const f32).cast::<c_void>(),
                c as *mut c_void,
                dt,
                int("ldc", ldc)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cublasGemmEx", e))
    }

    /// y[rows, out] = x[rows, in]·Wᵀ with W `[out, in]`.
    pub fn linear_forward(&self, x: &TensorRef, w: &TensorRef, y: &mut TensorMut) -> Result<()> {
        self.gpu
            .check_contexts([("x", x.ctx), ("w", w.ctx), ("y", y.ctx)])?;
        let dt = x.dtype;
        let (rows, d_in) = matrix(&x.info("x"), dt)?;
        let (d_out, w_in) = matrix(&w.info("w"), dt)?;
        expect("w", (d_out, w_in), (d_out, d_in))?;
        expect("y", matrix(&y.info("y"), dt)?, (rows, d_out))?;
        // Column-major: yᵀ[out, rows] = W[out, in] (stored as Wᵀ col-major, so op T)·xᵀ.
        self.gemm(
            dt,
            (true, false),
            (d_out, rows, d_in),
            (w.ptr, d_in),
            (x.ptr, d_in),
            (y.ptr, d_out),
            0.0,
        )
    }

    /// dx[rows, in] = dy[rows, out]·W with W `[out, in]`.
    pub fn linear_input_grad(
        &self,
        dy: &TensorRef,
        w: &TensorRef,
        dx: &mut TensorMut,
    ) -> Result<()> {
        self.gpu
            .check_contexts([("dy", dy.ctx), ("w", w.ctx), ("dx", dx.ctx)])?;
        let dt = dy.dtype;
        let (rows, d_out) = matrix(&dy.info("dy"), dt)?;
        let (w_out, d_in) = matrix(&w.info("w"), dt)?;
        expect("w", (w_out, d_in), (d_out, d_in))?;
        expect("dx", matrix(&dx.info("dx"), dt)?, (rows, d_in))?;
        // Column-major: dxᵀ[in, rows] = Wᵀ[in, out]·dyᵀ[out, rows]; W row-major is Wᵀ col-major.
        self.gemm(
            dt,
            (false, false),
            (d_in, rows, d_out),
            (w.ptr, d_in),
            (dy.ptr, d_out),
            (dx.ptr, d_in),
            0.0,
        )
    }

    /// dW[out, in] (+)= dyᵀ[out, rows]·x[rows, in].
    pub fn linear_weight_grad(
        &self,
        opts: &WeightGradOptions,
        dy: &TensorRef,
        x: &TensorRef,
        dw: &mut TensorMut,
    ) -> Result<()> {
        self.gpu
            .check_contexts([("dy", dy.ctx), ("x", x.ctx), ("dw", dw.ctx)])?;
        let dt = dy.dtype;
        let (rows, d_out) = matrix(&dy.info("dy"), dt)?;
        let (x_rows, d_in) = matrix(&x.info("x"), dt)?;
        expect("x", (x_rows, d_in), (rows, d_in))?;
        expect("dw", matrix(&dw.info("dw"), dt)?, (d_out, d_in))?;
        // Column-major: dWᵀ[in, out] = xᵀ[in, rows]·dy[rows, out] (dy row-major is dyᵀ
        // col-major, so op T).
        self.gemm(
            dt,
            (false, true),
            (d_in, d_out, rows),
            (x.ptr, d_in),
            (dy.ptr, d_out),
            (dw.ptr, d_in),
            if opts.accumulate { 1.0 } else { 0.0 },
        )
    }
}
