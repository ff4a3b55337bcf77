//! A decoder-only language model with GPT-3's alternation of dense and locally banded causal
//! attention, trained from scratch on the runtime's [`TrainBackend`]. Its layout is GPT-Neo's
//! (Hugging Face `GPTNeoForCausalLM`, the form EleutherAI shipped GPT-3's alternation in), so
//! a trained model is saved as a Hugging Face folder ([`super::hf_export`]) that
//! [`crate::runtime::gpt_neo::GptNeo`] and Hugging Face both load:
//!
//! - token plus learned position embeddings (`transformer.wte`, `transformer.wpe`);
//! - pre-LN blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`, a final `ln_f`;
//! - layer i's attention is `global` (causal over every earlier position) or `local` (causal
//!   over the last `window` positions, itself included: query i sees key j iff
//!   `i − window < j ≤ i`), run by the backends' sliding-window attention
//!   (`AttentionMask::window`), forward and backward;
//! - scores are not scaled by 1/√head_dim (GPT-Neo's choice; scale 1); Q, K, V projections
//!   without bias, the output projection and the MLP (`c_fc`, `c_proj`, `gelu_new`) with;
//! - the language-model head is the token embedding (tied).
//!
//! Weights start as GPT-Neo's `_init_weights`: normal with standard deviation 0.02 (drawn here
//! uniform with the same deviation), zero biases, LayerNorm γ = 1, β = 0.
//!
//! On the digit tasks (`Seq2Seq`) the source and target are one sequence: the source tokens,
//! [`BOS`] as the separator, the target, [`EOS`]; the loss counts the target part only
//! (predicted from the separator on), and greedy decoding continues `source BOS`.

use super::{argmax_rows, Decoded, GradAcc, ParamBuilder, Seq2Seq, Seq2SeqBatch, BOS, EOS, PAD};
use crate::error::{Error, Result};
use crate::runtime::backend::{Activation, AttentionMask, CausalAlign, Window};
use crate::runtime::gpt_neo::AttentionKind;
use crate::runtime::train::layers::{
    feed_forward_backward, feed_forward_forward, layer_norm_backward, layer_norm_forward,
    self_attention_backward, self_attention_forward, FeedForwardCache, FeedForwardParams,
    LayerNormParams, LinearParams, SelfAttentionCache, SelfAttentionParams,
};
use crate::runtime::train::{CrossEntropy, Gradients, Op, Param, TrainBackend};

/// Sizes and the layer pattern.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Gpt3Config {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    /// MLP width.
    pub ff: usize,
    /// Context: positions 0 .. context have an embedding.
    pub context: usize,
    /// Per layer: global or local attention.
    #[serde(skip)]
    pub attention: Vec<AttentionKind>,
    /// Positions a local layer's query sees, itself included (≥ 1).
    pub window: usize,
    pub ln_eps: f32,
    /// End of text (the id a generation stops at once saved).
    pub eos: u32,
}

impl Gpt3Config {
    /// `layers` layers alternating global, local, global, … (GPT-3's pattern, GPT-Neo's
    /// default), or all global when `dense`.
    pub fn alternating(layers: usize, dense: bool) -> Vec<AttentionKind> {
        (0..layers)
            .map(|i| {
                if dense || i % 2 == 0 {
                    AttentionKind::Global
                } else {
                    AttentionKind::Local
                }
            })
            .collect()
    }

    fn check(&self) -> Result<()> {
        for (arg, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("ff", self.ff),
            ("context", self.context),
            ("window", self.window),
            ("layers", self.attention.len()),
        ] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be ≥ 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.heads) {
            return Err(Error::invalid(
                "heads",
                format!(
                    "{} heads do not divide d_model {}",
                    self.heads, self.d_model
                ),
            ));
        }
        if self.eos as usize >= self.vocab {
            return Err(Error::invalid(
                "eos",
                format!("id {} outside the vocabulary of {}", self.eos, self.vocab),
            ));
        }
        Ok(())
    }
}

type Lin = (usize, Option<usize>);

#[derive(Clone, Copy, Debug)]
struct BlockIx {
    ln_1: (usize, usize),
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    ln_2: (usize, usize),
    fc: Lin,
    proj: Lin,
    local: bool,
}

/// The model: its parameters under their Hugging Face names (`transformer.h.0.ln_1.weight`, …).
pub struct Gpt3<B: TrainBackend> {
    pub config: Gpt3Config,
    params: Vec<Param<B::Tensor>>,
    wte: usize,
    wpe: usize,
    blocks: Vec<BlockIx>,
    ln_f: (usize, usize),
}

struct BlockCache<T> {
    /// The block's input x, its attention's input ln_1(x), the attention cache.
    ln1_in: T,
    h1: T,
    attn: SelfAttentionCache<T>,
    /// x + attn(…), the MLP's input ln_2 of it, the MLP cache.
    ln2_in: T,
    h2: T,
    mlp: FeedForwardCache<T>,
}

/// A forward pass with what its backward reads.
pub struct Forward<T> {
    /// The final hidden states (after `ln_f`), `[batch·len, d_model]`.
    pub hidden: T,
    lnf_in: T,
    blocks: Vec<BlockCache<T>>,
}

/// GPT-Neo's initialiser: standard deviation 0.02; uniform in ±0.02·√3 has it.
const INIT_STD: f32 = 0.02;

impl<B: TrainBackend> Gpt3<B> {
    /// A new model with GPT-Neo's initialisation, drawn from `seed`.
    pub fn new(be: &B, config: Gpt3Config, seed: u64) -> Result<Self> {
        config.check()?;
        let c = &config;
        let (d, bound) = (c.d_model, INIT_STD * 3f32.sqrt());
        let mut pb = ParamBuilder::new(be, seed);
        let wte = pb.uniform("transformer.wte.weight".into(), &[c.vocab, d], bound, true)?;
        let wpe = pb.uniform(
            "transformer.wpe.weight".into(),
            &[c.context, d],
            bound,
            true,
        )?;
        let ln = |pb: &mut ParamBuilder<'_, B>, name: String| -> Result<(usize, usize)> {
            Ok((
                pb.constant(format!("{name}.weight"), &[d], 1.0, false)?,
                pb.constant(format!("{name}.bias"), &[d], 0.0, false)?,
            ))
        };
        let lin = |pb: &mut ParamBuilder<'_, B>,
                   name: String,
                   out: usize,
                   inp: usize,
                   bias: bool|
         -> Result<Lin> {
            let w = pb.uniform(format!("{name}.weight"), &[out, inp], bound, true)?;
            let b = if bias {
                Some(pb.constant(format!("{name}.bias"), &[out], 0.0, false)?)
            } else {
                None
            };
            Ok((w, b))
        };
        let mut blocks = Vec::with_capacity(c.attention.len());
        for (i, kind) in c.attention.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            let a = format!("{p}.attn.attention");
            blocks.push(BlockIx {
                ln_1: ln(&mut pb, format!("{p}.ln_1"))?,
                k: lin(&mut pb, format!("{a}.k_proj"), d, d, false)?,
                v: lin(&mut pb, format!("{a}.v_proj"), d, d, false)?,
                q: lin(&mut pb, format!("{a}.q_proj"), d, d, false)?,
                o: lin(&mut pb, format!("{a}.out_proj"), d, d, true)?,
                ln_2: ln(&mut pb, format!("{p}.ln_2"))?,
                fc: lin(&mut pb, format!("{p}.mlp.c_fc"), c.ff, d, true)?,
                proj: lin(&mut pb, format!("{p}.mlp.c_proj"), d, c.ff, true)?,
                local: *kind == AttentionKind::Local,
            });
        }
        let ln_f = ln(&mut pb, "transformer.ln_f".into())?;
        Ok(Gpt3 {
            config,
            params: pb.params,
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }

    /// The same weights with another layer pattern (e.g. every layer global, to see what the
    /// window changes).
    pub fn with_attention(&self, be: &B, attention: Vec<AttentionKind>) -> Result<Self> {
        if attention.len() != self.blocks.len() {
            return Err(Error::invalid(
                "attention",
                format!("{} kinds for {} layers", attention.len(), self.blocks.len()),
            ));
        }
        let params = self
            .params
            .iter()
            .map(|p| {
                Ok(Param {
                    name: p.name.clone(),
                    value: crate::runtime::train::layers::copy(be, &p.value)?,
                    decay: p.decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let blocks = self
            .blocks
            .iter()
            .zip(&attention)
            .map(|(b, k)| BlockIx {
                local: *k == AttentionKind::Local,
                ..*b
            })
            .collect();
        Ok(Gpt3 {
            config: Gpt3Config {
                attention,
                ..self.config.clone()
            },
            params,
            blocks,
            ..*self
        })
    }

    fn p(&self, i: usize) -> &B::Tensor {
        &self.params[i].value
    }

    fn lin(&self, (w, b): Lin) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: self.p(w),
            b: b.map(|b| self.p(b)),
        }
    }

    fn ln(&self, (g, b): (usize, usize)) -> LayerNormParams<'_, B::Tensor> {
        LayerNormParams {
            gamma: self.p(g),
            beta: self.p(b),
            eps: self.config.ln_eps,
        }
    }

    fn attn(&self, ix: &BlockIx) -> SelfAttentionParams<'_, B::Tensor> {
        SelfAttentionParams {
            q: self.lin(ix.q),
            k: self.lin(ix.k),
            v: self.lin(ix.v),
            out: self.lin(ix.o),
            heads: self.config.heads,
        }
    }

    fn mlp(&self, ix: &BlockIx) -> FeedForwardParams<'_, B::Tensor> {
        FeedForwardParams {
            up: self.lin(ix.fc),
            down: self.lin(ix.proj),
            act: Activation::GeluTanh,
        }
    }

    /// The attention mask of a layer over `batch` right-padded sequences of `len`: causal,
    /// unscaled, and banded to the window when local.
    fn mask(&self, batch: usize, len: usize, local: bool) -> AttentionMask<'static> {
        AttentionMask {
            batch,
            len_q: len,
            len_k: len,
            key_lens: None,
            causal: Some(CausalAlign::TopLeft),
            window: local.then(|| Window::new(self.config.window - 1, 0, CausalAlign::TopLeft)),
            scale: Some(1.0),
        }
    }

    fn check_ids(&self, ids: &[u32], batch: usize, len: usize) -> Result<()> {
        if batch == 0 || len == 0 || ids.len() != batch * len {
            return Err(Error::shape(
                "ids",
                format!("[{batch}·{len}], not empty"),
                &[ids.len()],
            ));
        }
        if len > self.config.context {
            return Err(Error::invalid(
                "ids",
                format!(
                    "sequences of {len} tokens are longer than the context of {}",
                    self.config.context
                ),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(Error::invalid(
                "ids",
                format!(
                    "token {bad} outside the vocabulary of {}",
                    self.config.vocab
                ),
            ));
        }
        Ok(())
    }

    /// The forward pass over `batch` sequences of `len` tokens (`ids` batch-major, right
    /// padded), keeping what the backward reads.
    pub fn forward(
        &self,
        be: &B,
        ids: &[u32],
        batch: usize,
        len: usize,
    ) -> Result<Forward<B::Tensor>> {
        self.check_ids(ids, batch, len)?;
        let positions: Vec<u32> = (0..ids.len()).map(|r| (r % len) as u32).collect();
        let mut x = be.add(
            &be.gather_rows(self.p(self.wte), ids)?,
            &be.gather_rows(self.p(self.wpe), &positions)?,
        )?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for ix in &self.blocks {
            let mask = self.mask(batch, len, ix.local);
            let (h1, ln1_in) = layer_norm_forward(be, self.ln(ix.ln_1), &x, None)?;
            let (a, attn) = self_attention_forward(be, self.attn(ix), &h1, &mask, None)?;
            let x1 = be.add(&ln1_in, &a)?;
            let (h2, ln2_in) = layer_norm_forward(be, self.ln(ix.ln_2), &x1, None)?;
            let (m, mlp) = feed_forward_forward(be, self.mlp(ix), &h2)?;
            x = be.add(&ln2_in, &m)?;
            blocks.push(BlockCache {
                ln1_in,
                h1,
                attn,
                ln2_in,
                h2,
                mlp,
            });
        }
        let (hidden, lnf_in) = layer_norm_forward(be, self.ln(self.ln_f), &x, None)?;
        Ok(Forward {
            hidden,
            lnf_in,
            blocks,
        })
    }

    /// Logits `[rows, vocab]` of hidden states (the tied head: h·wteᵀ).
    pub fn logits(&self, be: &B, hidden: &B::Tensor) -> Result<B::Tensor> {
        be.matmul(hidden, Op::N, self.p(self.wte), Op::T)
    }

    /// Mean cross-entropy of next-token `labels` (−100: ignored) at every position of
    /// `batch` sequences of `len` tokens, and the gradient of every parameter.
    pub fn lm_loss_and_grads(
        &self,
        be: &B,
        ids: &[u32],
        labels: &[i64],
        batch: usize,
        len: usize,
        ce: &CrossEntropy,
    ) -> Result<(f32, Gradients<B::Tensor>)> {
        if labels.len() != ids.len() {
            return Err(Error::shape(
                "labels",
                format!("[{}]", ids.len()),
                &[labels.len()],
            ));
        }
        let f = self.forward(be, ids, batch, len)?;
        let logits = self.logits(be, &f.hidden)?;
        let (loss, dlogits) = be.cross_entropy(&logits, labels, ce)?;
        let mut g = GradAcc::new(self.params.len());
        let wte = self.p(self.wte);
        g.add(be, self.wte, be.matmul(&dlogits, Op::T, &f.hidden, Op::N)?)?;
        let dh = be.matmul(&dlogits, Op::N, wte, Op::N)?;
        let lg = layer_norm_backward(be, self.ln(self.ln_f), &f.lnf_in, &dh)?;
        g.add(be, self.ln_f.0, lg.dgamma)?;
        g.add(be, self.ln_f.1, lg.dbeta)?;
        let mut dx = lg.dx;
        for (ix, c) in self.blocks.iter().zip(&f.blocks).rev() {
            // x2 = x1 + mlp(ln_2(x1)): dx flows to x1 directly and through the MLP.
            let mg = feed_forward_backward(be, self.mlp(ix), &c.h2, &c.mlp, &dx)?;
            self.add_lin(be, &mut g, ix.fc, mg.up)?;
            self.add_lin(be, &mut g, ix.proj, mg.down)?;
            let lg = layer_norm_backward(be, self.ln(ix.ln_2), &c.ln2_in, &mg.dx)?;
            g.add(be, ix.ln_2.0, lg.dgamma)?;
            g.add(be, ix.ln_2.1, lg.dbeta)?;
            be.accumulate(&mut dx, &lg.dx)?;
            // x1 = x + attn(ln_1(x)).
            let mask = self.mask(batch, len, ix.local);
            let ag = self_attention_backward(be, self.attn(ix), &c.h1, &c.attn, &mask, None, &dx)?;
            for (lix, lgr) in [ix.q, ix.k, ix.v, ix.o]
                .into_iter()
                .zip([ag.q, ag.k, ag.v, ag.out])
            {
                self.add_lin(be, &mut g, lix, lgr)?;
            }
            let lg = layer_norm_backward(be, self.ln(ix.ln_1), &c.ln1_in, &ag.dx)?;
            g.add(be, ix.ln_1.0, lg.dgamma)?;
            g.add(be, ix.ln_1.1, lg.dbeta)?;
            be.accumulate(&mut dx, &lg.dx)?;
        }
        let positions: Vec<u32> = (0..ids.len()).map(|r| (r % len) as u32).collect();
        g.add(
            be,
            self.wte,
            be.gather_rows_backward(&dx, ids, self.config.vocab, None)?,
        )?;
        g.add(
            be,
            self.wpe,
            be.gather_rows_backward(&dx, &positions, self.config.context, None)?,
        )?;
        Ok((loss, g.finish(be, &self.params)?))
    }

    fn add_lin(
        &self,
        be: &B,
        g: &mut GradAcc<B::Tensor>,
        (w, b): Lin,
        lg: crate::runtime::train::layers::LinearGrads<B::Tensor>,
    ) -> Result<()> {
        g.add(be, w, lg.dw)?;
        match (b, lg.db) {
            (Some(b), Some(db)) => g.add(be, b, db),
            _ => Ok(()),
        }
    }

    /// Logits at every position of one sequence, `[len, vocab]` as f32.
    pub fn sequence_logits(&self, be: &B, ids: &[u32]) -> Result<Vec<f32>> {
        let f = self.forward(be, ids, 1, ids.len())?;
        be.to_f32(&self.logits(be, &f.hidden)?)
    }

    /// The attention probabilities of query `i` of sequence `b` in layer `layer`, averaged
    /// over heads, over keys `0..keys` (recomputed from the cached Q, K and log-sum-exp:
    /// P = exp(q·k − lse), the scale being 1).
    fn attention_row(
        &self,
        be: &B,
        f: &Forward<B::Tensor>,
        layer: usize,
        (b, len, i): (usize, usize, usize),
        keys: usize,
    ) -> Result<Vec<f32>> {
        let c = &f.blocks[layer].attn;
        let (q, k, lse) = (be.to_f32(&c.q)?, be.to_f32(&c.k)?, be.to_f32(&c.lse)?);
        let (w, heads) = (self.config.d_model, self.config.heads);
        let dim = w / heads;
        let band = crate::key_band::KeyBand::new(
            len,
            len,
            Some(CausalAlign::TopLeft),
            self.blocks[layer]
                .local
                .then(|| Window::new(self.config.window - 1, 0, CausalAlign::TopLeft)),
        );
        let mut row = vec![0f32; keys];
        for h in 0..heads {
            let l = lse[(b * heads + h) * len + i];
            for (j, r) in row.iter_mut().enumerate() {
                if !band.admits(i, j) {
                    continue;
                }
                let s: f32 = (0..dim)
                    .map(|e| {
                        q[(b * len + i) * w + h * dim + e] * k[(b * len + j) * w + h * dim + e]
                    })
                    .sum();
                *r += (s - l).exp() / heads as f32;
            }
        }
        Ok(row)
    }
}

/// The digit tasks as one sequence per example: `src BOS tgt` as input, the target and
/// [`EOS`] as labels from the separator on. Returns (ids, labels, len), right padded.
pub fn joined_batch(batch: &Seq2SeqBatch) -> (Vec<u32>, Vec<i64>, usize) {
    let (bn, tx, ty) = (batch.batch, batch.src_len, batch.tgt_len);
    let len = tx - 1 + ty;
    let mut ids = vec![PAD; bn * len];
    let mut labels = vec![-100i64; bn * len];
    for b in 0..bn {
        let s = batch.src_lens[b] - 1;
        let t = batch.tgt_out[b * ty..(b + 1) * ty]
            .iter()
            .filter(|&&y| y != -100)
            .count();
        let row = b * len;
        ids[row..row + s].copy_from_slice(&batch.src[b * tx..b * tx + s]);
        ids[row + s..row + s + t].copy_from_slice(&batch.tgt_in[b * ty..b * ty + t]);
        labels[row + s..row + s + t].copy_from_slice(&batch.tgt_out[b * ty..b * ty + t]);
    }
    (ids, labels, len)
}

impl<B: TrainBackend> Seq2Seq<B> for Gpt3<B> {
    fn arch(&self) -> &'static str {
        if self.blocks.iter().any(|b| b.local) {
            "gpt3-sparse"
        } else {
            "gpt3-dense"
        }
    }

    fn parameters(&self) -> &[Param<B::Tensor>] {
        &self.params
    }

    fn parameters_mut(&mut self) -> &mut [Param<B::Tensor>] {
        &mut self.params
    }

    fn loss_and_grads(
        &self,
        be: &B,
        batch: &Seq2SeqBatch,
        ce: &CrossEntropy,
    ) -> Result<(f32, Gradients<B::Tensor>)> {
        batch.check(self.config.vocab)?;
        let (ids, labels, len) = joined_batch(batch);
        self.lm_loss_and_grads(be, &ids, &labels, batch.batch, len, ce)
    }

    /// Greedy continuation of `source BOS`, recomputing the whole prefix each step (targets
    /// here are a dozen tokens). The attention map is the last global layer's, averaged over
    /// heads, of each predicting position over the source and the separator.
    fn greedy(&self, be: &B, sources: &[Vec<u32>], max_len: usize) -> Result<Vec<Decoded>> {
        let bn = sources.len();
        if bn == 0 {
            return Err(Error::invalid("sources", "no sources"));
        }
        let mut prefix: Vec<Vec<u32>> = sources
            .iter()
            .map(|s| s.iter().copied().chain([BOS]).collect())
            .collect();
        let src_keys: Vec<usize> = prefix.iter().map(|p| p.len()).collect();
        let mut out: Vec<Decoded> = (0..bn)
            .map(|_| Decoded {
                tokens: Vec::new(),
                attention: Vec::new(),
            })
            .collect();
        let map_layer = self.blocks.iter().rposition(|b| !b.local);
        let v = self.config.vocab;
        let mut done = vec![false; bn];
        for _ in 0..max_len {
            let len = prefix.iter().map(|p| p.len()).max().unwrap_or(1);
            if len > self.config.context {
                break;
            }
            let mut ids = vec![PAD; bn * len];
            for (b, p) in prefix.iter().enumerate() {
                ids[b * len..b * len + p.len()].copy_from_slice(p);
            }
            let f = self.forward(be, &ids, bn, len)?;
            let rows: Vec<u32> = prefix
                .iter()
                .enumerate()
                .map(|(b, p)| (b * len + p.len() - 1) as u32)
                .collect();
            let last = be.gather_rows(&f.hidden, &rows)?;
            let next = argmax_rows(&be.to_f32(&self.logits(be, &last)?)?, v);
            for b in 0..bn {
                if done[b] {
                    continue;
                }
                let i = prefix[b].len() - 1;
                out[b].attention.push(match map_layer {
                    Some(l) => self.attention_row(be, &f, l, (b, len, i), src_keys[b])?,
                    None => vec![0.0; src_keys[b]],
                });
                prefix[b].push(next[b]);
                if next[b] == EOS {
                    done[b] = true;
                } else {
                    out[b].tokens.push(next[b]);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(out)
    }
}
