//! The unfused attention baseline: S = Q·Kᵀ (cuBLAS, f32 out), a row softmax kernel
//! (`kernels/attention_unfused.cu`, P rounded to the input dtype), O = P·V (cuBLAS). It
//! materialises the Lq×Lk scores, so it is the yardstick the fused kernels are measured against
//! (`cuattn bench attention`) and a GPU-side cross-check at sizes the CPU reference cannot
//! reach; it is not meant for use.
//!
//! Scope: dense BHSD-contiguous Q, K, V, O (and LSE [B, H, Lq]), Hq = Hkv, no key padding;
//! causal masks of both alignments. Scores are computed for a few heads at a time so the
//! workspace stays under [`MAX_WORKSPACE_BYTES`].
//!
//! Two kinds of scratch:
//! - the scores and probabilities: the [`Unfused`] value's own ([`Unfused::forward_into`],
//!   grown on demand) or the caller's ([`Unfused::forward_into_workspace`], sized by
//!   [`workspace_bytes`]);
//! - cuBLAS's own workspace for the two GEMMs. Left alone, the handle draws it from a pool
//!   cuBLAS manages and may allocate inside a call. [`Unfused::reserve_blas_workspace`]
//!   (allocated here, once), [`Unfused::use_blas_workspace`] (the caller's address) or
//!   [`Unfused::use_blas_workspace_view`] (the caller's view) fix it instead
//!   ([`blas_workspace_bytes`] is the size to give; `ops::cublas` holds the checks, shared
//!   with [`super::gemm::Gemm`] and the runtime backend).
//!
//! With both fixed, [`Unfused::forward_into_workspace`] allocates nothing and can be captured
//! in a CUDA graph.
//!
//! Streams: an `Unfused` queues its GEMMs and its softmax kernel on the stream of the [`Gpu`]
//! it was made from, and never synchronises. For the caller's stream make it from
//! `gpu.on_stream(stream)` (or `unsafe { gpu.on_raw_stream(cu_stream) }`), as for every op;
//! cuBLAS's handle is bound to that stream once and never rebound (a `cublasSetStream` would
//! drop the fixed workspace).

use super::attention::{check, Options, Sequences};
pub use super::cublas::{
    workspace_bytes as blas_workspace_bytes, MIN_WORKSPACE_BYTES as MIN_BLAS_WORKSPACE_BYTES,
    WORKSPACE_ALIGN as BLAS_WORKSPACE_ALIGN,
};
use super::{cublas, validate, BlasHandle};
use crate::attention_types::Shape;
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

/// cuBLAS handle and a reusable workspace on one Gpu's stream.
pub struct Unfused {
    gpu: Arc<Gpu>,
    /// Its own cuBLAS handle: cuBLAS's pool for cuBLAS's scratch until a `*_blas_workspace`
    /// call fixes it.
    blas: BlasHandle,
    workspace: Option<CudaSlice<u8>>,
}

impl std::fmt::Debug for Unfused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unfused")
            .field("blas_workspace", &self.blas.workspace())
            .finish_non_exhaustive()
    }
}

impl Unfused {
    /// Loads cuBLAS (it must be on the library path) and binds it to the Gpu's stream: for a
    /// stream of your own, make the Unfused from `gpu.on_stream(stream)`. Every call refuses
    /// views of another context than the Gpu's ([`Error::Device`]).
    pub fn new(gpu: &Arc<Gpu>) -> Result<Unfused> {
        let blas = BlasHandle::new(gpu)?;
        Ok(Unfused {
            gpu: gpu.clone(),
            blas,
            workspace: None,
        })
    }

    /// The handle whose stream every call is queued on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The size of cuBLAS's fixed workspace, or `None` while cuBLAS draws from its own pool.
    pub fn blas_workspace(&self) -> Option<usize> {
        self.blas.workspace()
    }

    /// Allocates `bytes` of device memory (at least [`MIN_BLAS_WORKSPACE_BYTES`];
    /// [`blas_workspace_bytes`] is the recommended size) and makes it cuBLAS's workspace: later
    /// GEMMs allocate nothing. A cuBLAS workspace this value allocated before is freed in
    /// stream order, after the GEMMs already queued.
    pub fn reserve_blas_workspace(&mut self, bytes: usize) -> Result<()> {
        self.blas.reserve_workspace(bytes)
    }

    /// Makes `bytes` at `ptr` (the caller's device memory) cuBLAS's workspace. Refused before
    /// cuBLAS sees it: `bytes` below [`MIN_BLAS_WORKSPACE_BYTES`] ([`Error::InvalidArgument`]),
    /// `ptr` not [`BLAS_WORKSPACE_ALIGN`]-byte aligned ([`Error::Alignment`]), NULL, host
    /// memory or memory of another context ([`Error::Device`], [`Gpu::check_device_pointer`]);
    /// each with `arg: "workspace"`.
    ///
    /// # Safety
    /// `ptr` must be device memory usable by the Gpu's context, valid for reads and writes of
    /// `bytes` bytes for as long as this value is used (or until another cuBLAS workspace
    /// replaces it; a captured graph holds the address for every replay), and touched by
    /// nothing else while GEMMs of the Gpu's stream may use it.
    pub unsafe fn use_blas_workspace(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract above, which is the handle's.
        unsafe { self.blas.use_workspace(ptr, bytes) }
    }

    /// [`Unfused::use_blas_workspace`] on a view of the caller's memory: contiguous, inside
    /// its memory, any dtype (cuBLAS sees bytes). The view's context must be the Gpu's
    /// ([`Error::Device`]); its address and extent are checked as in `use_blas_workspace`.
    ///
    /// # Safety
    /// The view's memory must stay valid, and untouched by anything else, for as long as
    /// this value uses it (the view's borrow ends with the call; cuBLAS keeps the address).
    pub unsafe fn use_blas_workspace_view(&mut self, workspace: &mut TensorMut) -> Result<()> {
        self.gpu.check_context("workspace", workspace.ctx)?;
        let (ptr, bytes) = blas_workspace_of(workspace)?;
        // SAFETY: the view is device memory of the Gpu's context (checked) of `bytes` bytes
        // (its layout, checked to fit its memory); its lifetime is the caller's contract.
        unsafe { self.blas.use_workspace(ptr, bytes) }
    }

    /// O = softmax(Q·Kᵀ·scale + mask)·V into caller views, LSE optional (as
    /// [`super::attention::forward_into`], within this module's scope). The scores live in a
    /// workspace this value allocates on first use and grows when a call needs more
    /// ([`workspace_bytes`]); [`Unfused::forward_into_workspace`] takes the caller's instead.
    pub fn forward_into(
        &mut self,
        q: &TensorRef,
        k: &TensorRef,
        v: &TensorRef,
        o: &mut TensorMut,
        lse: Option<&mut TensorMut>,
        opts: &Options,
    ) -> Result<()> {
        self.check_contexts(q, k, v, o, lse.as_deref(), None)?;
        let plan = plan(q, k, v, o, lse.as_deref(), opts)?;
        if plan.heads == 0 || plan.shape.len_q == 0 {
            return Ok(());
        }
        let need = plan.all_heads_bytes();
        if self.workspace.as_ref().is_none_or(|w| w.len() < need) {
            self.workspace = None; // free the old one first
            self.workspace = Some(
                self.gpu
                    .stream()
                    .alloc_zeros::<u8>(need)
                    .map_err(|e| Error::driver(format!("allocating {need} bytes"), e))?,
            );
        }
        let ws = match self.workspace.as_ref() {
            Some(ws) => ws.device_ptr(self.gpu.stream()).0,
            None => return Err(Error::invalid("workspace", "not allocated")),
        };
        self.launch_all(q, k, v, o, lse, opts, &plan, (ws, need))
    }

    /// [`Unfused::forward_into`] on the caller's `workspace` (f32, contiguous, at least
    /// [`workspace_bytes`] bytes for every head in one pass; down to one head's
    /// `len_q·len_k·(4 + element size)` bytes, which runs the heads in as many passes as it
    /// takes): allocates nothing, so with a fixed cuBLAS workspace
    /// ([`Unfused::reserve_blas_workspace`], [`Unfused::use_blas_workspace`]) it can be
    /// captured in a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_into_workspace(
        &self,
        q: &TensorRef,
        k: &TensorRef,
        v: &TensorRef,
        o: &mut TensorMut,
        lse: Option<&mut TensorMut>,
        workspace: &mut TensorMut,
        opts: &Options,
    ) -> Result<()> {
        self.check_contexts(q, k, v, o, lse.as_deref(), Some(&*workspace))?;
        let plan = plan(q, k, v, o, lse.as_deref(), opts)?;
        let bytes = check_workspace(&plan, workspace)?;
        if plan.heads == 0 || plan.shape.len_q == 0 {
            return Ok(());
        }
        self.launch_all(q, k, v, o, lse, opts, &plan, (workspace.ptr, bytes))
    }

    fn check_contexts(
        &self,
        q: &TensorRef,
        k: &TensorRef,
        v: &TensorRef,
        o: &TensorMut,
        lse: Option<&TensorMut>,
        workspace: Option<&TensorMut>,
    ) -> Result<()> {
        self.gpu.check_contexts(
            [("q", q.ctx), ("k", k.ctx), ("v", v.ctx), ("o", o.ctx)]
                .into_iter()
                .chain(lse.map(|l| ("lse", l.ctx)))
                .chain(workspace.map(|w| ("workspace", w.ctx))),
        )
    }

    /// Queues the three steps for every head, `chunk` heads at a time, the chunk as many heads
    /// as `ws_bytes` of scratch at `ws` hold (at least one: the callers checked it).
    #[allow(clippy::too_many_arguments)]
    fn launch_all(
        &self,
        q: &TensorRef,
        k: &TensorRef,
        v: &TensorRef,
        o: &mut TensorMut,
        lse: Option<&mut TensorMut>,
        opts: &Options,
        plan: &Plan,
        (ws_ptr, ws_bytes): (u64, usize),
    ) -> Result<()> {
        let (s, heads, esize) = (plan.shape, plan.heads, plan.dtype.size_bytes());
        let chunk = plan.chunk(ws_bytes);
        let scores = ws_ptr;
        let probs = ws_ptr + (chunk * s.len_q * s.len_k * 4) as u64;
        let kernel = self.gpu.kernel(
            MODULE,
            match plan.dtype {
                DType::F32 => "attention_softmax_f32",
                DType::F16 => "attention_softmax_f16",
                DType::BF16 => "attention_softmax_bf16",
            },
        )?;
        let ty = match plan.dtype {
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
                scale: plan.scale,
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

/// What [`plan`] checked of a call.
#[derive(Clone, Copy, Debug)]
struct Plan {
    shape: Shape,
    dtype: DType,
    scale: f32,
    /// batch·heads score matrices.
    heads: usize,
    /// Scratch bytes of one head: Lq·Lk f32 scores and Lq·Lk probabilities in the dtype.
    per_head: usize,
}

impl Plan {
    /// Heads per pass in `bytes` of scratch: all of them if they fit, never more than
    /// [`MAX_WORKSPACE_BYTES`] worth, at least one.
    fn chunk(&self, bytes: usize) -> usize {
        let cap = bytes.min(MAX_WORKSPACE_BYTES.max(self.per_head));
        (cap / self.per_head.max(1)).clamp(1, self.heads.max(1))
    }

    fn all_heads_bytes(&self) -> usize {
        self.chunk(usize::MAX) * self.per_head
    }
}

/// Checks a call against the baseline's scope (dense BHSD, Hq = Hkv, no key padding, one
/// head's scores under [`MAX_WORKSPACE_BYTES`]) without touching the device.
fn plan(
    q: &TensorRef,
    k: &TensorRef,
    v: &TensorRef,
    o: &TensorMut,
    lse: Option<&TensorMut>,
    opts: &Options,
) -> Result<Plan> {
    let c = check(q, k, v, o, lse, opts)?;
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
    let per_head = s.len_q * s.len_k * (4 + c.dtype.size_bytes());
    let plan = Plan {
        shape: s,
        dtype: c.dtype,
        scale: c.scale,
        heads: s.batch * s.heads_q,
        per_head,
    };
    if per_head > MAX_WORKSPACE_BYTES || plan.chunk(usize::MAX) * s.len_q > i32::MAX as usize {
        return Err(Error::invalid(
            "q",
            format!(
                "one head's scores need {per_head} bytes, over the baseline's {MAX_WORKSPACE_BYTES}"
            ),
        ));
    }
    Ok(plan)
}

/// The caller's workspace against the plan: f32, its layout within its memory, at least one
/// head's bytes. Returns the bytes usable.
fn check_workspace(plan: &Plan, ws: &TensorMut) -> Result<usize> {
    let info = ws.info("workspace");
    validate::dtype(&info, DType::F32)?;
    validate::memory(&info)?;
    let bytes = (ws.layout.numel() * 4).min(ws.bytes);
    if plan.heads > 0 && bytes < plan.per_head {
        return Err(Error::invalid(
            "workspace",
            format!(
                "needs at least {} bytes (one head's scores and probabilities; {} for every \
                 head in one pass), got {bytes}",
                plan.per_head,
                plan.all_heads_bytes()
            ),
        ));
    }
    Ok(bytes)
}

/// The address and bytes of a cuBLAS workspace view: a contiguous layout inside the view's
/// memory, at least [`MIN_BLAS_WORKSPACE_BYTES`], 256-byte aligned. Checks numbers only (the
/// context and the driver's view of the pointer are the caller's checks).
fn blas_workspace_of(ws: &TensorMut) -> Result<(u64, usize)> {
    let info = ws.info("workspace");
    validate::memory(&info)?;
    if !ws.layout.is_contiguous() {
        return Err(Error::layout("workspace", "must be contiguous"));
    }
    let bytes = ws.layout.numel() * ws.dtype.size_bytes();
    cublas::check_workspace_size(bytes)?;
    cublas::check_workspace_align(ws.ptr)?;
    Ok((ws.ptr, bytes))
}

/// Bytes of scratch [`Unfused::forward_into_workspace`] uses to run every head of a call in one
/// pass (at most [`MAX_WORKSPACE_BYTES`], rounded down to whole heads): `batch·heads` heads of
/// `len_q·len_k` f32 scores and as many probabilities in `dtype`. A head over the maximum is
/// [`Error::InvalidArgument`], as the call would be.
pub fn workspace_bytes(
    dtype: DType,
    (batch, heads, len_q, len_k): (usize, usize, usize, usize),
) -> Result<usize> {
    let per_head = len_q
        .checked_mul(len_k)
        .and_then(|n| n.checked_mul(4 + dtype.size_bytes()))
        .filter(|&b| b <= MAX_WORKSPACE_BYTES)
        .ok_or_else(|| {
            Error::invalid(
                "len_k",
                format!(
                    "one head's {len_q}×{len_k} scores are over the baseline's {MAX_WORKSPACE_BYTES} bytes"
                ),
            )
        })?;
    let plan = Plan {
        shape: Shape::new(batch, heads, heads, len_q, len_k, 1, 1),
        dtype,
        scale: 1.0,
        heads: batch.saturating_mul(heads),
        per_head,
    };
    if plan.heads == 0 {
        return Ok(0);
    }
    Ok(plan.all_heads_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fake_views::{fake_mut, fake_ref, BASE};

    const GIB: u64 = 1 << 30;

    /// Fake BHSD views of one call: q, k, v, o at disjoint addresses.
    fn views(
        dt: DType,
        (b, h, lq, lk, d): (usize, usize, usize, usize, usize),
    ) -> (
        TensorRef<'static>,
        TensorRef<'static>,
        TensorRef<'static>,
        TensorMut<'static>,
    ) {
        (
            fake_ref(dt, &[b, h, lq, d], 0),
            fake_ref(dt, &[b, h, lk, d], GIB),
            fake_ref(dt, &[b, h, lk, d], 2 * GIB),
            fake_mut(dt, &[b, h, lq, d], 3 * GIB),
        )
    }

    #[test]
    fn workspace_bytes_is_every_heads_scores_and_probabilities() {
        // 2·3 heads of 10×20 f32 scores + 10×20 f16 probabilities.
        let want = 6 * 10 * 20 * (4 + 2);
        assert_eq!(workspace_bytes(DType::F16, (2, 3, 10, 20)).unwrap(), want);
        let (q, k, v, o) = views(DType::F16, (2, 3, 10, 20, 16));
        let p = plan(&q, &k, &v, &o, None, &Options::default()).unwrap();
        assert_eq!(p.all_heads_bytes(), want);
        assert_eq!(workspace_bytes(DType::F32, (0, 3, 10, 20)).unwrap(), 0);
    }

    #[test]
    fn workspace_bytes_stops_at_the_maximum_in_whole_heads() {
        // One head of 16384² f32 scores and probabilities is 2 GiB: one head per pass.
        let per_head = 16384 * 16384 * 8;
        assert_eq!(per_head, MAX_WORKSPACE_BYTES);
        assert_eq!(
            workspace_bytes(DType::F32, (4, 2, 16384, 16384)).unwrap(),
            per_head
        );
        let over = workspace_bytes(DType::F32, (1, 1, 16384, 16385));
        assert!(
            matches!(over, Err(Error::InvalidArgument { arg: "len_k", .. })),
            "{over:?}"
        );
        let overflow = workspace_bytes(DType::F32, (1, 1, usize::MAX, 2));
        assert!(
            matches!(overflow, Err(Error::InvalidArgument { .. })),
            "{overflow:?}"
        );
    }

    #[test]
    fn a_workspace_below_one_head_is_an_invalid_argument_naming_it() {
        let (q, k, v, o) = views(DType::BF16, (1, 2, 8, 12, 16));
        let p = plan(&q, &k, &v, &o, None, &Options::default()).unwrap();
        let one_head = 8 * 12 * 6;
        let small = fake_mut(DType::F32, &[one_head / 4 - 1], 4 * GIB);
        let r = check_workspace(&p, &small);
        assert!(
            matches!(
                r,
                Err(Error::InvalidArgument {
                    arg: "workspace",
                    ..
                })
            ),
            "{r:?}"
        );
        // One head: two passes; every head: one.
        let one = fake_mut(DType::F32, &[one_head / 4], 4 * GIB);
        assert_eq!(check_workspace(&p, &one).unwrap(), one_head);
        assert_eq!(p.chunk(one_head), 1);
        assert_eq!(p.chunk(2 * one_head), 2);
        assert_eq!(p.chunk(100 * one_head), 2);
    }

    #[test]
    fn a_workspace_not_f32_or_misaligned_is_refused() {
        let (q, k, v, o) = views(DType::F16, (1, 1, 4, 4, 8));
        let p = plan(&q, &k, &v, &o, None, &Options::default()).unwrap();
        let half = fake_mut(DType::F16, &[1024], 4 * GIB);
        let r = check_workspace(&p, &half);
        assert!(
            matches!(
                r,
                Err(Error::DType {
                    arg: "workspace",
                    ..
                })
            ),
            "{r:?}"
        );
        let odd = fake_mut(DType::F32, &[1024], 4 * GIB + 2);
        let r = check_workspace(&p, &odd);
        assert!(
            matches!(
                r,
                Err(Error::Alignment {
                    arg: "workspace",
                    ..
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn a_blas_workspace_view_is_its_bytes_when_large_contiguous_and_aligned() {
        let min = MIN_BLAS_WORKSPACE_BYTES;
        // Any dtype: cuBLAS sees bytes.
        let f16 = fake_mut(DType::F16, &[min / 2], 4 * GIB);
        assert_eq!(blas_workspace_of(&f16).unwrap(), (BASE + 4 * GIB, min));
        let f32 = fake_mut(DType::F32, &[4, min / 16], 4 * GIB + 256);
        assert_eq!(
            blas_workspace_of(&f32).unwrap(),
            (BASE + 4 * GIB + 256, min)
        );
    }

    #[test]
    fn a_blas_workspace_view_small_misaligned_strided_or_outside_its_memory_is_refused() {
        let min = MIN_BLAS_WORKSPACE_BYTES;
        let small = fake_mut(DType::F32, &[min / 4 - 1], 4 * GIB);
        let r = blas_workspace_of(&small);
        assert!(
            matches!(
                r,
                Err(Error::InvalidArgument {
                    arg: "workspace",
                    ..
                })
            ),
            "{r:?}"
        );
        // Aligned to its element but not to cuBLAS's 256 bytes.
        let odd = fake_mut(DType::F32, &[min / 4], 4 * GIB + 128);
        let r = blas_workspace_of(&odd);
        assert!(
            matches!(
                r,
                Err(Error::Alignment {
                    arg: "workspace",
                    align: 256,
                    ..
                })
            ),
            "{r:?}"
        );
        // Every other row of a [rows, cols] allocation: not one block of bytes.
        let (rows, cols) = (8, min / 4);
        let mut strided = fake_mut(DType::F32, &[2 * rows, cols], 4 * GIB);
        strided.layout =
            crate::tensor::Layout::strided("workspace", &[rows, cols], &[2 * cols, 1]).unwrap();
        let r = blas_workspace_of(&strided);
        assert!(
            matches!(
                r,
                Err(Error::Layout {
                    arg: "workspace",
                    ..
                })
            ),
            "{r:?}"
        );
        // A layout longer than the memory behind the view.
        let mut short = fake_mut(DType::F32, &[min / 4], 4 * GIB);
        short.bytes = min - 4;
        let r = blas_workspace_of(&short);
        assert!(
            matches!(
                r,
                Err(Error::Layout {
                    arg: "workspace",
                    ..
                })
            ),
            "{r:?}"
        );
        // NULL passes these number checks; `Gpu::check_device_pointer` refuses it (GPU test).
    }

    #[test]
    fn calls_outside_the_baselines_scope_are_refused_before_any_device_work() {
        let dt = DType::F16;
        let (q, k, v, o) = views(dt, (1, 2, 8, 8, 16));
        let lens = [4];
        let padded = Options {
            sequences: Sequences::Dense {
                key_lens: Some(&lens),
            },
            ..Options::default()
        };
        let r = plan(&q, &k, &v, &o, None, &padded);
        assert!(
            matches!(
                r,
                Err(Error::InvalidArgument {
                    arg: "sequences",
                    ..
                })
            ),
            "{r:?}"
        );
        // Grouped-query heads: 2 Q heads over 1 K/V head.
        let k1 = fake_ref(dt, &[1, 1, 8, 16], GIB);
        let v1 = fake_ref(dt, &[1, 1, 8, 16], 2 * GIB);
        let r = plan(&q, &k1, &v1, &o, None, &Options::default());
        assert!(
            matches!(r, Err(Error::InvalidArgument { arg: "k", .. })),
            "{r:?}"
        );
        // A mismatched output shape is the shared check's error.
        let o_bad = fake_mut(dt, &[1, 2, 7, 16], 3 * GIB);
        assert!(plan(&q, &k, &v, &o_bad, None, &Options::default()).is_err());
    }
}
