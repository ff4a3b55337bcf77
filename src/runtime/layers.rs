//! The building blocks of a transformer, written once against [`Backend`]: linear layers,
//! LayerNorm, the feed-forward block, positional encodings (sinusoidal and learned), and the
//! attention family (basic unparameterised self-attention, single-head scaled dot-product
//! attention with learned projections, multi-head self and cross attention, masked).
//!
//! Parameters arrive as [`HostParam`]s (f32, checkpoint shapes) and are uploaded once.

use super::backend::{Activation, AttentionMask, Backend, CausalAlign, Heads, WeightUse, Window};
use super::checkpoint::HostParam;
use crate::error::{Error, Result};

fn upload<B: Backend>(be: &B, p: &HostParam) -> Result<B::Tensor> {
    be.upload(&p.shape, &p.values)
}

/// `y = x·Wᵀ + b` with W `[out, in]`.
pub struct Linear<B: Backend> {
    pub weight: B::Tensor,
    pub bias: Option<B::Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

impl<B: Backend> Linear<B> {
    /// From a `[out, in]` weight (PyTorch `nn.Linear`) and an optional `[out]` bias.
    pub fn new(be: &B, weight: &HostParam, bias: Option<&HostParam>) -> Result<Self> {
        let [out, inp] = weight.shape[..] else {
            return Err(Error::shape("weight", "[out, in]", &weight.shape));
        };
        if let Some(b) = bias {
            if b.shape != [out] {
                return Err(Error::shape("bias", format!("[{out}]"), &b.shape));
            }
        }
        Ok(Linear {
            weight: upload(be, weight)?,
            bias: bias.map(|b| upload(be, b)).transpose()?,
            in_features: inp,
            out_features: out,
        })
    }

    /// [`Linear::new`] from parameters the layer takes over (uploaded without a host copy
    /// on the CPU backend).
    pub fn from_owned(be: &B, weight: HostParam, bias: Option<HostParam>) -> Result<Self> {
        Self::from_owned_for(be, weight, bias, WeightUse::AnyRows)
    }

    /// [`Linear::from_owned`] for a layer the model calls as `usage` says (the backend may
    /// store the weight for it: [`Backend::upload_linear_weight`]).
    pub fn from_owned_for(
        be: &B,
        weight: HostParam,
        bias: Option<HostParam>,
        usage: WeightUse,
    ) -> Result<Self> {
        let [out, inp] = weight.shape[..] else {
            return Err(Error::shape("weight", "[out, in]", &weight.shape));
        };
        if let Some(b) = &bias {
            if b.shape != [out] {
                return Err(Error::shape("bias", format!("[{out}]"), &b.shape));
            }
        }
        Ok(Linear {
            weight: be.upload_linear_weight(&weight.shape, weight.values, usage)?,
            bias: bias
                .map(|b| be.upload_owned(&b.shape, b.values))
                .transpose()?,
            in_features: inp,
            out_features: out,
        })
    }

    /// From a Conv1D weight stored `[in, out]` (GPT-2).
    pub fn from_conv1d(be: &B, weight: &HostParam, bias: Option<&HostParam>) -> Result<Self> {
        Self::from_owned(be, weight.transposed()?, bias.cloned())
    }

    /// Several linear layers over the same input fused into one (their outputs side by side,
    /// in order): one GEMM instead of several. Every part needs a bias, or none does.
    pub fn fused(be: &B, parts: &[(&HostParam, Option<&HostParam>)]) -> Result<Self> {
        Self::fused_for(be, parts, WeightUse::AnyRows)
    }

    /// [`Linear::fused`] for a layer the model calls as `usage` says.
    pub fn fused_for(
        be: &B,
        parts: &[(&HostParam, Option<&HostParam>)],
        usage: WeightUse,
    ) -> Result<Self> {
        let mut b = Vec::new();
        let mut out = 0;
        let inp = parts
            .first()
            .map_or(0, |(w, _)| w.shape.get(1).copied().unwrap_or(0));
        let with_bias = parts.first().is_some_and(|(_, b)| b.is_some());
        // The fused weight is a model's weight from here on: in huge pages where the kernel
        // allows.
        let total: usize = parts.iter().map(|(pw, _)| pw.values.len()).sum();
        let mut w = crate::runtime::host_memory::huge_page_buffer(total).map_err(|e| {
            Error::invalid("weight", format!("cannot allocate {total} values: {e}"))
        })?;
        for (pw, pb) in parts {
            if pw.shape.len() != 2 || pw.shape[1] != inp || pb.is_some() != with_bias {
                return Err(Error::shape(
                    "weight",
                    format!("[out, {inp}] (all parts alike, all with a bias or none)"),
                    &pw.shape,
                ));
            }
            w.extend_from_slice(&pw.values);
            out += pw.shape[0];
            if let Some(pb) = pb {
                b.extend_from_slice(&pb.values);
            }
        }
        let weight = HostParam {
            shape: vec![out, inp],
            values: w,
        };
        let bias = with_bias.then_some(HostParam {
            shape: vec![out],
            values: b,
        });
        Self::from_owned_for(be, weight, bias, usage)
    }

    pub fn forward(&self, be: &B, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        be.linear(x, &self.weight, self.bias.as_ref(), act)
    }
}

/// LayerNorm over the last dim with learned gain and bias.
pub struct LayerNorm<B: Backend> {
    pub gamma: B::Tensor,
    pub beta: B::Tensor,
    pub eps: f32,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(be: &B, gamma: &HostParam, beta: &HostParam, eps: f32) -> Result<Self> {
        if gamma.shape.len() != 1 || beta.shape != gamma.shape {
            return Err(Error::shape(
                "beta",
                format!("{:?} (gamma's, 1 dim)", gamma.shape),
                &beta.shape,
            ));
        }
        Ok(LayerNorm {
            gamma: upload(be, gamma)?,
            beta: upload(be, beta)?,
            eps,
        })
    }

    /// LayerNorm(x + residual), or LayerNorm(x).
    pub fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        residual: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        be.layer_norm(x, residual, &self.gamma, &self.beta, self.eps)
    }
}

/// Position-wise feed-forward: `W₂·act(W₁·x + b₁) + b₂`.
pub struct FeedForward<B: Backend> {
    pub up: Linear<B>,
    pub down: Linear<B>,
    pub act: Activation,
}

impl<B: Backend> FeedForward<B> {
    pub fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let h = self.up.forward(be, x, self.act)?;
        self.down.forward(be, &h, Activation::None)
    }
}

/// The sinusoidal encoding of "Attention Is All You Need": `[len, dim]` with
/// PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same). Computed in f64.
pub fn sinusoidal_positions(len: usize, dim: usize) -> HostParam {
    let mut values = vec![0f32; len * dim];
    for p in 0..len {
        for c in 0..dim {
            let i = (c / 2) as f64;
            let angle = p as f64 / 10000f64.powf(2.0 * i / dim as f64);
            values[p * dim + c] = if c % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    HostParam {
        shape: vec![len, dim],
        values,
    }
}

/// A table of position (or token) vectors looked up by index: learned positional encodings,
/// or the sinusoidal table uploaded once.
pub struct Embedding<B: Backend> {
    pub table: B::Tensor,
    pub rows: usize,
}

impl<B: Backend> Embedding<B> {
    pub fn new(be: &B, table: &HostParam) -> Result<Self> {
        if table.shape.len() != 2 {
            return Err(Error::shape("table", "[rows, width]", &table.shape));
        }
        Ok(Embedding {
            table: upload(be, table)?,
            rows: table.shape[0],
        })
    }

    /// [`Embedding::new`] from a table the layer takes over (no host copy on the CPU).
    pub fn from_owned(be: &B, table: HostParam) -> Result<Self> {
        if table.shape.len() != 2 {
            return Err(Error::shape("table", "[rows, width]", &table.shape));
        }
        Ok(Embedding {
            rows: table.shape[0],
            table: be.upload_owned(&table.shape, table.values)?,
        })
    }

    pub fn forward(&self, be: &B, ids: &[u32]) -> Result<B::Tensor> {
        be.gather_rows(&self.table, ids)
    }
}

/// Basic self-attention with no parameters: `softmax(X·Xᵀ)·X` per sequence (no scaling), X
/// `[batch·len, width]`.
pub fn basic_self_attention<B: Backend>(
    be: &B,
    x: &B::Tensor,
    batch: usize,
    len: usize,
) -> Result<B::Tensor> {
    let width = be.shape(x).get(1).copied().unwrap_or(0);
    let h = Heads {
        tensor: x,
        col: 0,
        heads: 1,
        dim: width,
    };
    let mask = AttentionMask {
        batch,
        len_q: len,
        len_k: len,
        key_lens: None,
        causal: None,
        window: None,
        scale: Some(1.0),
    };
    be.attention(h, h, h, &mask)
}

/// Single-head scaled dot-product attention with learned projections:
/// `softmax((X·W_qᵀ)(X·W_kᵀ)ᵀ / √d)·(X·W_vᵀ)`.
pub struct SingleHeadAttention<B: Backend> {
    /// W_q, W_k, W_v fused, `[3·d, in]`.
    pub qkv: Linear<B>,
    pub dim: usize,
}

impl<B: Backend> SingleHeadAttention<B> {
    pub fn new(be: &B, wq: &HostParam, wk: &HostParam, wv: &HostParam) -> Result<Self> {
        let dim = wq.shape.first().copied().unwrap_or(0);
        Ok(SingleHeadAttention {
            qkv: Linear::fused(be, &[(wq, None), (wk, None), (wv, None)])?,
            dim,
        })
    }

    pub fn forward(
        &self,
        be: &B,
        x: &B::Tensor,
        batch: usize,
        len: usize,
        causal: bool,
    ) -> Result<B::Tensor> {
        let qkv = self.qkv.forward(be, x, Activation::None)?;
        let heads = |i: usize| Heads {
            tensor: &qkv,
            col: i * self.dim,
            heads: 1,
            dim: self.dim,
        };
        let mask = AttentionMask {
            batch,
            len_q: len,
            len_k: len,
            key_lens: None,
            causal: causal.then_some(CausalAlign::TopLeft),
            window: None,
            scale: None,
        };
        be.attention(heads(0), heads(1), heads(2), &mask)
    }
}

/// Keys and values of all the positions a decoder has seen, per layer: the hook through which
/// incremental decoding (a KV cache) plugs into [`MultiHeadAttention::forward_self`].
pub trait KvCache<B: Backend> {
    /// Appends this step's keys and values (rows `b·len_new + t`, heads as given) and returns
    /// views of every key and value the step's queries attend to: rows `b·len_k + j`, with
    /// each sequence's count of valid keys (`None`: all `len_k`). The views borrow either the
    /// step's own heads or the cache, so no keys are copied to hand them over.
    fn append<'a>(
        &'a mut self,
        be: &B,
        k: Heads<'a, B::Tensor>,
        v: Heads<'a, B::Tensor>,
        batch: usize,
        len_new: usize,
    ) -> Result<CachedKv<'a, B::Tensor>>;
}

/// What a [`KvCache`] hands back for the attention of one step. The step's queries are aligned
/// bottom-right to each sequence's valid keys (the last query sees every valid key).
pub struct CachedKv<'a, T> {
    pub k: Heads<'a, T>,
    pub v: Heads<'a, T>,
    pub len_k: usize,
    pub key_lens: Option<&'a [usize]>,
}

/// Multi-head attention: projections, per-head scaled dot-product attention, output projection.
/// Self-attention projects Q, K and V in one GEMM; cross-attention projects Q from the
/// queries and K, V (in one GEMM) from the memory.
pub struct MultiHeadAttention<B: Backend> {
    projections: Projections<B>,
    pub out: Linear<B>,
    pub heads: usize,
    pub head_dim: usize,
    /// Multiplies Q·Kᵀ; `None` (every constructor's choice) for 1/√head_dim. GPT-Neo: 1.
    pub scale: Option<f32>,
    /// Local self-attention: each query sees only the last `w` positions up to and including
    /// its own (GPT-Neo's `local` layers, key j visible to query i iff i − w < j ≤ i, in
    /// positions of the sequence, cached or not). `None` (every constructor's choice): no
    /// window. Used by [`Self::forward_self`] only.
    pub local_window: Option<usize>,
}

enum Projections<B: Backend> {
    /// `[3·heads·dim, in]`: Q rows, then K, then V.
    SelfQkv(Linear<B>),
    Cross {
        q: Linear<B>,
        kv: Linear<B>,
    },
}

type LinearParts<'a> = (&'a HostParam, Option<&'a HostParam>);

impl<B: Backend> MultiHeadAttention<B> {
    fn check_heads(width: usize, heads: usize) -> Result<usize> {
        if heads == 0 || !width.is_multiple_of(heads) {
            return Err(Error::invalid(
                "heads",
                format!("{heads} heads do not divide the width {width}"),
            ));
        }
        Ok(width / heads)
    }

    /// Self-attention from Q, K, V and output projections (each `[out, in]` + bias).
    pub fn self_attention(
        be: &B,
        heads: usize,
        q: LinearParts<'_>,
        k: LinearParts<'_>,
        v: LinearParts<'_>,
        out: LinearParts<'_>,
    ) -> Result<Self> {
        Self::self_attention_for(be, heads, [q, k, v, out], WeightUse::AnyRows)
    }

    /// [`MultiHeadAttention::self_attention`] (Q, K, V, output in that order) for a layer
    /// the model calls as `usage` says ([`Backend::upload_linear_weight`]).
    pub fn self_attention_for(
        be: &B,
        heads: usize,
        [q, k, v, out]: [LinearParts<'_>; 4],
        usage: WeightUse,
    ) -> Result<Self> {
        let head_dim = Self::check_heads(q.0.shape.first().copied().unwrap_or(0), heads)?;
        let out = Linear::from_owned_for(be, out.0.clone(), out.1.cloned(), usage)?;
        Ok(MultiHeadAttention {
            projections: Projections::SelfQkv(Linear::fused_for(be, &[q, k, v], usage)?),
            out,
            heads,
            head_dim,
            scale: None,
            local_window: None,
        })
    }

    /// Self-attention from an already fused `[3·width, in]` projection (GPT-2's `c_attn`).
    pub fn from_fused_qkv(heads: usize, qkv: Linear<B>, out: Linear<B>) -> Result<Self> {
        let head_dim = Self::check_heads(qkv.out_features / 3, heads)?;
        if !qkv.out_features.is_multiple_of(3) {
            return Err(Error::invalid(
                "qkv",
                "fused projection width is not 3·width",
            ));
        }
        Ok(MultiHeadAttention {
            projections: Projections::SelfQkv(qkv),
            out,
            heads,
            head_dim,
            scale: None,
            local_window: None,
        })
    }

    /// Cross-attention: Q from the queries, K and V from the memory.
    pub fn cross_attention(
        be: &B,
        heads: usize,
        q: LinearParts<'_>,
        k: LinearParts<'_>,
        v: LinearParts<'_>,
        out: LinearParts<'_>,
    ) -> Result<Self> {
        let head_dim = Self::check_heads(q.0.shape.first().copied().unwrap_or(0), heads)?;
        Ok(MultiHeadAttention {
            projections: Projections::Cross {
                q: Linear::new(be, q.0, q.1)?,
                kv: Linear::fused(be, &[k, v])?,
            },
            out: Linear::new(be, out.0, out.1)?,
            heads,
            head_dim,
            scale: None,
            local_window: None,
        })
    }

    /// The fused `[3·heads·dim, in]` Q/K/V projection of a self-attention layer (`None` for
    /// cross-attention): what a captured decoding step (`super::graph_step`) runs.
    pub fn self_qkv(&self) -> Option<&Linear<B>> {
        match &self.projections {
            Projections::SelfQkv(qkv) => Some(qkv),
            Projections::Cross { .. } => None,
        }
    }

    /// The attention band of [`Self::local_window`] (windows are ≥ 1 position: the model
    /// configs refuse 0, which would be read as 1 here).
    pub(crate) fn window(&self, align: CausalAlign) -> Option<Window> {
        self.local_window
            .map(|w| Window::new(w.saturating_sub(1), 0, align))
    }

    fn heads_at<'t>(&self, t: &'t B::Tensor, col: usize) -> Heads<'t, B::Tensor> {
        Heads {
            tensor: t,
            col,
            heads: self.heads,
            dim: self.head_dim,
        }
    }

    /// Self-attention over `x` `[batch·len, width]`. `key_lens` masks padding; `causal`
    /// makes it masked (decoder) attention. With a `cache`, this step's keys and values are
    /// appended to it and the queries attend to everything cached (causal alignment
    /// bottom-right, so the last query sees every key). A [`Self::local_window`] narrows
    /// every query to its window, aligned the same way (with a cache: the last `w` cached
    /// positions up to the query).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_self(
        &self,
        be: &B,
        x: &B::Tensor,
        batch: usize,
        len: usize,
        key_lens: Option<&[usize]>,
        causal: bool,
        cache: Option<&mut dyn KvCache<B>>,
    ) -> Result<B::Tensor> {
        let Projections::SelfQkv(qkv_proj) = &self.projections else {
            return Err(Error::invalid(
                "self",
                "this layer was built for cross-attention",
            ));
        };
        let qkv = qkv_proj.forward(be, x, Activation::None)?;
        let width = self.heads * self.head_dim;
        let (q, k, v) = (
            self.heads_at(&qkv, 0),
            self.heads_at(&qkv, width),
            self.heads_at(&qkv, 2 * width),
        );
        let ctx = match cache {
            None => be.attention(
                q,
                k,
                v,
                &AttentionMask {
                    batch,
                    len_q: len,
                    len_k: len,
                    key_lens,
                    causal: causal.then_some(CausalAlign::TopLeft),
                    window: self.window(CausalAlign::TopLeft),
                    scale: self.scale,
                },
            )?,
            Some(cache) => {
                let all = cache.append(be, k, v, batch, len)?;
                be.attention(
                    q,
                    all.k,
                    all.v,
                    &AttentionMask {
                        batch,
                        len_q: len,
                        len_k: all.len_k,
                        key_lens: all.key_lens,
                        causal: causal.then_some(CausalAlign::BottomRight),
                        window: self.window(CausalAlign::BottomRight),
                        scale: self.scale,
                    },
                )?
            }
        };
        self.out.forward(be, &ctx, Activation::None)
    }

    /// Self-attention without a causal mask or cache over sequences packed back to back
    /// (`x` `[Σ lens, width]`, see [`Packing`]): the projections run over the real tokens
    /// only. The attention runs on the packed rows when the backend has a packed path
    /// ([`Backend::attention_packed`]); otherwise it reads a padded copy of Q, K and V whose
    /// padding rows repeat a row of their own sequence (masked as keys, their outputs
    /// dropped), and its output is gathered back to the packed rows.
    pub fn forward_self_packed(
        &self,
        be: &B,
        x: &B::Tensor,
        packing: &Packing,
    ) -> Result<B::Tensor> {
        let Projections::SelfQkv(qkv_proj) = &self.projections else {
            return Err(Error::invalid(
                "self",
                "this layer was built for cross-attention",
            ));
        };
        let qkv = qkv_proj.forward(be, x, Activation::None)?;
        let width = self.heads * self.head_dim;
        if let Some(ctx) = be.attention_packed(
            self.heads_at(&qkv, 0),
            self.heads_at(&qkv, width),
            self.heads_at(&qkv, 2 * width),
            &packing.lens,
            self.window(CausalAlign::TopLeft),
            self.scale,
        )? {
            return self.out.forward(be, &ctx, Activation::None);
        }
        let padded = match packing.is_dense() {
            true => None,
            false => Some(packing.gather_padded(be, &qkv)?),
        };
        let qkv_padded = padded.as_ref().unwrap_or(&qkv);
        let ctx = be.attention(
            self.heads_at(qkv_padded, 0),
            self.heads_at(qkv_padded, width),
            self.heads_at(qkv_padded, 2 * width),
            &AttentionMask {
                batch: packing.lens.len(),
                len_q: packing.len,
                len_k: packing.len,
                key_lens: (!packing.is_dense()).then_some(packing.lens.as_slice()),
                causal: None,
                window: self.window(CausalAlign::TopLeft),
                scale: self.scale,
            },
        )?;
        let ctx = match packing.is_dense() {
            true => ctx,
            false => packing.gather_packed(be, &ctx)?,
        };
        self.out.forward(be, &ctx, Activation::None)
    }

    /// Cross-attention of `x` `[batch·len_q, width]` over `memory` `[batch·len_k, width_m]`,
    /// whose padding `memory_lens` masks.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cross(
        &self,
        be: &B,
        x: &B::Tensor,
        memory: &B::Tensor,
        batch: usize,
        len_q: usize,
        len_k: usize,
        memory_lens: Option<&[usize]>,
    ) -> Result<B::Tensor> {
        let kv = self.cross_kv(be, memory)?;
        self.forward_cross_kv(be, x, &kv, batch, len_q, len_k, memory_lens)
    }

    /// The keys and values of `memory` side by side, `[rows, 2·width]`: computed once per
    /// input and reused by every decoding step ([`Self::forward_cross_kv`]).
    pub fn cross_kv(&self, be: &B, memory: &B::Tensor) -> Result<B::Tensor> {
        let Projections::Cross { kv, .. } = &self.projections else {
            return Err(Error::invalid(
                "cross",
                "this layer was built for self-attention",
            ));
        };
        kv.forward(be, memory, Activation::None)
    }

    /// Cross-attention of `x` `[batch·len_q, width]` over keys and values from
    /// [`Self::cross_kv`] (`[batch·len_k, 2·width]`), whose padding `memory_lens` masks.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_cross_kv(
        &self,
        be: &B,
        x: &B::Tensor,
        kv: &B::Tensor,
        batch: usize,
        len_q: usize,
        len_k: usize,
        memory_lens: Option<&[usize]>,
    ) -> Result<B::Tensor> {
        let Projections::Cross { q, .. } = &self.projections else {
            return Err(Error::invalid(
                "cross",
                "this layer was built for self-attention",
            ));
        };
        let q = q.forward(be, x, Activation::None)?;
        let width = self.heads * self.head_dim;
        let ctx = be.attention(
            self.heads_at(&q, 0),
            self.heads_at(kv, 0),
            self.heads_at(kv, width),
            &AttentionMask {
                batch,
                len_q,
                len_k,
                key_lens: memory_lens,
                causal: None,
                window: None,
                scale: self.scale,
            },
        )?;
        self.out.forward(be, &ctx, Activation::None)
    }
}

/// Sequences of different lengths packed back to back, without padding rows: sequence b's
/// tokens are the `lens[b]` rows after those of sequences 0..b. Holds the row maps between
/// that layout and the padded one (`[batch·len, ·]`, row `b·len + t`) that attention reads,
/// so the position-wise layers (every GEMM) compute no padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    pub lens: Vec<usize>,
    /// The padded length: the longest sequence.
    pub len: usize,
    /// For each padded row, the packed row it copies: token t of sequence b, or for a
    /// padding row the sequence's first token (any real row would do: it is masked as a key
    /// and its query output is dropped).
    to_padded: Vec<u32>,
    /// For each packed row, its padded row.
    to_packed: Vec<u32>,
}

impl Packing {
    /// The packing of sequences of `lens` tokens (at least one token in all).
    pub fn new(lens: &[usize]) -> Result<Packing> {
        let total: usize = lens.iter().sum();
        let len = lens.iter().copied().max().unwrap_or(0);
        let padded = lens.len() * len;
        if total == 0 || u32::try_from(padded).is_err() {
            return Err(Error::invalid(
                "lens",
                format!("{total} tokens in {padded} padded rows: need 1 ..= 2^32 − 1"),
            ));
        }
        let mut to_padded = Vec::with_capacity(padded);
        let mut to_packed = Vec::with_capacity(total);
        let mut start = 0u32;
        for (b, &n) in lens.iter().enumerate() {
            // A sequence without tokens has no row of its own: its (masked, dropped) padding
            // rows copy row 0.
            let first = if n == 0 { 0 } else { start };
            to_padded
                .extend((0..len as u32).map(|t| if (t as usize) < n { start + t } else { first }));
            to_packed.extend((0..n as u32).map(|t| (b * len) as u32 + t));
            start += n as u32;
        }
        Ok(Packing {
            lens: lens.to_vec(),
            len,
            to_padded,
            to_packed,
        })
    }

    /// Packed rows: the tokens of every sequence.
    pub fn rows(&self) -> usize {
        self.to_packed.len()
    }

    /// Whether every sequence has the padded length (then both layouts are the same).
    pub fn is_dense(&self) -> bool {
        self.lens.iter().all(|&n| n == self.len)
    }

    /// `[Σ lens, w]` packed rows → `[batch·len, w]` padded rows.
    pub fn gather_padded<B: Backend>(&self, be: &B, packed: &B::Tensor) -> Result<B::Tensor> {
        be.gather_rows(packed, &self.to_padded)
    }

    /// `[batch·len, w]` padded rows → `[Σ lens, w]` packed rows.
    pub fn gather_packed<B: Backend>(&self, be: &B, padded: &B::Tensor) -> Result<B::Tensor> {
        be.gather_rows(padded, &self.to_packed)
    }
}
