//! Tolerances of attention outputs computed in f32 with P rounded to the input dtype (the
//! fused kernel's arithmetic, and its CPU twin's), against the f64 reference.
//!
//! Error sources, for inputs identical on both sides:
//! - scores: an f32 dot product of D terms, then the scale and exp2 arguments: an absolute error
//!   of about (4√D + 8)·u32·S in the scaled score, S the largest |scale·Σ q·k| term sum;
//! - P rounded to the input dtype before P·V: a relative u_in on every weight;
//! - P·V and the row sum accumulated over Lk keys in f32: 4√Lk·u32 relative to max|V|.
//!
//! Weights that are off by a relative ε move the normalised O by at most 2ε·max|V|, so
//! O's absolute budget is max|V|·(2·score error + 2·u_in + 4√Lk·u32), plus the rounding of O
//! into its dtype (relative). LSE = scale·m + ln l carries the score error plus the sum's.

use super::Tolerance;
use crate::dtype::DType;
use crate::reference::attention::Shape;

/// Bounds for O (stored in `dtype`) and LSE (f32).
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    pub o: Tolerance,
    pub lse: Tolerance,
}

/// Bounds for one call with inputs `q`, `k`, `v` (BHSD) of `shape`, scale `scale`.
pub fn bounds(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: &Shape,
    scale: f64,
    dtype: DType,
) -> Tolerances {
    let u32_ = DType::F32.unit_roundoff();
    let max_abs = |x: &[f32]| x.iter().fold(0.0f64, |m, &a| m.max((a as f64).abs()));
    let score_scale = scale.abs() * max_abs(q) * max_abs(k) * shape.dim_qk as f64;
    let score_err = (4.0 * (shape.dim_qk as f64).sqrt() + 8.0) * u32_ * score_scale;
    let sum_err = 4.0 * (shape.len_k.max(1) as f64).sqrt() * u32_;
    let o_atol = max_abs(v) * (2.0 * score_err + 2.0 * dtype.unit_roundoff() + sum_err);
    let o_rtol = dtype.unit_roundoff();
    Tolerances {
        o: Tolerance {
            atol: o_atol + f64::MIN_POSITIVE,
            rtol: o_rtol,
            rel_norm_bound: 2.0 * o_rtol,
            max_finite: dtype.max_finite(),
        },
        lse: Tolerance {
            atol: score_err + sum_err,
            rtol: 4.0 * u32_,
            rel_norm_bound: 8.0 * u32_,
            max_finite: DType::F32.max_finite(),
        },
    }
}
