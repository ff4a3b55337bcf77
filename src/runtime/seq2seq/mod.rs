//! Sequence-to-sequence models trained from scratch on the runtime's [`TrainBackend`]:
//! Bahdanau et al.'s (2015) bidirectional-GRU encoder with additive attention and a GRU
//! decoder, or LSTMs in both places ([`bahdanau`]), and Vaswani et al.'s (2017) encoder-decoder Transformer
//! ([`transformer`]); a decoder-only model with GPT-3's alternating dense and local attention
//! in GPT-Neo's layout ([`gpt3`]), saved as a Hugging Face folder by [`hf_export`]; the
//! generated digit tasks they learn ([`tasks`]). `docs/training.md`
//! describes both; `examples/seq2seq.rs` trains them.
//!
//! Both models read a [`Seq2SeqBatch`] (batch-major token ids with their lengths) and give the
//! mean cross-entropy of the target tokens with the gradient of every named parameter
//! ([`Seq2Seq::loss_and_grads`]), and greedy decodes with the attention of each output step
//! over the source ([`Seq2Seq::greedy`]).

pub mod bahdanau;
pub mod gpt3;
pub mod hf_export;
pub mod tasks;
pub mod text;
pub mod transformer;

pub use bahdanau::{Bahdanau, BahdanauConfig, Cell};
pub use gpt3::{Gpt3, Gpt3Config};
pub use transformer::{Transformer, TransformerConfig};

use crate::error::{Error, Result};
use crate::runtime::train::{CrossEntropy, Gradients, Param, TrainBackend};
use rand::rngs::SmallRng;
use rand::Rng;

/// Padding (no embedding gradient, no loss).
pub const PAD: u32 = 0;
/// Beginning of the target: the decoder's first input.
pub const BOS: u32 = 1;
/// End of a sequence: appended to every source and target.
pub const EOS: u32 = 2;

/// Token ids of one batch, batch-major (row `b·len + t`), padded with [`PAD`].
#[derive(Clone, Debug, PartialEq)]
pub struct Seq2SeqBatch {
    pub batch: usize,
    /// `[batch·src_len]`: each source followed by [`EOS`].
    pub src: Vec<u32>,
    pub src_len: usize,
    /// Valid source tokens per sequence (its EOS included).
    pub src_lens: Vec<usize>,
    /// `[batch·tgt_len]`: [`BOS`] then the target (the decoder's inputs).
    pub tgt_in: Vec<u32>,
    /// `[batch·tgt_len]`: the target then [`EOS`]; −100 (ignored) at padding.
    pub tgt_out: Vec<i64>,
    pub tgt_len: usize,
}

impl Seq2SeqBatch {
    /// A batch of (source, target) token sequences (without BOS/EOS; none may be empty of
    /// room: both get one more token).
    pub fn from_pairs(pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Self> {
        if pairs.is_empty() {
            return Err(Error::invalid("pairs", "an empty batch"));
        }
        let batch = pairs.len();
        let src_len = pairs.iter().map(|(s, _)| s.len() + 1).max().unwrap_or(1);
        let tgt_len = pairs.iter().map(|(_, t)| t.len() + 1).max().unwrap_or(1);
        let mut out = Seq2SeqBatch {
            batch,
            src: vec![PAD; batch * src_len],
            src_len,
            src_lens: Vec::with_capacity(batch),
            tgt_in: vec![PAD; batch * tgt_len],
            tgt_out: vec![-100; batch * tgt_len],
            tgt_len,
        };
        for (b, (s, t)) in pairs.iter().enumerate() {
            if let Some(&bad) = s.iter().chain(t).find(|&&id| id <= EOS) {
                return Err(Error::invalid(
                    "pairs",
                    format!("token {bad} is reserved (PAD, BOS, EOS)"),
                ));
            }
            out.src[b * src_len..][..s.len()].copy_from_slice(s);
            out.src[b * src_len + s.len()] = EOS;
            out.src_lens.push(s.len() + 1);
            out.tgt_in[b * tgt_len] = BOS;
            out.tgt_in[b * tgt_len + 1..][..t.len()].copy_from_slice(t);
            for (i, &y) in t.iter().enumerate() {
                out.tgt_out[b * tgt_len + i] = y as i64;
            }
            out.tgt_out[b * tgt_len + t.len()] = EOS as i64;
        }
        Ok(out)
    }

    /// Checks the ids against a vocabulary and the lengths against the layout.
    pub fn check(&self, vocab: usize) -> Result<()> {
        let (b, tx, ty) = (self.batch, self.src_len, self.tgt_len);
        if b == 0 || tx == 0 || ty == 0 {
            return Err(Error::invalid("batch", "empty batch or sequences"));
        }
        if self.src.len() != b * tx || self.src_lens.len() != b {
            return Err(Error::shape(
                "src",
                format!("[{b}·{tx}]"),
                &[self.src.len()],
            ));
        }
        if self.tgt_in.len() != b * ty || self.tgt_out.len() != b * ty {
            return Err(Error::shape(
                "tgt_in",
                format!("[{b}·{ty}]"),
                &[self.tgt_in.len()],
            ));
        }
        if let Some(&l) = self.src_lens.iter().find(|&&l| l == 0 || l > tx) {
            return Err(Error::invalid(
                "src_lens",
                format!("length {l} outside 1..={tx}"),
            ));
        }
        if let Some(&bad) = self
            .src
            .iter()
            .chain(&self.tgt_in)
            .find(|&&id| id as usize >= vocab)
        {
            return Err(Error::invalid(
                "batch",
                format!("token {bad} outside the vocabulary of {vocab}"),
            ));
        }
        if let Some(&bad) = self
            .tgt_out
            .iter()
            .find(|&&y| y != -100 && (y < 0 || y as usize >= vocab))
        {
            return Err(Error::invalid(
                "tgt_out",
                format!("label {bad} outside the vocabulary of {vocab}"),
            ));
        }
        Ok(())
    }
}

/// One greedy decode: the tokens up to (without) EOS, and for each output step the attention
/// weights over the source positions (EOS included): `attention[i][j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub tokens: Vec<u32>,
    pub attention: Vec<Vec<f32>>,
}

/// What both models offer the training loop.
pub trait Seq2Seq<B: TrainBackend> {
    /// `bahdanau` or `transformer`.
    fn arch(&self) -> &'static str;
    fn parameters(&self) -> &[Param<B::Tensor>];
    fn parameters_mut(&mut self) -> &mut [Param<B::Tensor>];
    /// Mean cross-entropy of the target tokens (teacher forcing) and the gradient of every
    /// parameter, in parameter order.
    fn loss_and_grads(
        &self,
        be: &B,
        batch: &Seq2SeqBatch,
        ce: &CrossEntropy,
    ) -> Result<(f32, Gradients<B::Tensor>)>;
    /// Greedy decoding of each source (tokens without EOS) for at most `max_len` steps.
    fn greedy(&self, be: &B, sources: &[Vec<u32>], max_len: usize) -> Result<Vec<Decoded>>;
}

/// Parameters under construction: names, values drawn from one seeded generator.
pub(crate) struct ParamBuilder<'b, B: TrainBackend> {
    be: &'b B,
    pub params: Vec<Param<B::Tensor>>,
    rng: SmallRng,
}

impl<'b, B: TrainBackend> ParamBuilder<'b, B> {
    pub fn new(be: &'b B, seed: u64) -> Self {
        use rand::SeedableRng;
        ParamBuilder {
            be,
            params: Vec::new(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// A parameter of `shape` with values uniform in ±`bound`; returns its index.
    pub fn uniform(
        &mut self,
        name: String,
        shape: &[usize],
        bound: f32,
        decay: bool,
    ) -> Result<usize> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if bound > 0.0 {
                    self.rng.gen_range(-bound..bound)
                } else {
                    0.0
                }
            })
            .collect();
        self.push(name, shape, v, decay)
    }

    /// A parameter of `shape` filled with `value`.
    pub fn constant(
        &mut self,
        name: String,
        shape: &[usize],
        value: f32,
        decay: bool,
    ) -> Result<usize> {
        let n: usize = shape.iter().product();
        self.push(name, shape, vec![value; n], decay)
    }

    fn push(&mut self, name: String, shape: &[usize], v: Vec<f32>, decay: bool) -> Result<usize> {
        self.params.push(Param {
            name,
            value: self.be.upload_as(shape, &v, crate::DType::F32)?,
            decay,
        });
        Ok(self.params.len() - 1)
    }
}

/// Gradients gathered per parameter index during a backward pass (a parameter used several
/// times gets the sum).
pub(crate) struct GradAcc<T> {
    slots: Vec<Option<T>>,
}

impl<T> GradAcc<T> {
    pub fn new(n: usize) -> Self {
        GradAcc {
            slots: (0..n).map(|_| None).collect(),
        }
    }

    pub fn add<B: TrainBackend<Tensor = T>>(&mut self, be: &B, i: usize, g: T) -> Result<()> {
        match &mut self.slots[i] {
            Some(acc) => be.accumulate(acc, &g),
            slot => {
                *slot = Some(g);
                Ok(())
            }
        }
    }

    /// The gradients in parameter order; a parameter that got none gets zeros.
    pub fn finish<B: TrainBackend<Tensor = T>>(
        self,
        be: &B,
        params: &[Param<T>],
    ) -> Result<Gradients<T>> {
        let tensors = self
            .slots
            .into_iter()
            .zip(params)
            .map(|(g, p)| match g {
                Some(g) => Ok(g),
                None => be.zeros(be.shape(&p.value)),
            })
            .collect::<Result<Vec<T>>>()?;
        Ok(Gradients {
            names: params.iter().map(|p| p.name.clone()).collect(),
            tensors,
            no_grad: Vec::new(),
        })
    }
}

/// `[steps·batch, width]` from per-step `[batch, width]` tensors: time-major (row t·batch + b)
/// or batch-major (row b·steps + t). Through the host: a row permutation the trait has no op
/// for (a device backend would add one).
pub(crate) fn stack_steps<B: TrainBackend>(
    be: &B,
    parts: &[&B::Tensor],
    batch_major: bool,
) -> Result<B::Tensor> {
    let Some(first) = parts.first() else {
        return Err(Error::invalid("parts", "nothing to stack"));
    };
    let (batch, width) = match be.shape(first) {
        [b, w] => (*b, *w),
        s => return Err(Error::shape("parts", "[batch, width]", s)),
    };
    let steps = parts.len();
    let mut out = vec![0f32; steps * batch * width];
    for (t, p) in parts.iter().enumerate() {
        if be.shape(p) != [batch, width] {
            return Err(Error::shape(
                "parts",
                format!("[{batch}, {width}]"),
                be.shape(p),
            ));
        }
        let v = be.to_f32(p)?;
        for b in 0..batch {
            let row = if batch_major {
                b * steps + t
            } else {
                t * batch + b
            };
            out[row * width..(row + 1) * width].copy_from_slice(&v[b * width..(b + 1) * width]);
        }
    }
    be.upload(&[steps * batch, width], &out)
}

/// The inverse of [`stack_steps`]: `steps` tensors `[batch, width]`.
pub(crate) fn unstack_steps<B: TrainBackend>(
    be: &B,
    x: &B::Tensor,
    steps: usize,
    batch_major: bool,
) -> Result<Vec<B::Tensor>> {
    let (rows, width) = match be.shape(x) {
        [r, w] if steps > 0 && r % steps == 0 => (*r, *w),
        s => return Err(Error::shape("x", format!("[{steps}·batch, width]"), s)),
    };
    let batch = rows / steps;
    let v = be.to_f32(x)?;
    (0..steps)
        .map(|t| {
            let mut part = vec![0f32; batch * width];
            for b in 0..batch {
                let row = if batch_major {
                    b * steps + t
                } else {
                    t * batch + b
                };
                part[b * width..(b + 1) * width]
                    .copy_from_slice(&v[row * width..(row + 1) * width]);
            }
            be.upload(&[batch, width], &part)
        })
        .collect()
}

/// Index of the largest value of each `[rows, classes]` row (the first on ties).
pub(crate) fn argmax_rows(values: &[f32], classes: usize) -> Vec<u32> {
    values
        .chunks(classes)
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}
