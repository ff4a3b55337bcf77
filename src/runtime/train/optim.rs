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
///
/// `no_grad` lists (ascending) the parameters the step did not touch, PyTorch's `.grad is
/// None` (a layer LayerDrop skipped): their tensors hold zeros, so norms, clipping and
/// accumulation need no special case, and [`AdamW::step`] skips them entirely as
/// `torch.optim.AdamW` does. Empty: every parameter has a gradient.
pub struct Gradients<T> {
    pub names: Vec<String>,
    pub tensors: Vec<T>,
    pub no_grad: Vec<usize>,
}

impl<T> Gradients<T> {
    /// The gradient of the parameter called `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.tensors[i])
    }

    /// Whether parameter `i` has a gradient (is not in [`Gradients::no_grad`]).
    pub fn has_grad(&self, i: usize) -> bool {
        self.no_grad.binary_search(&i).is_err()
    }

    /// `self += other` (gradient accumulation over micro-batches). A parameter is left without
    /// a gradient only if neither side has one (as PyTorch's `.grad` after two backwards).
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
        self.no_grad.retain(|i| !other.has_grad(*i));
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
        let all: Vec<&T> = self.tensors.iter().collect();
        Ok(be.sum_squares_all(&all)?.sqrt())
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

/// AdamW over a parameter list: f32 moments and a step counter per parameter (PyTorch's
/// per-parameter `state["step"]`: a parameter without a gradient in a step is not stepped, so
/// its bias correction counts only the steps that moved it).
pub struct AdamW<T> {
    pub config: AdamWConfig,
    moments: Vec<(T, T)>,
    /// Calls of [`AdamW::step`].
    step: u64,
    /// Steps each parameter took.
    param_steps: Vec<u64>,
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
            param_steps: vec![0; params.len()],
        })
    }

    /// Steps taken so far (calls of [`AdamW::step`]).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Steps each parameter took, in list order: [`AdamW::steps`] less the steps where it had
    /// no gradient.
    pub fn param_steps(&self) -> &[u64] {
        &self.param_steps
    }

    /// One step of every parameter with its gradient, at learning rate `lr` (a schedule's
    /// value for this step; the config's `lr` is the default). Parameters in
    /// [`Gradients::no_grad`] are skipped: no weight decay, no moment update, no step counted.
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
        if !grads.no_grad.windows(2).all(|w| w[0] < w[1])
            || grads.no_grad.last().is_some_and(|&i| i >= params.len())
        {
            return Err(Error::invalid(
                "grads",
                format!(
                    "no_grad must be ascending indices below {}, got {:?}",
                    params.len(),
                    grads.no_grad
                ),
            ));
        }
        self.step += 1;
        let c = self.config;
        for (i, ((p, g), (m, v))) in params
            .iter_mut()
            .zip(&grads.tensors)
            .zip(&mut self.moments)
            .enumerate()
        {
            if !grads.has_grad(i) {
                continue;
            }
            let hp = AdamWStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if p.decay { c.weight_decay } else { 0.0 },
                step: self.param_steps[i] + 1,
            };
            be.adamw_step(&mut p.value, g, m, v, &hp)?;
            self.param_steps[i] += 1;
        }
        Ok(())
    }
}
