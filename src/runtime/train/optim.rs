//! Named parameters, AdamW and global gradient-norm clipping, with PyTorch's semantics
//! (`torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_`).

use super::backend::{AdamWStep, TrainBackend};
use crate::error::{Error, Result};

/// One trainable tensor under its checkpoint name. `decay`: whether AdamW's weight decay
/// applies (Hugging Face's Trainer exempts biases and LayerNorm weights).
pub struct Param<T> {
    pub name: String,
    pub value: T,
    pub decay: bool,
}

/// Gradients of a model's parameters, in the order of its parameter list.
pub struct Gradients<T> {
    pub names: Vec<String>,
    pub tensors: Vec<T>,
}

impl<T> Gradients<T> {
    /// The gradient of the parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.tensors[i])
    }

    /// `self += other` (gradient accumulation over micro-batches).
    pub fn accumulate<B: TrainBackend<Tensor = T>>(&mut self, be: &B, other: &Self) -> Result<()> {
        if self.names != other.names {
            return Err(Error::invalid(
                "other",
                "gradients of a different parameter list",
            ));
        }
        for (a, b) in self.tensors.iter_mut().zip(&other.tensors) {
            be.accumulate(a, b)?;
        }
        Ok(())
    }

    /// Every gradient times `s`.
    pub fn scale<B: TrainBackend<Tensor = T>>(&mut self, be: &B, s: f32) -> Result<()> {
        for t in &mut self.tensors {
            be.scale(t, s)?;
        }
        Ok(())
    }

    /// The L2 norm of all gradients together.
    pub fn global_norm<B: TrainBackend<Tensor = T>>(&self, be: &B) -> Result<f64> {
        let mut sum = 0f64;
        for t in &self.tensors {
            sum += be.sum_squares(t)?;
        }
        Ok(sum.sqrt())
    }

    /// Clips by global norm as `clip_grad_norm_`: scales every gradient by
    /// min(1, max_norm/(norm + 1e-6)). Returns the norm before clipping.
    pub fn clip_global_norm<B: TrainBackend<Tensor = T>>(
        &mut self,
        be: &B,
        max_norm: f32,
    ) -> Result<f64> {
        if max_norm.is_nan() || max_norm <= 0.0 {
            return Err(Error::invalid(
                "max_norm",
                format!("must be > 0, got {max_norm}"),
            ));
        }
        let norm = self.global_norm(be)?;
        let coef = (max_norm as f64 / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            self.scale(be, coef as f32)?;
        }
        Ok(norm)
    }
}

/// AdamW's hyper-parameters; the defaults are PyTorch's (lr 1e-3, betas (0.9, 0.999),
/// eps 1e-8, weight decay 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over a parameter list: f32 moments per parameter, one step counter.
pub struct AdamW<T> {
    pub config: AdamWConfig,
    moments: Vec<(T, T)>,
    step: u64,
}

impl<T> AdamW<T> {
    /// Zero moments for every parameter of `params`.
    pub fn new<B: TrainBackend<Tensor = T>>(
        be: &B,
        params: &[Param<T>],
        config: AdamWConfig,
    ) -> Result<Self> {
        for (arg, v) in [
            ("lr", config.lr),
            ("eps", config.eps),
            ("weight_decay", config.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::invalid(
                    arg,
                    format!("must be finite and ≥ 0, got {v}"),
                ));
            }
        }
        for (arg, b) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(arg, format!("must be in [0, 1), got {b}")));
            }
        }
        let moments = params
            .iter()
            .map(|p| {
                let shape = be.shape(&p.value).to_vec();
                let n: usize = shape.iter().product();
                let z = vec![0f32; n];
                Ok((
                    be.upload_as(&shape, &z, crate::DType::F32)?,
                    be.upload_as(&shape, &z, crate::DType::F32)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            config,
            moments,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One step of every parameter with its gradient, at learning rate `lr` (a schedule's
    /// value for this step; the config's `lr` is the default).
    pub fn step<B: TrainBackend<Tensor = T>>(
        &mut self,
        be: &B,
        params: &mut [Param<T>],
        grads: &Gradients<T>,
        lr: f32,
    ) -> Result<()> {
        if params.len() != self.moments.len() || grads.tensors.len() != params.len() {
            return Err(Error::invalid(
                "grads",
                format!(
                    "{} parameters, {} gradients, optimizer built for {}",
                    params.len(),
                    grads.tensors.len(),
                    self.moments.len()
                ),
            ));
        }
        if !(lr >= 0.0 && lr.is_finite()) {
            return Err(Error::invalid(
                "lr",
                format!("must be finite and ≥ 0, got {lr}"),
            ));
        }
        self.step += 1;
        let c = self.config;
        for ((p, g), (m, v)) in params.iter_mut().zip(&grads.tensors).zip(&mut self.moments) {
            let hp = AdamWStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if p.decay { c.weight_decay } else { 0.0 },
                step: self.step,
            };
            be.adamw_step(&mut p.value, g, m, v, &hp)?;
        }
        Ok(())
    }
}
