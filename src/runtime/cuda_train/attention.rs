//! Attention with dropout on the probabilities, unfused: the fused kernels have no dropout, so
//! this path materialises the `[batch, heads_q, len_q, len_k]` scores of one call.
//!
//! Forward: S = Q·Kᵀ (cuBLAS, f32 out) → `attn_softmax_fwd` (P in the backend's dtype, LSE) →
//! P̃ = dropout(P) (the Philox kernel; element `((b·Hq + h)·Lq + i)·Lk + j`, as the CPU
//! backend and the trait define it) → O = P̃·V (cuBLAS).
//! Backward: S again and P = exp(scale·S − LSE) from the forward's LSE (`lse_in`), P̃ again;
//! dV = Σ_group P̃ᵀ·dO, dP̃ = dO·Vᵀ, dP = dropout(dP̃) (the same site: the same mask),
//! dS = scale·P∘(dP − rowsum(P∘dP)) (`attn_softmax_bwd`), dQ = dS·K, dK = Σ_group dSᵀ·Q.
//! dK and dV are summed over a GQA group in f32, query heads in ascending order (cuBLAS with
//! β = 1 after the first), then rounded once: deterministic.
//!
//! Sequence b's products run over its `key_len(b)` keys only, so padded keys are never read
//! and their dK, dV rows stay zero. Per call: two f32 and three backend-dtype buffers of the
//! score shape in the backward (one f32, two backend-dtype in the forward).

use super::{Cuda, Operand};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::DeviceTensor;
use crate::kernels::params::{
    cuattn_attn_softmax_bwd_params, cuattn_attn_softmax_fwd_params, CUATTN_CAUSAL_BOTTOM_RIGHT,
    CUATTN_CAUSAL_NONE, CUATTN_CAUSAL_TOP_LEFT,
};
use crate::ops::launch;
use crate::ops::training::dropout::{dropout_into, DropoutOptions};
use crate::runtime::backend::{AttentionMask, Backend, CausalAlign, Heads};
use crate::runtime::train::backend::{AttentionGrads, DropoutSite};
use cudarc::driver::{CudaSlice, DevicePtr};

const MODULE: &str = "training_ops";

/// The sizes of one call (checked by `check_attention`).
struct Geometry<'m> {
    batch: usize,
    len_q: usize,
    len_k: usize,
    heads_q: usize,
    heads_kv: usize,
    group: usize,
    dim: usize,
    dim_v: usize,
    /// Row widths of the tensors holding Q, K, V.
    wq: usize,
    wk: usize,
    wv: usize,
    scale: f32,
    mask: &'m AttentionMask<'m>,
    /// The backend's dtype and its size in bytes.
    dtype: DType,
    esize: u64,
}

/// Query heads `h0 .. h0 + count` of one sequence against K/V head `hk0` (advancing `kv_step`
/// heads per query head: 1 without GQA, 0 inside a GQA group).
#[derive(Clone, Copy)]
struct HeadBlock {
    b: usize,
    h0: usize,
    hk0: usize,
    count: usize,
    kv_step: usize,
}

impl<'m> Geometry<'m> {
    fn new(
        be: &Cuda,
        q: &Heads<'_, DeviceTensor>,
        k: &Heads<'_, DeviceTensor>,
        v: &Heads<'_, DeviceTensor>,
        mask: &'m AttentionMask<'m>,
        (wq, wk, wv): (usize, usize, usize),
    ) -> Self {
        let dtype = be.dtype();
        Geometry {
            batch: mask.batch,
            len_q: mask.len_q,
            len_k: mask.len_k,
            heads_q: q.heads,
            heads_kv: k.heads,
            group: q.heads / k.heads,
            dim: q.dim,
            dim_v: v.dim,
            wq,
            wk,
            wv,
            scale: mask.scale.unwrap_or(1.0 / (q.dim as f32).sqrt()),
            mask,
            dtype,
            esize: dtype.size_bytes() as u64,
        }
    }

    fn key_len(&self, b: usize) -> usize {
        self.mask.key_lens.map_or(self.len_k, |l| l[b])
    }

    /// Elements of one head's score block.
    fn block(&self) -> usize {
        self.len_q * self.len_k
    }

    fn rows(&self) -> usize {
        self.batch * self.heads_q * self.len_q
    }

    /// The GEMM batches of the call: per sequence with keys, all heads at once without GQA,
    /// else one batch per K/V head over its query heads.
    fn head_blocks(&self) -> Vec<HeadBlock> {
        let mut out = Vec::new();
        for b in (0..self.batch).filter(|&b| self.key_len(b) > 0) {
            if self.group == 1 {
                out.push(HeadBlock {
                    b,
                    h0: 0,
                    hk0: 0,
                    count: self.heads_q,
                    kv_step: 1,
                });
            } else {
                out.extend((0..self.heads_kv).map(|hk| HeadBlock {
                    b,
                    h0: hk * self.group,
                    hk0: hk,
                    count: self.group,
                    kv_step: 0,
                }));
            }
        }
        out
    }

    /// Head `h` of a `[batch·len, width]` tensor holding heads of `dim` from column `col`,
    /// rows of sequence `b`, as a GEMM operand advancing `step` elements per batch entry.
    #[allow(clippy::too_many_arguments)]
    fn head(
        &self,
        t: &DeviceTensor,
        (col, width, dim): (usize, usize, usize),
        len: usize,
        b: usize,
        h: usize,
        trans: bool,
        step: usize,
    ) -> Operand {
        Operand {
            ptr: super::ptr(t) + ((b * len * width + col + h * dim) as u64) * self.esize,
            ld: width,
            trans,
            stride: step,
        }
    }

    /// Head `h` of sequence `b` in a `[batch, heads_q, len_q, len_k]` buffer of `size`-byte
    /// elements, advancing one head per batch entry.
    fn scores(&self, t: &DeviceTensor, b: usize, h: usize, trans: bool) -> Operand {
        let size = t.dtype().size_bytes() as u64;
        Operand {
            ptr: super::ptr(t) + (((b * self.heads_q + h) * self.block()) as u64) * size,
            ld: self.len_k,
            trans,
            stride: self.block(),
        }
    }

    fn causal(&self) -> i32 {
        (match self.mask.causal {
            None => CUATTN_CAUSAL_NONE,
            Some(CausalAlign::TopLeft) => CUATTN_CAUSAL_TOP_LEFT,
            Some(CausalAlign::BottomRight) => CUATTN_CAUSAL_BOTTOM_RIGHT,
        }) as i32
    }
}

/// S = Q·Kᵀ (f32) for every head with keys.
fn scores(
    be: &Cuda,
    g: &Geometry<'_>,
    q: &Heads<'_, DeviceTensor>,
    k: &Heads<'_, DeviceTensor>,
) -> Result<DeviceTensor> {
    let s = be.gpu().zeros(DType::F32, &[g.rows(), g.len_k])?;
    for hb in g.head_blocks() {
        let kl = g.key_len(hb.b);
        be.gemm_rm(
            (g.len_q, kl, g.dim),
            g.head(
                q.tensor,
                (q.col, g.wq, g.dim),
                g.len_q,
                hb.b,
                hb.h0,
                false,
                g.dim,
            ),
            g.head(
                k.tensor,
                (k.col, g.wk, g.dim),
                g.len_k,
                hb.b,
                hb.hk0,
                true,
                g.dim * hb.kv_step,
            ),
            {
                let c = g.scores(&s, hb.b, hb.h0, false);
                (c.ptr, c.ld, c.stride)
            },
            (g.dtype, DType::F32),
            hb.count,
            false,
        )?;
    }
    Ok(s)
}

/// The device copy of the key lengths (i32), if any.
fn key_lens_on_device(be: &Cuda, g: &Geometry<'_>) -> Result<Option<CudaSlice<i32>>> {
    g.mask
        .key_lens
        .map(|l| {
            let lens: Vec<i32> = l.iter().map(|&x| x as i32).collect();
            be.gpu()
                .stream()
                .clone_htod(&lens)
                .map_err(|e| Error::driver("copy key lengths to the device", e))
        })
        .transpose()
}

/// P from S: the forward's softmax writing `lse`, or (`lse_in`) P recomputed from it.
fn softmax(
    be: &Cuda,
    g: &Geometry<'_>,
    s: &DeviceTensor,
    lse: &DeviceTensor,
    lse_in: bool,
) -> Result<DeviceTensor> {
    let probs = be.gpu().zeros(g.dtype, s.shape())?;
    let lens = key_lens_on_device(be, g)?;
    let name: &'static str = match g.dtype {
        DType::F32 => "attn_softmax_fwd_f32",
        DType::F16 => "attn_softmax_fwd_f16",
        DType::BF16 => "attn_softmax_fwd_bf16",
    };
    let kernel = be.gpu().kernel(MODULE, name)?;
    let p = cuattn_attn_softmax_fwd_params {
        scores: super::ptr(s),
        probs: super::ptr(&probs),
        lse: super::ptr(lse),
        key_lens: lens
            .as_ref()
            .map_or(0, |l| l.device_ptr(be.gpu().stream()).0),
        rows: g.rows() as i64,
        heads_q: g.heads_q as i32,
        len_q: g.len_q as i32,
        len_k: g.len_k as i32,
        causal: g.causal(),
        lse_in: lse_in as i32,
        scale: g.scale,
    };
    // SAFETY: s (f32) and probs (backend dtype) are [rows, len_k] contiguous, lse one f32 per
    // row (shape checked by the callers); the key lengths (one i32 per sequence, each ≤ len_k
    // as check_attention verified) are freed in stream order after the kernel; one block
    // per row in a grid-stride loop, a multiple of 32 threads.
    unsafe {
        launch(
            be.gpu(),
            &kernel,
            &p,
            row_grid(be, g),
            (row_threads(g), 1),
            0,
        )
    }?;
    Ok(probs)
}

fn row_threads(g: &Geometry<'_>) -> u32 {
    if g.len_k <= 256 {
        128
    } else {
        256
    }
}

fn row_grid(be: &Cuda, g: &Geometry<'_>) -> (u32, u32) {
    let most = be.gpu().info().multiprocessors as usize * 16;
    (g.rows().clamp(1, most) as u32, 1)
}

/// x∘M/(1 − p) of the site into a new tensor of x's dtype, over the whole score buffer.
fn dropped(be: &Cuda, x: &DeviceTensor, site: &DropoutSite) -> Result<DeviceTensor> {
    let mut y = be.gpu().zeros(x.dtype(), x.shape())?;
    dropout_into(
        be.gpu(),
        &DropoutOptions {
            p: site.p,
            seed: site.seed,
            offset: site.offset,
        },
        &x.view(),
        &mut y.view_mut(),
    )?;
    Ok(y)
}

/// The forward with dropout `site` on the probabilities: (O, LSE).
pub(super) fn forward(
    be: &Cuda,
    q: &Heads<'_, DeviceTensor>,
    k: &Heads<'_, DeviceTensor>,
    v: &Heads<'_, DeviceTensor>,
    mask: &AttentionMask<'_>,
    widths: (usize, usize, usize),
    site: DropoutSite,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let g = Geometry::new(be, q, k, v, mask, widths);
    let gpu = be.gpu();
    let wo = g.heads_q * g.dim_v;
    let out = gpu.zeros(g.dtype, &[g.batch * g.len_q, wo])?;
    let lse = gpu.full(
        DType::F32,
        &[g.batch, g.heads_q, g.len_q],
        f32::NEG_INFINITY,
    )?;
    if g.rows() == 0 || g.len_k == 0 {
        return Ok((out, lse));
    }
    let s = scores(be, &g, q, k)?;
    let probs = softmax(be, &g, &s, &lse, false)?;
    drop(s);
    let pd = dropped(be, &probs, &site)?;
    for hb in g.head_blocks() {
        let kl = g.key_len(hb.b);
        let c = g.head(&out, (0, wo, g.dim_v), g.len_q, hb.b, hb.h0, false, g.dim_v);
        be.gemm_rm(
            (g.len_q, g.dim_v, kl),
            g.scores(&pd, hb.b, hb.h0, false),
            g.head(
                v.tensor,
                (v.col, g.wv, g.dim_v),
                g.len_k,
                hb.b,
                hb.hk0,
                false,
                g.dim_v * hb.kv_step,
            ),
            (c.ptr, c.ld, c.stride),
            (g.dtype, g.dtype),
            hb.count,
            false,
        )?;
    }
    Ok((out, lse))
}

/// `acc[b, hk] = Σ_{h in hk's group} op(scores_bh)ᵀ·x_bh` into an f32 `[batch·len_k,
/// heads_kv·dim]` buffer: dV (x = dO, scores = P̃) or dK (x = Q, scores = dS).
#[allow(clippy::too_many_arguments)]
fn group_sums(
    be: &Cuda,
    g: &Geometry<'_>,
    scores_t: &DeviceTensor,
    x: &DeviceTensor,
    (x_col, x_width): (usize, usize),
    dim: usize,
) -> Result<DeviceTensor> {
    let width = g.heads_kv * dim;
    let acc = be.gpu().zeros(DType::F32, &[g.batch * g.len_k, width])?;
    for hb in g.head_blocks() {
        let kl = g.key_len(hb.b);
        // One product per query head inside a group (β = 1 after the first, in order); all
        // heads in one batched product without GQA.
        let (batches, per_call) = if g.group == 1 {
            (1, hb.count)
        } else {
            (hb.count, 1)
        };
        for i in 0..batches {
            let h = hb.h0 + i;
            let c_ptr = super::ptr(&acc) + ((hb.b * g.len_k * width + hb.hk0 * dim) * 4) as u64;
            be.gemm_rm(
                (kl, dim, g.len_q),
                g.scores(scores_t, hb.b, h, true),
                g.head(x, (x_col, x_width, dim), g.len_q, hb.b, h, false, dim),
                (c_ptr, width, dim),
                (g.dtype, DType::F32),
                per_call,
                i > 0,
            )?;
        }
    }
    Ok(acc)
}

/// The backward with dropout `site` on the probabilities.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &Cuda,
    q: &Heads<'_, DeviceTensor>,
    k: &Heads<'_, DeviceTensor>,
    v: &Heads<'_, DeviceTensor>,
    _o: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    mask: &AttentionMask<'_>,
    widths: (usize, usize, usize),
    site: DropoutSite,
) -> Result<AttentionGrads<DeviceTensor>> {
    let g = Geometry::new(be, q, k, v, mask, widths);
    let gpu = be.gpu();
    let dt = g.dtype;
    let (wo, wdq) = (g.heads_q * g.dim_v, g.heads_q * g.dim);
    let dq = gpu.zeros(dt, &[g.batch * g.len_q, wdq])?;
    if g.rows() == 0 || g.len_k == 0 {
        return Ok(AttentionGrads {
            dq,
            dk: gpu.zeros(dt, &[g.batch * g.len_k, g.heads_kv * g.dim])?,
            dv: gpu.zeros(dt, &[g.batch * g.len_k, g.heads_kv * g.dim_v])?,
        });
    }
    if !lse.layout().is_contiguous() {
        return Err(Error::layout(
            "lse",
            "must be contiguous [batch, heads, len_q]",
        ));
    }
    let s = scores(be, &g, q, k)?;
    let probs = softmax(be, &g, &s, lse, true)?;
    drop(s);
    let pd = dropped(be, &probs, &site)?;
    // dV = Σ P̃ᵀ·dO.
    let dv32 = group_sums(be, &g, &pd, dout, (0, wo), g.dim_v)?;
    drop(pd);
    // dP̃ = dO·Vᵀ, through the mask.
    let dpt = gpu.zeros(DType::F32, &[g.rows(), g.len_k])?;
    for hb in g.head_blocks() {
        let kl = g.key_len(hb.b);
        let c = g.scores(&dpt, hb.b, hb.h0, false);
        be.gemm_rm(
            (g.len_q, kl, g.dim_v),
            g.head(dout, (0, wo, g.dim_v), g.len_q, hb.b, hb.h0, false, g.dim_v),
            g.head(
                v.tensor,
                (v.col, g.wv, g.dim_v),
                g.len_k,
                hb.b,
                hb.hk0,
                true,
                g.dim_v * hb.kv_step,
            ),
            (c.ptr, c.ld, c.stride),
            (dt, DType::F32),
            hb.count,
            false,
        )?;
    }
    let dp = dropped(be, &dpt, &site)?;
    drop(dpt);
    // dS = scale·P∘(dP − rowsum(P∘dP)).
    let ds = gpu.zeros(dt, &[g.rows(), g.len_k])?;
    let name: &'static str = match dt {
        DType::F32 => "attn_softmax_bwd_f32",
        DType::F16 => "attn_softmax_bwd_f16",
        DType::BF16 => "attn_softmax_bwd_bf16",
    };
    let kernel = gpu.kernel(MODULE, name)?;
    let p = cuattn_attn_softmax_bwd_params {
        probs: super::ptr(&probs),
        dprobs: super::ptr(&dp),
        dscores: super::ptr(&ds),
        rows: g.rows() as i64,
        len_k: g.len_k as i32,
        scale: g.scale,
    };
    // SAFETY: probs, dp (f32) and ds are [rows, len_k] contiguous buffers made above; one
    // block per row in a grid-stride loop, a multiple of 32 threads.
    unsafe { launch(gpu, &kernel, &p, row_grid(be, &g), (row_threads(&g), 1), 0) }?;
    drop((probs, dp));
    // dQ = dS·K.
    for hb in g.head_blocks() {
        let kl = g.key_len(hb.b);
        let c = g.head(&dq, (0, wdq, g.dim), g.len_q, hb.b, hb.h0, false, g.dim);
        be.gemm_rm(
            (g.len_q, g.dim, kl),
            g.scores(&ds, hb.b, hb.h0, false),
            g.head(
                k.tensor,
                (k.col, g.wk, g.dim),
                g.len_k,
                hb.b,
                hb.hk0,
                false,
                g.dim * hb.kv_step,
            ),
            (c.ptr, c.ld, c.stride),
            (dt, dt),
            hb.count,
            false,
        )?;
    }
    // dK = Σ dSᵀ·Q.
    let dk32 = group_sums(be, &g, &ds, q.tensor, (q.col, g.wq), g.dim)?;
    let finish = |t: DeviceTensor| -> Result<DeviceTensor> {
        if dt == DType::F32 {
            Ok(t)
        } else {
            be.converted(&t, dt)
        }
    };
    Ok(AttentionGrads {
        dq,
        dk: finish(dk32)?,
        dv: finish(dv32)?,
    })
}
