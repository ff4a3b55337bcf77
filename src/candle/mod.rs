//! candle integration (feature `candle`): cuattn's ops as candle `CustomOp`s, so a candle
//! model calls them on its own tensors.
//!
//! - [`attention`] / [`attention_with_lse`]: Q `[B, Hq, Lq, D]`, K `[B, Hkv, Lk, D]`, V
//!   `[B, Hkv, Lk, Dv]` → O `[B, Hq, Lq, Dv]` (and LSE `[B, Hq, Lq]`, f32), with the causal mask
//!   (either alignment), a sliding window, key padding and grouped-query heads.
//! - [`sparse_attention`]: the same under a block-sparse [`BlockLayout`].
//! - [`decode`]: one query per sequence against a KV cache with per-sequence lengths.
//! - [`layer_norm`] (differentiable: candle's backprop calls [`layer_norm_backward`]) and
//!   [`layer_norm_backward`].
//!
//! On candle's CPU storage each op runs cuattn's CPU path (the f64 references of
//! [`crate::reference`], rounded to the input dtype); on candle's CUDA storage (feature
//! `candle-cuda`) it runs cuattn's kernels on candle's own stream and memory, without a copy or
//! a synchronisation. Inputs are f32, f16 or bf16; non-contiguous inputs are made contiguous
//! first. cuattn's errors reach candle as `candle_core::Error::Wrapped`.
//!
//! Outputs beyond the first (LSE, dγ, dβ) are made inside the op and handed back through the
//! op value: a candle custom op returns one tensor.

#[cfg(feature = "candle-cuda")]
mod cuda;

pub use crate::key_band::Window;
pub use crate::reference::attention::CausalAlign;
use crate::reference::attention::{self as ref_attn, Shape};
use crate::reference::layernorm as ref_ln;
pub use crate::sparse::BlockLayout;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType as CDType, Device, Layout, Result, Shape as CShape, Tensor,
};
use std::sync::Mutex;

/// Masks and scale of [`attention`], [`attention_with_lse`] and [`sparse_attention`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AttentionOptions {
    /// Multiplies Q·Kᵀ; `None`: 1/√D.
    pub scale: Option<f32>,
    /// Not with [`sparse_attention`] (the layout carries its masks).
    pub causal: Option<CausalAlign>,
    /// Not with [`sparse_attention`].
    pub window: Option<Window>,
    /// Valid keys per sequence (key padding); `None`: all Lk.
    pub key_lens: Option<Vec<usize>>,
}

/// What an [`AttentionOp`] computes.
#[derive(Clone, Debug)]
enum Kind {
    Dense,
    Sparse(BlockLayout),
    /// Q `[B, Hq, D]` against caches `[B, Hkv, L, D]`, keys `0..key_lens[b]`.
    Decode,
}

/// The attention custom op over (Q, K, V); its LSE is left in `lse`.
struct AttentionOp {
    opts: AttentionOptions,
    kind: Kind,
    lse: Mutex<Option<Tensor>>,
}

fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

fn take<T>(slot: &Mutex<Option<T>>, what: &str) -> Result<T> {
    match slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(t) => Ok(t),
        None => bail!("cuattn: the op left no {what}"),
    }
}

fn put<T>(slot: &Mutex<Option<T>>, value: T) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
}

/// The elements of a contiguous CPU tensor as f32.
fn host_f32(arg: &str, s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("cuattn: `{arg}` must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => v[a..b].to_vec(),
        CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        other => bail!(
            "cuattn: `{arg}` must be f32, f16 or bf16, got {:?}",
            other.dtype()
        ),
    })
}

/// f64 results rounded to `dtype` (f32, f16, bf16).
fn storage_of(values: &[f64], dtype: CDType) -> Result<CpuStorage> {
    Ok(match dtype {
        CDType::F32 => CpuStorage::F32(values.iter().map(|&x| x as f32).collect()),
        CDType::F16 => CpuStorage::F16(values.iter().map(|&x| half::f16::from_f64(x)).collect()),
        CDType::BF16 => CpuStorage::BF16(values.iter().map(|&x| half::bf16::from_f64(x)).collect()),
        other => bail!("cuattn: no {other:?} outputs"),
    })
}

fn rank(arg: &str, dims: &[usize], want: usize) -> Result<()> {
    if dims.len() != want {
        bail!("cuattn: `{arg}` must have {want} dims, got {dims:?}")
    }
    Ok(())
}

impl AttentionOp {
    fn new(opts: &AttentionOptions, kind: Kind) -> AttentionOp {
        AttentionOp {
            opts: opts.clone(),
            kind,
            lse: Mutex::new(None),
        }
    }

    /// The call's sizes from the dims of Q, K and V (Decode: Q has no length dim).
    fn shape(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Shape> {
        rank("k", k, 4)?;
        rank("v", v, 4)?;
        let (batch, heads_q, len_q, dim_qk) = match self.kind {
            Kind::Decode => {
                rank("q", q, 3)?;
                (q[0], q[1], 1, q[2])
            }
            _ => {
                rank("q", q, 4)?;
                (q[0], q[1], q[2], q[3])
            }
        };
        let s = Shape::new(batch, heads_q, k[1], len_q, k[2], dim_qk, v[3]);
        if k[0] != batch || v[0] != batch || k[3] != dim_qk || v[1] != k[1] || v[2] != k[2] {
            bail!(
                "cuattn: q {q:?}, k {k:?}, v {v:?} are not [B, Hq, Lq, D], [B, Hkv, Lk, D], \
                 [B, Hkv, Lk, Dv]"
            )
        }
        Ok(s)
    }

    /// The reference's options: decode keeps keys `0..len` (bottom-right causal with one query).
    fn reference_options(&self, s: &Shape) -> ref_attn::Options {
        let scale = self
            .opts
            .scale
            .map_or(1.0 / (s.dim_qk as f64).sqrt(), |x| x as f64);
        let causal = match self.kind {
            Kind::Decode => Some(CausalAlign::BottomRight),
            _ => self.opts.causal,
        };
        ref_attn::Options {
            scale,
            causal,
            key_lens: self.opts.key_lens.clone(),
            window: self.opts.window,
        }
    }

    fn out_shape(&self, s: &Shape) -> (CShape, CShape) {
        match self.kind {
            Kind::Decode => (
                (s.batch, s.heads_q, s.dim_v).into(),
                (s.batch, s.heads_q).into(),
            ),
            _ => (
                (s.batch, s.heads_q, s.len_q, s.dim_v).into(),
                (s.batch, s.heads_q, s.len_q).into(),
            ),
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Dense => "cuattn-attention",
            Kind::Sparse(_) => "cuattn-sparse-attention",
            Kind::Decode => "cuattn-decode",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, CShape)> {
        let s = self.shape(l1.dims(), l2.dims(), l3.dims())?;
        let (q, k, v) = (
            host_f32("q", s1, l1)?,
            host_f32("k", s2, l2)?,
            host_f32("v", s3, l3)?,
        );
        let opts = self.reference_options(&s);
        let out = match &self.kind {
            Kind::Sparse(layout) => {
                layout.check_call(&s, layout.block_size()).map_err(wrap)?;
                let keep = |_b: usize, h: usize, i: usize, j: usize| {
                    layout.admits(layout.head_of(h), i, j)
                };
                ref_attn::forward_masked(&q, &k, &v, &s, &opts, &keep)
            }
            _ => ref_attn::forward(&q, &k, &v, &s, &opts),
        }
        .map_err(wrap)?;
        let (o_shape, lse_shape) = self.out_shape(&s);
        let lse: Vec<f32> = out.lse.iter().map(|&x| x as f32).collect();
        put(&self.lse, Tensor::from_vec(lse, lse_shape, &Device::Cpu)?);
        Ok((storage_of(&out.o, s1.dtype())?, o_shape))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, CShape)> {
        let s = self.shape(l1.dims(), l2.dims(), l3.dims())?;
        let (o, lse) = cuda::attention(self, &s, (s1, l1), (s2, l2), (s3, l3))?;
        put(&self.lse, lse);
        Ok((o, self.out_shape(&s).0))
    }
}

fn run_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    let op = AttentionOp::new(opts, kind);
    let o = q
        .contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
    Ok((o, take(&op.lse, "log-sum-exp")?))
}

/// O = softmax(Q·Kᵀ·scale + masks)·V (module docs for the shapes).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
    Ok(attention_with_lse(q, k, v, opts)?.0)
}

/// [`attention`] and the per-row log-sum-exp (`[B, Hq, Lq]`, f32, natural log; −inf for a row
/// with no admissible key, whose O is 0).
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    run_attention(q, k, v, opts, Kind::Dense)
}

/// Block-sparse attention: query `i` of head `h` sees key `j` iff `layout` keeps it (and
/// `j < key_lens[b]`); O and LSE as [`attention_with_lse`]. `opts.causal` and `opts.window`
/// must be `None` (the layout carries its masks: [`crate::sparse::patterns`]).
pub fn sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &BlockLayout,
    opts: &AttentionOptions,
) -> Result<(Tensor, Tensor)> {
    if opts.causal.is_some() || opts.window.is_some() {
        bail!("cuattn: block-sparse attention takes its causal/window masks from the layout")
    }
    run_attention(q, k, v, opts, Kind::Sparse(layout.clone()))
}

/// One decode step: Q `[B, Hq, D]` against the caches K `[B, Hkv, L, D]` and V
/// `[B, Hkv, L, Dv]`, sequence `b` seeing keys `0..cache_lens[b]` (clamped to L) → O
/// `[B, Hq, Dv]`.
pub fn decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    cache_lens: &[usize],
    scale: Option<f32>,
) -> Result<Tensor> {
    let opts = AttentionOptions {
        scale,
        key_lens: Some(cache_lens.to_vec()),
        ..Default::default()
    };
    Ok(run_attention(q, k_cache, v_cache, &opts, Kind::Decode)?.0)
}

/// LayerNorm over the last dim of x with γ and β (`[hidden]`, x's dtype).
struct LayerNormOp {
    eps: f32,
}

fn hidden_of(x: &[usize], gamma: &[usize], beta: Option<&[usize]>) -> Result<usize> {
    let Some(&hidden) = x.last() else {
        bail!("cuattn: layer_norm's x has no dims")
    };
    if gamma != [hidden] || beta.is_some_and(|b| b != [hidden]) {
        bail!("cuattn: gamma and beta must be [{hidden}] (x's last dim), got {gamma:?}, {beta:?}")
    }
    Ok(hidden)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "cuattn-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, CShape)> {
        let hidden = hidden_of(l1.dims(), l2.dims(), Some(l3.dims()))?;
        let x = host_f32("x", s1, l1)?;
        let (g, b) = (host_f32("gamma", s2, l2)?, host_f32("beta", s3, l3)?);
        let out = ref_ln::forward(&x, hidden, Some(&g), Some(&b), self.eps).map_err(wrap)?;
        Ok((storage_of(&out.y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, CShape)> {
        hidden_of(l1.dims(), l2.dims(), Some(l3.dims()))?;
        let y = cuda::layer_norm(self.eps, (s1, l1), (s2, l2), (s3, l3))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dgamma, dbeta) = layer_norm_backward(dy, x, gamma, self.eps)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// y = (x − mean)·rstd·γ + β over the last dim of x (γ, β `[hidden]` in x's dtype). Tracked by
/// candle's autograd: its gradients come from [`layer_norm_backward`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )
}

/// LayerNorm backward over (dy, x, γ); dγ and dβ are left in `params`.
struct LayerNormBackwardOp {
    eps: f32,
    params: Mutex<Option<(Tensor, Tensor)>>,
}

impl CustomOp3 for LayerNormBackwardOp {
    fn name(&self) -> &'static str {
        "cuattn-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, CShape)> {
        if l1.dims() != l2.dims() {
            bail!("cuattn: dy {:?} and x {:?} differ", l1.dims(), l2.dims())
        }
        let hidden = hidden_of(l2.dims(), l3.dims(), None)?;
        let (dy, x, g) = (
            host_f32("dy", s1, l1)?,
            host_f32("x", s2, l2)?,
            host_f32("gamma", s3, l3)?,
        );
        let out = ref_ln::backward(&dy, &x, hidden, Some(&g), self.eps).map_err(wrap)?;
        let param = |v: &[f64]| -> Result<Tensor> {
            let t = Tensor::from_vec(v.to_vec(), hidden, &Device::Cpu)?;
            t.to_dtype(s3.dtype())
        };
        put(&self.params, (param(&out.dgamma)?, param(&out.dbeta)?));
        Ok((storage_of(&out.dx, s2.dtype())?, l2.shape().clone()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, CShape)> {
        if l1.dims() != l2.dims() {
            bail!("cuattn: dy {:?} and x {:?} differ", l1.dims(), l2.dims())
        }
        hidden_of(l2.dims(), l3.dims(), None)?;
        let (dx, dgamma, dbeta) =
            cuda::layer_norm_backward(self.eps, (s1, l1), (s2, l2), (s3, l3))?;
        put(&self.params, (dgamma, dbeta));
        Ok((dx, l2.shape().clone()))
    }
}

/// Gradients of [`layer_norm`]: (dx, dγ, dβ) from the upstream dy, the forward's x and γ (row
/// statistics recomputed from x). dγ and dβ are summed over rows, in γ's dtype.
pub fn layer_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = LayerNormBackwardOp {
        eps,
        params: Mutex::new(None),
    };
    let dx = dy
        .contiguous()?
        .apply_op3_no_bwd(&x.contiguous()?, &gamma.contiguous()?, &op)?;
    let (dgamma, dbeta) = take(&op.params, "dgamma and dbeta")?;
    Ok((dx, dgamma, dbeta))
}
