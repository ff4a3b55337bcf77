//! Vaswani et al. (2017), "Attention is all you need": the encoder-decoder Transformer,
//! built from the runtime's layers ([`crate::runtime::train::layers`]) and their backward.
//!
//! - Embeddings scaled by √d plus the sinusoidal encoding PE(pos, 2k) = sin(pos/10000^(2k/d)),
//!   PE(pos, 2k+1) = cos(…); optionally one table shared by the source, the target and the
//!   output projection (the paper's sharing; logits = x·Eᵀ, no bias).
//! - Encoder layers: self-attention over the valid source positions, then a ReLU
//!   feed-forward block. Decoder layers: causal self-attention, cross-attention on the
//!   encoder's output (its keys and values projected from it), feed-forward.
//! - Each sub-block is post-LN as in the paper, LN(x + f(x)), or pre-LN, x + f(LN(x)), with a
//!   final LayerNorm after each stack. The backward of both: with dy the gradient of the
//!   block's output, post-LN gives ds = LN'(dy) to f's output and to x; pre-LN gives dy to
//!   f's output and to x, and f's input gradient goes back through LN.
//! - No dropout (the digit tasks do not need it).
//!
//! Parameter names follow Hugging Face's BART (`encoder.layers.0.self_attn.q_proj.weight`, …).

use super::{argmax_rows, Decoded, GradAcc, ParamBuilder, Seq2Seq, Seq2SeqBatch, BOS, EOS, PAD};
use crate::error::{Error, Result};
use crate::runtime::backend::{Activation, AttentionMask, CausalAlign};
use crate::runtime::generate::{
    generate, GenerateBackend, GenerateOptions, Generation, TokenModel,
};
use crate::runtime::layers::KvCache;
use crate::runtime::train::layers::{
    copy, cross_attention_backward, cross_attention_forward, feed_forward_backward,
    feed_forward_forward, layer_norm_backward, layer_norm_forward, self_attention_backward,
    self_attention_forward, FeedForwardCache, FeedForwardParams, LayerNormParams, LinearParams,
    SelfAttentionCache, SelfAttentionParams,
};
use crate::runtime::train::{CrossEntropy, Gradients, Op, Param, TrainBackend};

/// Sizes and options.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TransformerConfig {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    /// Pre-LN instead of the paper's post-LN.
    pub pre_ln: bool,
    /// One embedding table for source, target and output projection.
    pub shared_embeddings: bool,
    pub ln_eps: f32,
}

impl TransformerConfig {
    fn check(&self) -> Result<()> {
        for (arg, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("ff", self.ff),
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
        if self.vocab <= EOS as usize {
            return Err(Error::invalid(
                "vocab",
                "must hold PAD, BOS, EOS and tokens",
            ));
        }
        Ok(())
    }
}

type Lin = (usize, usize);

#[derive(Clone, Copy, Debug)]
struct AttnIx {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
}

#[derive(Clone, Copy, Debug)]
struct FfIx {
    up: Lin,
    down: Lin,
}

#[derive(Clone, Copy, Debug)]
struct EncIx {
    attn: AttnIx,
    ln1: Lin,
    ff: FfIx,
    ln2: Lin,
}

#[derive(Clone, Copy, Debug)]
struct DecIx {
    attn: AttnIx,
    ln1: Lin,
    cross: AttnIx,
    ln2: Lin,
    ff: FfIx,
    ln3: Lin,
}

/// The model: parameters in a list, with their indices per layer.
pub struct Transformer<B: TrainBackend> {
    pub config: TransformerConfig,
    params: Vec<Param<B::Tensor>>,
    src_emb: usize,
    tgt_emb: usize,
    out_emb: usize,
    enc: Vec<EncIx>,
    dec: Vec<DecIx>,
    /// Final LayerNorms of the stacks (pre-LN only).
    enc_ln: Option<Lin>,
    dec_ln: Option<Lin>,
}

/// One residual sub-block's cache: f's input, the LayerNorm's input s (x + f(x) post-LN,
/// x pre-LN), and f's own cache.
struct Sub<T, C> {
    f_in: T,
    s: T,
    fc: C,
}

/// Cross-attention's cache: the projections and the context with its log-sum-exp.
type CrossCache<T> = SelfAttentionCache<T>;

struct EncLayerCache<T> {
    attn: Sub<T, SelfAttentionCache<T>>,
    ff: Sub<T, FeedForwardCache<T>>,
}

struct DecLayerCache<T> {
    attn: Sub<T, SelfAttentionCache<T>>,
    cross: Sub<T, CrossCache<T>>,
    ff: Sub<T, FeedForwardCache<T>>,
}

struct StackOut<T, C> {
    out: T,
    layers: Vec<C>,
    /// Input of the final LayerNorm (pre-LN).
    final_s: Option<T>,
}

/// The sinusoidal encoding: angle pos·10000^(−2k/d) for dimensions 2k (sin) and 2k+1 (cos).
fn positional(pos: usize, i: usize, d: usize) -> f32 {
    let rate = (-(10000f64.ln()) * (i - i % 2) as f64 / d as f64).exp();
    let angle = pos as f64 * rate;
    (if i.is_multiple_of(2) {
        angle.sin()
    } else {
        angle.cos()
    }) as f32
}

fn xavier(fan_in: usize, fan_out: usize) -> f32 {
    (6.0 / (fan_in + fan_out) as f32).sqrt()
}

fn lin_param<B: TrainBackend>(
    pb: &mut ParamBuilder<'_, B>,
    name: String,
    out: usize,
    inp: usize,
) -> Result<Lin> {
    Ok((
        pb.uniform(
            format!("{name}.weight"),
            &[out, inp],
            xavier(inp, out),
            true,
        )?,
        pb.constant(format!("{name}.bias"), &[out], 0.0, false)?,
    ))
}

fn ln_param<B: TrainBackend>(pb: &mut ParamBuilder<'_, B>, name: String, d: usize) -> Result<Lin> {
    Ok((
        pb.constant(format!("{name}.weight"), &[d], 1.0, false)?,
        pb.constant(format!("{name}.bias"), &[d], 0.0, false)?,
    ))
}

fn attn_param<B: TrainBackend>(
    pb: &mut ParamBuilder<'_, B>,
    name: String,
    d: usize,
) -> Result<AttnIx> {
    Ok(AttnIx {
        q: lin_param(pb, format!("{name}.q_proj"), d, d)?,
        k: lin_param(pb, format!("{name}.k_proj"), d, d)?,
        v: lin_param(pb, format!("{name}.v_proj"), d, d)?,
        o: lin_param(pb, format!("{name}.out_proj"), d, d)?,
    })
}

impl<B: TrainBackend> Transformer<B> {
    /// A new model: Xavier-uniform weights, zero biases, LayerNorm γ = 1, β = 0, embeddings
    /// uniform with standard deviation d^−1/2 (so that ×√d gives unit scale), from `seed`.
    pub fn new(be: &B, config: TransformerConfig, seed: u64) -> Result<Self> {
        config.check()?;
        let c = config;
        let d = c.d_model;
        let mut pb = ParamBuilder::new(be, seed);
        let emb_bound = (3.0 / d as f32).sqrt();
        let (src_emb, tgt_emb, out_emb) = if c.shared_embeddings {
            let e = pb.uniform("shared.weight".into(), &[c.vocab, d], emb_bound, true)?;
            (e, e, e)
        } else {
            (
                pb.uniform(
                    "encoder.embed_tokens.weight".into(),
                    &[c.vocab, d],
                    emb_bound,
                    true,
                )?,
                pb.uniform(
                    "decoder.embed_tokens.weight".into(),
                    &[c.vocab, d],
                    emb_bound,
                    true,
                )?,
                pb.uniform(
                    "lm_head.weight".into(),
                    &[c.vocab, d],
                    xavier(d, c.vocab),
                    true,
                )?,
            )
        };
        let lin = lin_param::<B>;
        let ln = |pb: &mut ParamBuilder<'_, B>, name: String| ln_param(pb, name, d);
        let attn = |pb: &mut ParamBuilder<'_, B>, name: String| attn_param(pb, name, d);
        let mut enc = Vec::with_capacity(c.enc_layers);
        for l in 0..c.enc_layers {
            let pre = format!("encoder.layers.{l}");
            let a = attn(&mut pb, format!("{pre}.self_attn"))?;
            let ln1 = ln(&mut pb, format!("{pre}.self_attn_layer_norm"))?;
            let ff = FfIx {
                up: lin(&mut pb, format!("{pre}.fc1"), c.ff, d)?,
                down: lin(&mut pb, format!("{pre}.fc2"), d, c.ff)?,
            };
            let ln2 = ln(&mut pb, format!("{pre}.final_layer_norm"))?;
            enc.push(EncIx {
                attn: a,
                ln1,
                ff,
                ln2,
            });
        }
        let enc_ln = if c.pre_ln {
            Some(ln(&mut pb, "encoder.layer_norm".into())?)
        } else {
            None
        };
        let mut dec = Vec::with_capacity(c.dec_layers);
        for l in 0..c.dec_layers {
            let pre = format!("decoder.layers.{l}");
            let a = attn(&mut pb, format!("{pre}.self_attn"))?;
            let ln1 = ln(&mut pb, format!("{pre}.self_attn_layer_norm"))?;
            let cross = attn(&mut pb, format!("{pre}.encoder_attn"))?;
            let ln2 = ln(&mut pb, format!("{pre}.encoder_attn_layer_norm"))?;
            let ff = FfIx {
                up: lin(&mut pb, format!("{pre}.fc1"), c.ff, d)?,
                down: lin(&mut pb, format!("{pre}.fc2"), d, c.ff)?,
            };
            let ln3 = ln(&mut pb, format!("{pre}.final_layer_norm"))?;
            dec.push(DecIx {
                attn: a,
                ln1,
                cross,
                ln2,
                ff,
                ln3,
            });
        }
        let dec_ln = if c.pre_ln {
            Some(ln(&mut pb, "decoder.layer_norm".into())?)
        } else {
            None
        };
        Ok(Transformer {
            config,
            params: pb.params,
            src_emb,
            tgt_emb,
            out_emb,
            enc,
            dec,
            enc_ln,
            dec_ln,
        })
    }

    fn p(&self, i: usize) -> &B::Tensor {
        &self.params[i].value
    }

    fn lin(&self, (w, b): Lin) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: self.p(w),
            b: Some(self.p(b)),
        }
    }

    fn ln(&self, (g, b): Lin) -> LayerNormParams<'_, B::Tensor> {
        LayerNormParams {
            gamma: self.p(g),
            beta: self.p(b),
            eps: self.config.ln_eps,
        }
    }

    fn attn(&self, a: &AttnIx) -> SelfAttentionParams<'_, B::Tensor> {
        SelfAttentionParams {
            q: self.lin(a.q),
            k: self.lin(a.k),
            v: self.lin(a.v),
            out: self.lin(a.o),
            heads: self.config.heads,
        }
    }

    fn ff(&self, f: &FfIx) -> FeedForwardParams<'_, B::Tensor> {
        FeedForwardParams {
            up: self.lin(f.up),
            down: self.lin(f.down),
            act: Activation::Relu,
        }
    }

    /// Embedding ·√d + sinusoids for batch-major ids of sequences of `len`.
    fn embed(&self, be: &B, table: usize, ids: &[u32], len: usize) -> Result<B::Tensor> {
        let d = self.config.d_model;
        let mut x = be.gather_rows(self.p(table), ids)?;
        be.scale(&mut x, (d as f32).sqrt())?;
        let pe: Vec<f32> = (0..ids.len())
            .flat_map(|r| (0..d).map(move |i| positional(r % len, i, d)))
            .collect();
        be.add(&x, &be.upload(&[ids.len(), d], &pe)?)
    }

    fn embed_backward(
        &self,
        be: &B,
        table: usize,
        ids: &[u32],
        dx: &B::Tensor,
        g: &mut GradAcc<B::Tensor>,
    ) -> Result<()> {
        let mut dx = copy(be, dx)?;
        be.scale(&mut dx, (self.config.d_model as f32).sqrt())?;
        let rows = self.config.vocab;
        g.add(
            be,
            table,
            be.gather_rows_backward(&dx, ids, rows, Some(PAD))?,
        )
    }

    /// The input side of a sub-block: f's input (LN(x) pre-LN, x post-LN) and, pre-LN, the
    /// LayerNorm's input.
    fn sub_in(&self, be: &B, ln: Lin, x: &B::Tensor) -> Result<(B::Tensor, Option<B::Tensor>)> {
        if self.config.pre_ln {
            let (y, s) = layer_norm_forward(be, self.ln(ln), x, None)?;
            Ok((y, Some(s)))
        } else {
            Ok((copy(be, x)?, None))
        }
    }

    /// The output side: x + f(x) pre-LN, LN(x + f(x)) post-LN (with the LayerNorm's input).
    fn sub_out(
        &self,
        be: &B,
        ln: Lin,
        x: &B::Tensor,
        f: &B::Tensor,
        s_pre: Option<B::Tensor>,
    ) -> Result<(B::Tensor, B::Tensor)> {
        match s_pre {
            Some(s) => Ok((be.add(x, f)?, s)),
            None => layer_norm_forward(be, self.ln(ln), f, Some(x)),
        }
    }

    /// Gradient of f's output from dy (both LN placements: see the module docs); the same
    /// tensor is the residual path's share of dx.
    fn sub_out_back(
        &self,
        be: &B,
        ln: Lin,
        s: &B::Tensor,
        dy: &B::Tensor,
        g: &mut GradAcc<B::Tensor>,
    ) -> Result<B::Tensor> {
        if self.config.pre_ln {
            return copy(be, dy);
        }
        let lg = layer_norm_backward(be, self.ln(ln), s, dy)?;
        g.add(be, ln.0, lg.dgamma)?;
        g.add(be, ln.1, lg.dbeta)?;
        Ok(lg.dx)
    }

    /// dx of a sub-block from the residual share `dres` and f's input gradient `dfin`.
    fn sub_in_back(
        &self,
        be: &B,
        ln: Lin,
        s: &B::Tensor,
        mut dres: B::Tensor,
        dfin: &B::Tensor,
        g: &mut GradAcc<B::Tensor>,
    ) -> Result<B::Tensor> {
        if self.config.pre_ln {
            let lg = layer_norm_backward(be, self.ln(ln), s, dfin)?;
            g.add(be, ln.0, lg.dgamma)?;
            g.add(be, ln.1, lg.dbeta)?;
            be.accumulate(&mut dres, &lg.dx)?;
        } else {
            be.accumulate(&mut dres, dfin)?;
        }
        Ok(dres)
    }

    fn add_lin(
        &self,
        be: &B,
        g: &mut GradAcc<B::Tensor>,
        ix: Lin,
        lg: crate::runtime::train::layers::LinearGrads<B::Tensor>,
    ) -> Result<()> {
        g.add(be, ix.0, lg.dw)?;
        g.add(be, ix.1, lg.db.expect("bias"))
    }

    fn final_ln(
        &self,
        be: &B,
        ln: Option<Lin>,
        x: B::Tensor,
    ) -> Result<(B::Tensor, Option<B::Tensor>)> {
        match ln {
            Some(ln) => {
                let (y, s) = layer_norm_forward(be, self.ln(ln), &x, None)?;
                Ok((y, Some(s)))
            }
            None => Ok((x, None)),
        }
    }

    fn final_ln_back(
        &self,
        be: &B,
        ln: Option<Lin>,
        s: Option<&B::Tensor>,
        dy: B::Tensor,
        g: &mut GradAcc<B::Tensor>,
    ) -> Result<B::Tensor> {
        match (ln, s) {
            (Some(ln), Some(s)) => {
                let lg = layer_norm_backward(be, self.ln(ln), s, &dy)?;
                g.add(be, ln.0, lg.dgamma)?;
                g.add(be, ln.1, lg.dbeta)?;
                Ok(lg.dx)
            }
            _ => Ok(dy),
        }
    }

    fn encode(
        &self,
        be: &B,
        src: &[u32],
        mask: &AttentionMask<'_>,
    ) -> Result<StackOut<B::Tensor, EncLayerCache<B::Tensor>>> {
        let mut x = self.embed(be, self.src_emb, src, mask.len_q)?;
        let mut layers = Vec::with_capacity(self.enc.len());
        for ix in &self.enc {
            let (f_in, s_pre) = self.sub_in(be, ix.ln1, &x)?;
            let (a, ac) = self_attention_forward(be, self.attn(&ix.attn), &f_in, mask, None)?;
            let (x1, s) = self.sub_out(be, ix.ln1, &x, &a, s_pre)?;
            let attn = Sub { f_in, s, fc: ac };
            let (f_in, s_pre) = self.sub_in(be, ix.ln2, &x1)?;
            let (f, fc) = feed_forward_forward(be, self.ff(&ix.ff), &f_in)?;
            let (x2, s) = self.sub_out(be, ix.ln2, &x1, &f, s_pre)?;
            layers.push(EncLayerCache {
                attn,
                ff: Sub { f_in, s, fc },
            });
            x = x2;
        }
        let (out, final_s) = self.final_ln(be, self.enc_ln, x)?;
        Ok(StackOut {
            out,
            layers,
            final_s,
        })
    }

    fn decode(
        &self,
        be: &B,
        tgt: &[u32],
        mem: &B::Tensor,
        self_mask: &AttentionMask<'_>,
        cross_mask: &AttentionMask<'_>,
    ) -> Result<StackOut<B::Tensor, DecLayerCache<B::Tensor>>> {
        let mut x = self.embed(be, self.tgt_emb, tgt, self_mask.len_q)?;
        let mut layers = Vec::with_capacity(self.dec.len());
        for ix in &self.dec {
            let (f_in, s_pre) = self.sub_in(be, ix.ln1, &x)?;
            let (a, ac) = self_attention_forward(be, self.attn(&ix.attn), &f_in, self_mask, None)?;
            let (x1, s) = self.sub_out(be, ix.ln1, &x, &a, s_pre)?;
            let attn = Sub { f_in, s, fc: ac };
            let (f_in, s_pre) = self.sub_in(be, ix.ln2, &x1)?;
            let (a, cc) =
                cross_attention_forward(be, self.attn(&ix.cross), &f_in, mem, cross_mask, None)?;
            let (x2, s) = self.sub_out(be, ix.ln2, &x1, &a, s_pre)?;
            let cross = Sub { f_in, s, fc: cc };
            let (f_in, s_pre) = self.sub_in(be, ix.ln3, &x2)?;
            let (f, fc) = feed_forward_forward(be, self.ff(&ix.ff), &f_in)?;
            let (x3, s) = self.sub_out(be, ix.ln3, &x2, &f, s_pre)?;
            layers.push(DecLayerCache {
                attn,
                cross,
                ff: Sub { f_in, s, fc },
            });
            x = x3;
        }
        let (out, final_s) = self.final_ln(be, self.dec_ln, x)?;
        Ok(StackOut {
            out,
            layers,
            final_s,
        })
    }

    fn masks<'m>(batch: usize, tx: usize, ty: usize, lens: &'m [usize]) -> [AttentionMask<'m>; 3] {
        let enc = AttentionMask {
            batch,
            len_q: tx,
            len_k: tx,
            key_lens: Some(lens),
            causal: None,
            window: None,
            scale: None,
        };
        let dec = AttentionMask {
            len_q: ty,
            len_k: ty,
            key_lens: None,
            causal: Some(CausalAlign::TopLeft),
            ..enc
        };
        let cross = AttentionMask {
            len_q: ty,
            len_k: tx,
            ..enc
        };
        [enc, dec, cross]
    }

    /// Logits `[B·Ty, vocab]` (batch-major) of a teacher-forced batch.
    pub fn logits(&self, be: &B, batch: &Seq2SeqBatch) -> Result<B::Tensor> {
        batch.check(self.config.vocab)?;
        let [em, dm, cm] = Self::masks(batch.batch, batch.src_len, batch.tgt_len, &batch.src_lens);
        let enc = self.encode(be, &batch.src, &em)?;
        let dec = self.decode(be, &batch.tgt_in, &enc.out, &dm, &cm)?;
        be.matmul(&dec.out, Op::N, self.p(self.out_emb), Op::T)
    }
}

impl<B: TrainBackend> Seq2Seq<B> for Transformer<B> {
    fn arch(&self) -> &'static str {
        "transformer"
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
        let [em, dm, cm] = Self::masks(batch.batch, batch.src_len, batch.tgt_len, &batch.src_lens);
        let enc = self.encode(be, &batch.src, &em)?;
        let dec = self.decode(be, &batch.tgt_in, &enc.out, &dm, &cm)?;
        let out_w = self.p(self.out_emb);
        let logits = be.matmul(&dec.out, Op::N, out_w, Op::T)?;
        let (loss, dlogits) = be.cross_entropy(&logits, &batch.tgt_out, ce)?;

        let mut g = GradAcc::new(self.params.len());
        g.add(
            be,
            self.out_emb,
            be.matmul(&dlogits, Op::T, &dec.out, Op::N)?,
        )?;
        let dy = be.matmul(&dlogits, Op::N, out_w, Op::N)?;
        let mut dy = self.final_ln_back(be, self.dec_ln, dec.final_s.as_ref(), dy, &mut g)?;
        let mut dmem = be.zeros(be.shape(&enc.out))?;
        for (ix, c) in self.dec.iter().zip(&dec.layers).rev() {
            // Feed-forward.
            let df = self.sub_out_back(be, ix.ln3, &c.ff.s, &dy, &mut g)?;
            let fg = feed_forward_backward(be, self.ff(&ix.ff), &c.ff.f_in, &c.ff.fc, &df)?;
            self.add_lin(be, &mut g, ix.ff.up, fg.up)?;
            self.add_lin(be, &mut g, ix.ff.down, fg.down)?;
            let dx2 = self.sub_in_back(be, ix.ln3, &c.ff.s, df, &fg.dx, &mut g)?;
            // Cross-attention.
            let da = self.sub_out_back(be, ix.ln2, &c.cross.s, &dx2, &mut g)?;
            let (dfin, dm_l, [gq, gk, gv, go]) = cross_attention_backward(
                be,
                self.attn(&ix.cross),
                &c.cross.f_in,
                &enc.out,
                &c.cross.fc,
                &cm,
                None,
                &da,
            )?;
            be.accumulate(&mut dmem, &dm_l)?;
            for (lix, lg) in [ix.cross.q, ix.cross.k, ix.cross.v, ix.cross.o]
                .into_iter()
                .zip([gq, gk, gv, go])
            {
                self.add_lin(be, &mut g, lix, lg)?;
            }
            let dx1 = self.sub_in_back(be, ix.ln2, &c.cross.s, da, &dfin, &mut g)?;
            // Causal self-attention.
            let da = self.sub_out_back(be, ix.ln1, &c.attn.s, &dx1, &mut g)?;
            let ag = self_attention_backward(
                be,
                self.attn(&ix.attn),
                &c.attn.f_in,
                &c.attn.fc,
                &dm,
                None,
                &da,
            )?;
            for (lix, lg) in [ix.attn.q, ix.attn.k, ix.attn.v, ix.attn.o]
                .into_iter()
                .zip([ag.q, ag.k, ag.v, ag.out])
            {
                self.add_lin(be, &mut g, lix, lg)?;
            }
            dy = self.sub_in_back(be, ix.ln1, &c.attn.s, da, &ag.dx, &mut g)?;
        }
        self.embed_backward(be, self.tgt_emb, &batch.tgt_in, &dy, &mut g)?;

        let mut dx = self.final_ln_back(be, self.enc_ln, enc.final_s.as_ref(), dmem, &mut g)?;
        for (ix, c) in self.enc.iter().zip(&enc.layers).rev() {
            let df = self.sub_out_back(be, ix.ln2, &c.ff.s, &dx, &mut g)?;
            let fg = feed_forward_backward(be, self.ff(&ix.ff), &c.ff.f_in, &c.ff.fc, &df)?;
            self.add_lin(be, &mut g, ix.ff.up, fg.up)?;
            self.add_lin(be, &mut g, ix.ff.down, fg.down)?;
            let dx1 = self.sub_in_back(be, ix.ln2, &c.ff.s, df, &fg.dx, &mut g)?;
            let da = self.sub_out_back(be, ix.ln1, &c.attn.s, &dx1, &mut g)?;
            let ag = self_attention_backward(
                be,
                self.attn(&ix.attn),
                &c.attn.f_in,
                &c.attn.fc,
                &em,
                None,
                &da,
            )?;
            for (lix, lg) in [ix.attn.q, ix.attn.k, ix.attn.v, ix.attn.o]
                .into_iter()
                .zip([ag.q, ag.k, ag.v, ag.out])
            {
                self.add_lin(be, &mut g, lix, lg)?;
            }
            dx = self.sub_in_back(be, ix.ln1, &c.attn.s, da, &ag.dx, &mut g)?;
        }
        self.embed_backward(be, self.src_emb, &batch.src, &dx, &mut g)?;
        Ok((loss, g.finish(be, &self.params)?))
    }

    /// Greedy decoding, recomputing the decoder over the whole prefix at each step (no KV
    /// cache: targets here are a dozen tokens). The attention map is the last decoder
    /// layer's cross-attention, averaged over heads.
    fn greedy(&self, be: &B, sources: &[Vec<u32>], max_len: usize) -> Result<Vec<Decoded>> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            sources.iter().map(|s| (s.clone(), Vec::new())).collect();
        let batch = Seq2SeqBatch::from_pairs(&pairs)?;
        batch.check(self.config.vocab)?;
        let (bn, tx) = (batch.batch, batch.src_len);
        let [em, _, _] = Self::masks(bn, tx, 1, &batch.src_lens);
        let enc = self.encode(be, &batch.src, &em)?;
        let mut prefix: Vec<Vec<u32>> = vec![vec![BOS]; bn];
        let mut out: Vec<Decoded> = (0..bn)
            .map(|_| Decoded {
                tokens: Vec::new(),
                attention: Vec::new(),
            })
            .collect();
        let mut done = vec![false; bn];
        let v = self.config.vocab;
        for step in 0..max_len {
            let ty = step + 1;
            let ids: Vec<u32> = prefix.iter().flatten().copied().collect();
            let [_, dm, cm] = Self::masks(bn, tx, ty, &batch.src_lens);
            let dec = self.decode(be, &ids, &enc.out, &dm, &cm)?;
            let logits = be.to_f32(&be.matmul(&dec.out, Op::N, self.p(self.out_emb), Op::T)?)?;
            let last: Vec<f32> = (0..bn)
                .flat_map(|b| logits[(b * ty + step) * v..][..v].to_vec())
                .collect();
            let next = argmax_rows(&last, v);
            let maps = match dec.layers.last() {
                Some(c) => cross_attention_map(
                    be,
                    &c.cross.fc,
                    self.config.heads,
                    bn,
                    ty,
                    tx,
                    &batch.src_lens,
                )?,
                None => vec![vec![0.0; tx]; bn * ty],
            };
            for b in 0..bn {
                prefix[b].push(next[b]);
                if done[b] {
                    continue;
                }
                out[b]
                    .attention
                    .push(maps[b * ty + step][..batch.src_lens[b]].to_vec());
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

/// Cross-attention probabilities averaged over heads, one row per query (`[B·Ty][Tx]`),
/// recomputed from the cached Q, K and log-sum-exp: P = exp(QKᵀ/√d − LSE).
fn cross_attention_map<B: TrainBackend>(
    be: &B,
    c: &CrossCache<B::Tensor>,
    heads: usize,
    bn: usize,
    ty: usize,
    tx: usize,
    lens: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let (q, k, lse) = (be.to_f32(&c.q)?, be.to_f32(&c.k)?, be.to_f32(&c.lse)?);
    let w = be.shape(&c.q)[1];
    let dim = w / heads;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut maps = vec![vec![0f32; tx]; bn * ty];
    for b in 0..bn {
        for i in 0..ty {
            for h in 0..heads {
                let l = lse[(b * heads + h) * ty + i];
                for j in 0..lens[b] {
                    let s: f32 = (0..dim)
                        .map(|e| {
                            q[(b * ty + i) * w + h * dim + e] * k[(b * tx + j) * w + h * dim + e]
                        })
                        .sum();
                    maps[b * ty + i][j] += (s * scale - l).exp() / heads as f32;
                }
            }
        }
    }
    Ok(maps)
}

/// What the decoding loop keeps of an encoded batch: the encoder output `[rows·tx, d]` of every
/// row (each input repeated once per beam) and the rows' source lengths.
pub struct TransformerMemory<T> {
    out: T,
    lens: Vec<usize>,
    tx: usize,
}

/// The Transformer as a [`TokenModel`] of the shared decoding loop
/// ([`crate::runtime::generate::generate`]): greedy, sampling and beam search over its
/// decoder, the encoder run once per call. The decoder has no KV cache: it recomputes the
/// prefix at every step, so the options must say `use_kv_cache: false` (a call with a cache
/// is a typed error).
impl<B: TrainBackend> TokenModel<B> for Transformer<B> {
    type Memory = TransformerMemory<B::Tensor>;

    fn vocab_size(&self) -> usize {
        self.config.vocab
    }

    fn eos_token_id(&self) -> u32 {
        EOS
    }

    fn pad_token_id(&self) -> u32 {
        PAD
    }

    fn max_positions(&self) -> usize {
        // Sinusoidal positions have no table: only the loop's own limits apply.
        MAX_DECODE_POSITIONS
    }

    fn cache_layout(&self) -> (usize, usize) {
        (self.config.dec_layers, self.config.d_model)
    }

    fn decoder_prompt(&self, index: usize, input: &[u32]) -> Result<Vec<u32>> {
        if input.is_empty() {
            return Err(Error::invalid("prompt", format!("source {index} is empty")));
        }
        if let Some(&bad) = input
            .iter()
            .find(|&&t| t <= EOS || t as usize >= self.config.vocab)
        {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "source {index}: token {bad} is reserved or outside the vocabulary of {}",
                    self.config.vocab
                ),
            ));
        }
        Ok(vec![BOS])
    }

    fn encode(
        &self,
        be: &B,
        inputs: &[Vec<u32>],
        copies: usize,
    ) -> Result<TransformerMemory<B::Tensor>> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = inputs
            .iter()
            .flat_map(|s| std::iter::repeat_n((s.clone(), Vec::new()), copies.max(1)))
            .collect();
        let batch = Seq2SeqBatch::from_pairs(&pairs)?;
        batch.check(self.config.vocab)?;
        let [em, _, _] = Self::masks(batch.batch, batch.src_len, 1, &batch.src_lens);
        let enc = self.encode(be, &batch.src, &em)?;
        Ok(TransformerMemory {
            out: enc.out,
            lens: batch.src_lens,
            tx: batch.src_len,
        })
    }

    fn select_memory(
        &self,
        be: &B,
        memory: &TransformerMemory<B::Tensor>,
        keep: &[usize],
    ) -> Result<TransformerMemory<B::Tensor>> {
        if let Some(&bad) = keep.iter().find(|&&j| j >= memory.lens.len()) {
            return Err(Error::invalid(
                "keep",
                format!("row {bad} is outside the memory's {}", memory.lens.len()),
            ));
        }
        let tx = memory.tx;
        let rows: Vec<u32> = keep
            .iter()
            .flat_map(|&j| (j * tx..(j + 1) * tx).map(|r| r as u32))
            .collect();
        Ok(TransformerMemory {
            out: be.gather_rows(&memory.out, &rows)?,
            lens: keep.iter().map(|&j| memory.lens[j]).collect(),
            tx,
        })
    }

    fn decode(
        &self,
        be: &B,
        memory: &TransformerMemory<B::Tensor>,
        ids: &[u32],
        positions: &[u32],
        batch: usize,
        len: usize,
        rows: &[u32],
        caches: Option<&mut [&mut dyn KvCache<B>]>,
    ) -> Result<Vec<f32>> {
        if caches.is_some() {
            return Err(Error::invalid(
                "use_kv_cache",
                "the seq2seq Transformer's decoder recomputes its prefix: generate with \
                 use_kv_cache: false",
            ));
        }
        if batch != memory.lens.len() || ids.len() != batch * len || positions.len() != ids.len() {
            return Err(Error::shape(
                "ids",
                format!("[{}·{len}] as the encoded rows", memory.lens.len()),
                &[ids.len()],
            ));
        }
        // The decoder embeds row r at position r mod len: right-padded rows from position 0.
        if positions
            .iter()
            .enumerate()
            .any(|(r, &p)| p as usize != r % len)
        {
            return Err(Error::invalid(
                "positions",
                "the Transformer decodes right-padded rows from position 0",
            ));
        }
        let [_, dm, cm] = Self::masks(batch, memory.tx, len, &memory.lens);
        let dec = self.decode(be, ids, &memory.out, &dm, &cm)?;
        let picked = be.gather_rows(&dec.out, rows)?;
        be.to_f32(&be.matmul(&picked, Op::N, self.p(self.out_emb), Op::T)?)
    }
}

/// The decoding loop's context limit for the Transformer (its positions are computed).
const MAX_DECODE_POSITIONS: usize = 1 << 16;

impl<B: TrainBackend + GenerateBackend> Transformer<B> {
    /// Beam search (or greedy, `beams` = 1) over `sources` through the shared decoding loop,
    /// at most `max_len` tokens each (EOS included), scores sum(log p)/length^`length_penalty`.
    pub fn beam_search(
        &self,
        be: &B,
        sources: &[Vec<u32>],
        max_len: usize,
        beams: usize,
        length_penalty: f32,
    ) -> Result<Generation> {
        let opts = GenerateOptions {
            max_new_tokens: max_len,
            num_beams: beams,
            length_penalty,
            use_kv_cache: false,
            ..GenerateOptions::default()
        };
        generate(be, self, sources, &opts, &mut |_, _| {})
    }

    /// Σ log p of each target (its EOS included) under teacher forcing: the score beam
    /// search maximises, for comparing decodes.
    pub fn sequence_log_probs(&self, be: &B, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f64>> {
        let batch = Seq2SeqBatch::from_pairs(pairs)?;
        let logits = be.to_f32(&self.logits(be, &batch)?)?;
        let v = self.config.vocab;
        let mut out = vec![0f64; batch.batch];
        for (r, &y) in batch.tgt_out.iter().enumerate() {
            if y < 0 {
                continue;
            }
            let row = &logits[r * v..(r + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&z| (z as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            out[r / batch.tgt_len] += row[y as usize] as f64 - lse;
        }
        Ok(out)
    }
}
