//! Bahdanau, Cho and Bengio (2015), "Neural machine translation by jointly learning to align
//! and translate": a bidirectional GRU encoder, additive attention, a GRU decoder; or, with
//! [`Cell::Lstm`], the same model with LSTM cells (the option).
//!
//! - Encoder: source embeddings x_j; a forward RNN →h_j and a backward RNN ←h_j (each
//!   starting from zeros at its own end of the sequence: padded steps keep the state, as
//!   PyTorch's packed sequences do; an LSTM keeps both h and its memory c);
//!   annotations h_j = [→h_j; ←h_j] `[batch·Tx, 2·He]`.
//! - Alignment: keys U·h_j computed once per sequence; at target step i the query is
//!   W·s_{i−1} + b_W and e_ij = vᵀ tanh(W·s_{i−1} + b_W + U·h_j), α_i = softmax_j(e_i) over
//!   the valid source positions, c_i = Σ_j α_ij·h_j ([`TrainBackend::additive_attention`]).
//! - Decoder: s_0 = tanh(W_init·←h_1 + b_init) (the paper's initial state), then
//!   s_i = GRU([E·y_{i−1}; c_i], s_{i−1}) with PyTorch's `nn.GRUCell` equations. With LSTM
//!   cells s_i is the LSTM's h (`nn.LSTMCell`): h_0 is the same tanh transform of ←h_1, and the
//!   memory starts at c_0 = 0, as `nn.LSTM`'s default state. Why zeros: c is the LSTM's
//!   unsquashed accumulator, not a summary of the source the way h is; the paper's transform
//!   exists to hand the decoder the backward encoder's summary, which h_0 already carries into
//!   every gate (and the first query), so a second transform would add parameters and a second
//!   path for the same information.
//! - Output (a documented simplification of the paper's maxout layer): a tanh "deep output"
//!   t_i = tanh(W_r·[s_i; c_i; E·y_{i−1}] + b_r), logits = W_o·t_i + b_o. The paper's
//!   maxout takes the max of pairs of units instead of the tanh; it reads the same three
//!   inputs.
//!
//! Every GEMM of the encoder's input projections, of the decoder's weight gradients and of
//! the output layer runs once over all time steps; only the recurrences run step by step.

use super::{
    argmax_rows, stack_steps, unstack_steps, Decoded, GradAcc, ParamBuilder, Seq2Seq, Seq2SeqBatch,
    EOS, PAD,
};
use crate::error::{Error, Result};
use crate::runtime::backend::Activation;
use crate::runtime::train::layers::{copy, linear_backward, LinearParams};
use crate::runtime::train::{CrossEntropy, Gradients, Op, Param, TrainBackend};

/// The recurrent cell of the encoder and the decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cell {
    /// PyTorch's `nn.GRU` equations (the paper's choice).
    #[default]
    Gru,
    /// PyTorch's `nn.LSTM` equations (gates i, f, g, o).
    Lstm,
}

impl Cell {
    /// Gate blocks of the cell's projections (`[gates·H, in]`).
    pub fn gates(self) -> usize {
        match self {
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }

    /// Its name: `gru` or `lstm` (also the parameter names' module, `encoder.lstm.…`).
    pub fn name(self) -> &'static str {
        match self {
            Cell::Gru => "gru",
            Cell::Lstm => "lstm",
        }
    }
}

/// Sizes of the model.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct BahdanauConfig {
    pub vocab: usize,
    /// Embedding width (source and target).
    pub emb: usize,
    /// Hidden size of each encoder direction (annotations are twice this).
    pub enc_hidden: usize,
    pub dec_hidden: usize,
    /// Width of the alignment model's tanh layer.
    pub attn: usize,
    /// Width of the deep-output layer.
    pub readout: usize,
    /// The encoder's and decoder's recurrent cell.
    pub cell: Cell,
}

impl BahdanauConfig {
    fn check(&self) -> Result<()> {
        let c = self;
        for (arg, v) in [
            ("vocab", c.vocab),
            ("emb", c.emb),
            ("enc_hidden", c.enc_hidden),
            ("dec_hidden", c.dec_hidden),
            ("attn", c.attn),
            ("readout", c.readout),
        ] {
            if v == 0 {
                return Err(Error::invalid(arg, "must be ≥ 1"));
            }
        }
        if c.vocab <= EOS as usize {
            return Err(Error::invalid(
                "vocab",
                "must hold PAD, BOS, EOS and tokens",
            ));
        }
        Ok(())
    }
}

/// Parameter indices (into [`Bahdanau::parameters`]).
#[derive(Clone, Copy, Debug)]
struct Ix {
    src_emb: usize,
    /// Forward, backward direction: w_ih, w_hh, b_ih, b_hh.
    enc: [[usize; 4]; 2],
    init: (usize, usize),
    att_w: (usize, usize),
    att_u: usize,
    att_v: usize,
    tgt_emb: usize,
    dec: [usize; 4],
    readout: (usize, usize),
    out: (usize, usize),
}

/// The model: parameters under PyTorch-style names (`encoder.gru.weight_ih_l0`, …; with LSTM
/// cells `encoder.lstm.…` and `decoder.lstm.…`).
pub struct Bahdanau<B: TrainBackend> {
    pub config: BahdanauConfig,
    params: Vec<Param<B::Tensor>>,
    ix: Ix,
}

/// A recurrent state: h, and the LSTM's memory c (`None` for a GRU).
struct State<T> {
    h: T,
    c: Option<T>,
}

/// One encoder step's state in, cache and h out.
type StepTensors<T> = (State<T>, T, T);

/// The gradients of one cell step ([`Bahdanau::cell_backward`]).
struct StepGrads<T> {
    dgi: T,
    /// dL/dgh, `None` when it equals dL/dgi (an LSTM's gates).
    dgh: Option<T>,
    /// dL/dh not through gh (add dgh·W_hh).
    dh: T,
    /// dL/dc (an LSTM).
    dc: Option<T>,
}

/// One encoder direction's steps, indexed by source position.
struct DirCache<T> {
    /// The state each step read (h, and c for an LSTM).
    state_in: Vec<State<T>>,
    cache: Vec<T>,
    h_out: Vec<T>,
}

struct EncCache<T> {
    /// Source ids, time-major.
    ids: Vec<u32>,
    /// Embeddings, time-major `[Tx·B, E]`.
    x: T,
    /// active[t][b]: position t is inside sequence b.
    active: Vec<Vec<bool>>,
    dirs: [DirCache<T>; 2],
    /// Annotations, batch-major `[B·Tx, 2He]`.
    ann: T,
    /// U·h_j, batch-major `[B·Tx, A]`.
    keys: T,
}

/// One decoder step's tensors.
struct DecStep<T> {
    s_in: T,
    /// The LSTM's memory in and out.
    c_in: Option<T>,
    q: T,
    ctx: T,
    alpha: T,
    emb: T,
    xin: T,
    cache: T,
    s_out: T,
    c_out: Option<T>,
}

impl<B: TrainBackend> Bahdanau<B> {
    /// A new model with PyTorch's default initialisations: uniform ±1/√H for the GRUs (or
    /// LSTMs), ±1/√fan_in for the linear layers, ±1 for embeddings (from `seed`).
    pub fn new(be: &B, config: BahdanauConfig, seed: u64) -> Result<Self> {
        config.check()?;
        let c = config;
        let (rnn, k) = (c.cell.name(), c.cell.gates());
        let mut pb = ParamBuilder::new(be, seed);
        let inv = |n: usize| 1.0 / (n as f32).sqrt();
        let src_emb = pb.uniform(
            "encoder.embedding.weight".into(),
            &[c.vocab, c.emb],
            1.0,
            true,
        )?;
        let mut enc = [[0; 4]; 2];
        for (d, suffix) in ["", "_reverse"].iter().enumerate() {
            let h = c.enc_hidden;
            let b = inv(h);
            enc[d] = [
                pb.uniform(
                    format!("encoder.{rnn}.weight_ih_l0{suffix}"),
                    &[k * h, c.emb],
                    b,
                    true,
                )?,
                pb.uniform(
                    format!("encoder.{rnn}.weight_hh_l0{suffix}"),
                    &[k * h, h],
                    b,
                    true,
                )?,
                pb.uniform(
                    format!("encoder.{rnn}.bias_ih_l0{suffix}"),
                    &[k * h],
                    b,
                    false,
                )?,
                pb.uniform(
                    format!("encoder.{rnn}.bias_hh_l0{suffix}"),
                    &[k * h],
                    b,
                    false,
                )?,
            ];
        }
        let (he, hd, a) = (c.enc_hidden, c.dec_hidden, c.attn);
        let init = (
            pb.uniform("decoder.init.weight".into(), &[hd, he], inv(he), true)?,
            pb.uniform("decoder.init.bias".into(), &[hd], inv(he), false)?,
        );
        let att_w = (
            pb.uniform("decoder.attention.W.weight".into(), &[a, hd], inv(hd), true)?,
            pb.uniform("decoder.attention.W.bias".into(), &[a], inv(hd), false)?,
        );
        let att_u = pb.uniform(
            "decoder.attention.U.weight".into(),
            &[a, 2 * he],
            inv(2 * he),
            true,
        )?;
        let att_v = pb.uniform("decoder.attention.v".into(), &[a], inv(a), true)?;
        let tgt_emb = pb.uniform(
            "decoder.embedding.weight".into(),
            &[c.vocab, c.emb],
            1.0,
            true,
        )?;
        let din = c.emb + 2 * he;
        let dec = [
            pb.uniform(
                format!("decoder.{rnn}.weight_ih"),
                &[k * hd, din],
                inv(hd),
                true,
            )?,
            pb.uniform(
                format!("decoder.{rnn}.weight_hh"),
                &[k * hd, hd],
                inv(hd),
                true,
            )?,
            pb.uniform(format!("decoder.{rnn}.bias_ih"), &[k * hd], inv(hd), false)?,
            pb.uniform(format!("decoder.{rnn}.bias_hh"), &[k * hd], inv(hd), false)?,
        ];
        let rin = hd + 2 * he + c.emb;
        let readout = (
            pb.uniform(
                "decoder.readout.weight".into(),
                &[c.readout, rin],
                inv(rin),
                true,
            )?,
            pb.uniform("decoder.readout.bias".into(), &[c.readout], inv(rin), false)?,
        );
        let out = (
            pb.uniform(
                "decoder.out.weight".into(),
                &[c.vocab, c.readout],
                inv(c.readout),
                true,
            )?,
            pb.uniform("decoder.out.bias".into(), &[c.vocab], inv(c.readout), false)?,
        );
        Ok(Bahdanau {
            config,
            params: pb.params,
            ix: Ix {
                src_emb,
                enc,
                init,
                att_w,
                att_u,
                att_v,
                tgt_emb,
                dec,
                readout,
                out,
            },
        })
    }

    fn p(&self, i: usize) -> &B::Tensor {
        &self.params[i].value
    }

    fn lin(&self, (w, b): (usize, usize)) -> LinearParams<'_, B::Tensor> {
        LinearParams {
            w: self.p(w),
            b: Some(self.p(b)),
        }
    }

    fn linear(
        &self,
        be: &B,
        ix: (usize, usize),
        x: &B::Tensor,
        act: Activation,
    ) -> Result<B::Tensor> {
        be.linear(x, self.p(ix.0), Some(self.p(ix.1)), act)
    }

    /// The zero state of `batch` rows of `hidden` units (with c for an LSTM).
    fn zero_state(&self, be: &B, batch: usize, hidden: usize) -> Result<State<B::Tensor>> {
        Ok(State {
            h: be.zeros(&[batch, hidden])?,
            c: match self.config.cell {
                Cell::Gru => None,
                Cell::Lstm => Some(be.zeros(&[batch, hidden])?),
            },
        })
    }

    /// One cell step after its two GEMMs: the new state and the backward's cache.
    fn cell_step(
        &self,
        be: &B,
        gi: &B::Tensor,
        gh: &B::Tensor,
        st: &State<B::Tensor>,
        active: Option<&[bool]>,
    ) -> Result<(State<B::Tensor>, B::Tensor)> {
        match &st.c {
            None => {
                let (h, cache) = be.gru_cell(gi, gh, &st.h, active)?;
                Ok((State { h, c: None }, cache))
            }
            Some(c) => {
                let (h, c, cache) = be.lstm_cell(gi, gh, &st.h, c, active)?;
                Ok((State { h, c: Some(c) }, cache))
            }
        }
    }

    /// The backward of [`Self::cell_step`] from dL/dh' and (an LSTM) dL/dc'.
    fn cell_backward(
        &self,
        be: &B,
        cache: &B::Tensor,
        (h_in, c_in): (&B::Tensor, Option<&B::Tensor>),
        dh: &B::Tensor,
        dc: Option<&B::Tensor>,
        active: Option<&[bool]>,
    ) -> Result<StepGrads<B::Tensor>> {
        match (c_in, dc) {
            (None, _) => {
                let g = be.gru_cell_backward(cache, h_in, dh, active)?;
                Ok(StepGrads {
                    dgi: g.dgi,
                    dgh: Some(g.dgh),
                    dh: g.dh,
                    dc: None,
                })
            }
            (Some(c), Some(dc)) => {
                let g = be.lstm_cell_backward(cache, c, dh, dc, active)?;
                Ok(StepGrads {
                    dgi: g.dgates,
                    dgh: None,
                    dh: g.dh,
                    dc: Some(g.dc),
                })
            }
            (Some(_), None) => Err(Error::invalid("dc", "an LSTM step's backward needs dL/dc'")),
        }
    }

    /// The encoder over `src` (batch-major ids `[batch·tx]`, lengths `lens`).
    fn encode(
        &self,
        be: &B,
        src: &[u32],
        batch: usize,
        tx: usize,
        lens: &[usize],
    ) -> Result<EncCache<B::Tensor>> {
        let he = self.config.enc_hidden;
        let ids: Vec<u32> = (0..tx)
            .flat_map(|t| (0..batch).map(move |b| (b, t)))
            .map(|(b, t)| src[b * tx + t])
            .collect();
        let x = be.gather_rows(self.p(self.ix.src_emb), &ids)?;
        let active: Vec<Vec<bool>> = (0..tx)
            .map(|t| lens.iter().map(|&l| t < l).collect())
            .collect();
        let mut dirs = Vec::with_capacity(2);
        for d in 0..2 {
            let [w_ih, w_hh, b_ih, b_hh] = self.ix.enc[d];
            let gi_all = be.linear(&x, self.p(w_ih), Some(self.p(b_ih)), Activation::None)?;
            let gi = unstack_steps(be, &gi_all, tx, false)?;
            let mut st = self.zero_state(be, batch, he)?;
            let mut slots: Vec<Option<StepTensors<B::Tensor>>> = (0..tx).map(|_| None).collect();
            let order: Vec<usize> = if d == 0 {
                (0..tx).collect()
            } else {
                (0..tx).rev().collect()
            };
            for t in order {
                let gh = be.linear(&st.h, self.p(w_hh), Some(self.p(b_hh)), Activation::None)?;
                let (st_new, cache) =
                    self.cell_step(be, &gi[t], &gh, &st, Some(active[t].as_slice()))?;
                let st_in = std::mem::replace(&mut st, st_new);
                let h_out = copy(be, &st.h)?;
                slots[t] = Some((st_in, cache, h_out));
            }
            let mut dc = DirCache {
                state_in: Vec::with_capacity(tx),
                cache: Vec::with_capacity(tx),
                h_out: Vec::with_capacity(tx),
            };
            for s in slots {
                let (a, b, c) = s.expect("every position is visited");
                dc.state_in.push(a);
                dc.cache.push(b);
                dc.h_out.push(c);
            }
            dirs.push(dc);
        }
        let [fwd, bwd]: [DirCache<B::Tensor>; 2] = dirs
            .try_into()
            .map_err(|_| Error::invalid("dirs", "two directions"))?;
        let per_step: Vec<B::Tensor> = (0..tx)
            .map(|t| be.concat_cols(&[&fwd.h_out[t], &bwd.h_out[t]]))
            .collect::<Result<_>>()?;
        let ann = stack_steps(be, &per_step.iter().collect::<Vec<_>>(), true)?;
        let keys = be.matmul(&ann, Op::N, self.p(self.ix.att_u), Op::T)?;
        Ok(EncCache {
            ids,
            x,
            active,
            dirs: [fwd, bwd],
            ann,
            keys,
        })
    }

    /// s_0 = tanh(W_init·←h_1 + b), and an LSTM's c_0 = 0 (see the module docs).
    fn initial_state(&self, be: &B, enc: &EncCache<B::Tensor>) -> Result<State<B::Tensor>> {
        let h = self.linear(be, self.ix.init, &enc.dirs[1].h_out[0], Activation::Tanh)?;
        let c = match self.config.cell {
            Cell::Gru => None,
            Cell::Lstm => Some(be.zeros(be.shape(&h))?),
        };
        Ok(State { h, c })
    }

    /// One decoder step from s_{i−1} (and c_{i−1}) and the input token ids.
    fn dec_step(
        &self,
        be: &B,
        enc: &EncCache<B::Tensor>,
        st: State<B::Tensor>,
        ids: &[u32],
        lens: &[usize],
    ) -> Result<DecStep<B::Tensor>> {
        let q = self.linear(be, self.ix.att_w, &st.h, Activation::None)?;
        let (ctx, alpha) =
            be.additive_attention(&q, &enc.keys, self.p(self.ix.att_v), &enc.ann, Some(lens))?;
        let emb = be.gather_rows(self.p(self.ix.tgt_emb), ids)?;
        let xin = be.concat_cols(&[&emb, &ctx])?;
        let [w_ih, w_hh, b_ih, b_hh] = self.ix.dec;
        let gi = be.linear(&xin, self.p(w_ih), Some(self.p(b_ih)), Activation::None)?;
        let gh = be.linear(&st.h, self.p(w_hh), Some(self.p(b_hh)), Activation::None)?;
        let (out, cache) = self.cell_step(be, &gi, &gh, &st, None)?;
        Ok(DecStep {
            s_in: st.h,
            c_in: st.c,
            q,
            ctx,
            alpha,
            emb,
            xin,
            cache,
            s_out: out.h,
            c_out: out.c,
        })
    }

    /// The state a decoder step left, for the next step (copies: the step keeps its own).
    fn state_after(&self, be: &B, st: &DecStep<B::Tensor>) -> Result<State<B::Tensor>> {
        Ok(State {
            h: copy(be, &st.s_out)?,
            c: st.c_out.as_ref().map(|c| copy(be, c)).transpose()?,
        })
    }

    /// The deep-output input [s_i; c_i; E·y_{i−1}] of one step.
    fn readout_input(&self, be: &B, st: &DecStep<B::Tensor>) -> Result<B::Tensor> {
        be.concat_cols(&[&st.s_out, &st.ctx, &st.emb])
    }

    /// Logits of readout inputs `r`, and the tanh layer's output.
    fn output(&self, be: &B, r: &B::Tensor) -> Result<(B::Tensor, B::Tensor)> {
        let t = self.linear(be, self.ix.readout, r, Activation::Tanh)?;
        let logits = self.linear(be, self.ix.out, &t, Activation::None)?;
        Ok((logits, t))
    }

    /// The encoder's backward from dL/d(annotations) and dL/d←h_1 (through s_0).
    fn encode_backward(
        &self,
        be: &B,
        enc: &EncCache<B::Tensor>,
        dann: &B::Tensor,
        dh_first: B::Tensor,
        g: &mut GradAcc<B::Tensor>,
    ) -> Result<()> {
        let he = self.config.enc_hidden;
        let tx = enc.active.len();
        let per_step = unstack_steps(be, dann, tx, true)?;
        let mut dx_total: Option<B::Tensor> = None;
        let mut dh_first = Some(dh_first);
        for d in 0..2 {
            let [w_ih, w_hh, b_ih, b_hh] = self.ix.enc[d];
            let dc = &enc.dirs[d];
            let batch = enc.active[0].len();
            // dL/dh and (an LSTM) dL/dc flowing back from the next step: the last step's
            // c feeds nothing, so its gradient starts at zero.
            let State {
                h: mut carry,
                c: mut carry_c,
            } = self.zero_state(be, batch, he)?;
            let mut dgi: Vec<Option<B::Tensor>> = (0..tx).map(|_| None).collect();
            let mut dgh: Vec<Option<B::Tensor>> = (0..tx).map(|_| None).collect();
            // Backward in the reverse of the direction's processing order.
            let order: Vec<usize> = if d == 0 {
                (0..tx).rev().collect()
            } else {
                (0..tx).collect()
            };
            for t in order {
                let mut dh = be.slice_cols(&per_step[t], d * he, he)?;
                be.accumulate(&mut dh, &carry)?;
                if d == 1 && t == 0 {
                    be.accumulate(&mut dh, dh_first.as_ref().expect("used once"))?;
                    dh_first = None;
                }
                let gr = self.cell_backward(
                    be,
                    &dc.cache[t],
                    (&dc.state_in[t].h, dc.state_in[t].c.as_ref()),
                    &dh,
                    carry_c.as_ref(),
                    Some(enc.active[t].as_slice()),
                )?;
                carry = gr.dh;
                carry_c = gr.dc;
                let back = be.matmul(
                    gr.dgh.as_ref().unwrap_or(&gr.dgi),
                    Op::N,
                    self.p(w_hh),
                    Op::N,
                )?;
                be.accumulate(&mut carry, &back)?;
                dgi[t] = Some(gr.dgi);
                dgh[t] = gr.dgh;
            }
            let dgi: Vec<B::Tensor> = dgi.into_iter().map(|x| x.expect("every step")).collect();
            let dgh: Vec<B::Tensor> = dgh.into_iter().flatten().collect();
            let dgi_all = stack_steps(be, &dgi.iter().collect::<Vec<_>>(), false)?;
            // An LSTM's dgh is its dgi.
            let dgh_all = if dgh.is_empty() {
                None
            } else {
                Some(stack_steps(be, &dgh.iter().collect::<Vec<_>>(), false)?)
            };
            let dgh_all = dgh_all.as_ref().unwrap_or(&dgi_all);
            let h_in_all = stack_steps(
                be,
                &dc.state_in.iter().map(|s| &s.h).collect::<Vec<_>>(),
                false,
            )?;
            let gi = linear_backward(
                be,
                LinearParams {
                    w: self.p(w_ih),
                    b: Some(self.p(b_ih)),
                },
                &enc.x,
                &dgi_all,
                true,
            )?;
            g.add(be, w_ih, gi.dw)?;
            g.add(be, b_ih, gi.db.expect("has a bias"))?;
            g.add(be, w_hh, be.matmul(dgh_all, Op::T, &h_in_all, Op::N)?)?;
            g.add(be, b_hh, be.sum_rows(dgh_all)?)?;
            let dx = gi.dx.expect("asked for dx");
            match &mut dx_total {
                Some(acc) => be.accumulate(acc, &dx)?,
                None => dx_total = Some(dx),
            }
        }
        let dx = dx_total.expect("two directions");
        let demb = be.gather_rows_backward(&dx, &enc.ids, self.config.vocab, Some(PAD))?;
        g.add(be, self.ix.src_emb, demb)
    }

    /// The logits `[Ty·B, vocab]` (time-major: row i·B + b) of a teacher-forced batch.
    pub fn logits(&self, be: &B, batch: &Seq2SeqBatch) -> Result<B::Tensor> {
        batch.check(self.config.vocab)?;
        let (bn, tx, ty) = (batch.batch, batch.src_len, batch.tgt_len);
        let enc = self.encode(be, &batch.src, bn, tx, &batch.src_lens)?;
        let mut s = self.initial_state(be, &enc)?;
        let mut rs = Vec::with_capacity(ty);
        for i in 0..ty {
            let ids: Vec<u32> = (0..bn).map(|b| batch.tgt_in[b * ty + i]).collect();
            let st = self.dec_step(be, &enc, s, &ids, &batch.src_lens)?;
            rs.push(self.readout_input(be, &st)?);
            s = State {
                h: st.s_out,
                c: st.c_out,
            };
        }
        let r = stack_steps(be, &rs.iter().collect::<Vec<_>>(), false)?;
        Ok(self.output(be, &r)?.0)
    }
}

impl<B: TrainBackend> Seq2Seq<B> for Bahdanau<B> {
    fn arch(&self) -> &'static str {
        "bahdanau"
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
        let (bn, tx, ty) = (batch.batch, batch.src_len, batch.tgt_len);
        let lens: &[usize] = &batch.src_lens;
        let enc = self.encode(be, &batch.src, bn, tx, lens)?;
        let s0 = self.initial_state(be, &enc)?;
        let mut s = State {
            h: copy(be, &s0.h)?,
            c: s0.c,
        };
        let s0 = s0.h;
        let mut steps = Vec::with_capacity(ty);
        let mut dec_ids = Vec::with_capacity(ty * bn);
        for i in 0..ty {
            let ids: Vec<u32> = (0..bn).map(|b| batch.tgt_in[b * ty + i]).collect();
            dec_ids.extend_from_slice(&ids);
            let st = self.dec_step(be, &enc, s, &ids, lens)?;
            s = self.state_after(be, &st)?;
            steps.push(st);
        }
        let rs: Vec<B::Tensor> = steps
            .iter()
            .map(|st| self.readout_input(be, st))
            .collect::<Result<_>>()?;
        let r = stack_steps(be, &rs.iter().collect::<Vec<_>>(), false)?;
        let (logits, t) = self.output(be, &r)?;
        let labels: Vec<i64> = (0..ty)
            .flat_map(|i| (0..bn).map(move |b| (b, i)))
            .map(|(b, i)| batch.tgt_out[b * ty + i])
            .collect();
        let (loss, dlogits) = be.cross_entropy(&logits, &labels, ce)?;

        // Backward.
        let mut g = GradAcc::new(self.params.len());
        let go = linear_backward(be, self.lin(self.ix.out), &t, &dlogits, true)?;
        g.add(be, self.ix.out.0, go.dw)?;
        g.add(be, self.ix.out.1, go.db.expect("bias"))?;
        let dt = be.tanh_backward(&t, go.dx.as_ref().expect("dx"))?;
        let gr = linear_backward(be, self.lin(self.ix.readout), &r, &dt, true)?;
        g.add(be, self.ix.readout.0, gr.dw)?;
        g.add(be, self.ix.readout.1, gr.db.expect("bias"))?;
        let dr = unstack_steps(be, gr.dx.as_ref().expect("dx"), ty, false)?;
        let (he, hd, e) = (
            self.config.enc_hidden,
            self.config.dec_hidden,
            self.config.emb,
        );
        let [w_ih, w_hh, b_ih, b_hh] = self.ix.dec;
        // dL/ds and (an LSTM) dL/dc from the step after; the last c feeds nothing.
        let State {
            h: mut carry,
            c: mut carry_c,
        } = self.zero_state(be, bn, hd)?;
        let mut dkeys = be.zeros(be.shape(&enc.keys))?;
        let mut dann = be.zeros(be.shape(&enc.ann))?;
        let mut dgi = Vec::with_capacity(ty);
        let mut dgh = Vec::with_capacity(ty);
        let mut dq = Vec::with_capacity(ty);
        let mut demb = Vec::with_capacity(ty);
        for i in (0..ty).rev() {
            let st = &steps[i];
            let mut ds = be.slice_cols(&dr[i], 0, hd)?;
            be.accumulate(&mut ds, &carry)?;
            let gc = self.cell_backward(
                be,
                &st.cache,
                (&st.s_in, st.c_in.as_ref()),
                &ds,
                carry_c.as_ref(),
                None,
            )?;
            let dxin = be.matmul(&gc.dgi, Op::N, self.p(w_ih), Op::N)?;
            let mut de = be.slice_cols(&dxin, 0, e)?;
            be.accumulate(&mut de, &be.slice_cols(&dr[i], hd + 2 * he, e)?)?;
            let mut dc = be.slice_cols(&dxin, e, 2 * he)?;
            be.accumulate(&mut dc, &be.slice_cols(&dr[i], hd, 2 * he)?)?;
            let ag = be.additive_attention_backward(
                &st.q,
                &enc.keys,
                self.p(self.ix.att_v),
                &enc.ann,
                &st.alpha,
                &dc,
                Some(lens),
            )?;
            be.accumulate(&mut dkeys, &ag.dkeys)?;
            be.accumulate(&mut dann, &ag.dvalues)?;
            g.add(be, self.ix.att_v, ag.dv)?;
            carry = gc.dh;
            carry_c = gc.dc;
            let dgh_i = gc.dgh.as_ref().unwrap_or(&gc.dgi);
            be.accumulate(&mut carry, &be.matmul(dgh_i, Op::N, self.p(w_hh), Op::N)?)?;
            be.accumulate(
                &mut carry,
                &be.matmul(&ag.dq, Op::N, self.p(self.ix.att_w.0), Op::N)?,
            )?;
            dgi.push(gc.dgi);
            if let Some(x) = gc.dgh {
                dgh.push(x);
            }
            dq.push(ag.dq);
            demb.push(de);
        }
        // The lists were filled from the last step back: restore time order.
        dgi.reverse();
        dgh.reverse();
        dq.reverse();
        demb.reverse();
        let stack = |v: &[B::Tensor]| stack_steps(be, &v.iter().collect::<Vec<_>>(), false);
        let s_in = stack_steps(
            be,
            &steps.iter().map(|st| &st.s_in).collect::<Vec<_>>(),
            false,
        )?;
        let xin = stack_steps(
            be,
            &steps.iter().map(|st| &st.xin).collect::<Vec<_>>(),
            false,
        )?;
        let (dgi, dq, demb) = (stack(&dgi)?, stack(&dq)?, stack(&demb)?);
        // An LSTM's dgh is its dgi.
        let dgh = if dgh.is_empty() {
            None
        } else {
            Some(stack(&dgh)?)
        };
        let dgh = dgh.as_ref().unwrap_or(&dgi);
        g.add(be, w_ih, be.matmul(&dgi, Op::T, &xin, Op::N)?)?;
        g.add(be, b_ih, be.sum_rows(&dgi)?)?;
        g.add(be, w_hh, be.matmul(dgh, Op::T, &s_in, Op::N)?)?;
        g.add(be, b_hh, be.sum_rows(dgh)?)?;
        g.add(be, self.ix.att_w.0, be.matmul(&dq, Op::T, &s_in, Op::N)?)?;
        g.add(be, self.ix.att_w.1, be.sum_rows(&dq)?)?;
        g.add(
            be,
            self.ix.tgt_emb,
            be.gather_rows_backward(&demb, &dec_ids, self.config.vocab, Some(PAD))?,
        )?;
        // s_0 = tanh(W_init·←h_1 + b); an LSTM's c_0 = 0 takes no gradient.
        let dpre = be.tanh_backward(&s0, &carry)?;
        let gi = linear_backward(
            be,
            self.lin(self.ix.init),
            &enc.dirs[1].h_out[0],
            &dpre,
            true,
        )?;
        g.add(be, self.ix.init.0, gi.dw)?;
        g.add(be, self.ix.init.1, gi.db.expect("bias"))?;
        // Keys U·h_j.
        g.add(
            be,
            self.ix.att_u,
            be.matmul(&dkeys, Op::T, &enc.ann, Op::N)?,
        )?;
        be.accumulate(
            &mut dann,
            &be.matmul(&dkeys, Op::N, self.p(self.ix.att_u), Op::N)?,
        )?;
        self.encode_backward(be, &enc, &dann, gi.dx.expect("dx"), &mut g)?;
        Ok((loss, g.finish(be, &self.params)?))
    }

    fn greedy(&self, be: &B, sources: &[Vec<u32>], max_len: usize) -> Result<Vec<Decoded>> {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            sources.iter().map(|s| (s.clone(), Vec::new())).collect();
        let batch = Seq2SeqBatch::from_pairs(&pairs)?;
        batch.check(self.config.vocab)?;
        let (bn, tx) = (batch.batch, batch.src_len);
        let enc = self.encode(be, &batch.src, bn, tx, &batch.src_lens)?;
        let mut s = self.initial_state(be, &enc)?;
        let mut ids = vec![super::BOS; bn];
        let mut out: Vec<Decoded> = batch
            .src_lens
            .iter()
            .map(|_| Decoded {
                tokens: Vec::new(),
                attention: Vec::new(),
            })
            .collect();
        let mut done = vec![false; bn];
        for _ in 0..max_len {
            let st = self.dec_step(be, &enc, s, &ids, &batch.src_lens)?;
            let r = self.readout_input(be, &st)?;
            let (logits, _) = self.output(be, &r)?;
            let next = argmax_rows(&be.to_f32(&logits)?, self.config.vocab);
            let alpha = be.to_f32(&st.alpha)?;
            for b in 0..bn {
                if done[b] {
                    continue;
                }
                out[b]
                    .attention
                    .push(alpha[b * tx..b * tx + batch.src_lens[b]].to_vec());
                if next[b] == EOS {
                    done[b] = true;
                } else {
                    out[b].tokens.push(next[b]);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            ids = next;
            s = State {
                h: st.s_out,
                c: st.c_out,
            };
        }
        Ok(out)
    }
}
