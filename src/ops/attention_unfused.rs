//! The unfused attention baseline: S = Q·Kᵀ (cuBLAS, f32 out), a row softmax kernel
//! (`kernels/attention_unfused.cu`, P rounded to the input dtype), O = P·V (cuBLAS). It
//! materialises the Lq×Lk scores, so it is the yardstick the fused kernels are measured against
//! (`cuattn bench attention`) and a GPU-side cross-check at sizes the CPU reference cannot
//! reach; it is not meant for use.
//!
//! Scope: dense BHSD-contiguous Q, K, V, O (and LSE [B, H, Lq]), Hq = Hkv, no key padding;
//! causal masks of both alignments. Scores are computed for a few heads at a time so the
//! workspace stays under [`MAX_WORKSPACE_BYTES`].

use super::attention::{check, Options, Sequences};
use super::BlasHandle;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, TensorMut, TensorRef};
use crate::kernels::params::{
    cuattn_attention_softmax_params, CUATTN_CAUSAL_BOTTOM_RIGHT, CUATTN_CAUSAL_NONE,
    CUATTN_CAUSAL_TOP_LEFT,
};
use crate::reference::attention::CausalAlign;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::ffi::c_void;
use std::sync::Arc;

const MODULE: &str = "attention_unfused";
const SOFTMAX_THREADS: u32 = 256;
/// Largest scores-plus-probabilities workspace one call allocates.
pub const MAX_WORKSPACE_BYTES: usize = 2 << 30;

/// cuBLAS handle and a reusable workspace on one Gpu.
pub struct Unfused {
    gpu: Arc<Gpu>,
    /// Its own cuBLAS handle (cuBLAS's pool for cuBLAS's scratch).
    blas: BlasHandle,
    workspace: Option<CudaSlice<u8>>,
}

impl Unfused {
    /// Loads cuBLAS (it must be on the library path) and binds it to the Gpu's stream.
    pub fn new(gpu: &Arc<Gpu>) -> Result<Unfused> {
        let blas = BlasHandle::new(gpu)?;
        Ok(Unfused {
            gpu: gpu.clone(),
            blas,
            workspace: None,
        })
    }

    /// O = softmax(Q·Kᵀ·scale + mask)·V into caller views, LSE optional (as
    /// [`super::attention::forward_into`], within this module's scope).
    pub fn forward_into(
        &mut self,
        q: &TensorRef,
        k: &TensorRef,
        v: &TensorRef,
        o: &mut TensorMut,
        lse: Option<&mut TensorMut>,
        opts: &Options,
    ) -> Result<()> {
        self.gpu.check_contexts(
            [("q", q.ctx), ("k", k.ctx), ("v", v.ctx), ("o", o.ctx)]
                .into_iter()
                .chain(lse.as_ref().map(|l| ("lse", l.ctx))),
        )?;
        let c = check(q, k, v, o, lse.as_deref(), opts)?;
        let s = c.shape;
        if !matches!(opts.sequences, Sequences::Dense { key_lens: None }) {
            return Err(Error::invalid(
                "sequences",
                "the unfused baseline takes dense batches without key padding",
            ));
        }
        if s.heads_q != s.heads_kv {
            return Err(Error::invalid(
                "k",
                format!(
                    "the unfused baseline needs as many K/V heads as Q heads ({} vs {})",
                    s.heads_kv, s.heads_q
                ),
            ));
        }
        let bhsd = |st: &super::attention::Strides, len: usize, dim: usize, name| {
            let want = (s.heads_q * len * dim, len * dim, dim);
            if (st.batch, st.head, st.row) == (want.0 as i64, want.1 as i64, want.2 as i64) {
                Ok(())
            } else {
                Err(Error::layout(
                    name,
                    "the unfused baseline needs contiguous BHSD tensors",
                ))
            }
        };
        bhsd(&c.q, s.len_q, s.dim_qk, "q")?;
        bhsd(&c.k, s.len_k, s.dim_qk, "k")?;
        bhsd(&c.v, s.len_k, s.dim_v, "v")?;
        bhsd(&c.o, s.len_q, s.dim_v, "o")?;
        if let Some((bs, hs)) = c.lse {
            if (bs, hs) != ((s.heads_q * s.len_q) as i64, s.len_q as i64) {
                return Err(Error::layout(
                    "lse",
                    "the unfused baseline needs a contiguous [B, H, Lq] LSE",
                ));
            }
        }
        let heads = s.batch * s.heads_q;
        if heads == 0 || s.len_q == 0 {
            return Ok(());
        }
        let esize = c.dtype.size_bytes();
        let per_head = s.len_q * s.len_k * (4 + esize);
        let chunk = (MAX_WORKSPACE_BYTES / per_head.max(1)).clamp(1, heads);
        if per_head > MAX_WORKSPACE_BYTES || chunk * s.len_q > i32::MAX as usize {
            return Err(Error::invalid(
                "q",
                format!(
                    "one head's scores need {per_head} bytes, over the baseline's {MAX_WORKSPACE_BYTES}"
                ),
            ));
        }
        let need = chunk * per_head;
        if self.workspace.as_ref().is_none_or(|w| w.len() < need) {
            self.workspace = None; // free the old one first
            self.workspace = Some(
                self.gpu
                    .stream()
                    .alloc_zeros::<u8>(need)
                    .map_err(|e| Error::driver(format!("allocating {need} bytes"), e))?,
            );
        }
        let ws = self.workspace.as_ref().expect("allocated above");
        let ws_ptr = ws.device_ptr(self.gpu.stream()).0;
        let scores = ws_ptr;
        let probs = ws_ptr + (chunk * s.len_q * s.len_k * 4) as u64;
        let kernel = self.gpu.kernel(
            MODULE,
            match c.dtype {
                DType::F32 => "attention_softmax_f32",
                DType::F16 => "attention_softmax_f16",
                DType::BF16 => "attention_softmax_bf16",
            },
        )?;
        let ty = match c.dtype {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        };
        let (one, zero) = (1.0f32, 0.0f32);
        let (lq, lk, d, dv) = (
            s.len_q as i32,
            s.len_k as i32,
            s.dim_qk as i32,
            s.dim_v as i32,
        );
        let lse_ptr = lse.map(|l| l.ptr);
        let mut h0 = 0;
        while h0 < heads {
            let n = chunk.min(heads - h0);
            let at = |base: u64, per: usize| base + (h0 * per * esize) as u64;
            let (qp, kp, vp, op) = (
                at(q.ptr, s.len_q * s.dim_qk),
                at(k.ptr, s.len_k * s.dim_qk),
                at(v.ptr, s.len_k * s.dim_v),
                at(o.ptr, s.len_q * s.dim_v),
            );
            // Column-major views of row-major data: Sᵀ (Lk×Lq) = K (Lk×D, stored D×Lk) · Qᵀ.
            // SAFETY: `check` and the BHSD checks above bound every matrix of the n heads
            // from h0 inside its view; the workspace holds n·Lq·Lk f32 scores and n·Lq·Lk
            // probabilities; alpha/beta are host f32 (the handle's default pointer mode).
            unsafe {
                blas::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    lk,
                    lq,
                    d,
                    &one as *const f32 as *const c_void,
                    kp as *const c_void,
                    ty,
                    d,
                    (s.len_k * s.dim_qk) as i64,
                    qp as *const c_void,
                    ty,
                    d,
                    (s.len_q * s.dim_qk) as i64,
                    &zero as *const f32 as *const c_void,
                    scores as *mut c_void,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    lk,
                    (s.len_q * s.len_k) as i64,
                    n as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| blas_err("QKᵀ", e))?;
            let p = cuattn_attention_softmax_params {
                scores,
                probs,
                lse: lse_ptr.map_or(0, |l| l + (h0 * s.len_q * 4) as u64),
                len_q: lq,
                len_k: lk,
                causal: match opts.causal {
                    None => CUATTN_CAUSAL_NONE,
                    Some(CausalAlign::TopLeft) => CUATTN_CAUSAL_TOP_LEFT,
                    Some(CausalAlign::BottomRight) => CUATTN_CAUSAL_BOTTOM_RIGHT,
                } as i32,
                scale: c.scale,
            };
            // SAFETY: one block per score row of the n heads (n·Lq ≤ i32::MAX, checked), each
            // reading Lk f32 scores and writing Lk probabilities inside the workspace, and one
            // LSE inside the checked contiguous [B, H, Lq] view.
            unsafe {
                super::launch(
                    &self.gpu,
                    &kernel,
                    &p,
                    ((n * s.len_q) as u32, 1),
                    (SOFTMAX_THREADS, 1),
                    0,
                )?
            };
            // Oᵀ (Dv×Lq) = Vᵀ (V stored Dv×Lk) · Pᵀ (P stored Lk×Lq).
            // SAFETY: as for QKᵀ; O of the n heads lies inside the checked `o` view.
            unsafe {
                blas::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    dv,
                    lq,
                    lk,
                    &one as *const f32 as *const c_void,
                    vp as *const c_void,
                    ty,
                    dv,
                    (s.len_k * s.dim_v) as i64,
                    probs as *const c_void,
                    ty,
                    lk,
                    (s.len_q * s.len_k) as i64,
                    &zero as *const f32 as *const c_void,
                    op as *mut c_void,
                    ty,
                    dv,
                    (s.len_q * s.dim_v) as i64,
                    n as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| blas_err("PV", e))?;
            h0 += n;
        }
        Ok(())
    }
}

fn blas_err(what: &str, e: cudarc::cublas::result::CublasError) -> Error {
    Error::blas(format!("cuBLAS {what}"), e)
}
