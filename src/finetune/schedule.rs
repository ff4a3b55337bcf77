//! Learning-rate schedules as the Hugging Face Trainer applies them: the rate of optimizer
//! step `k` (from 0) is `base · factor(k)`, with a linear warm-up from 0 over `warmup` steps,
//! then either a linear decay to 0 at `total` steps (the Trainer's default) or a constant rate.
//! The first step of a warm-up therefore has rate 0, as in `get_linear_schedule_with_warmup`.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ScheduleKind {
    /// Warm-up, then linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Warm-up, then the base rate.
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub base: f64,
    pub warmup: usize,
    pub total: usize,
    pub kind: ScheduleKind,
}

impl LrSchedule {
    /// A schedule over `total` optimizer steps; `base` must be finite and > 0.
    pub fn new(base: f64, warmup: usize, total: usize, kind: ScheduleKind) -> Result<Self> {
        if !(base.is_finite() && base > 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("{base} is not a finite rate > 0"),
            ));
        }
        Ok(LrSchedule {
            base,
            warmup,
            total,
            kind,
        })
    }

    /// The rate of optimizer step `step` (from 0).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.base * step as f64 / self.warmup.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.base,
            ScheduleKind::Linear => {
                let left = self.total.saturating_sub(step) as f64;
                let span = self.total.saturating_sub(self.warmup).max(1) as f64;
                self.base * (left / span).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay_matches_hf_lambda() {
        // HF: step/warmup before the warm-up ends, then (total-step)/(total-warmup).
        let s = LrSchedule::new(1e-3, 2, 6, ScheduleKind::Linear).unwrap();
        let got: Vec<f64> = (0..7).map(|k| s.lr(k) / 1e-3).collect();
        let want = [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn no_warmup_starts_at_the_base_rate() {
        let s = LrSchedule::new(2e-5, 0, 4, ScheduleKind::Linear).unwrap();
        assert_eq!(s.lr(0), 2e-5);
        assert!((s.lr(3) - 0.5e-5).abs() < 1e-18);
        let c = LrSchedule::new(2e-5, 1, 4, ScheduleKind::Constant).unwrap();
        assert_eq!((c.lr(0), c.lr(1), c.lr(100)), (0.0, 2e-5, 2e-5));
    }

    #[test]
    fn bad_rates_are_rejected() {
        for lr in [0.0, -1e-3, f64::NAN, f64::INFINITY] {
            let e = LrSchedule::new(lr, 0, 1, ScheduleKind::Linear).unwrap_err();
            assert!(e.to_string().contains("lr"), "{e}");
        }
    }
}
