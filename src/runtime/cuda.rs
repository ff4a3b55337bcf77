//! The CUDA backend: tensors in device memory in f32, f16 or bf16; linear layers and batched
//! products through cuBLAS (f32 accumulation), attention through cuattn's fused kernel (key
//! padding via `key_lens`, heads read in place through strides; one query per sequence against
//! many keys goes to the split-KV decode kernel instead), LayerNorm through cuattn's kernel
//! (residual add fused), bias + activation and add through `ops::elementwise`, and the
//! embedding gather and the KV-cache append through the small kernels of
//! `kernels/runtime_ops.cu`.
//!
//! All work goes to the [`Gpu`]'s one stream, in order; `to_f32` synchronizes. Every op a
//! transformer layer runs has a form writing into the caller's tensors (`linear_into`,
//! `attention_into`, `layer_norm_into`, `add_into`, `batched_matmul_nt_into`) that allocates
//! nothing, so a layer can be captured in a CUDA graph on the caller's stream; the
//! allocating [`Backend`] entries size their output and call them.

use super::backend::{
    check_attention, Activation, AttentionMask, Backend, CausalAlign, HasShape, Heads,
};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::{DeviceTensor, Gpu, I32View};
use crate::kernels::params::cuattn_append_kv_params;
use crate::ops::attention::{self as attn, Options, Sequences};
use crate::ops::decode;
use crate::ops::elementwise;
use crate::ops::gemm;
use crate::ops::launch;
use crate::ops::layernorm::{self as ln, Tuning};
use crate::ops::BlasHandle;
use crate::tensor::{HostTensor, Layout};
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::CudaSlice;
use std::ffi::c_void;
use std::sync::Arc;

const MODULE: &str = "runtime_ops";
const THREADS: u32 = 256;

/// Runs on one GPU with tensors stored in `dtype`.
pub struct Cuda {
    gpu: Arc<Gpu>,
    dtype: DType,
    /// Linear layers and batched products; its workspace is cuBLAS's pool until an embedder
    /// fixes one ([`Cuda::use_blas_workspace`], [`Cuda::reserve_blas_workspace`]).
    blas: BlasHandle,
    /// The key lengths of the last decode-shaped attention and their device copy: every layer
    /// of a generation step has the same, so they are uploaded once per step. Never written
    /// after upload (a change allocates a new buffer; the old one is freed in stream order),
    /// so kernels still queued keep reading the lengths they were launched with.
    decode_lens: std::sync::Mutex<Option<(Vec<i32>, CudaSlice<i32>)>>,
    /// Generation replays its one-token steps from a CUDA graph
    /// ([`super::graph_step`]); off: every step runs op by op (the eager path).
    decode_graph: bool,
    /// A decoding step's own backend (a stream of its own, a cuBLAS handle with a fixed
    /// workspace, reserved scratch), kept between generation calls so that each call does not
    /// create them again ([`super::graph_step`]); taken by one step at a time.
    step_backend: std::sync::Mutex<Option<Box<Cuda>>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("gpu", &self.gpu.info().name)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl HasShape for DeviceTensor {
    fn dims(&self) -> &[usize] {
        self.shape()
    }
}

fn rows_cols(arg: &'static str, t: &DeviceTensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, c] => Ok((*r, *c)),
        s => Err(Error::shape(arg, "2 dims [rows, width]", s)),
    }
}

fn ptr(t: &DeviceTensor) -> u64 {
    t.view().device_ptr()
}

fn blas_err(context: &str, e: blas::CublasError) -> Error {
    Error::blas(context, e)
}

fn int(arg: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(arg, format!("{v} exceeds cuBLAS's 32-bit sizes")))
}

impl Cuda {
    /// A backend on `gpu` storing tensors in `dtype`. Its cuBLAS calls draw scratch from
    /// cuBLAS's own pool until [`Cuda::use_blas_workspace`] or
    /// [`Cuda::reserve_blas_workspace`] fixes a workspace.
    pub fn new(gpu: Arc<Gpu>, dtype: DType) -> Result<Cuda> {
        let blas = BlasHandle::new(&gpu)?;
        Ok(Cuda {
            gpu,
            dtype,
            blas,
            decode_lens: std::sync::Mutex::new(None),
            decode_graph: super::graph_step::graph_enabled_by_env(
                std::env::var(super::graph_step::ENV).ok().as_deref(),
            ),
            step_backend: std::sync::Mutex::new(None),
        })
    }

    /// The kept decoding-step backend, if one is free (see `step_backend`).
    pub(crate) fn take_step_backend(&self) -> Option<Box<Cuda>> {
        self.step_backend
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Keeps a decoding step's backend for the next step made on this backend.
    pub(crate) fn keep_step_backend(&self, be: Box<Cuda>) {
        *self
            .step_backend
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(be);
    }

    /// Whether generation on this backend replays its one-token decoding steps from a CUDA
    /// graph ([`super::graph_step`]). On unless the environment variable
    /// `CUATTN_DECODE_GRAPH` is `0` (or `off`, `false`) when the backend is made.
    pub fn decode_graph(&self) -> bool {
        self.decode_graph
    }

    /// Turns the CUDA-graph decoding step on or off (off: every step runs op by op, the
    /// eager path, for comparisons).
    pub fn set_decode_graph(&mut self, on: bool) {
        self.decode_graph = on;
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The cuBLAS handle (on the Gpu's stream), for the training ops (`cuda_train/`).
    pub(crate) fn blas(&self) -> &BlasHandle {
        &self.blas
    }

    /// The cuBLAS workspace to give [`Cuda::use_blas_workspace`]: NVIDIA's recommended size
    /// for the device, as for [`gemm::Gemm`] ([`gemm::workspace_bytes`]).
    pub fn blas_workspace_bytes(&self) -> usize {
        gemm::workspace_bytes(&self.gpu)
    }

    /// The size of the backend's fixed cuBLAS workspace, or `None` while cuBLAS draws from
    /// its own pool.
    pub fn blas_workspace(&self) -> Option<usize> {
        self.blas.workspace()
    }

    /// Allocates a cuBLAS workspace of `bytes` (at least [`gemm::MIN_WORKSPACE_BYTES`]) once,
    /// so that the backend's GEMMs allocate nothing afterwards.
    pub fn reserve_blas_workspace(&mut self, bytes: usize) -> Result<()> {
        self.blas.reserve_workspace(bytes)
    }

    /// Makes `bytes` at `ptr` (the caller's device memory) the workspace of every cuBLAS call
    /// of this backend (linear layers, batched products, the training backend's GEMMs): they
    /// allocate nothing and can be captured in a CUDA graph on the caller's memory. The same
    /// checks as [`gemm::Gemm::use_workspace`] (one implementation): `bytes` below
    /// [`gemm::MIN_WORKSPACE_BYTES`] is [`Error::InvalidArgument`], `ptr` not 256-byte aligned
    /// [`Error::Alignment`], and NULL, host memory or memory of another context or device
    /// [`Error::Device`]. The backend's other scratch (decode's split partials, LayerNorm's
    /// backward partials) is the [`Gpu`]'s: hand that over with [`Gpu::use_workspace`].
    ///
    /// # Safety
    /// `ptr` must be device memory usable by the backend's context, valid for reads and writes
    /// of `bytes` bytes for as long as this backend is used (or until another workspace
    /// replaces it), and touched by nothing else while work of the backend's stream may use it.
    pub unsafe fn use_blas_workspace(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller's contract above, which is the handle's.
        unsafe { self.blas.use_workspace(ptr, bytes) }
    }

    fn grid(&self, elems: usize) -> u32 {
        let resident = self.gpu.info().multiprocessors as usize * 8;
        elems.div_ceil(THREADS as usize).clamp(1, resident) as u32
    }

    /// Refuses tensors of another context than the backend's ([`Error::Device`] naming the
    /// argument) before any launch, by the ops' own check. Every entry of [`Backend`] and of
    /// the training backend (`cuda_train/`) that takes tensors calls it first: a
    /// [`DeviceTensor`] carries the [`Gpu`] that made it, which may be another context's.
    pub(crate) fn check_contexts<'t>(
        &self,
        tensors: impl IntoIterator<Item = (&'static str, &'t DeviceTensor)>,
    ) -> Result<()> {
        self.gpu
            .check_contexts(tensors.into_iter().map(|(arg, t)| (arg, t.context_id())))
    }

    fn check_dtype(&self, arg: &'static str, t: &DeviceTensor) -> Result<()> {
        if t.dtype() != self.dtype {
            return Err(Error::DType {
                arg,
                expected: self.dtype,
                got: t.dtype(),
            });
        }
        Ok(())
    }

    fn cuda_dtype(&self) -> blas_sys::cudaDataType {
        match self.dtype {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        }
    }

    /// Column-major `C[m, n] = op(A)·op(B)`, strided-batched, f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        transa: bool,
        transb: bool,
        (m, n, k): (usize, usize, usize),
        (a, lda, stride_a): (u64, usize, usize),
        (b, ldb, stride_b): (u64, usize, usize),
        (c, ldc, stride_c): (u64, usize, usize),
        batch: usize,
    ) -> Result<()> {
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dt = self.cuda_dtype();
        // SAFETY: every caller derives a, b, c and their leading dims and batch strides from
        // tensors whose shapes it checked (m·n·k and batch within each buffer); alpha and beta
        // are host f32 scalars, as cuBLAS' default host pointer mode and COMPUTE_32F expect;
        // the handle's stream is the Gpu's stream, which orders the GEMM after the writes of
        // its inputs.
        unsafe {
            blas::gemm_strided_batched_ex(
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
                stride_a as i64,
                b as *const c_void,
                dt,
                int("ldb", ldb)?,
                stride_b as i64,
                (&beta as *const f32).cast::<c_void>(),
                c as *mut c_void,
                dt,
                int("ldc", ldc)?,
                stride_c as i64,
                int("batch", batch)?,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_err("cublasGemmStridedBatchedEx", e))
    }

    /// [`Backend::linear`] into `y` (`[rows, out]` of the backend's dtype, the caller's):
    /// y = act(x·Wᵀ + b). With parameters already in the backend's dtype it allocates nothing,
    /// so with a fixed cuBLAS workspace ([`Cuda::use_blas_workspace`]) it can be captured in a
    /// CUDA graph.
    pub fn linear_into(
        &self,
        x: &DeviceTensor,
        w: &DeviceTensor,
        bias: Option<&DeviceTensor>,
        act: Activation,
        y: &mut DeviceTensor,
    ) -> Result<()> {
        self.check_contexts(
            [("x", x), ("w", w), ("y", &*y)]
                .into_iter()
                .chain(bias.map(|b| ("bias", b))),
        )?;
        let (rows, inp) = rows_cols("x", x)?;
        let (out, w_in) = rows_cols("w", w)?;
        self.check_dtype("x", x)?;
        self.check_dtype("y", y)?;
        if w_in != inp {
            return Err(Error::shape("w", format!("[out, {inp}]"), w.shape()));
        }
        if let Some(b) = bias {
            if b.shape() != [out] {
                return Err(Error::shape("bias", format!("[{out}]"), b.shape()));
            }
        }
        if y.shape() != [rows, out] {
            return Err(Error::shape("y", format!("[{rows}, {out}]"), y.shape()));
        }
        // Parameters stored in another dtype (a trainer's f32 master weights on a 16-bit
        // backend) are read converted to this one.
        let (mut w_slot, mut b_slot) = (None, None);
        let w = self.in_compute_dtype(w, &mut w_slot)?;
        let bias = match bias {
            Some(b) => Some(self.in_compute_dtype(b, &mut b_slot)?),
            None => None,
        };
        if rows == 0 || out == 0 {
            return Ok(());
        }
        // Row-major Y = X·Wᵀ is column-major Yᵀ[out, rows] = W·Xᵀ: W's bytes are a
        // column-major [in, out] matrix (so op T), X's a column-major [in, rows] one. (k = in
        // = 0 writes zeros: β = 0.)
        self.gemm(
            true,
            false,
            (out, rows, inp),
            (ptr(w), inp, 0),
            (ptr(x), inp, 0),
            (ptr(y), out, 0),
            1,
        )?;
        if bias.is_some() || act != Activation::None {
            self.bias_act(y, bias, act)?;
        }
        Ok(())
    }

    /// [`Backend::batched_matmul_nt`] into `c` (`[batch·m, n]` of the backend's dtype, the
    /// caller's): C_b = A_b·B_bᵀ. Allocates nothing.
    pub fn batched_matmul_nt_into(
        &self,
        a: &DeviceTensor,
        b: &DeviceTensor,
        batch: usize,
        c: &mut DeviceTensor,
    ) -> Result<()> {
        self.check_contexts([("a", a), ("b", b), ("c", &*c)])?;
        let (ar, k) = rows_cols("a", a)?;
        let (br, bk) = rows_cols("b", b)?;
        self.check_dtype("a", a)?;
        self.check_dtype("b", b)?;
        self.check_dtype("c", c)?;
        if batch == 0 || ar % batch != 0 || br % batch != 0 || bk != k {
            return Err(Error::shape(
                "b",
                format!("[{batch}·n, {k}] with a [{batch}·m, {k}]"),
                b.shape(),
            ));
        }
        let (m, n) = (ar / batch, br / batch);
        if c.shape() != [ar, n] {
            return Err(Error::shape("c", format!("[{ar}, {n}]"), c.shape()));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major C_b = A_b·B_bᵀ is column-major C_bᵀ[n, m] = B_b·A_bᵀ.
        self.gemm(
            true,
            false,
            (n, m, k),
            (ptr(b), k, n * k),
            (ptr(a), k, m * k),
            (ptr(c), n, m * n),
            batch,
        )
    }

    pub(crate) fn bias_act(
        &self,
        y: &mut DeviceTensor,
        bias: Option<&DeviceTensor>,
        act: Activation,
    ) -> Result<()> {
        self.check_contexts([("y", &*y)].into_iter().chain(bias.map(|b| ("bias", b))))?;
        let bias = bias.map(|b| b.view());
        elementwise::bias_act_into(&self.gpu, &mut y.view_mut(), bias.as_ref(), act)
    }
}

/// The optional parts of [`Cuda::attention_into`]. `Default`: key lengths from the mask (host,
/// uploaded by the call), no LSE.
#[derive(Debug, Default)]
pub struct AttentionIntoOptions<'v, 'a> {
    /// One key length per sequence already on the device, in place of the mask's `key_lens`
    /// (which must then be `None`): the call uploads nothing and can be captured in a CUDA
    /// graph. The host cannot check the values; the kernels clamp each to `0..=len_k`.
    pub device_key_lens: Option<I32View<'a>>,
    /// f32 `[batch, heads_q, len_q]`: each query row's log-sum-exp of its scaled scores
    /// (natural log; −inf for a row with no admissible key), written when given.
    pub lse: Option<&'v mut DeviceTensor>,
}

/// The caller-output forms of the ops a transformer layer runs ([`Backend`]'s allocating entries
/// call these): every one queues its kernels on the [`Gpu`]'s stream (make the backend from
/// `gpu.on_stream(your_stream)` to use yours), never synchronises, and allocates nothing when
/// the parameters are in the backend's dtype and the lengths are on the device, so a whole
/// layer can be captured in a CUDA graph ([`Cuda::linear_into`] with
/// [`Cuda::use_blas_workspace`] for the GEMMs). Every check (contexts, dtypes, shapes) comes
/// before the first launch and is a typed [`Error`].
impl Cuda {
    /// [`Backend::add`] into `out` (the caller's, `a`'s shape, the backend's dtype).
    pub fn add_into(
        &self,
        a: &DeviceTensor,
        b: &DeviceTensor,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        self.check_contexts([("a", a), ("b", b), ("out", &*out)])?;
        self.check_add(a, b)?;
        self.check_dtype("out", out)?;
        if out.shape() != a.shape() {
            return Err(Error::shape(
                "out",
                format!("{:?} (a's shape)", a.shape()),
                out.shape(),
            ));
        }
        elementwise::add_into(&self.gpu, &a.view(), &b.view(), &mut out.view_mut())
    }

    fn check_add(&self, a: &DeviceTensor, b: &DeviceTensor) -> Result<()> {
        self.check_dtype("a", a)?;
        self.check_dtype("b", b)?;
        if a.shape() != b.shape() {
            return Err(Error::shape(
                "b",
                format!("{:?} (a's shape)", a.shape()),
                b.shape(),
            ));
        }
        Ok(())
    }

    /// [`Backend::layer_norm`] into `y` (the caller's, `x`'s shape): `y = LayerNorm(x)`, or
    /// with `residual = Some((r, sum))` the fused `sum = x + r` (added in f32, stored in the
    /// dtype to the caller's `sum`, `x`'s shape) and `y = LayerNorm(sum)`. No scratch: the
    /// sum a layer does not keep is still an output, so the caller owns every byte written.
    /// γ and β stored in another dtype (a trainer's f32 master weights) are converted into a
    /// temporary first; in the backend's dtype nothing is allocated.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_into(
        &self,
        x: &DeviceTensor,
        residual: Option<(&DeviceTensor, &mut DeviceTensor)>,
        gamma: &DeviceTensor,
        beta: &DeviceTensor,
        eps: f32,
        y: &mut DeviceTensor,
    ) -> Result<()> {
        // Before γ and β are converted: the conversion is a launch on their memory.
        self.check_contexts(
            [("x", x), ("gamma", gamma), ("beta", beta), ("y", &*y)]
                .into_iter()
                .chain(
                    residual
                        .iter()
                        .flat_map(|(r, s)| [("residual", *r), ("sum", &**s)]),
                ),
        )?;
        self.check_dtype("x", x)?;
        self.check_dtype("y", y)?;
        let (mut g_slot, mut b_slot) = (None, None);
        let gamma = self.in_compute_dtype(gamma, &mut g_slot)?;
        let beta = self.in_compute_dtype(beta, &mut b_slot)?;
        let (g, b) = (gamma.view(), beta.view());
        match residual {
            None => ln::forward_into(
                &self.gpu,
                &x.view(),
                Some(&g),
                Some(&b),
                eps,
                &mut y.view_mut(),
                None,
                None,
                Tuning::default(),
            ),
            Some((r, sum)) => ln::add_forward_into(
                &self.gpu,
                &x.view(),
                &r.view(),
                Some(&g),
                Some(&b),
                eps,
                &mut sum.view_mut(),
                &mut y.view_mut(),
                None,
                None,
                Tuning::default(),
            ),
        }
    }

    /// [`Backend::attention`] into `out` (the caller's, `[batch·len_q, heads_q·dim_v]` of the
    /// backend's dtype), with the options of [`AttentionIntoOptions`]: key lengths on the
    /// device and the LSE. A call of one query per sequence runs the split-KV decode kernel,
    /// whose partials use the [`Gpu`]'s scratch ([`Cuda::attention_workspace_bytes`]); every
    /// other call needs none.
    pub fn attention_into(
        &self,
        q: Heads<'_, DeviceTensor>,
        k: Heads<'_, DeviceTensor>,
        v: Heads<'_, DeviceTensor>,
        mask: &AttentionMask<'_>,
        out: &mut DeviceTensor,
        opts: AttentionIntoOptions<'_, '_>,
    ) -> Result<()> {
        let AttentionIntoOptions {
            device_key_lens,
            mut lse,
        } = opts;
        self.check_contexts(
            [
                ("q", q.tensor),
                ("k", k.tensor),
                ("v", v.tensor),
                ("out", &*out),
            ]
            .into_iter()
            .chain(lse.as_deref().map(|l| ("lse", l))),
        )?;
        if let Some(lens) = &device_key_lens {
            self.gpu.check_context("key_lens", lens.context())?;
        }
        let (wq, wk, wv) = check_attention(&q, &k, &v, mask)?;
        for (arg, h) in [("q", &q), ("k", &k), ("v", &v)] {
            self.check_dtype(arg, h.tensor)?;
        }
        self.check_dtype("out", out)?;
        let m = *mask;
        let width_o = q.heads * v.dim;
        if out.shape() != [m.batch * m.len_q, width_o] {
            return Err(Error::shape(
                "out",
                format!("[{}, {width_o}]", m.batch * m.len_q),
                out.shape(),
            ));
        }
        if let Some(l) = lse.as_deref() {
            if l.dtype() != DType::F32 {
                return Err(Error::DType {
                    arg: "lse",
                    expected: DType::F32,
                    got: l.dtype(),
                });
            }
            if l.shape() != [m.batch, q.heads, m.len_q] {
                return Err(Error::shape(
                    "lse",
                    format!("[{}, {}, {}]", m.batch, q.heads, m.len_q),
                    l.shape(),
                ));
            }
        }
        if let Some(lens) = &device_key_lens {
            if m.key_lens.is_some() {
                return Err(Error::invalid(
                    "key_lens",
                    "give the key lengths on the host (the mask) or on the device, not both",
                ));
            }
            if lens.len() != m.batch {
                return Err(Error::shape(
                    "key_lens",
                    format!("[{}]", m.batch),
                    &[lens.len()],
                ));
            }
        }
        if m.batch == 0 || m.len_q == 0 {
            return Ok(());
        }
        if m.len_k == 0 {
            // No key at all: every row is 0 and its LSE −inf, as the kernels write for a
            // fully masked row.
            self.fill_words(out, None)?;
            if let Some(l) = lse.as_deref_mut() {
                self.fill_words(l, Some(f32::NEG_INFINITY.to_bits()))?;
            }
            return Ok(());
        }
        let lens = device_key_lens;
        if let Some(done) = self.try_decode(
            &q,
            &k,
            &v,
            &m,
            (wq, wk, wv),
            (lens, lse.as_deref_mut()),
            out,
        ) {
            return done;
        }
        // [B, H, L, D] views of the heads in place: rows b·L + t of a `width`-wide tensor.
        let layout = |len: usize, heads: usize, dim: usize, width: usize| {
            Layout::strided(
                "heads",
                &[m.batch, heads, len, dim],
                &[len * width, dim, width, 1],
            )
        };
        let qv = q
            .tensor
            .view_at(q.col, layout(m.len_q, q.heads, q.dim, wq)?)?;
        let kv = k
            .tensor
            .view_at(k.col, layout(m.len_k, k.heads, k.dim, wk)?)?;
        let vv = v
            .tensor
            .view_at(v.col, layout(m.len_k, v.heads, v.dim, wv)?)?;
        let host_lens: Option<Vec<i32>> = m.key_lens.map(|l| l.iter().map(|&x| x as i32).collect());
        let sequences = match lens {
            Some(key_lens) => Sequences::DenseDevice { key_lens },
            None => Sequences::Dense {
                key_lens: host_lens.as_deref(),
            },
        };
        let opts = Options {
            scale: m.scale,
            causal: m.causal,
            window: m.window,
            sequences,
            ..Options::default()
        };
        let o_layout = layout(m.len_q, q.heads, v.dim, width_o)?;
        let mut ov = out.view_mut_at(0, o_layout)?;
        let mut lse_view = lse.map(|l| l.view_mut());
        attn::forward_into(&self.gpu, &qv, &kv, &vv, &mut ov, lse_view.as_mut(), &opts)
    }

    /// Scratch bytes [`Cuda::attention_into`] takes from the [`Gpu`] for a call of these
    /// sizes (reserve them with [`Gpu::reserve_workspace`] or hand them over with
    /// [`Gpu::use_workspace`] before capturing): the split-KV decode kernel's partials when
    /// the call is one query per sequence (`len_q == 1`, head dims equal and at most
    /// [`decode::MAX_HEAD_DIM`]), planned for `len_k` keys; 0 otherwise (the fused kernel
    /// needs none).
    pub fn attention_workspace_bytes(
        &self,
        (batch, len_q, len_k): (usize, usize, usize),
        (heads_q, heads_kv): (usize, usize),
        (dim_qk, dim_v): (usize, usize),
    ) -> Result<usize> {
        if len_q != 1 || dim_qk != dim_v || dim_qk > decode::MAX_HEAD_DIM || batch == 0 {
            return Ok(0);
        }
        let splits = decode::planned_splits(
            &self.gpu,
            self.dtype,
            (batch, heads_q, heads_kv, dim_qk),
            len_k,
        )?;
        Ok(decode::workspace_bytes(batch, heads_q, dim_qk, splits))
    }

    /// Sets every 32-bit word of `t` to `word` (`None`: every byte to 0), in stream order.
    fn fill_words(&self, t: &mut DeviceTensor, word: Option<u32>) -> Result<()> {
        let bytes = t.shape().iter().product::<usize>() * t.dtype().size_bytes();
        let dst = t.view_mut().device_ptr();
        let stream = self.gpu.stream().cu_stream();
        // SAFETY: `t` is a contiguous tensor of `bytes` bytes (one word per f32 element when
        // `word` is given: only f32 LSE tensors are filled so); the memset is queued on the
        // Gpu's stream, after the work that used the memory before.
        let r = unsafe {
            match word {
                None => cudarc::driver::result::memset_d8_async(dst, 0, bytes, stream),
                Some(w) => {
                    cudarc::driver::sys::cuMemsetD32Async(dst, w, bytes / 4, stream).result()
                }
            }
        };
        r.map_err(|e| Error::driver("filling an output with no keys", e))
    }
}

impl Cuda {
    /// Copies the step's keys and values into the caches: row b·len_new + t of `k`/`v` to row
    /// b·capacity + start[b] + t of `k_cache`/`v_cache` (`[batch·capacity, width]`) for
    /// t < count[b], with `start_count` = [start; count] on the device (`2·batch` i32).
    /// `host_start_count` is the same array on the host, checked here.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append_kv(
        &self,
        k: Heads<'_, DeviceTensor>,
        v: Heads<'_, DeviceTensor>,
        k_cache: &mut DeviceTensor,
        v_cache: &mut DeviceTensor,
        (start_count, host_start_count): (&CudaSlice<i32>, &[i32]),
        batch: usize,
        len_new: usize,
    ) -> Result<()> {
        self.gpu
            .check_context("kv_cache", crate::gpu::ContextId::of(start_count.context()))?;
        let dev = I32View::new(&self.gpu, start_count);
        let caches = (k_cache, v_cache);
        self.append_kv_view(k, v, caches, (dev, Some(host_start_count)), batch, len_new)
    }

    /// [`Cuda::append_kv`] with the step array as a device view (a captured decoding step
    /// reads it from a buffer a graph's copy fills): with `host_start_count` `None` the values
    /// are not checked here, and need not be: the kernel skips every row outside
    /// `0..capacity` and every t ≥ count, so any values stay inside the caches.
    pub(crate) fn append_kv_view(
        &self,
        k: Heads<'_, DeviceTensor>,
        v: Heads<'_, DeviceTensor>,
        (k_cache, v_cache): (&mut DeviceTensor, &mut DeviceTensor),
        (start_count, host_start_count): (I32View<'_>, Option<&[i32]>),
        batch: usize,
        len_new: usize,
    ) -> Result<()> {
        self.check_contexts([
            ("k", k.tensor),
            ("v", v.tensor),
            ("k_cache", &*k_cache),
            ("v_cache", &*v_cache),
        ])?;
        self.gpu.check_context("kv_cache", start_count.context())?;
        let width = k.heads * k.dim;
        let (src_rows, src_width) = rows_cols("k", k.tensor)?;
        let (cache_rows, cache_width) = rows_cols("k_cache", k_cache)?;
        for (arg, t) in [("k", k.tensor), ("v", v.tensor), ("k_cache", &*k_cache)] {
            self.check_dtype(arg, t)?;
        }
        self.check_dtype("v_cache", v_cache)?;
        // One row stride serves both sources.
        if v.tensor.shape() != k.tensor.shape() {
            return Err(Error::shape(
                "v",
                format!("{:?} (k's)", k.tensor.shape()),
                v.tensor.shape(),
            ));
        }
        if batch == 0
            || src_rows != batch * len_new
            || v.heads * v.dim != width
            || k.col.max(v.col) + width > src_width
        {
            return Err(Error::shape(
                "k",
                format!("[{batch}·{len_new}, ≥ col + {width}] with k and v blocks {width} wide"),
                k.tensor.shape(),
            ));
        }
        if cache_width != width || cache_rows % batch != 0 || v_cache.shape() != k_cache.shape() {
            return Err(Error::shape(
                "k_cache",
                format!("[{batch}·capacity, {width}], v_cache alike"),
                k_cache.shape(),
            ));
        }
        let capacity = cache_rows / batch;
        if start_count.len() != 2 * batch {
            return Err(Error::shape(
                "kv_cache",
                format!("[2·{batch}] starts and counts"),
                &[start_count.len()],
            ));
        }
        let checked = host_start_count.is_some();
        let host_start_count = host_start_count.unwrap_or_default();
        let (start, count) = host_start_count.split_at(batch.min(host_start_count.len()));
        if checked
            && (host_start_count.len() != 2 * batch
                || (0..batch).any(|b| {
                    start[b] < 0
                        || count[b] < 0
                        || count[b] as usize > len_new
                        || start[b] as i64 + count[b] as i64 > capacity as i64
                }))
        {
            return Err(Error::invalid(
                "kv_cache",
                format!(
                    "starts and counts {host_start_count:?} do not fit {batch} sequences of \
                     {len_new} new rows in a cache of {capacity}"
                ),
            ));
        }
        if width == 0 || len_new == 0 {
            return Ok(());
        }
        let size = self.dtype.size_bytes() as u64;
        let name = if size == 4 {
            "rt_append_kv_b32"
        } else {
            "rt_append_kv_b16"
        };
        let kernel = self.gpu.kernel(MODULE, name)?;
        let p = cuattn_append_kv_params {
            src_k: ptr(k.tensor) + k.col as u64 * size,
            src_v: ptr(v.tensor) + v.col as u64 * size,
            dst_k: ptr(k_cache),
            dst_v: ptr(v_cache),
            start_count: start_count.device_ptr(),
            src_row_stride: src_width as i64,
            batch: batch as i64,
            len_new: len_new as i64,
            capacity: capacity as i64,
            width: width as i64,
        };
        // SAFETY: the sources are [batch·len_new, src_width] tensors of this dtype with the
        // key and value blocks inside each row (col + width ≤ src_width, checked); the caches
        // are [batch·capacity, width]; the device array holds 2·batch i32 (its length checked;
        // when the host copy is given, equal to it and checked above: 0 ≤ start, 0 ≤ count ≤
        // len_new, start + count ≤ capacity), and the kernel skips every row t ≥ count[b] and
        // every destination outside 0..capacity, so any values stay inside the caches.
        unsafe {
            launch(
                &self.gpu,
                &kernel,
                &p,
                (self.grid(batch * len_new * width), 1),
                (THREADS, 1),
                0,
            )
        }
    }

    /// Attention of one query per sequence over cached keys through the split-KV decode
    /// kernel, when the call is of that shape: `None` when it is not (the fused kernel runs).
    #[allow(clippy::too_many_arguments)]
    fn try_decode(
        &self,
        q: &Heads<'_, DeviceTensor>,
        k: &Heads<'_, DeviceTensor>,
        v: &Heads<'_, DeviceTensor>,
        m: &AttentionMask<'_>,
        (wq, wk, wv): (usize, usize, usize),
        (device_lens, lse): (Option<I32View<'_>>, Option<&mut DeviceTensor>),
        out: &mut DeviceTensor,
    ) -> Option<Result<()>> {
        // With one query, no mask or the bottom-right one keeps every valid key; top-left would
        // keep key 0 only, which the decode kernel does not do. The decode kernel's running
        // maximum also needs a positive scale.
        // A window: the decode kernel has none, so it runs only when the window holds every
        // valid key anyway (a bottom-right window of left width ≥ key_len − 1, as GPT-Neo's
        // local layers have until the cache outgrows them); otherwise the fused kernel takes
        // the step with the window as its band (it skips the key tiles outside it).
        let window_is_moot = m.window.is_none_or(|w| {
            w.align == CausalAlign::BottomRight
                && match m.key_lens {
                    Some(lens) => lens.iter().all(|&l| l <= w.left.saturating_add(1)),
                    // Device lengths are unknown here: bounded by len_k.
                    None => m.len_k <= w.left.saturating_add(1),
                }
        });
        let decode_shaped = m.len_q == 1
            && window_is_moot
            && matches!(m.causal, None | Some(CausalAlign::BottomRight))
            && m.scale.is_none_or(|s| s.is_finite() && s > 0.0)
            && v.dim == q.dim
            && q.dim <= decode::MAX_HEAD_DIM;
        if !decode_shaped {
            return None;
        }
        Some((|| {
            let width_o = q.heads * v.dim;
            let rows = |heads: usize, dim: usize, width: usize| {
                Layout::strided("heads", &[m.batch, heads, dim], &[width, dim, 1])
            };
            let cache = |heads: usize, dim: usize, width: usize| {
                Layout::strided(
                    "cache",
                    &[m.batch, heads, m.len_k, dim],
                    &[m.len_k * width, dim, width, 1],
                )
            };
            let qv = q.tensor.view_at(q.col, rows(q.heads, q.dim, wq)?)?;
            let kv = k.tensor.view_at(k.col, cache(k.heads, k.dim, wk)?)?;
            let vv = v.tensor.view_at(v.col, cache(v.heads, v.dim, wv)?)?;
            let mut ov = out.view_mut_at(0, rows(q.heads, v.dim, width_o)?)?;
            // [B, Hq, 1] seen as decode's [B, Hq].
            let mut lse_view = match lse {
                Some(l) => Some(l.view_mut_at(0, Layout::contiguous(&[m.batch, q.heads]))?),
                None => None,
            };
            let opts = decode::Options {
                scale: m.scale,
                splits: None,
            };
            if let Some(lens) = device_lens {
                // The kernel clamps each length to len_k, the planner plans for len_k.
                return decode::forward_into(
                    &self.gpu,
                    &qv,
                    &kv,
                    &vv,
                    decode::CacheLens::View {
                        lens,
                        max_len: m.len_k,
                    },
                    &mut ov,
                    lse_view.as_mut(),
                    &opts,
                );
            }
            // check_attention bounded every length by len_k, which the cache views hold.
            let lens: Vec<i32> = match m.key_lens {
                Some(l) => l.iter().map(|&x| x as i32).collect(),
                None => vec![m.len_k as i32; m.batch],
            };
            let max_len = lens.iter().copied().max().unwrap_or(0) as usize;
            let mut memo = self
                .decode_lens
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if memo.as_ref().is_none_or(|(host, _)| *host != lens) {
                let dev = self
                    .gpu
                    .stream()
                    .clone_htod(&lens)
                    .map_err(|e| Error::driver("copy key lengths to device", e))?;
                *memo = Some((lens, dev));
            }
            let dev_lens = match memo.as_ref() {
                Some((_, dev)) => dev,
                None => return Err(Error::invalid("key_lens", "no device copy")),
            };
            decode::forward_into(
                &self.gpu,
                &qv,
                &kv,
                &vv,
                decode::CacheLens::Device {
                    lens: dev_lens,
                    max_len,
                },
                &mut ov,
                lse_view.as_mut(),
                &opts,
            )
        })())
    }
}

impl Backend for Cuda {
    type Tensor = DeviceTensor;

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({})",
            self.gpu.info().ordinal,
            self.gpu.info().name,
            self.dtype
        )
    }

    fn upload(&self, shape: &[usize], values: &[f32]) -> Result<DeviceTensor> {
        self.gpu
            .upload(&HostTensor::from_f32(self.dtype, shape, values)?)
    }

    fn to_f32(&self, t: &DeviceTensor) -> Result<Vec<f32>> {
        t.to_f32_vec()
    }

    fn shape<'t>(&self, t: &'t DeviceTensor) -> &'t [usize] {
        t.shape()
    }

    fn linear(
        &self,
        x: &DeviceTensor,
        w: &DeviceTensor,
        bias: Option<&DeviceTensor>,
        act: Activation,
    ) -> Result<DeviceTensor> {
        self.check_contexts(
            [("x", x), ("w", w)]
                .into_iter()
                .chain(bias.map(|b| ("bias", b))),
        )?;
        let (rows, _) = rows_cols("x", x)?;
        let (out, _) = rows_cols("w", w)?;
        let mut y = self.gpu.zeros(self.dtype, &[rows, out])?;
        self.linear_into(x, w, bias, act, &mut y)?;
        Ok(y)
    }

    fn batched_matmul_nt(
        &self,
        a: &DeviceTensor,
        b: &DeviceTensor,
        batch: usize,
    ) -> Result<DeviceTensor> {
        self.check_contexts([("a", a), ("b", b)])?;
        let (ar, _) = rows_cols("a", a)?;
        let (br, _) = rows_cols("b", b)?;
        let n = br.checked_div(batch).unwrap_or(0);
        let mut c = self.gpu.zeros(self.dtype, &[ar, n])?;
        self.batched_matmul_nt_into(a, b, batch, &mut c)?;
        Ok(c)
    }

    fn add(&self, a: &DeviceTensor, b: &DeviceTensor) -> Result<DeviceTensor> {
        self.check_contexts([("a", a), ("b", b)])?;
        self.check_add(a, b)?;
        let mut out = self.gpu.zeros(self.dtype, a.shape())?;
        self.add_into(a, b, &mut out)?;
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &DeviceTensor,
        residual: Option<&DeviceTensor>,
        gamma: &DeviceTensor,
        beta: &DeviceTensor,
        eps: f32,
    ) -> Result<DeviceTensor> {
        self.check_contexts(
            [("x", x), ("gamma", gamma), ("beta", beta)]
                .into_iter()
                .chain(residual.map(|r| ("residual", r))),
        )?;
        self.check_dtype("x", x)?;
        let mut y = self.gpu.zeros(self.dtype, x.shape())?;
        match residual {
            None => self.layer_norm_into(x, None, gamma, beta, eps, &mut y)?,
            Some(r) => {
                // The sum x + residual is not kept by the model: a temporary.
                let mut sum = self.gpu.zeros(self.dtype, x.shape())?;
                self.layer_norm_into(x, Some((r, &mut sum)), gamma, beta, eps, &mut y)?
            }
        }
        Ok(y)
    }

    fn gather_rows(&self, table: &DeviceTensor, ids: &[u32]) -> Result<DeviceTensor> {
        self.check_contexts([("table", table)])?;
        let (n, width) = rows_cols("table", table)?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::invalid(
                "ids",
                format!("id {bad} is outside the table's {n} rows"),
            ));
        }
        // A table stored in another dtype (a trainer's f32 master weights) is gathered in its
        // own dtype and the rows converted.
        let mut out = self.gpu.zeros(table.dtype(), &[ids.len(), width])?;
        if ids.is_empty() || width == 0 {
            return self.converted(&out, self.dtype);
        }
        // Checked < n above, and n rows of a device table fit in i32.
        let ids: Vec<i32> = ids
            .iter()
            .map(|&id| i32::try_from(id).map_err(|_| Error::invalid("ids", "id above i32::MAX")))
            .collect::<Result<_>>()?;
        let dev_ids = self
            .gpu
            .stream()
            .clone_htod(&ids)
            .map_err(|e| Error::driver("copy ids to device", e))?;
        elementwise::gather_rows_into(
            &self.gpu,
            &table.view(),
            &I32View::new(&self.gpu, &dev_ids),
            &mut out.view_mut(),
        )?;
        if out.dtype() == self.dtype {
            Ok(out)
        } else {
            self.converted(&out, self.dtype)
        }
    }

    fn attention(
        &self,
        q: Heads<'_, DeviceTensor>,
        k: Heads<'_, DeviceTensor>,
        v: Heads<'_, DeviceTensor>,
        mask: &AttentionMask<'_>,
    ) -> Result<DeviceTensor> {
        // The checks before the output is sized by them.
        self.check_contexts([("q", q.tensor), ("k", k.tensor), ("v", v.tensor)])?;
        check_attention(&q, &k, &v, mask)?;
        let mut out = self
            .gpu
            .zeros(self.dtype, &[mask.batch * mask.len_q, q.heads * v.dim])?;
        self.attention_into(q, k, v, mask, &mut out, AttentionIntoOptions::default())?;
        Ok(out)
    }
}
