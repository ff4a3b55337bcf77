//! The one rule by which a kernel's output is compared with its f64 CPU reference.
//!
//! Each output element gets a bound `atol + rtol·|ref|`, chosen per op from two sources of
//! error, and nothing else:
//! - **storage rounding**: the kernel stores its result in the output dtype; round-to-nearest
//!   puts it within a relative `u_out` of the exact value (u = 2^-24 f32, 2^-11 f16, 2^-8 bf16).
//! - **f32 accumulation**: the kernel accumulates in f32 over `n` terms; a sum of n terms in f32
//!   carries a relative error of at most about `n·u_f32` in the worst case, `√n·u_f32` in
//!   practice. We budget `4·√n·u_f32` relative to the *magnitude scale* of the terms, which for
//!   normalised outputs is the size of the largest term, not of the (possibly cancelling) result.
//!
//! Inputs are identical on both sides (the reference reads the values rounded to the input
//! dtype), so input rounding is not part of the budget. NaN or infinity where the reference is
//! finite always fails. Besides every element, the whole output must satisfy
//! ‖out−ref‖ ≤ rel_norm_bound·‖ref‖ + atol·√N: most elements must be far inside their bound,
//! since a worst-case bound on every element at once would allow a norm √N times larger.

use crate::dtype::DType;

pub mod attention;
pub mod attention_backward;
pub mod layernorm;

/// The bound for one output of an op.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
    /// Bound on ‖out−ref‖₂/‖ref‖₂ over the whole output.
    pub rel_norm_bound: f64,
    /// Largest finite value of the output dtype: where the exact result is beyond it, the
    /// stored value must be the infinity (or the maximum) of the same sign.
    pub max_finite: f64,
}

impl Tolerance {
    /// The rule above for an output stored in `out` dtype, accumulated in f32 over `n` terms
    /// whose magnitudes are at most `scale` (the atol part absorbs cancellation).
    pub fn for_output(out: DType, n: usize, scale: f64) -> Self {
        let u32_ = DType::F32.unit_roundoff();
        let acc = 4.0 * (n.max(1) as f64).sqrt() * u32_;
        let rtol = out.unit_roundoff() + acc;
        Tolerance {
            atol: acc * scale + f64::MIN_POSITIVE,
            rtol,
            rel_norm_bound: 2.0 * rtol + acc,
            max_finite: out.max_finite(),
        }
    }
}

/// Outcome of comparing an output with its reference.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub max_abs_err: f64,
    /// Index of the worst element relative to its bound.
    pub worst_index: usize,
    /// err / bound at the worst element: ≤ 1 passes.
    pub worst_ratio: f64,
    pub rel_norm_err: f64,
    pub non_finite: usize,
    pub passed: bool,
}

/// Compares `out` with `reference` under `tol`. NaN, infinities where the reference is finite,
/// and a length mismatch all fail.
pub fn compare(out: &[f32], reference: &[f64], tol: Tolerance) -> Comparison {
    let mut c = Comparison {
        max_abs_err: 0.0,
        worst_index: 0,
        worst_ratio: 0.0,
        rel_norm_err: 0.0,
        non_finite: 0,
        passed: out.len() == reference.len(),
    };
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let o = o as f64;
        if r.abs() > tol.max_finite {
            // Out of the dtype's range: round-to-nearest stores ±inf (±max just above it).
            let stored = (o.is_infinite() || o.abs() == tol.max_finite) && o.signum() == r.signum();
            if !stored {
                c.non_finite += 1;
                c.worst_ratio = f64::INFINITY;
                c.worst_index = i;
            }
            continue;
        }
        if !o.is_finite() && r.is_finite() {
            c.non_finite += 1;
            c.worst_index = i;
            c.worst_ratio = f64::INFINITY;
            continue;
        }
        if !r.is_finite() {
            // Only an exact match (same infinity) passes where the reference itself is not finite.
            if o != r {
                c.non_finite += 1;
                c.worst_ratio = f64::INFINITY;
                c.worst_index = i;
            }
            continue;
        }
        let err = (o - r).abs();
        let bound = tol.atol + tol.rtol * r.abs();
        let ratio = err / bound;
        if ratio > c.worst_ratio {
            c.worst_ratio = ratio;
            c.worst_index = i;
        }
        c.max_abs_err = c.max_abs_err.max(err);
        diff2 += err * err;
        ref2 += r * r;
    }
    c.rel_norm_err = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else {
        diff2.sqrt()
    };
    // The norm bound is relative to ‖ref‖, plus the absolute allowance of every element
    // (atol·√N): where the reference cancels to ~0, only the absolute part is meaningful.
    let norm_bound = tol.rel_norm_bound * ref2.sqrt() + tol.atol * (out.len() as f64).sqrt();
    c.passed &= c.non_finite == 0 && c.worst_ratio <= 1.0 && diff2.sqrt() <= norm_bound;
    c
}

/// [`compare`], as a `Result` whose error describes the worst element: what tests and checks
/// report.
pub fn expect_close(
    what: &str,
    out: &[f32],
    reference: &[f64],
    tol: Tolerance,
) -> Result<(), String> {
    let r = compare(out, reference, tol);
    if r.passed {
        return Ok(());
    }
    Err(format!(
        "{what}: worst element {} = {} vs reference {} (err/bound {:.3}), max abs err {:.3e}, \
         rel norm err {:.3e} (bound {:.3e}), {} non-finite, {} vs {} elements",
        r.worst_index,
        out.get(r.worst_index).copied().unwrap_or(f32::NAN),
        reference.get(r.worst_index).copied().unwrap_or(f64::NAN),
        r.worst_ratio,
        r.max_abs_err,
        r.rel_norm_err,
        tol.rel_norm_bound,
        r.non_finite,
        out.len(),
        reference.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_never_passes() {
        let tol = Tolerance::for_output(DType::F16, 10, 1.0);
        assert!(!compare(&[f32::NAN], &[1.0], tol).passed);
        assert!(!compare(&[f32::INFINITY], &[1.0], tol).passed);
    }

    #[test]
    fn exact_match_passes_and_one_ulp_beyond_the_bound_fails() {
        let tol = Tolerance::for_output(DType::F32, 1, 1.0);
        assert!(compare(&[1.0, -2.0], &[1.0, -2.0], tol).passed);
        let bound = tol.atol + tol.rtol * 1.0;
        assert!(!compare(&[(1.0 + 2.0 * bound) as f32], &[1.0], tol).passed);
    }

    #[test]
    fn a_reference_that_cancels_to_zero_is_judged_by_atol() {
        let tol = Tolerance::for_output(DType::F32, 4, 1.0);
        let tiny = (0.5 * tol.atol) as f32;
        assert!(compare(&[tiny, -tiny], &[0.0, 0.0], tol).passed);
        assert!(!compare(&[(3.0 * tol.atol) as f32, 0.0], &[0.0, 0.0], tol).passed);
    }

    #[test]
    fn results_beyond_the_dtype_range_must_be_stored_as_infinity() {
        let tol = Tolerance::for_output(DType::F16, 2, 1.0);
        assert!(compare(&[f32::NEG_INFINITY], &[-157_734.6], tol).passed);
        assert!(!compare(&[f32::INFINITY], &[-157_734.6], tol).passed);
        assert!(!compare(&[-1.0], &[-157_734.6], tol).passed);
        assert!(!compare(&[f32::NAN], &[-157_734.6], tol).passed);
    }

    #[test]
    fn length_mismatch_fails() {
        let tol = Tolerance::for_output(DType::F32, 1, 1.0);
        assert!(!compare(&[1.0], &[1.0, 2.0], tol).passed);
    }
}
