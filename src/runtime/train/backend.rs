//! What a backend needs on top of [`Backend`] to train: tensors with their own dtype, in-place
//! accumulation, the three GEMM shapes of a linear layer's forward and backward, reductions,
//! elementwise ops and their derivatives, column slices, attention that keeps its log-sum-exp
//! and its backward, dropout, the loss and the optimizer step.
//!
//! Every op validates its inputs and returns a typed [`crate::Error`]; none panics on bad input.

use super::rnn_ops::{self, AdditiveGrads, GruCellGrads, LstmCellGrads};
use crate::error::Result;
use crate::runtime::backend::{Activation, AttentionMask, Backend, Heads};
use crate::DType;

/// Whether a GEMM operand is read as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored: `[rows, cols]`.
    N,
    /// Transposed: a stored `[rows, cols]` read as `[cols, rows]`.
    T,
}

/// Gradients of LayerNorm `y = (s − mean)·rstd·γ + β` (s = x, or x + residual).
pub struct LayerNormGrads<T> {
    /// dL/ds, `[rows, width]` (the residual's gradient too: s = x + residual).
    pub dx: T,
    pub dgamma: T,
    pub dbeta: T,
}

/// Gradients of attention, one tensor per input view: `dq` `[batch·len_q, heads_q·dim]`,
/// `dk` `[batch·len_k, heads_kv·dim]`, `dv` `[batch·len_k, heads_kv·dim_v]` (heads side by
/// side, like the output). Under GQA a K/V head's gradient is the sum over its query heads.
pub struct AttentionGrads<T> {
    pub dq: T,
    pub dk: T,
    pub dv: T,
}

/// Softmax cross-entropy over rows of logits, with PyTorch's `F.cross_entropy` semantics:
/// the mean over rows whose label is not `ignore_index`; with label smoothing ε the target is
/// (1 − ε)·one_hot + ε/classes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    pub ignore_index: i64,
    pub label_smoothing: f32,
}

impl Default for CrossEntropy {
    fn default() -> Self {
        CrossEntropy {
            ignore_index: -100,
            label_smoothing: 0.0,
        }
    }
}

/// One dropout site: the Philox stream `(seed, offset)` of [`crate::rng`], element i of the
/// tensor (row-major) drawing word i. The backward applies the same site to the upstream
/// gradient, so it regenerates the forward's mask.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutSite {
    pub p: f32,
    pub seed: u64,
    pub offset: u64,
}

/// The hyper-parameters of one AdamW step (PyTorch's `torch.optim.AdamW`):
/// m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ·(1 − lr·λ) − lr·m̂/(√v̂ + ε) with
/// m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ); λ = 0 for a parameter without decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// t, counting from 1.
    pub step: u64,
}

/// The ops training needs. Gradients flow as tensors of the backend; losses and norms come
/// back to the host as numbers.
pub trait TrainBackend: Backend {
    /// The element type of this tensor (f32 master weights may sit beside f16/bf16
    /// activations).
    fn tensor_dtype(&self, t: &Self::Tensor) -> DType;

    /// A tensor of `shape` stored in `dtype` (an error if the backend has no such storage).
    fn upload_as(&self, shape: &[usize], values: &[f32], dtype: DType) -> Result<Self::Tensor>;

    /// Zeros of `shape` in the backend's activation dtype.
    fn zeros(&self, shape: &[usize]) -> Result<Self::Tensor>;

    /// A copy of `t` converted to `dtype`.
    fn cast(&self, t: &Self::Tensor, dtype: DType) -> Result<Self::Tensor>;

    /// `acc += x`, same shape (in place).
    fn accumulate(&self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<()>;

    /// `x *= s` (in place).
    fn scale(&self, x: &mut Self::Tensor, s: f32) -> Result<()>;

    /// `op(a)·op(b)` for 2-D tensors: NN, NT and TN are the forward, input-gradient and
    /// weight-gradient GEMMs of a linear layer.
    fn matmul(
        &self,
        a: &Self::Tensor,
        op_a: Op,
        b: &Self::Tensor,
        op_b: Op,
    ) -> Result<Self::Tensor>;

    /// Column sums of `[rows, cols]` → `[cols]` (a bias gradient).
    fn sum_rows(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Σ x² over all elements, accumulated in f64.
    fn sum_squares(&self, x: &Self::Tensor) -> Result<f64>;

    /// Σ x² over every element of every tensor (the square of a global gradient norm). The
    /// default adds [`TrainBackend::sum_squares`] tensor by tensor; a device backend
    /// overrides it to wait for the device once instead of once per tensor.
    fn sum_squares_all(&self, xs: &[&Self::Tensor]) -> Result<f64> {
        let mut sum = 0f64;
        for x in xs {
            sum += self.sum_squares(x)?;
        }
        Ok(sum)
    }

    /// Elementwise `a·b`.
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `act(x)` elementwise.
    fn activate(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;

    /// `dy·act'(x)` elementwise, x the activation's input.
    fn activation_backward(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        act: Activation,
    ) -> Result<Self::Tensor>;

    /// The logistic sigmoid 1/(1 + e^−x) elementwise.
    fn sigmoid(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// `dy·σ(x)(1 − σ(x))` from y = σ(x) (the saved output, as a GRU gate keeps it).
    fn sigmoid_backward(&self, y: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor>;

    /// `dy·(1 − y²)` from y = tanh(x).
    fn tanh_backward(&self, y: &Self::Tensor, dy: &Self::Tensor) -> Result<Self::Tensor>;

    /// Columns `start .. start + width` of a 2-D tensor.
    fn slice_cols(&self, x: &Self::Tensor, start: usize, width: usize) -> Result<Self::Tensor>;

    /// 2-D tensors with the same rows side by side.
    fn concat_cols(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    /// The gradients of [`Backend::layer_norm`] at input `x` (the sum x + residual when there
    /// was one) given dL/dy.
    fn layer_norm_backward(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        eps: f32,
        dy: &Self::Tensor,
    ) -> Result<LayerNormGrads<Self::Tensor>>;

    /// The backward of [`Backend::gather_rows`]: `[rows, width]` zeros with every `dy` row
    /// added into row `ids[i]` (a deterministic scatter-add). Rows equal to `padding_idx` get
    /// no gradient (PyTorch's `nn.Embedding(padding_idx=…)`).
    fn gather_rows_backward(
        &self,
        dy: &Self::Tensor,
        ids: &[u32],
        rows: usize,
        padding_idx: Option<u32>,
    ) -> Result<Self::Tensor>;

    /// [`Backend::attention`] that also returns the log-sum-exp of every query's scaled
    /// scores, `[batch, heads_q, len_q]` in f32 (−∞ for a query with no admissible key).
    /// With `dropout`, the probabilities P (element `((b·heads_q + h)·len_q + i)·len_k + j`)
    /// go through the site's mask before P·V, as BERT's `attention_probs_dropout_prob`.
    fn attention_with_lse(
        &self,
        q: Heads<'_, Self::Tensor>,
        k: Heads<'_, Self::Tensor>,
        v: Heads<'_, Self::Tensor>,
        mask: &AttentionMask<'_>,
        dropout: Option<DropoutSite>,
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    /// dQ, dK, dV of attention from the forward's inputs, its output `o` and `lse`, and dL/dO
    /// (the same `dropout` site as the forward: the mask is regenerated, not stored).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: Heads<'_, Self::Tensor>,
        k: Heads<'_, Self::Tensor>,
        v: Heads<'_, Self::Tensor>,
        o: &Self::Tensor,
        lse: &Self::Tensor,
        dout: &Self::Tensor,
        mask: &AttentionMask<'_>,
        dropout: Option<DropoutSite>,
    ) -> Result<AttentionGrads<Self::Tensor>>;

    /// Dropout: x·1/(1−p) where the site's mask keeps the element, else 0. Its backward is the
    /// same call on dL/dy.
    fn dropout(&self, x: &Self::Tensor, site: DropoutSite) -> Result<Self::Tensor>;

    /// Loss and dL/dlogits of softmax cross-entropy over `[rows, classes]` logits with one
    /// label per row. No row left after `ignore_index` gives loss 0 and zero gradients.
    fn cross_entropy(
        &self,
        logits: &Self::Tensor,
        labels: &[i64],
        opts: &CrossEntropy,
    ) -> Result<(f32, Self::Tensor)>;

    /// One AdamW step on `param` (f32 master weights) with its f32 state `m`, `v`, in place.
    /// `hp.weight_decay` is the decay this parameter gets (0 for no decay).
    fn adamw_step(
        &self,
        param: &mut Self::Tensor,
        grad: &Self::Tensor,
        m: &mut Self::Tensor,
        v: &mut Self::Tensor,
        hp: &AdamWStep,
    ) -> Result<()>;

    /// One GRU step after its two GEMMs ([`super::rnn_ops`] has the equations): gi, gh
    /// `[batch, 3H]`, h `[batch, H]`; returns h' and the cache `[batch, 4H]` its backward
    /// reads. Rows with `active[b] == false` keep h. The default runs the host f32 op through
    /// a copy; a device backend overrides it with a fused kernel.
    fn gru_cell(
        &self,
        gi: &Self::Tensor,
        gh: &Self::Tensor,
        h: &Self::Tensor,
        active: Option<&[bool]>,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let (batch, hidden) =
            rnn_ops::gru_dims(self.shape(gi), self.shape(gh), self.shape(h), active)?;
        let (out, cache) = rnn_ops::gru_cell(
            &self.to_f32(gi)?,
            &self.to_f32(gh)?,
            &self.to_f32(h)?,
            batch,
            hidden,
            active,
        );
        Ok((
            self.upload(&[batch, hidden], &out)?,
            self.upload(&[batch, 4 * hidden], &cache)?,
        ))
    }

    /// The backward of [`TrainBackend::gru_cell`] from its cache, h and dL/dh'.
    fn gru_cell_backward(
        &self,
        cache: &Self::Tensor,
        h: &Self::Tensor,
        dout: &Self::Tensor,
        active: Option<&[bool]>,
    ) -> Result<GruCellGrads<Self::Tensor>> {
        let (batch, hidden) = rnn_cache_dims(self.shape(cache), self.shape(h), self.shape(dout))?;
        if let Some(a) = active {
            if a.len() != batch {
                return Err(crate::Error::shape(
                    "active",
                    format!("[{batch}]"),
                    &[a.len()],
                ));
            }
        }
        let (dgi, dgh, dh) = rnn_ops::gru_cell_backward(
            &self.to_f32(cache)?,
            &self.to_f32(h)?,
            &self.to_f32(dout)?,
            batch,
            hidden,
            active,
        );
        Ok(GruCellGrads {
            dgi: self.upload(&[batch, 3 * hidden], &dgi)?,
            dgh: self.upload(&[batch, 3 * hidden], &dgh)?,
            dh: self.upload(&[batch, hidden], &dh)?,
        })
    }

    /// One LSTM step after its two GEMMs ([`super::rnn_ops`] has the equations, PyTorch's
    /// `nn.LSTM` gates i, f, g, o): gi, gh `[batch, 4H]`, h, c `[batch, H]`; returns h', c' and
    /// the cache `[batch, 5H]` (i, f, g, o, tanh c') its backward reads. Rows with
    /// `active[b] == false` keep h and c. The default runs the host f32 op through a copy; a
    /// device backend overrides it with a fused kernel.
    fn lstm_cell(
        &self,
        gi: &Self::Tensor,
        gh: &Self::Tensor,
        h: &Self::Tensor,
        c: &Self::Tensor,
        active: Option<&[bool]>,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)> {
        let (batch, hidden) = rnn_ops::lstm_dims(
            self.shape(gi),
            self.shape(gh),
            self.shape(h),
            self.shape(c),
            active,
        )?;
        let (h_new, c_new, cache) = rnn_ops::lstm_cell(
            &self.to_f32(gi)?,
            &self.to_f32(gh)?,
            &self.to_f32(h)?,
            &self.to_f32(c)?,
            batch,
            hidden,
            active,
        );
        Ok((
            self.upload(&[batch, hidden], &h_new)?,
            self.upload(&[batch, hidden], &c_new)?,
            self.upload(&[batch, 5 * hidden], &cache)?,
        ))
    }

    /// The backward of [`TrainBackend::lstm_cell`] from its cache, c (the step's input
    /// memory), dL/dh' and dL/dc'.
    fn lstm_cell_backward(
        &self,
        cache: &Self::Tensor,
        c: &Self::Tensor,
        dh_out: &Self::Tensor,
        dc_out: &Self::Tensor,
        active: Option<&[bool]>,
    ) -> Result<LstmCellGrads<Self::Tensor>> {
        let (batch, hidden) = rnn_ops::lstm_backward_dims(
            self.shape(cache),
            self.shape(c),
            self.shape(dh_out),
            self.shape(dc_out),
            active,
        )?;
        let (dgates, dh, dc) = rnn_ops::lstm_cell_backward(
            &self.to_f32(cache)?,
            &self.to_f32(c)?,
            &self.to_f32(dh_out)?,
            &self.to_f32(dc_out)?,
            batch,
            hidden,
            active,
        );
        Ok(LstmCellGrads {
            dgates: self.upload(&[batch, 4 * hidden], &dgates)?,
            dh: self.upload(&[batch, hidden], &dh)?,
            dc: self.upload(&[batch, hidden], &dc)?,
        })
    }

    /// Bahdanau's additive attention ([`super::rnn_ops`]): q `[batch, A]`, keys `[batch·L, A]`,
    /// v `[A]`, values `[batch·L, D]`, the first `key_lens[b]` keys of each sequence valid;
    /// returns the context `[batch, D]` and the weights α `[batch, L]`.
    fn additive_attention(
        &self,
        q: &Self::Tensor,
        keys: &Self::Tensor,
        v: &Self::Tensor,
        values: &Self::Tensor,
        key_lens: Option<&[usize]>,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let d = rnn_ops::AdditiveDims::check(
            self.shape(q),
            self.shape(keys),
            self.shape(v),
            self.shape(values),
            key_lens,
        )?;
        let (ctx, alpha) = rnn_ops::additive_attention(
            &self.to_f32(q)?,
            &self.to_f32(keys)?,
            &self.to_f32(v)?,
            &self.to_f32(values)?,
            &d,
            key_lens,
        );
        Ok((
            self.upload(&[d.batch, d.dim_v], &ctx)?,
            self.upload(&[d.batch, d.len_k], &alpha)?,
        ))
    }

    /// The backward of [`TrainBackend::additive_attention`] from its inputs, α and dL/dcontext.
    #[allow(clippy::too_many_arguments)]
    fn additive_attention_backward(
        &self,
        q: &Self::Tensor,
        keys: &Self::Tensor,
        v: &Self::Tensor,
        values: &Self::Tensor,
        alpha: &Self::Tensor,
        dctx: &Self::Tensor,
        key_lens: Option<&[usize]>,
    ) -> Result<AdditiveGrads<Self::Tensor>> {
        let d = rnn_ops::AdditiveDims::check(
            self.shape(q),
            self.shape(keys),
            self.shape(v),
            self.shape(values),
            key_lens,
        )?;
        if self.shape(alpha) != [d.batch, d.len_k] {
            return Err(crate::Error::shape(
                "alpha",
                format!("[{}, {}]", d.batch, d.len_k),
                self.shape(alpha),
            ));
        }
        if self.shape(dctx) != [d.batch, d.dim_v] {
            return Err(crate::Error::shape(
                "dctx",
                format!("[{}, {}]", d.batch, d.dim_v),
                self.shape(dctx),
            ));
        }
        let [dq, dk, dv, dval] = rnn_ops::additive_attention_backward(
            &self.to_f32(q)?,
            &self.to_f32(keys)?,
            &self.to_f32(v)?,
            &self.to_f32(values)?,
            &self.to_f32(alpha)?,
            &self.to_f32(dctx)?,
            &d,
            key_lens,
        );
        Ok(AdditiveGrads {
            dq: self.upload(&[d.batch, d.dim_a], &dq)?,
            dkeys: self.upload(&[d.batch * d.len_k, d.dim_a], &dk)?,
            dv: self.upload(&[d.dim_a], &dv)?,
            dvalues: self.upload(&[d.batch * d.len_k, d.dim_v], &dval)?,
        })
    }
}

/// (batch, H) of a GRU backward's cache `[batch, 4H]`, h `[batch, H]` and dh' `[batch, H]`.
pub(crate) fn rnn_cache_dims(
    cache: &[usize],
    h: &[usize],
    dout: &[usize],
) -> Result<(usize, usize)> {
    let (batch, hidden) = match h {
        [b, w] if *w > 0 => (*b, *w),
        s => return Err(crate::Error::shape("h", "[batch, hidden ≥ 1]", s)),
    };
    if cache != [batch, 4 * hidden] {
        return Err(crate::Error::shape(
            "cache",
            format!("[{batch}, {}]", 4 * hidden),
            cache,
        ));
    }
    if dout != [batch, hidden] {
        return Err(crate::Error::shape(
            "dout",
            format!("[{batch}, {hidden}]"),
            dout,
        ));
    }
    Ok((batch, hidden))
}

/// The argument checks every backend's [`TrainBackend::cross_entropy`] makes on logits
/// `[rows, classes]`: one label per row, at least one class, label smoothing in [0, 1], and
/// every label a class or the ignore index.
pub(crate) fn check_cross_entropy(
    rows: usize,
    classes: usize,
    labels: &[i64],
    opts: &CrossEntropy,
) -> Result<()> {
    use crate::error::Error;
    if labels.len() != rows {
        return Err(Error::shape("labels", format!("[{rows}]"), &[labels.len()]));
    }
    if classes == 0 {
        return Err(Error::Empty {
            arg: "logits",
            shape: vec![rows, classes],
        });
    }
    let eps = opts.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::invalid(
            "label_smoothing",
            format!("must be in [0, 1], got {eps}"),
        ));
    }
    if let Some(&bad) = labels
        .iter()
        .find(|&&l| l != opts.ignore_index && (l < 0 || l as usize >= classes))
    {
        return Err(Error::invalid(
            "labels",
            format!("label {bad} is outside the {classes} classes"),
        ));
    }
    Ok(())
}
