//! f64 references of the sequence-to-sequence models ([`crate::runtime::seq2seq`]): the GRU
//! and LSTM steps (PyTorch's `nn.GRU` and `nn.LSTM` equations), Bahdanau's additive attention,
//! and the loss of the whole models written from their equations with plain loops. Parameters are read by name
//! through a lookup, so a reference shares nothing with the model but the parameter names;
//! the training tests differentiate these numerically.

use super::runtime::{attention_with, cross_entropy, layer_norm_f64, linear_f64};
use super::runtime::{AttentionSizes, HeadsRef};
use crate::runtime::backend::{Activation, CausalAlign};
use crate::runtime::seq2seq::bahdanau::Cell;
use crate::runtime::seq2seq::Seq2SeqBatch;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// One GRU step from the pre-activations gi = x·W_ihᵀ + b_ih and gh = h·W_hhᵀ + b_hh
/// (`[batch, 3H]`, blocks r, z, n): h' = (1 − z)∘n + z∘h.
pub fn gru_cell(gi: &[f64], gh: &[f64], h: &[f64], hidden: usize) -> Vec<f64> {
    let hd = hidden;
    let mut out = vec![0.0; h.len()];
    for (b, o) in out.chunks_mut(hd).enumerate() {
        let (gi, gh, hb) = (&gi[b * 3 * hd..], &gh[b * 3 * hd..], &h[b * hd..]);
        for u in 0..hd {
            let r = sigmoid(gi[u] + gh[u]);
            let z = sigmoid(gi[hd + u] + gh[hd + u]);
            let n = (gi[2 * hd + u] + r * gh[2 * hd + u]).tanh();
            o[u] = (1.0 - z) * n + z * hb[u];
        }
    }
    out
}

/// One GRU step with its weights (`nn.GRUCell`): x `[batch, in]`, h `[batch, H]`,
/// W_ih `[3H, in]`, W_hh `[3H, H]`.
pub fn gru_step(
    x: &[f64],
    h: &[f64],
    w_ih: &[f64],
    w_hh: &[f64],
    b_ih: &[f64],
    b_hh: &[f64],
    hidden: usize,
) -> Vec<f64> {
    let inp = w_ih.len() / (3 * hidden);
    let gi = linear_f64(x, inp, w_ih, 3 * hidden, Some(b_ih), Activation::None);
    let gh = linear_f64(h, hidden, w_hh, 3 * hidden, Some(b_hh), Activation::None);
    gru_cell(&gi, &gh, h, hidden)
}

/// Additive attention: for sequence b, α_b = softmax_j(v·tanh(q_b + k_bj)) over its first
/// `key_lens[b]` keys, c_b = Σ_j α_bj·values_bj. Returns (context `[batch, D]`,
/// α `[batch, len_k]`, 0 at padded keys).
pub fn additive_attention(
    q: &[f64],
    keys: &[f64],
    v: &[f64],
    values: &[f64],
    len_k: usize,
    key_lens: &[usize],
) -> (Vec<f64>, Vec<f64>) {
    let a = v.len();
    let batch = q.len() / a;
    let d = values.len() / (batch * len_k).max(1);
    let mut ctx = vec![0.0; batch * d];
    let mut alpha = vec![0.0; batch * len_k];
    for b in 0..batch {
        let len = key_lens[b];
        let e: Vec<f64> = (0..len)
            .map(|j| {
                (0..a)
                    .map(|c| v[c] * (q[b * a + c] + keys[(b * len_k + j) * a + c]).tanh())
                    .sum()
            })
            .collect();
        let max = e.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = e.iter().map(|x| (x - max).exp()).sum();
        for j in 0..len {
            let p = (e[j] - max).exp() / sum;
            alpha[b * len_k + j] = p;
            for c in 0..d {
                ctx[b * d + c] += p * values[(b * len_k + j) * d + c];
            }
        }
    }
    (ctx, alpha)
}

/// A parameter by its model name (f64 values, row-major as the model stores them).
pub type Lookup<'f, 'a> = &'f dyn Fn(&str) -> &'a [f64];

fn rows(table: &[f64], width: usize, ids: impl Iterator<Item = u32>) -> Vec<f64> {
    ids.flat_map(|i| {
        table[i as usize * width..(i as usize + 1) * width]
            .iter()
            .copied()
    })
    .collect()
}

/// Sizes of the Bahdanau model the reference evaluates.
#[derive(Clone, Copy, Debug)]
pub struct BahdanauSizes {
    pub vocab: usize,
    pub emb: usize,
    pub enc_hidden: usize,
    pub dec_hidden: usize,
    /// GRU (parameters `encoder.gru.…`, `decoder.gru.…`) or LSTM (`….lstm.…`) cells.
    pub cell: Cell,
}

/// A recurrent state: h, and an LSTM's memory c (empty for a GRU).
type RnnState = (Vec<f64>, Vec<f64>);

/// One step of `cell` with the weights under `{prefix}.weight_ih{suffix}`, … from `state`.
fn rnn_step(
    p: Lookup<'_, '_>,
    cell: Cell,
    prefix: &str,
    suffix: &str,
    x: &[f64],
    (h, c): &RnnState,
    hidden: usize,
) -> RnnState {
    let g = |n: &str| p(&format!("{prefix}.{n}{suffix}"));
    let (w_ih, w_hh, b_ih, b_hh) = (g("weight_ih"), g("weight_hh"), g("bias_ih"), g("bias_hh"));
    match cell {
        Cell::Gru => (gru_step(x, h, w_ih, w_hh, b_ih, b_hh, hidden), Vec::new()),
        Cell::Lstm => lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, hidden),
    }
}

/// The Bahdanau model's mean cross-entropy on a batch (teacher forcing), from its equations:
/// a bidirectional GRU (or LSTM) over each source alone (each direction starting from zeros
/// at the sequence's own ends), annotations [→h_j; ←h_j], s_0 = tanh(W_init·←h_1 + b) (an
/// LSTM's memory starting at 0), and per target step i: c_i from additive attention with
/// query W·s_{i−1} + b_W and keys U·h_j, s_i = GRU([E y_{i−1}; c_i], s_{i−1}) (or the LSTM's h),
/// logits = W_o·tanh(W_r·[s_i; c_i; E y_{i−1}] + b_r) + b_o.
pub fn bahdanau_loss(
    p: Lookup<'_, '_>,
    z: &BahdanauSizes,
    batch: &Seq2SeqBatch,
    smoothing: f64,
) -> f64 {
    let (e, he, hd) = (z.emb, z.enc_hidden, z.dec_hidden);
    let (bn, tx, ty) = (batch.batch, batch.src_len, batch.tgt_len);
    let mut logits = Vec::new();
    let mut labels = Vec::new();
    for b in 0..bn {
        let len = batch.src_lens[b];
        let src = &batch.src[b * tx..(b + 1) * tx];
        let x = rows(p("encoder.embedding.weight"), e, src[..len].iter().copied());
        let zero_state = |n: usize| -> RnnState {
            let c = match z.cell {
                Cell::Gru => Vec::new(),
                Cell::Lstm => vec![0.0; n],
            };
            (vec![0.0; n], c)
        };
        let enc_prefix = format!("encoder.{}", z.cell.name());
        let dec_prefix = format!("decoder.{}", z.cell.name());
        let run = |suffix: &str, order: Vec<usize>| -> Vec<Vec<f64>> {
            let mut st = zero_state(he);
            let mut out = vec![Vec::new(); len];
            for t in order {
                st = rnn_step(
                    p,
                    z.cell,
                    &enc_prefix,
                    &format!("_l0{suffix}"),
                    &x[t * e..(t + 1) * e],
                    &st,
                    he,
                );
                out[t] = st.0.clone();
            }
            out
        };
        let fwd = run("", (0..len).collect());
        let bwd = run("_reverse", (0..len).rev().collect());
        let ann: Vec<f64> = (0..len)
            .flat_map(|t| fwd[t].iter().chain(&bwd[t]).copied().collect::<Vec<_>>())
            .collect();
        let keys = linear_f64(
            &ann,
            2 * he,
            p("decoder.attention.U.weight"),
            p("decoder.attention.v").len(),
            None,
            Activation::None,
        );
        let mut st = zero_state(hd);
        st.0 = linear_f64(
            &bwd[0],
            he,
            p("decoder.init.weight"),
            hd,
            Some(p("decoder.init.bias")),
            Activation::Tanh,
        );
        for i in 0..ty {
            let a = p("decoder.attention.v").len();
            let q = linear_f64(
                &st.0,
                hd,
                p("decoder.attention.W.weight"),
                a,
                Some(p("decoder.attention.W.bias")),
                Activation::None,
            );
            let (c, _) = additive_attention(&q, &keys, p("decoder.attention.v"), &ann, len, &[len]);
            let y = batch.tgt_in[b * ty + i];
            let emb = rows(p("decoder.embedding.weight"), e, std::iter::once(y));
            let xin: Vec<f64> = emb.iter().chain(&c).copied().collect();
            st = rnn_step(p, z.cell, &dec_prefix, "", &xin, &st, hd);
            let r_in: Vec<f64> = st.0.iter().chain(&c).chain(&emb).copied().collect();
            let r = p("decoder.readout.bias").len();
            let t = linear_f64(
                &r_in,
                r_in.len(),
                p("decoder.readout.weight"),
                r,
                Some(p("decoder.readout.bias")),
                Activation::Tanh,
            );
            logits.extend(linear_f64(
                &t,
                r,
                p("decoder.out.weight"),
                z.vocab,
                Some(p("decoder.out.bias")),
                Activation::None,
            ));
            labels.push(batch.tgt_out[b * ty + i]);
        }
    }
    cross_entropy(&logits, z.vocab, &labels, -100, smoothing)
}

/// Sizes and options of the Transformer the reference evaluates.
#[derive(Clone, Copy, Debug)]
pub struct TransformerSizes {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub ff: usize,
    pub enc_layers: usize,
    pub dec_layers: usize,
    pub pre_ln: bool,
    pub shared_embeddings: bool,
    pub ln_eps: f32,
}

/// The sinusoidal encoding of position `pos`, dimension `i` of `d`: sin(pos/10000^(2k/d)) at
/// even i = 2k, cos at odd i = 2k + 1.
pub fn sinusoid(pos: usize, i: usize, d: usize) -> f64 {
    let k = (i / 2) as f64;
    let angle = pos as f64 / 10000f64.powf(2.0 * k / d as f64);
    if i.is_multiple_of(2) {
        angle.sin()
    } else {
        angle.cos()
    }
}

/// The Transformer's mean cross-entropy on a batch (teacher forcing): embeddings ·√d plus
/// sinusoids, post-LN (or pre-LN with a final LayerNorm per stack) blocks of self-attention
/// and ReLU feed-forward, the decoder's causal self-attention and cross-attention on the
/// encoder output, logits = x·E_outᵀ.
pub fn transformer_loss(
    p: Lookup<'_, '_>,
    z: &TransformerSizes,
    batch: &Seq2SeqBatch,
    smoothing: f64,
) -> f64 {
    let d = z.d_model;
    let (bn, tx, ty) = (batch.batch, batch.src_len, batch.tgt_len);
    let (src_name, tgt_name, out_name) = if z.shared_embeddings {
        ("shared.weight", "shared.weight", "shared.weight")
    } else {
        (
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "lm_head.weight",
        )
    };
    let embed = |table: &str, ids: &[u32], len: usize| -> Vec<f64> {
        let mut x = rows(p(table), d, ids.iter().copied());
        for (r, row) in x.chunks_mut(d).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = *v * (d as f64).sqrt() + sinusoid(r % len, i, d);
            }
        }
        x
    };
    let lin = |x: &[f64], name: &str, act: Activation| -> Vec<f64> {
        let b = p(&format!("{name}.bias"));
        linear_f64(
            x,
            p(&format!("{name}.weight")).len() / b.len(),
            p(&format!("{name}.weight")),
            b.len(),
            Some(b),
            act,
        )
    };
    let ln = |x: &[f64], res: Option<&[f64]>, name: &str| -> Vec<f64> {
        layer_norm_f64(
            x,
            res,
            d,
            p(&format!("{name}.weight")),
            p(&format!("{name}.bias")),
            z.ln_eps,
        )
    };
    let attn = |xq: &[f64], xkv: &[f64], name: &str, sizes: &AttentionSizes| -> Vec<f64> {
        let q = lin(xq, &format!("{name}.q_proj"), Activation::None);
        let k = lin(xkv, &format!("{name}.k_proj"), Activation::None);
        let v = lin(xkv, &format!("{name}.v_proj"), Activation::None);
        let (o, _) = attention_with(
            heads_view(&q, d, z.heads),
            heads_view(&k, d, z.heads),
            heads_view(&v, d, z.heads),
            sizes,
            None,
        );
        lin(&o, &format!("{name}.out_proj"), Activation::None)
    };
    // A residual sub-block, post-LN: LN(x + f(x)); pre-LN: x + f(LN(x)).
    let block = |x: &[f64], ln_name: &str, f: &dyn Fn(&[f64]) -> Vec<f64>| -> Vec<f64> {
        if z.pre_ln {
            let y = f(&ln(x, None, ln_name));
            x.iter().zip(&y).map(|(a, b)| a + b).collect()
        } else {
            ln(&f(x), Some(x), ln_name)
        }
    };
    let ff = |x: &[f64], pre: &str| -> Vec<f64> {
        let h = lin(x, &format!("{pre}.fc1"), Activation::Relu);
        lin(&h, &format!("{pre}.fc2"), Activation::None)
    };
    let enc_mask = AttentionSizes {
        batch: bn,
        len_q: tx,
        len_k: tx,
        key_lens: Some(batch.src_lens.as_slice()),
        causal: None,
        window: None,
        scale: 1.0 / ((d / z.heads) as f64).sqrt(),
    };
    let mut x = embed(src_name, &batch.src, tx);
    for l in 0..z.enc_layers {
        let pre = format!("encoder.layers.{l}");
        x = block(&x, &format!("{pre}.self_attn_layer_norm"), &|x| {
            attn(x, x, &format!("{pre}.self_attn"), &enc_mask)
        });
        x = block(&x, &format!("{pre}.final_layer_norm"), &|x| ff(x, &pre));
    }
    if z.pre_ln {
        x = ln(&x, None, "encoder.layer_norm");
    }
    let mem = x;
    let self_mask = AttentionSizes {
        len_q: ty,
        len_k: ty,
        key_lens: None,
        causal: Some(CausalAlign::TopLeft),
        ..enc_mask
    };
    let cross_mask = AttentionSizes {
        len_q: ty,
        len_k: tx,
        ..enc_mask
    };
    let mut y = embed(tgt_name, &batch.tgt_in, ty);
    for l in 0..z.dec_layers {
        let pre = format!("decoder.layers.{l}");
        y = block(&y, &format!("{pre}.self_attn_layer_norm"), &|x| {
            attn(x, x, &format!("{pre}.self_attn"), &self_mask)
        });
        y = block(&y, &format!("{pre}.encoder_attn_layer_norm"), &|x| {
            attn(x, &mem, &format!("{pre}.encoder_attn"), &cross_mask)
        });
        y = block(&y, &format!("{pre}.final_layer_norm"), &|x| ff(x, &pre));
    }
    if z.pre_ln {
        y = ln(&y, None, "decoder.layer_norm");
    }
    let logits = linear_f64(&y, d, p(out_name), z.vocab, None, Activation::None);
    cross_entropy(&logits, z.vocab, &batch.tgt_out, -100, smoothing)
}

fn heads_view(t: &[f64], width: usize, heads: usize) -> HeadsRef<'_, f64> {
    HeadsRef {
        data: t,
        width,
        col: 0,
        heads,
        dim: width / heads,
    }
}

/// Sizes of [`gpt3_lm_loss`]: the decoder-only model of [`crate::runtime::seq2seq::gpt3`].
#[derive(Clone, Debug)]
pub struct Gpt3Sizes {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    /// Per layer: `true` for a local layer.
    pub local: Vec<bool>,
    pub window: usize,
    pub ln_eps: f32,
}

/// The decoder-only model's mean next-token cross-entropy on `batch` right-padded sequences
/// of `len` tokens, from GPT-Neo's equations: token plus position embeddings, pre-LN blocks
/// x + attn(ln_1(x)), x + mlp(ln_2(x)) with causal unscaled attention (local layers: query i
/// sees keys i − window < j ≤ i), Q/K/V without bias, gelu_new MLP, final ln_f, logits
/// x·wteᵀ.
pub fn gpt3_lm_loss(
    p: Lookup<'_, '_>,
    z: &Gpt3Sizes,
    ids: &[u32],
    labels: &[i64],
    batch: usize,
    len: usize,
) -> f64 {
    let d = z.d_model;
    let wte = p("transformer.wte.weight");
    let wpe = p("transformer.wpe.weight");
    let mut x: Vec<f64> = (0..batch * len)
        .flat_map(|r| {
            let (t, pos) = (ids[r] as usize, r % len);
            (0..d).map(move |i| wte[t * d + i] + wpe[pos * d + i])
        })
        .collect();
    let lin = |x: &[f64], name: &str, out: usize, bias: bool, act: Activation| -> Vec<f64> {
        let w = p(&format!("{name}.weight"));
        let b = bias.then(|| p(&format!("{name}.bias")));
        linear_f64(x, w.len() / out, w, out, b, act)
    };
    let ln = |x: &[f64], name: &str| -> Vec<f64> {
        layer_norm_f64(
            x,
            None,
            d,
            p(&format!("{name}.weight")),
            p(&format!("{name}.bias")),
            z.ln_eps,
        )
    };
    for (l, &local) in z.local.iter().enumerate() {
        let pre = format!("transformer.h.{l}");
        let a = format!("{pre}.attn.attention");
        let sizes = AttentionSizes {
            batch,
            len_q: len,
            len_k: len,
            key_lens: None,
            causal: Some(CausalAlign::TopLeft),
            window: local
                .then(|| crate::key_band::Window::new(z.window - 1, 0, CausalAlign::TopLeft)),
            scale: 1.0,
        };
        let h = ln(&x, &format!("{pre}.ln_1"));
        let q = lin(&h, &format!("{a}.q_proj"), d, false, Activation::None);
        let k = lin(&h, &format!("{a}.k_proj"), d, false, Activation::None);
        let v = lin(&h, &format!("{a}.v_proj"), d, false, Activation::None);
        let (o, _) = attention_with(
            heads_view(&q, d, z.heads),
            heads_view(&k, d, z.heads),
            heads_view(&v, d, z.heads),
            &sizes,
            None,
        );
        let o = lin(&o, &format!("{a}.out_proj"), d, true, Activation::None);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        let h = ln(&x, &format!("{pre}.ln_2"));
        let ff = p(&format!("{pre}.mlp.c_fc.bias")).len();
        let m = lin(
            &h,
            &format!("{pre}.mlp.c_fc"),
            ff,
            true,
            Activation::GeluTanh,
        );
        let m = lin(&m, &format!("{pre}.mlp.c_proj"), d, true, Activation::None);
        x.iter_mut().zip(&m).for_each(|(x, m)| *x += m);
    }
    let x = ln(&x, "transformer.ln_f");
    let logits = linear_f64(&x, d, wte, z.vocab, None, Activation::None);
    cross_entropy(&logits, z.vocab, labels, -100, 0.0)
}

/// One LSTM step (PyTorch's `nn.LSTMCell`) from gi = x·W_ihᵀ + b_ih and gh = h·W_hhᵀ + b_hh
/// (`[batch, 4H]`, blocks i, f, g, o): returns (h', c').
pub fn lstm_cell(gi: &[f64], gh: &[f64], c: &[f64], hidden: usize) -> (Vec<f64>, Vec<f64>) {
    let hd = hidden;
    let mut h_out = vec![0.0; c.len()];
    let mut c_out = vec![0.0; c.len()];
    for b in 0..c.len() / hd {
        let (gi, gh) = (&gi[b * 4 * hd..], &gh[b * 4 * hd..]);
        for u in 0..hd {
            let i = sigmoid(gi[u] + gh[u]);
            let f = sigmoid(gi[hd + u] + gh[hd + u]);
            let g = (gi[2 * hd + u] + gh[2 * hd + u]).tanh();
            let o = sigmoid(gi[3 * hd + u] + gh[3 * hd + u]);
            let cn = f * c[b * hd + u] + i * g;
            c_out[b * hd + u] = cn;
            h_out[b * hd + u] = o * cn.tanh();
        }
    }
    (h_out, c_out)
}

/// One LSTM step with its weights (`nn.LSTMCell`): x `[batch, in]`, h and c `[batch, H]`,
/// W_ih `[4H, in]`, W_hh `[4H, H]`; returns (h', c').
#[allow(clippy::too_many_arguments)]
pub fn lstm_step(
    x: &[f64],
    h: &[f64],
    c: &[f64],
    w_ih: &[f64],
    w_hh: &[f64],
    b_ih: &[f64],
    b_hh: &[f64],
    hidden: usize,
) -> (Vec<f64>, Vec<f64>) {
    let inp = w_ih.len() / (4 * hidden);
    let gi = linear_f64(x, inp, w_ih, 4 * hidden, Some(b_ih), Activation::None);
    let gh = linear_f64(h, hidden, w_hh, 4 * hidden, Some(b_hh), Activation::None);
    lstm_cell(&gi, &gh, c, hidden)
}
