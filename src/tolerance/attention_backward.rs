//! Tolerances of attention gradients computed as the fused backward does (f32 arithmetic, P and
//! dS rounded to the input dtype before their GEMMs, D from the stored O, LSE from the forward)
//! against the f64 reference ([`crate::reference::attention_backward`]).
//!
//! Error per term, for inputs identical on both sides:
//! - P_ij = exp(scale·s_ij − LSE_i): a relative error ε_P = the score error plus the forward's
//!   LSE error ([`super::attention::bounds`]), plus u_in when rounded for a GEMM;
//! - D_i = dO_i·O_i from O stored in the dtype (relative u_in per element, plus the forward's O
//!   error) and dP_ij = dO_i·v_j in f32: an absolute error e_D each, at most
//!   Dv·max|dO|·(max|V|·(u_in + 4√Dv·u32) + O's atol);
//! - dS_ij = P_ij(dP_ij − D_i): error ≤ ε·P_ij(|dP_ij − D_i| + e_D/ε), ε = ε_P + 2u_in.
//!
//! So each gradient element is a sum of terms each within ε of a magnitude A (dV: P_ij|dO_i|;
//! dK: scale·|dS_ij|'s bound·|q_i|; dQ: the same with |k_j|), accumulated in f32 over n terms
//! (4√n·u32). The bound's absolute part is (ε + 4√n·u32)·max A over the output — computed here
//! in f64 by one pass over the admissible pairs — and its relative part the output dtype's
//! rounding.

use super::Tolerance;
use crate::dtype::DType;
use crate::reference::attention::{Options, Shape};

/// Bounds for dQ, dK and dV (stored in `dtype`).
#[derive(Clone, Copy, Debug)]
pub struct Tolerances {
    pub dq: Tolerance,
    pub dk: Tolerance,
    pub dv: Tolerance,
}

/// Bounds for the gradients of one call (BHSD inputs as in the reference; `keep` as in
/// [`crate::reference::attention_backward::backward_masked`]).
#[allow(clippy::too_many_arguments)]
pub fn bounds(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    shape: &Shape,
    opts: &Options,
    keep: &dyn Fn(usize, usize, usize, usize) -> bool,
    dtype: DType,
) -> Tolerances {
    let s = shape;
    let u32_ = DType::F32.unit_roundoff();
    let u_in = dtype.unit_roundoff();
    let fwd = super::attention::bounds(q, k, v, s, opts.scale, dtype);
    let max_abs = |x: &[f32]| x.iter().fold(0.0f64, |m, &a| m.max((a as f64).abs()));
    let score_scale = opts.scale * max_abs(q) * max_abs(k) * s.dim_qk as f64;
    let score_err = (4.0 * (s.dim_qk as f64).sqrt() + 8.0) * u32_ * score_scale;
    let eps = score_err + fwd.lse.atol + fwd.lse.rtol * score_scale + 2.0 * u_in;
    let dv_f = s.dim_v as f64;
    let e_d = dv_f * max_abs(d_o) * (max_abs(v) * (u_in + 4.0 * dv_f.sqrt() * u32_) + fwd.o.atol);

    // max over outputs of Σ |term| bounds, by one f64 pass over the admissible pairs.
    let group = s.heads_q / s.heads_kv;
    let (d, dvn) = (s.dim_qk, s.dim_v);
    let mut a_dq = vec![0.0f64; s.q_len()];
    let mut a_dk = vec![0.0f64; s.k_len()];
    let mut a_dv = vec![0.0f64; s.v_len()];
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum() };
    let mut p = vec![0.0f64; s.len_k];
    let mut dp = vec![0.0f64; s.len_k];
    for b in 0..s.batch {
        let band = opts.key_band(s, b);
        for h in 0..s.heads_q {
            let hk = h / group;
            let qb = ((b * s.heads_q + h) * s.len_q) * d;
            let kb = ((b * s.heads_kv + hk) * s.len_k) * d;
            let vb = ((b * s.heads_kv + hk) * s.len_k) * dvn;
            let ob = ((b * s.heads_q + h) * s.len_q) * dvn;
            for i in 0..s.len_q {
                let keys: Vec<usize> = band.keys(i).filter(|&j| keep(b, h, i, j)).collect();
                if keys.is_empty() {
                    continue;
                }
                let qi = &q[qb + i * d..qb + (i + 1) * d];
                let doi = &d_o[ob + i * dvn..ob + (i + 1) * dvn];
                let mut max = f64::NEG_INFINITY;
                for &j in &keys {
                    p[j] = opts.scale * dot(qi, &k[kb + j * d..kb + (j + 1) * d]);
                    max = max.max(p[j]);
                }
                let sum: f64 = keys.iter().map(|&j| (p[j] - max).exp()).sum();
                let mut delta = 0.0;
                for &j in &keys {
                    p[j] = (p[j] - max).exp() / sum;
                    dp[j] = dot(doi, &v[vb + j * dvn..vb + (j + 1) * dvn]);
                    delta += p[j] * dp[j];
                }
                for &j in &keys {
                    let a_ds = opts.scale * p[j] * ((dp[j] - delta).abs() + e_d / eps);
                    for (a, &x) in a_dv[vb + j * dvn..vb + (j + 1) * dvn].iter_mut().zip(doi) {
                        *a += p[j] * (x as f64).abs();
                    }
                    for (a, &x) in a_dk[kb + j * d..kb + (j + 1) * d].iter_mut().zip(qi) {
                        *a += a_ds * (x as f64).abs();
                    }
                    let kj = &k[kb + j * d..kb + (j + 1) * d];
                    for (a, &x) in a_dq[qb + i * d..qb + (i + 1) * d].iter_mut().zip(kj) {
                        *a += a_ds * (x as f64).abs();
                    }
                }
            }
        }
    }
    let max = |x: &[f64]| x.iter().fold(0.0f64, |m, &a| m.max(a));
    let tol = |magnitude: f64, n: usize| {
        let acc = 4.0 * (n.max(1) as f64).sqrt() * u32_;
        Tolerance {
            atol: (eps + acc) * magnitude + f64::MIN_POSITIVE,
            rtol: u_in,
            rel_norm_bound: 2.0 * u_in,
            max_finite: dtype.max_finite(),
        }
    };
    Tolerances {
        dq: tol(max(&a_dq), s.len_k),
        dk: tol(max(&a_dk), s.len_q * group),
        dv: tol(max(&a_dv), s.len_q * group),
    }
}
