//! The backward of every layer, written out explicitly: each `*_forward` returns its output
//! and a cache of what its backward reads, each `*_backward` takes that cache and dL/d(output)
//! and returns dL/d(input) and the parameter gradients. Parameters are borrowed, so one set of
//! weights serves any number of calls (and a recomputed forward).
//!
//! Linear layer `y = x·Wᵀ + b`: dx = dy·W (NN GEMM), dW = dyᵀ·x (TN), db = Σ_rows dy.

use super::backend::{DropoutSite, LayerNormGrads, Op, TrainBackend};
use crate::error::Result;
use crate::runtime::backend::{Activation, AttentionMask, Heads};

/// A linear layer's parameters: W `[out, in]`, b `[out]`.
pub struct LinearParams<'a, T> {
    pub w: &'a T,
    pub b: Option<&'a T>,
}

/// Gradients of a linear layer.
pub struct LinearGrads<T> {
    /// dL/dx, when asked for.
    pub dx: Option<T>,
    pub dw: T,
    pub db: Option<T>,
}

/// `x·Wᵀ + b` (no activation; see [`TrainBackend::activate`]).
pub fn linear_forward<B: TrainBackend>(
    be: &B,
    p: LinearParams<'_, B::Tensor>,
    x: &B::Tensor,
) -> Result<B::Tensor> {
    be.linear(x, p.w, p.b, Activation::None)
}

/// The backward of [`linear_forward`] at input `x`.
pub fn linear_backward<B: TrainBackend>(
    be: &B,
    p: LinearParams<'_, B::Tensor>,
    x: &B::Tensor,
    dy: &B::Tensor,
    want_dx: bool,
) -> Result<LinearGrads<B::Tensor>> {
    Ok(LinearGrads {
        dx: if want_dx {
            Some(be.matmul(dy, Op::N, p.w, Op::N)?)
        } else {
            None
        },
        dw: be.matmul(dy, Op::T, x, Op::N)?,
        db: match p.b {
            Some(_) => Some(be.sum_rows(dy)?),
            None => None,
        },
    })
}

/// LayerNorm's parameters.
pub struct LayerNormParams<'a, T> {
    pub gamma: &'a T,
    pub beta: &'a T,
    pub eps: f32,
}

/// LayerNorm of `x + residual` (or `x`); returns the output and the normalised input s
/// (the cache its backward needs).
pub fn layer_norm_forward<B: TrainBackend>(
    be: &B,
    p: LayerNormParams<'_, B::Tensor>,
    x: &B::Tensor,
    residual: Option<&B::Tensor>,
) -> Result<(B::Tensor, B::Tensor)> {
    let s = match residual {
        Some(r) => be.add(x, r)?,
        None => copy(be, x)?,
    };
    let y = be.layer_norm(&s, None, p.gamma, p.beta, p.eps)?;
    Ok((y, s))
}

/// The backward of [`layer_norm_forward`]: dx (also the residual's gradient), dγ, dβ.
pub fn layer_norm_backward<B: TrainBackend>(
    be: &B,
    p: LayerNormParams<'_, B::Tensor>,
    s: &B::Tensor,
    dy: &B::Tensor,
) -> Result<LayerNormGrads<B::Tensor>> {
    be.layer_norm_backward(s, p.gamma, p.eps, dy)
}

/// Dropout at a site, or the identity (a copy-free pass-through is not possible for an owned
/// result, so `None` returns `x` itself).
pub fn maybe_dropout<B: TrainBackend>(
    be: &B,
    x: B::Tensor,
    site: Option<DropoutSite>,
) -> Result<B::Tensor> {
    match site {
        Some(s) if s.p > 0.0 => be.dropout(&x, s),
        _ => Ok(x),
    }
}

/// Multi-head self-attention's parameters (separate Q, K, V projections, as checkpoints
/// store them) and head count.
pub struct SelfAttentionParams<'a, T> {
    pub q: LinearParams<'a, T>,
    pub k: LinearParams<'a, T>,
    pub v: LinearParams<'a, T>,
    pub out: LinearParams<'a, T>,
    pub heads: usize,
}

/// What [`self_attention_backward`] reads: the projections, the context (attention output
/// before the output projection) and its log-sum-exp.
pub struct SelfAttentionCache<T> {
    pub q: T,
    pub k: T,
    pub v: T,
    pub ctx: T,
    pub lse: T,
}

/// Gradients of a self-attention block, in the order q, k, v, out (weight then bias each).
pub struct SelfAttentionGrads<T> {
    pub dx: T,
    pub q: LinearGrads<T>,
    pub k: LinearGrads<T>,
    pub v: LinearGrads<T>,
    pub out: LinearGrads<T>,
}

fn heads<T>(t: &T, heads: usize, width: usize) -> Heads<'_, T> {
    Heads {
        tensor: t,
        col: 0,
        heads,
        dim: width / heads,
    }
}

/// Self-attention over `x` `[batch·len, width]`: out = (softmax(QKᵀ/√d + mask)·V)·W_oᵀ + b_o,
/// with `probs_dropout` on the probabilities.
pub fn self_attention_forward<B: TrainBackend>(
    be: &B,
    p: SelfAttentionParams<'_, B::Tensor>,
    x: &B::Tensor,
    mask: &AttentionMask<'_>,
    probs_dropout: Option<DropoutSite>,
) -> Result<(B::Tensor, SelfAttentionCache<B::Tensor>)> {
    let q = linear_forward(be, p.q, x)?;
    let k = linear_forward(be, p.k, x)?;
    let v = linear_forward(be, p.v, x)?;
    let (wq, wv) = (be.shape(&q)[1], be.shape(&v)[1]);
    let (ctx, lse) = be.attention_with_lse(
        heads(&q, p.heads, wq),
        heads(&k, p.heads, wq),
        heads(&v, p.heads, wv),
        mask,
        probs_dropout,
    )?;
    let out = linear_forward(be, p.out, &ctx)?;
    Ok((out, SelfAttentionCache { q, k, v, ctx, lse }))
}

/// The backward of [`self_attention_forward`] at input `x`.
pub fn self_attention_backward<B: TrainBackend>(
    be: &B,
    p: SelfAttentionParams<'_, B::Tensor>,
    x: &B::Tensor,
    c: &SelfAttentionCache<B::Tensor>,
    mask: &AttentionMask<'_>,
    probs_dropout: Option<DropoutSite>,
    dout: &B::Tensor,
) -> Result<SelfAttentionGrads<B::Tensor>> {
    let out = linear_backward(be, p.out, &c.ctx, dout, true)?;
    let dctx = out.dx.as_ref().expect("asked for dx");
    let (wq, wv) = (be.shape(&c.q)[1], be.shape(&c.v)[1]);
    let g = be.attention_backward(
        heads(&c.q, p.heads, wq),
        heads(&c.k, p.heads, wq),
        heads(&c.v, p.heads, wv),
        &c.ctx,
        &c.lse,
        dctx,
        mask,
        probs_dropout,
    )?;
    let mut gq = linear_backward(be, p.q, x, &g.dq, true)?;
    let mut gk = linear_backward(be, p.k, x, &g.dk, true)?;
    let mut gv = linear_backward(be, p.v, x, &g.dv, true)?;
    let mut dx = gq.dx.take().expect("asked for dx");
    be.accumulate(&mut dx, &gk.dx.take().expect("asked for dx"))?;
    be.accumulate(&mut dx, &gv.dx.take().expect("asked for dx"))?;
    Ok(SelfAttentionGrads {
        dx,
        q: gq,
        k: gk,
        v: gv,
        out,
    })
}

/// dL/dx, dL/dmem and the q, k, v, out projections' gradients.
pub type CrossBackward<T> = (T, T, [LinearGrads<T>; 4]);

/// Cross-attention: queries from `x` `[B·Ty, d]`, keys and values from `mem` `[B·Tx, d]`
/// (the encoder's output), with `probs_dropout` on the probabilities; its cache has the same
/// fields as self-attention's.
pub fn cross_attention_forward<B: TrainBackend>(
    be: &B,
    p: SelfAttentionParams<'_, B::Tensor>,
    x: &B::Tensor,
    mem: &B::Tensor,
    mask: &AttentionMask<'_>,
    probs_dropout: Option<DropoutSite>,
) -> Result<(B::Tensor, SelfAttentionCache<B::Tensor>)> {
    let q = linear_forward(be, p.q, x)?;
    let k = linear_forward(be, p.k, mem)?;
    let v = linear_forward(be, p.v, mem)?;
    let (wq, wv) = (be.shape(&q)[1], be.shape(&v)[1]);
    let (ctx, lse) = be.attention_with_lse(
        heads(&q, p.heads, wq),
        heads(&k, p.heads, wq),
        heads(&v, p.heads, wv),
        mask,
        probs_dropout,
    )?;
    let out = linear_forward(be, p.out, &ctx)?;
    Ok((out, SelfAttentionCache { q, k, v, ctx, lse }))
}

/// The backward of [`cross_attention_forward`] (the same `probs_dropout` site): dL/dx,
/// dL/dmem and the projections' gradients in the order q, k, v, out.
#[allow(clippy::too_many_arguments)]
pub fn cross_attention_backward<B: TrainBackend>(
    be: &B,
    p: SelfAttentionParams<'_, B::Tensor>,
    x: &B::Tensor,
    mem: &B::Tensor,
    c: &SelfAttentionCache<B::Tensor>,
    mask: &AttentionMask<'_>,
    probs_dropout: Option<DropoutSite>,
    dout: &B::Tensor,
) -> Result<CrossBackward<B::Tensor>> {
    let out = linear_backward(be, p.out, &c.ctx, dout, true)?;
    let (wq, wv) = (be.shape(&c.q)[1], be.shape(&c.v)[1]);
    let g = be.attention_backward(
        heads(&c.q, p.heads, wq),
        heads(&c.k, p.heads, wq),
        heads(&c.v, p.heads, wv),
        &c.ctx,
        &c.lse,
        out.dx.as_ref().expect("asked for dx"),
        mask,
        probs_dropout,
    )?;
    let mut gq = linear_backward(be, p.q, x, &g.dq, true)?;
    let mut gk = linear_backward(be, p.k, mem, &g.dk, true)?;
    let mut gv = linear_backward(be, p.v, mem, &g.dv, true)?;
    let dx = gq.dx.take().expect("asked for dx");
    let mut dmem = gk.dx.take().expect("asked for dx");
    be.accumulate(&mut dmem, &gv.dx.take().expect("asked for dx"))?;
    Ok((dx, dmem, [gq, gk, gv, out]))
}

/// A copy of a tensor through the backend (a tensor type need not be `Clone`).
pub fn copy<B: TrainBackend>(be: &B, t: &B::Tensor) -> Result<B::Tensor> {
    be.cast(t, be.tensor_dtype(t))
}

/// The feed-forward block's parameters: `down(act(up(x)))`.
pub struct FeedForwardParams<'a, T> {
    pub up: LinearParams<'a, T>,
    pub down: LinearParams<'a, T>,
    pub act: Activation,
}

/// What [`feed_forward_backward`] reads: the pre-activation z and the activation a (after
/// any activation dropout: the down projection's input).
pub struct FeedForwardCache<T> {
    pub z: T,
    pub a: T,
}

pub struct FeedForwardGrads<T> {
    pub dx: T,
    pub up: LinearGrads<T>,
    pub down: LinearGrads<T>,
}

pub fn feed_forward_forward<B: TrainBackend>(
    be: &B,
    p: FeedForwardParams<'_, B::Tensor>,
    x: &B::Tensor,
) -> Result<(B::Tensor, FeedForwardCache<B::Tensor>)> {
    feed_forward_forward_dropout(be, p, x, None)
}

/// `down(dropout(act(up(x))))`: [`feed_forward_forward`] with `act_dropout` between the
/// activation and the down projection (BART's `activation_dropout`).
pub fn feed_forward_forward_dropout<B: TrainBackend>(
    be: &B,
    p: FeedForwardParams<'_, B::Tensor>,
    x: &B::Tensor,
    act_dropout: Option<DropoutSite>,
) -> Result<(B::Tensor, FeedForwardCache<B::Tensor>)> {
    let z = linear_forward(be, p.up, x)?;
    let a = maybe_dropout(be, be.activate(&z, p.act)?, act_dropout)?;
    let y = linear_forward(be, p.down, &a)?;
    Ok((y, FeedForwardCache { z, a }))
}

pub fn feed_forward_backward<B: TrainBackend>(
    be: &B,
    p: FeedForwardParams<'_, B::Tensor>,
    x: &B::Tensor,
    c: &FeedForwardCache<B::Tensor>,
    dy: &B::Tensor,
) -> Result<FeedForwardGrads<B::Tensor>> {
    feed_forward_backward_dropout(be, p, x, c, None, dy)
}

/// The backward of [`feed_forward_forward_dropout`] (the same `act_dropout` site: the mask is
/// regenerated on dL/d(activation)).
pub fn feed_forward_backward_dropout<B: TrainBackend>(
    be: &B,
    p: FeedForwardParams<'_, B::Tensor>,
    x: &B::Tensor,
    c: &FeedForwardCache<B::Tensor>,
    act_dropout: Option<DropoutSite>,
    dy: &B::Tensor,
) -> Result<FeedForwardGrads<B::Tensor>> {
    let mut down = linear_backward(be, p.down, &c.a, dy, true)?;
    let da = maybe_dropout(be, down.dx.take().expect("asked for dx"), act_dropout)?;
    let dz = be.activation_backward(&c.z, &da, p.act)?;
    let mut up = linear_backward(be, p.up, x, &dz, true)?;
    let dx = up.dx.take().expect("asked for dx");
    Ok(FeedForwardGrads { dx, up, down })
}

/// BERT's embeddings: word + token type + position rows, summed (then LayerNorm'd by the
/// caller). Returns the sum.
pub fn embeddings_forward<B: TrainBackend>(
    be: &B,
    tables: [&B::Tensor; 3],
    ids: [&[u32]; 3],
) -> Result<B::Tensor> {
    let mut sum = be.gather_rows(tables[0], ids[0])?;
    for (t, i) in tables.iter().zip(ids).skip(1) {
        let rows = be.gather_rows(t, i)?;
        be.accumulate(&mut sum, &rows)?;
    }
    Ok(sum)
}

/// The gradient of each table of [`embeddings_forward`]: the same dL/dsum scattered by each
/// table's ids. `padding_idx[i]` rows of table i get none.
pub fn embeddings_backward<B: TrainBackend>(
    be: &B,
    tables: [&B::Tensor; 3],
    ids: [&[u32]; 3],
    padding_idx: [Option<u32>; 3],
    dsum: &B::Tensor,
) -> Result<[B::Tensor; 3]> {
    let g =
        |i: usize| be.gather_rows_backward(dsum, ids[i], be.shape(tables[i])[0], padding_idx[i]);
    Ok([g(0)?, g(1)?, g(2)?])
}

// By hand: derived impls would require `T: Copy`, but only references are copied.
impl<T> Clone for LinearParams<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for LinearParams<'_, T> {}

// By hand: derived impls would require `T: Copy`, but only references are copied.
impl<T> Clone for LayerNormParams<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for LayerNormParams<'_, T> {}

// By hand: derived impls would require `T: Copy`, but only references are copied.
impl<T> Clone for SelfAttentionParams<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SelfAttentionParams<'_, T> {}

// By hand: derived impls would require `T: Copy`, but only references are copied.
impl<T> Clone for FeedForwardParams<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for FeedForwardParams<'_, T> {}
