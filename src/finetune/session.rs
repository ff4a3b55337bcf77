//! The training runtime's `BertForSequenceClassification` (gradients, AdamW, clipping) behind
//! the loop's [`ClassifierTraining`]: a model, its optimizer and the gradients accumulated
//! since the last optimizer step, on one [`TrainBackend`].

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

/// A model under training on backend `B`.
pub struct BertTrainee<'b, B: TrainBackend> {
    be: &'b B,
    pub model: BertForSequenceClassification<B>,
    optimizer: AdamW<B::Tensor>,
    grads: Option<Gradients<B::Tensor>>,
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
        })
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
        let opts = StepOptions {
            dropout_seed: Some(seed),
            step: micro_batch,
            ..StepOptions::default()
        };
        let mut out = self
            .model
            .forward_backward(self.be, batch, &labels, &opts)?;
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
        grads.clip_global_norm(self.be, max_norm as f32)
    }

    fn optimizer_step(&mut self, lr: f64) -> Result<()> {
        let grads = self
            .grads
            .take()
            .ok_or_else(|| Error::invalid("grads", "an optimizer step without gradients"))?;
        self.optimizer
            .step(self.be, self.model.parameters_mut(), &grads, lr as f32)
    }

    fn num_labels(&self) -> usize {
        self.model.config.num_labels
    }
}
