//! The fine-tuning loop, with the semantics of the Hugging Face Trainer:
//! - each epoch visits the training examples once, shuffled by a seeded generator (or in file
//!   order), in micro-batches of `batch_size` padded to their longest sequence;
//! - an optimizer step accumulates the gradients of `grad_accum` micro-batches, each one's
//!   mean cross-entropy scaled by 1/(micro-batches in the step), so that with equal batch
//!   sizes the step's gradient is that of the mean over all its examples;
//! - the global gradient norm is clipped to `max_grad_norm` (0: off), then AdamW updates every
//!   parameter at the scheduled rate, with weight decay only on parameters that are neither
//!   biases nor LayerNorm weights;
//! - `max_steps`, when set, is the number of optimizer steps (the data is cycled as needed,
//!   and the schedule decays over exactly those steps), as `TrainingArguments.max_steps`;
//! - the evaluation file, if any, is scored at the end of every epoch and after the last step.
//!
//! The model is reached through [`ClassifierTraining`], which the training runtime's
//! `BertForSequenceClassification` implements; the loop itself is tested here with a small
//! model whose gradients are known in closed form.

use super::data::Example;
use super::schedule::LrSchedule;
use super::train_log::{EvalMetrics, StepRecord};
use crate::error::{Error, Result};
use crate::runtime::tokenizer::TokenBatch;
use rand::{seq::SliceRandom, SeedableRng};

/// What the loop needs from a classification model under training.
pub trait ClassifierTraining {
    /// Forward and backward of one micro-batch with dropout (stream `(seed, micro_batch)`):
    /// returns its mean cross-entropy and ADDS `scale` × its gradient to the accumulated
    /// gradients.
    fn accumulate(
        &mut self,
        batch: &TokenBatch,
        labels: &[usize],
        scale: f32,
        seed: u64,
        micro_batch: u64,
    ) -> Result<f64>;

    /// Logits `[batch, classes]` without dropout and without touching the gradients.
    fn logits(&mut self, batch: &TokenBatch) -> Result<Vec<f32>>;

    /// Scales the accumulated gradients so their global L2 norm is at most `max_norm` (as
    /// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64>;

    /// One AdamW step at rate `lr` (weight decay, set when the optimizer was built, on the
    /// parameters [`decays`] selects), then clears the accumulated gradients.
    fn optimizer_step(&mut self, lr: f64) -> Result<()>;

    fn num_labels(&self) -> usize;
}

/// Whether a parameter gets weight decay: the Hugging Face Trainer exempts every parameter
/// whose (lower-cased) name contains `bias`, `layernorm` or `rmsnorm`.
pub fn decays(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !["bias", "layernorm", "rmsnorm"]
        .iter()
        .any(|f| n.contains(f))
}

/// The hyper-parameters of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub schedule: super::schedule::ScheduleKind,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub eval_batch_size: usize,
}

impl TrainOptions {
    /// Checks every number a user can get wrong; each error names its option.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be ≥ 1"));
        }
        if self.grad_accum == 0 {
            return Err(Error::invalid("grad_accum", "must be ≥ 1"));
        }
        if self.eval_batch_size == 0 {
            return Err(Error::invalid("eval_batch_size", "must be ≥ 1"));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(Error::invalid(
                "epochs",
                "must be ≥ 1 (or give --max-steps)",
            ));
        }
        if self.max_steps == Some(0) {
            return Err(Error::invalid("max_steps", "must be ≥ 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("{} is not a finite rate > 0", self.lr),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::invalid(
                "weight_decay",
                format!("{} is not a finite value ≥ 0", self.weight_decay),
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(Error::invalid(
                "max_grad_norm",
                format!(
                    "{} is not a finite value ≥ 0 (0 turns clipping off)",
                    self.max_grad_norm
                ),
            ));
        }
        Ok(())
    }

    /// Optimizer steps per epoch for `examples` training examples (a last partial group of
    /// micro-batches still makes a step).
    pub fn steps_per_epoch(&self, examples: usize) -> usize {
        examples
            .div_ceil(self.batch_size)
            .div_ceil(self.grad_accum)
            .max(1)
    }

    /// Total optimizer steps of the run.
    pub fn total_steps(&self, examples: usize) -> usize {
        self.max_steps
            .unwrap_or(self.epochs * self.steps_per_epoch(examples))
    }
}

/// What a run returns: a record per optimizer step and the last evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    pub records: Vec<StepRecord>,
    pub final_eval: Option<EvalMetrics>,
}

/// Mean cross-entropy and accuracy of `model` on `examples`.
pub fn evaluate<M: ClassifierTraining>(
    model: &mut M,
    encode: &dyn Fn(&[&str]) -> Result<TokenBatch>,
    examples: &[Example],
    batch_size: usize,
) -> Result<EvalMetrics> {
    if examples.is_empty() {
        return Err(Error::invalid("eval", "no evaluation examples"));
    }
    if batch_size == 0 {
        return Err(Error::invalid("eval_batch_size", "must be ≥ 1"));
    }
    let k = model.num_labels();
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for chunk in examples.chunks(batch_size) {
        let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
        let logits = model.logits(&encode(&texts)?)?;
        if logits.len() != chunk.len() * k {
            return Err(Error::shape(
                "logits",
                format!("[{}, {k}]", chunk.len()),
                &[logits.len()],
            ));
        }
        for (e, z) in chunk.iter().zip(logits.chunks(k)) {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            loss += lse - z[e.label] as f64;
            let best = (0..k).fold(0, |b, j| if z[j] > z[b] { j } else { b });
            correct += usize::from(best == e.label);
        }
    }
    let n = examples.len() as f64;
    Ok(EvalMetrics {
        loss: loss / n,
        accuracy: correct as f64 / n,
    })
}

/// Trains `model` on `train`; `encode` tokenizes a micro-batch (padded to its longest);
/// `on_step` sees every step's record as it completes (a progress bar).
pub fn train<M: ClassifierTraining>(
    model: &mut M,
    encode: &dyn Fn(&[&str]) -> Result<TokenBatch>,
    train: &[Example],
    eval: Option<&[Example]>,
    opts: &TrainOptions,
    mut on_step: impl FnMut(&StepRecord, usize),
) -> Result<TrainReport> {
    opts.validate()?;
    if train.is_empty() {
        return Err(Error::invalid("train", "no training examples"));
    }
    // Every step frees and reallocates the same activations: on the CPU, keep their buffers.
    let _keep = crate::runtime::cpu::KeepOpBuffers::new();
    let k = model.num_labels();
    if let Some(bad) = train
        .iter()
        .chain(eval.unwrap_or(&[]))
        .find(|e| e.label >= k)
    {
        return Err(Error::invalid(
            "labels",
            format!("label id {} for a head of {k} classes", bad.label),
        ));
    }
    let total = opts.total_steps(train.len());
    let schedule = LrSchedule::new(opts.lr, opts.warmup_steps, total, opts.schedule)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut records = Vec::with_capacity(total);
    let mut final_eval = None;
    let (mut step, mut micro, mut epoch) = (0usize, 0u64, 0usize);
    while step < total {
        epoch += 1;
        let mut order: Vec<usize> = (0..train.len()).collect();
        if opts.shuffle {
            order.shuffle(&mut rng);
        }
        let batches: Vec<&[usize]> = order.chunks(opts.batch_size).collect();
        for group in batches.chunks(opts.grad_accum) {
            if step >= total {
                break;
            }
            let start = std::time::Instant::now();
            let scale = 1.0 / group.len() as f32;
            let (mut loss, mut seen) = (0.0, 0);
            for idx in group {
                let texts: Vec<&str> = idx.iter().map(|&i| train[i].text.as_str()).collect();
                let labels: Vec<usize> = idx.iter().map(|&i| train[i].label).collect();
                let batch = encode(&texts)?;
                let l = model.accumulate(&batch, &labels, scale, opts.seed, micro)?;
                if !l.is_finite() {
                    return Err(Error::invalid(
                        "loss",
                        format!(
                            "step {}: the loss is {l} (learning rate too high?)",
                            step + 1
                        ),
                    ));
                }
                loss += l / group.len() as f64;
                seen += idx.len();
                micro += 1;
            }
            if opts.max_grad_norm > 0.0 {
                model.clip_grad_norm(opts.max_grad_norm)?;
            }
            let lr = schedule.lr(step);
            model.optimizer_step(lr)?;
            step += 1;
            records.push(StepRecord {
                step,
                epoch,
                loss,
                lr,
                samples_per_s: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
                eval: None,
            });
            on_step(records.last().expect("just pushed"), total);
        }
        // Here an epoch has ended or the last step was taken (or both): evaluate.
        if let Some(ev) = eval {
            let m = evaluate(model, encode, ev, opts.eval_batch_size)?;
            if let Some(r) = records.last_mut() {
                r.eval = Some(m);
            }
            final_eval = Some(m);
        }
    }
    Ok(TrainReport {
        records,
        final_eval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetune::schedule::ScheduleKind;

    /// Softmax regression on the mean of one-hot token ids (vocabulary `v`): a model whose
    /// gradient is exact in a few lines, trained by plain SGD (the loop passes the rate).
    struct Toy {
        v: usize,
        k: usize,
        w: Vec<f64>,
        g: Vec<f64>,
        seen_labels: Vec<usize>,
        clips: Vec<f64>,
    }

    impl Toy {
        fn new(v: usize, k: usize) -> Self {
            Toy {
                v,
                k,
                w: vec![0.0; v * k],
                g: vec![0.0; v * k],
                seen_labels: Vec::new(),
                clips: Vec::new(),
            }
        }
        fn features(&self, batch: &TokenBatch, b: usize) -> Vec<f64> {
            let mut x = vec![0.0; self.v];
            let n = batch.lens[b];
            for &id in &batch.ids[b * batch.len..b * batch.len + n] {
                x[id as usize] += 1.0 / n as f64;
            }
            x
        }
        fn z(&self, x: &[f64]) -> Vec<f64> {
            (0..self.k)
                .map(|c| (0..self.v).map(|i| self.w[c * self.v + i] * x[i]).sum())
                .collect()
        }
    }

    impl ClassifierTraining for Toy {
        fn accumulate(
            &mut self,
            batch: &TokenBatch,
            labels: &[usize],
            scale: f32,
            _seed: u64,
            _micro: u64,
        ) -> Result<f64> {
            self.seen_labels.extend_from_slice(labels);
            let n = labels.len() as f64;
            let mut loss = 0.0;
            for (b, &y) in labels.iter().enumerate() {
                let x = self.features(batch, b);
                let z = self.z(&x);
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
                loss += m + s.ln() - z[y];
                for (c, (zc, g)) in z.iter().zip(self.g.chunks_mut(self.v)).enumerate() {
                    let p = (zc - m).exp() / s - f64::from(u8::from(c == y));
                    for (g, xi) in g.iter_mut().zip(&x) {
                        *g += scale as f64 * p * xi / n;
                    }
                }
            }
            Ok(loss / n)
        }
        fn logits(&mut self, batch: &TokenBatch) -> Result<Vec<f32>> {
            Ok((0..batch.batch())
                .flat_map(|b| self.z(&self.features(batch, b)))
                .map(|v| v as f32)
                .collect())
        }
        fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
            let norm = self.g.iter().map(|g| g * g).sum::<f64>().sqrt();
            self.clips.push(norm);
            let c = (max_norm / (norm + 1e-6)).min(1.0);
            self.g.iter_mut().for_each(|g| *g *= c);
            Ok(norm)
        }
        fn optimizer_step(&mut self, lr: f64) -> Result<()> {
            for (w, g) in self.w.iter_mut().zip(&mut self.g) {
                *w -= lr * *g;
                *g = 0.0;
            }
            Ok(())
        }
        fn num_labels(&self) -> usize {
            self.k
        }
    }

    /// Token ids = bytes mod 16 (a stand-in tokenizer), padded with 0.
    fn encode(texts: &[&str]) -> Result<TokenBatch> {
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        let mut b = TokenBatch {
            ids: vec![0; texts.len() * len],
            type_ids: vec![0; texts.len() * len],
            lens: Vec::new(),
            len,
            truncated: Vec::new(),
        };
        for (i, t) in texts.iter().enumerate() {
            for (j, c) in t.bytes().enumerate() {
                b.ids[i * len + j] = (c % 16) as u32;
            }
            b.lens.push(t.len().max(1));
        }
        Ok(b)
    }

    fn data(n: usize) -> Vec<Example> {
        (0..n)
            .map(|i| Example {
                text: if i % 2 == 0 {
                    "abab".into()
                } else {
                    "cdc".into()
                },
                label: i % 2,
            })
            .collect()
    }

    fn opts() -> TrainOptions {
        TrainOptions {
            epochs: 2,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            lr: 0.5,
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: ScheduleKind::Constant,
            max_grad_norm: 0.0,
            seed: 7,
            shuffle: false,
            eval_batch_size: 3,
        }
    }

    #[test]
    fn accumulating_two_half_batches_equals_one_full_batch() {
        let train_data = data(8);
        let mut a = Toy::new(16, 2);
        train(&mut a, &encode, &train_data, None, &opts(), |_, _| {}).unwrap();
        let mut b = Toy::new(16, 2);
        let o = TrainOptions {
            batch_size: 2,
            grad_accum: 2,
            ..opts()
        };
        let rb = train(&mut b, &encode, &train_data, None, &o, |_, _| {}).unwrap();
        assert_eq!(rb.records.len(), 4);
        for (x, y) in a.w.iter().zip(&b.w) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
        assert!(a.w.iter().any(|w| w.abs() > 1e-3), "the model did not move");
    }

    #[test]
    fn max_steps_overrides_epochs_and_cycles_the_data() {
        let mut m = Toy::new(16, 2);
        let o = TrainOptions {
            max_steps: Some(5),
            epochs: 1,
            schedule: ScheduleKind::Linear,
            ..opts()
        };
        let r = train(&mut m, &encode, &data(8), None, &o, |_, _| {}).unwrap();
        let steps: Vec<(usize, usize)> = r.records.iter().map(|s| (s.step, s.epoch)).collect();
        assert_eq!(steps, [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]);
        // Linear decay over exactly the 5 steps.
        assert!((r.records[0].lr - 0.5).abs() < 1e-12);
        assert!((r.records[4].lr - 0.1).abs() < 1e-12);
        let o = TrainOptions {
            max_steps: Some(1),
            ..opts()
        };
        assert_eq!(
            train(&mut m, &encode, &data(8), None, &o, |_, _| {})
                .unwrap()
                .records
                .len(),
            1
        );
    }

    #[test]
    fn no_shuffle_keeps_file_order_and_shuffle_is_seeded() {
        let d: Vec<Example> = (0..10)
            .map(|i| Example {
                text: "ab".into(),
                label: i,
            })
            .collect();
        let mut m = Toy::new(16, 10);
        train(&mut m, &encode, &d, None, &opts(), |_, _| {}).unwrap();
        let file_order: Vec<usize> = (0..10).chain(0..10).collect();
        assert_eq!(m.seen_labels, file_order);
        let shuffled = |seed| {
            let mut m = Toy::new(16, 10);
            let o = TrainOptions {
                shuffle: true,
                seed,
                ..opts()
            };
            train(&mut m, &encode, &d, None, &o, |_, _| {}).unwrap();
            m.seen_labels
        };
        let (a, b, c) = (shuffled(1), shuffled(1), shuffled(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a[..10], a[10..], "each epoch gets its own order");
        let mut first = a[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn clipping_runs_only_when_enabled_and_eval_ends_every_epoch() {
        let mut m = Toy::new(16, 2);
        let ev = data(5);
        let r = train(&mut m, &encode, &data(8), Some(&ev), &opts(), |_, _| {}).unwrap();
        assert!(m.clips.is_empty());
        let evals: Vec<bool> = r.records.iter().map(|s| s.eval.is_some()).collect();
        assert_eq!(evals, [false, true, false, true]);
        let fe = r.final_eval.unwrap();
        assert_eq!(fe.accuracy, 1.0, "a separable toy problem is learned");
        assert!(fe.loss < std::f64::consts::LN_2);
        let o = TrainOptions {
            max_grad_norm: 1e-3,
            ..opts()
        };
        let mut m = Toy::new(16, 2);
        train(&mut m, &encode, &data(8), None, &o, |_, _| {}).unwrap();
        assert_eq!(m.clips.len(), 4);
        // After clipping to 1e-3 at rate 0.5 no weight can move more than 5e-4 per step.
        assert!(m.w.iter().all(|w| w.abs() <= 4.0 * 5e-4 + 1e-12));
    }

    #[test]
    fn loss_matches_the_model_and_bad_options_are_rejected() {
        let mut m = Toy::new(16, 2);
        let r = train(&mut m, &encode, &data(4), None, &opts(), |_, _| {}).unwrap();
        assert!((r.records[0].loss - std::f64::consts::LN_2).abs() < 1e-12);
        for (o, what) in [
            (
                TrainOptions {
                    batch_size: 0,
                    ..opts()
                },
                "batch_size",
            ),
            (TrainOptions { lr: 0.0, ..opts() }, "lr"),
            (TrainOptions { lr: -1.0, ..opts() }, "lr"),
            (
                TrainOptions {
                    lr: f64::NAN,
                    ..opts()
                },
                "lr",
            ),
            (
                TrainOptions {
                    grad_accum: 0,
                    ..opts()
                },
                "grad_accum",
            ),
            (
                TrainOptions {
                    max_steps: Some(0),
                    ..opts()
                },
                "max_steps",
            ),
            (
                TrainOptions {
                    weight_decay: -0.1,
                    ..opts()
                },
                "weight_decay",
            ),
            (
                TrainOptions {
                    max_grad_norm: f64::NAN,
                    ..opts()
                },
                "max_grad_norm",
            ),
        ] {
            let e = train(&mut m, &encode, &data(4), None, &o, |_, _| {}).unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        let bad = [Example {
            text: "a".into(),
            label: 2,
        }];
        let e = train(&mut m, &encode, &bad, None, &opts(), |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("label id 2"), "{e}");
    }

    #[test]
    fn weight_decay_skips_biases_and_layernorm_as_hf_does() {
        assert!(decays("bert.encoder.layer.0.attention.self.query.weight"));
        assert!(decays("classifier.weight"));
        assert!(decays("bert.embeddings.word_embeddings.weight"));
        assert!(!decays("classifier.bias"));
        assert!(!decays("bert.embeddings.LayerNorm.weight"));
        assert!(!decays("bert.encoder.layer.3.output.LayerNorm.gamma"));
    }
}
