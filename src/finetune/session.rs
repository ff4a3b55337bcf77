//! The training runtime's `BertForSequenceClassification` (gradients, AdamW, clipping) behind
//! the loop's [`ClassifierTraining`]: a model, its optimizer and the gradients accumulated
//! since the last optimizer step, on one [`TrainBackend`]; with f16 activations, dynamic loss
//! scaling ([`LossScaler`]).

use super::export::{write_safetensors, NamedTensor};
use super::trainer::{decays, ClassifierTraining, TrainOptions};
use crate::error::{Error, Result};
use crate::runtime::tokenizer::TokenBatch;
use crate::runtime::train::{
    AdamW, AdamWConfig, BertForSequenceClassification, Gradients, Head, StepOptions, TrainBackend,
};
use std::path::Path;

/// Which head a run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadChoice {
    /// The folder's `classifier.*`, labels from its config.
    Existing,
    /// A new head of `num_labels` classes, initialised as Hugging Face does.
    New { num_labels: usize },
}

/// Dynamic loss scaling for f16 activations, with the defaults of PyTorch's `GradScaler`:
/// dL/dlogits is multiplied by the scale (2^16 at first) so that small gradients do not
/// underflow f16; the parameter gradients (f32) are divided by it again. A step whose
/// gradients are not finite is skipped and the scale halved; after 2000 steps in a row
/// without one, the scale doubles.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    /// Finite steps since the last change of scale.
    good_steps: u32,
    /// Optimizer steps skipped so far (1-based step numbers) and the scale each ran at.
    pub skipped: Vec<(usize, f32)>,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good_steps: 0,
            skipped: Vec::new(),
        }
    }
}

impl LossScaler {
    const GROWTH_INTERVAL: u32 = 2000;

    /// After a step's gradients: whether they were finite (then the step is taken), updating
    /// the scale; `step` numbers the optimizer step for the record.
    pub fn update(&mut self, finite: bool, step: usize) -> bool {
        if !finite {
            self.skipped.push((step, self.scale));
            self.scale = (self.scale * 0.5).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.good_steps = 0;
            if (self.scale * 2.0).is_finite() {
                self.scale *= 2.0;
            }
        }
        true
    }
}

/// Hears of every step skipped for non-finite gradients, in words.
type SkipLog<'b> = Box<dyn FnMut(&str) + 'b>;

/// A model under training on backend `B`.
pub struct BertTrainee<'b, B: TrainBackend> {
    be: &'b B,
    pub model: BertForSequenceClassification<B>,
    optimizer: AdamW<B::Tensor>,
    grads: Option<Gradients<B::Tensor>>,
    scaler: Option<LossScaler>,
    /// The global norm of the accumulated gradients, when clipping computed it this step.
    norm: Option<f64>,
    /// Optimizer steps taken or skipped.
    steps: usize,
    on_skip: Option<SkipLog<'b>>,
}

impl<'b, B: TrainBackend> BertTrainee<'b, B> {
    /// Loads `dir` with the chosen head (a new one is seeded by `opts.seed`) and sets up AdamW
    /// with PyTorch's defaults (betas 0.9/0.999, eps 1e-8) and `opts.weight_decay`.
    pub fn load(be: &'b B, dir: &Path, head: HeadChoice, opts: &TrainOptions) -> Result<Self> {
        let head = match head {
            HeadChoice::Existing => Head::FromCheckpoint,
            HeadChoice::New { num_labels } => Head::New {
                num_labels,
                seed: opts.seed,
            },
        };
        let mut model = BertForSequenceClassification::from_folder(be, dir, head)?;
        // The Trainer's rule, whatever the runtime's default flags are.
        for p in model.parameters_mut() {
            p.decay = decays(&p.name);
        }
        let optimizer = AdamW::new(
            be,
            model.parameters(),
            AdamWConfig {
                lr: opts.lr as f32,
                weight_decay: opts.weight_decay as f32,
                ..AdamWConfig::default()
            },
        )?;
        Ok(BertTrainee {
            be,
            model,
            optimizer,
            grads: None,
            scaler: None,
            norm: None,
            steps: 0,
            on_skip: None,
        })
    }

    /// Turns on dynamic loss scaling (for f16 activations); `on_skip` hears of every skipped
    /// step, in words (the log).
    pub fn with_loss_scaling(mut self, on_skip: impl FnMut(&str) + 'b) -> Self {
        self.scaler = Some(LossScaler::default());
        self.on_skip = Some(Box::new(on_skip));
        self
    }

    /// The loss scaler, when loss scaling is on.
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    pub fn max_positions(&self) -> usize {
        self.model.config.bert.max_position_embeddings
    }

    /// Writes every parameter as f32 safetensors under its Hugging Face name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let host = self.model.to_host(self.be)?;
        let tensors: Vec<NamedTensor<'_>> = host
            .iter()
            .map(|(name, p)| NamedTensor {
                name: name.clone(),
                shape: p.shape.clone(),
                values: &p.values,
            })
            .collect();
        write_safetensors(path, &tensors)
    }
}

impl<B: TrainBackend> ClassifierTraining for BertTrainee<'_, B> {
    fn accumulate(
        &mut self,
        batch: &TokenBatch,
        labels: &[usize],
        scale: f32,
        seed: u64,
        micro_batch: u64,
    ) -> Result<f64> {
        let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let loss_scale = self.scaler.as_ref().map(|s| s.scale);
        let opts = StepOptions {
            dropout_seed: Some(seed),
            step: micro_batch,
            loss_scale,
            ..StepOptions::default()
        };
        let mut out = self
            .model
            .forward_backward(self.be, batch, &labels, &opts)?;
        // The parameter gradients are f32: unscaling there loses nothing.
        let scale = scale / loss_scale.unwrap_or(1.0);
        if scale != 1.0 {
            out.grads.scale(self.be, scale)?;
        }
        match &mut self.grads {
            Some(acc) => acc.accumulate(self.be, &out.grads)?,
            None => self.grads = Some(out.grads),
        }
        Ok(out.loss as f64)
    }

    fn logits(&mut self, batch: &TokenBatch) -> Result<Vec<f32>> {
        let z = self.model.logits(self.be, batch)?;
        self.be.to_f32(&z)
    }

    fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let grads = self
            .grads
            .as_mut()
            .ok_or_else(|| Error::invalid("grads", "no gradients to clip"))?;
        let norm = grads.clip_global_norm(self.be, max_norm as f32)?;
        self.norm = Some(norm);
        Ok(norm)
    }

    fn optimizer_step(&mut self, lr: f64) -> Result<()> {
        let grads = self
            .grads
            .take()
            .ok_or_else(|| Error::invalid("grads", "an optimizer step without gradients"))?;
        self.steps += 1;
        let norm = self.norm.take();
        if let Some(scaler) = &mut self.scaler {
            let norm = match norm {
                Some(n) => n,
                None => grads.global_norm(self.be)?,
            };
            let at = scaler.scale;
            if !scaler.update(norm.is_finite(), self.steps) {
                if let Some(log) = &mut self.on_skip {
                    log(&format!(
                        "step {}: gradients not finite at loss scale {at}: step skipped, \
                         scale now {}",
                        self.steps, scaler.scale
                    ));
                }
                return Ok(());
            }
        }
        self.optimizer
            .step(self.be, self.model.parameters_mut(), &grads, lr as f32)
    }

    fn num_labels(&self) -> usize {
        self.model.config.num_labels
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn loss_scaler_halves_and_skips_on_overflow_and_doubles_after_2000_finite_steps() {
        let mut s = LossScaler::default();
        assert_eq!(s.scale, 65536.0);
        assert!(!s.update(false, 1));
        assert_eq!((s.scale, s.skipped.clone()), (32768.0, vec![(1, 65536.0)]));
        for step in 2..2001 {
            assert!(s.update(true, step));
        }
        assert_eq!(s.scale, 32768.0, "1999 finite steps: not yet");
        assert!(s.update(true, 2001));
        assert_eq!(
            s.scale, 65536.0,
            "the 2000th finite step in a row doubles it"
        );
        // An overflow resets the count.
        for step in 2002..2100 {
            s.update(true, step);
        }
        assert!(!s.update(false, 2100));
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.skipped.len(), 2);
    }
}
