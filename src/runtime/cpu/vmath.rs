//! Row kernels of the CPU backend (softmax pieces, LayerNorm), written as plain loops over
//! 16 independent lanes so that the compiler vectorizes them, and compiled three times: for
//! AVX-512, for AVX2+FMA and for the baseline target. The [`Isa`] argument picks the copy
//! (callers pass [`Isa::current`]; tests pass each supported level).
//!
//! f32 sums are kept in 16 partial sums (one per lane) and added at the end: the same
//! accuracy class as a sequential f32 sum, without the serial dependency that stops the
//! loop from vectorizing.

use super::isa::Isa;

const LANES: usize = 16;

/// Defines `pub fn $name(isa: Isa, args..) -> ret` running `$body` compiled for `isa`.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $t:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name(isa: Isa, $($arg: $t),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $t),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $t),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $t),*) $(-> $ret)? { imp($($arg),*) }
                match isa.capped() {
                    // SAFETY: `capped` keeps the level at what this CPU supports, the only
                    // requirement of calling a function compiled for it.
                    Isa::Avx512 => return unsafe { v4($($arg),*) },
                    Isa::Avx2 => return unsafe { v3($($arg),*) },
                    Isa::Scalar => {}
                }
            }
            let _ = isa;
            imp($($arg),*)
        }
    };
}

/// e^x in f32 for a loop body the compiler can vectorize: x = n·ln2 + r with n an integer and
/// |r| ≤ ln2/2, e^r by its Taylor series to degree 7 (truncation ≤ 5e-9 relative, Horner with
/// fused multiply-adds: one instruction per coefficient in the FMA copies), times 2^n built in
/// the exponent bits. Relative error a few f32 ulps; below -87.3 the result is 0
/// (never denormal), above 88 it saturates at e^88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part with few mantissa bits (n·LN2_HI is exact) and the rest.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.3;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2^n from the integer bits: `shifted` is 1.5·2^23 + n exactly (|n| ≤ 127 < 2^22), so
    // its bit pattern is ROUND's plus n. Integer lanes only: `n as i32` (a saturating cast)
    // made the compiler convert the eight lanes one at a time.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if below {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn lane_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

multiversion! {
    /// The largest value (−∞ for none; NaN-free input assumed, as scores are).
    pub fn max(xs: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a = if v > *a { v } else { *a };
            }
        }
        acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
    }
}

multiversion! {
    /// In place: `x ← e^(x·scale − shift)`; returns the sum of the results.
    pub fn exp_sum(xs: &mut [f32], scale: f32, shift: f32) -> f32 {
        for v in xs.iter_mut() {
            *v = exp(*v * scale - shift);
        }
        lane_sum(xs)
    }
}

#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, u), v) in acc.iter_mut().zip(x).zip(y) {
            *s = u.mul_add(*v, *s);
        }
    }
    acc.iter().sum::<f32>() + rest
}

multiversion! {
    /// `out[j] = q·k_j` for the rows `k_j = k[j·stride..][..q.len()]`, j < `out.len()`.
    pub fn dots(q: &[f32], k: &[f32], stride: usize, out: &mut [f32]) {
        let d = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            *o = lane_dot(q, &k[j * stride..j * stride + d]);
        }
    }
}

multiversion! {
    /// `out = Σ_j p[j]·v_j` for the rows `v_j = v[j·stride..][..out.len()]`, in j order
    /// (0 when `p` is empty).
    pub fn weighted_rows(p: &[f32], v: &[f32], stride: usize, out: &mut [f32]) {
        let d = out.len();
        out.fill(0.0);
        for (j, &w) in p.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(&v[j * stride..j * stride + d]) {
                *o = w.mul_add(*x, *o);
            }
        }
    }
}

multiversion! {
    /// In place: `x ← x·s`.
    pub fn scale(xs: &mut [f32], s: f32) {
        for v in xs.iter_mut() {
            *v *= s;
        }
    }
}

multiversion! {
    /// One LayerNorm row: `out = (v − mean)/√(var + eps)·gamma + beta` for v = x (+ residual),
    /// statistics in f32 (two passes: the mean, then the mean squared deviation).
    pub fn layer_norm_row(
        x: &[f32],
        residual: Option<&[f32]>,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        out: &mut [f32]
    ) {
        match residual {
            Some(r) => {
                for ((o, a), b) in out.iter_mut().zip(x).zip(r) {
                    *o = a + b;
                }
            }
            None => out.copy_from_slice(x),
        }
        let n = out.len() as f32;
        let mean = lane_sum(out) / n;
        let mut acc = [0f32; LANES];
        let chunks = out.chunks_exact(LANES);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += (v - mean) * (v - mean);
            }
        }
        let var = (acc.iter().sum::<f32>() + rest.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in out.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * rstd * g + b;
        }
    }
}

multiversion! {
    /// `out = a + b`.
    pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

/// GELU with the exact erf, x·Φ(x) (the formula of
/// [`Activation::apply`](crate::runtime::Activation::apply), erf's Horner steps fused);
/// inlined so the loops below vectorize it.
#[inline(always)]
fn gelu_erf_one(x: f32) -> f32 {
    0.5 * x * (1.0 + crate::runtime::backend::erf_fused(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU's tanh form as x·σ(2u) (see [`gelu_tanh`]); inlined so the loops vectorize it.
#[inline(always)]
fn gelu_tanh_one(v: f32) -> f32 {
    let t = -2.0 * 0.797_884_6 * (0.044715 * v * v).mul_add(v, v);
    // Past e^80 the true value is below |x|·1.9e-35: 0, as f32's 1 + tanh u gives.
    if t > 80.0 {
        0.0
    } else {
        v / (1.0 + exp(t))
    }
}

/// In place: GELU with the exact erf ([`gelu_erf_one`]).
pub fn gelu_erf(isa: Isa, xs: &mut [f32]) {
    gelu_erf_rows(isa, None, xs)
}

multiversion! {
    /// In place: GELU's tanh form (GPT-2's `gelu_new`), 0.5·x·(1 + tanh u) with
    /// u = √(2/π)·(x + 0.044715·x³), computed as x·σ(2u) = x / (1 + e^(−2u)) — the same
    /// function (1 + tanh u = 2σ(2u)) with [`exp`], so the loop vectorizes; for very negative x
    /// it avoids the cancellation in 1 + tanh u.
    pub fn gelu_tanh(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu_tanh_one(*x);
        }
    }
}

/// GELU′(x) = Φ(x) + x·φ(x) for GELU with the exact erf (inlined so loops vectorize it).
#[inline(always)]
pub fn gelu_erf_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + crate::runtime::backend::erf_fused(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp(-0.5 * x * x) * 0.398_942_3; // 1/√(2π)
    cdf + x * pdf
}

multiversion! {
    /// `out = dy·GELU′(x)` ([`gelu_erf_derivative`] over a slice, vectorized).
    pub fn gelu_erf_backward(x: &[f32], dy: &[f32], out: &mut [f32]) {
        for ((o, &x), &g) in out.iter_mut().zip(x).zip(dy) {
            *o = g * gelu_erf_derivative(x);
        }
    }
}

/// In place over rows of `bias.len()` values: x = GELU_erf(x + bias[column]) — a GEMM's
/// bias and activation in one pass over its output.
pub fn bias_gelu_erf(isa: Isa, bias: &[f32], xs: &mut [f32]) {
    gelu_erf_rows(isa, Some(bias), xs)
}

/// x = GELU_erf(x + bias[column]) over rows of `bias.len()` values, or GELU_erf(x) over the
/// whole slice. With AVX2 [`gelu_lanes`] evaluates one erf piece per lane; the other copies
/// evaluate all three pieces and keep one. The values are bitwise the same.
fn gelu_erf_rows(isa: Isa, bias: Option<&[f32]>, xs: &mut [f32]) {
    if bias.is_some_and(|b| b.is_empty()) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.capped() == Isa::Avx2 {
        // SAFETY: `capped` keeps the level at what this CPU supports, the only requirement
        // of calling a function compiled for it.
        return unsafe { gelu_lanes::rows_avx2(bias, xs) };
    }
    gelu_erf_three_pieces(isa, bias, xs)
}

multiversion! {
    /// [`gelu_erf_rows`] as a plain loop over [`gelu_erf_one`].
    pub fn gelu_erf_three_pieces(bias: Option<&[f32]>, xs: &mut [f32]) {
        match bias {
            Some(bias) => {
                for row in xs.chunks_exact_mut(bias.len()) {
                    for (x, &b) in row.iter_mut().zip(bias) {
                        *x = gelu_erf_one(*x + b);
                    }
                }
            }
            None => xs.iter_mut().for_each(|x| *x = gelu_erf_one(*x)),
        }
    }
}

/// GELU_erf for AVX2 with the erf's three pieces (see [`erf`](crate::runtime::backend::erf))
/// evaluated as one. Each lane finds its piece from |u| (u = x/√2) and an in-lane permute
/// (`vpermilps`, cheap on every AVX2 CPU) hands it that piece's t scaling and coefficients,
/// so one Horner chain of ten FMAs runs where the portable loop runs three and selects. A
/// lane does the same f32 operations as [`gelu_erf_one`] on its piece, with the same
/// roundings, so the values are bitwise the portable ones (the tests hold them to that).
///
/// Measured on a Zen 5 core (bias + GELU over 2000 rows of 1536): 0.54–0.58 ns per value
/// against 0.78–0.83 for the three-chain loop, two vectors per step. The same scheme with
/// AVX-512 ran 0.29–0.31 against 0.37–0.39 there, yet made whole embedding runs 4–6% slower
/// (its share of the profile 7.1% against 3.1%), so AVX-512 keeps the three chains.
#[cfg(target_arch = "x86_64")]
mod gelu_lanes {
    use super::gelu_erf_one;
    use crate::runtime::backend::{ERF_BOUNDS, ERF_FIT, ERF_ONE_FROM, ERF_T_SCALE, ERF_T_SHIFT};
    use std::arch::x86_64::*;
    use std::f32::consts::FRAC_1_SQRT_2;

    /// Per-piece values in the first three lanes of each 128-bit half (in-lane permutes pick
    /// within a half; the fourth lane is never picked).
    fn lanes(per_piece: [f32; 3]) -> [f32; 8] {
        let mut v = [0.0; 8];
        for half in v.chunks_exact_mut(4) {
            half[..3].copy_from_slice(&per_piece);
        }
        v
    }

    /// The pieces' constants, one vector each, piece r in lane r of each half.
    struct Pieces {
        fit: [__m256; 10],
        scale: __m256,
        shift: __m256,
    }

    /// The first 8 values of `s`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load8(s: &[f32]) -> __m256 {
        let s = &s[..8];
        // SAFETY: `s` holds the 8 values read.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// `v` into the first 8 values of `s`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn store8(s: &mut [f32], v: __m256) {
        let s = &mut s[..8];
        // SAFETY: `s` holds the 8 values written, borrowed mutably.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }

    /// GELU_erf of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu8(x: __m256, k: &Pieces) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let u = _mm256_mul_ps(x, _mm256_set1_ps(FRAC_1_SQRT_2));
        let a = _mm256_min_ps(_mm256_andnot_ps(sign, u), _mm256_set1_ps(ERF_ONE_FROM));
        let ge = |bound: f32| _mm256_cmp_ps::<_CMP_GE_OQ>(a, _mm256_set1_ps(bound));
        // The piece: minus the sum of the two all-ones masks.
        let (m1, m2) = (ge(ERF_BOUNDS[1]), ge(ERF_BOUNDS[2]));
        let sum = _mm256_add_epi32(_mm256_castps_si256(m1), _mm256_castps_si256(m2));
        let piece = _mm256_sub_epi32(_mm256_setzero_si256(), sum);
        let pick = |v: __m256| _mm256_permutevar_ps(v, piece);
        let t = _mm256_sub_ps(_mm256_mul_ps(a, pick(k.scale)), pick(k.shift));
        let mut y = pick(k.fit[9]);
        for c in k.fit[..9].iter().rev() {
            y = _mm256_fmadd_ps(y, t, pick(*c));
        }
        y = _mm256_blendv_ps(y, _mm256_set1_ps(1.0), ge(ERF_ONE_FROM));
        y = _mm256_or_ps(_mm256_andnot_ps(sign, y), _mm256_and_ps(sign, u)); // copysign
        y = _mm256_blendv_ps(y, u, _mm256_cmp_ps::<_CMP_UNORD_Q>(u, u)); // NaN stays NaN
        let half_x = _mm256_mul_ps(_mm256_set1_ps(0.5), x);
        _mm256_mul_ps(half_x, _mm256_add_ps(_mm256_set1_ps(1.0), y))
    }

    /// The rows of [`super::gelu_erf_rows`], 8 lanes at a time (callers check that the CPU
    /// has AVX2 and FMA).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rows_avx2(bias: Option<&[f32]>, xs: &mut [f32]) {
        let v = |per_piece: [f32; 3]| load8(&lanes(per_piece));
        let k = Pieces {
            fit: std::array::from_fn(|i| v([ERF_FIT[0][i], ERF_FIT[1][i], ERF_FIT[2][i]])),
            scale: v(ERF_T_SCALE),
            shift: v(ERF_T_SHIFT),
        };
        // x + bias (or x) for the 8 values at `i` of a row.
        let load = |row: &[f32], i: usize| {
            let x = load8(&row[i..]);
            match bias {
                Some(b) => _mm256_add_ps(x, load8(&b[i..])),
                None => x,
            }
        };
        let n = bias.map_or(xs.len(), |b| b.len());
        for row in xs.chunks_exact_mut(n.max(1)) {
            let mut i = 0;
            while i + 16 <= n {
                let (x0, x1) = (load(row, i), load(row, i + 8));
                let (g0, g1) = (gelu8(x0, &k), gelu8(x1, &k));
                store8(&mut row[i..], g0);
                store8(&mut row[i + 8..], g1);
                i += 16;
            }
            if i + 8 <= n {
                let g = gelu8(load(row, i), &k);
                store8(&mut row[i..], g);
                i += 8;
            }
            for (j, x) in row.iter_mut().enumerate().skip(i) {
                // No `+ 0.0` without a bias: it would turn −0 into +0.
                let v = bias.map_or(*x, |b| *x + b[j]);
                *x = gelu_erf_one(v);
            }
        }
    }
}

multiversion! {
    /// In place over rows of `bias.len()` values: x = GELU_tanh(x + bias[column]), the form
    /// of [`gelu_tanh`].
    pub fn bias_gelu_tanh(bias: &[f32], xs: &mut [f32]) {
        for row in xs.chunks_exact_mut(bias.len()) {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x = gelu_tanh_one(*x + b);
            }
        }
    }
}

multiversion! {
    /// In place over rows of `bias.len()` values: x += bias[column].
    pub fn add_bias(bias: &[f32], xs: &mut [f32]) {
        for row in xs.chunks_exact_mut(bias.len()) {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x += b;
            }
        }
    }
}

/// In place over rows of `bias.len()` values (the whole slice when `bias` is `None`):
/// x = act(x + bias[column]), one pass for the GELUs.
pub fn bias_activation(
    isa: Isa,
    act: crate::runtime::Activation,
    bias: Option<&[f32]>,
    xs: &mut [f32],
) {
    use crate::runtime::Activation;
    match (bias, act) {
        (Some([]), _) => {}
        (Some(b), Activation::GeluErf) => bias_gelu_erf(isa, b, xs),
        (Some(b), Activation::GeluTanh) => bias_gelu_tanh(isa, b, xs),
        (Some(b), other) => {
            add_bias(isa, b, xs);
            activation(isa, other, xs);
        }
        (None, act) => activation(isa, act, xs),
    }
}

/// `act` over a slice: both GELUs in the copy for `isa`, the rest as
/// [`Activation::apply_slice`](crate::runtime::Activation::apply_slice) does (which sends the
/// GELUs here with [`Isa::current`]).
pub fn activation(isa: Isa, act: crate::runtime::Activation, xs: &mut [f32]) {
    match act {
        crate::runtime::Activation::GeluErf => gelu_erf(isa, xs),
        crate::runtime::Activation::GeluTanh => gelu_tanh(isa, xs),
        other => other.apply_slice(xs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulps_of_f64_exp_over_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0173;
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// 2^n from the rounding constant's bits is bitwise the 2^n of a float-to-int conversion,
    /// over the whole clamped range (both ends and past them) at a step finer than ln 2's
    /// rounding boundaries.
    #[test]
    fn exp_takes_two_to_the_n_from_the_rounding_bits() {
        let by_cast = |x: f32| {
            let below = x < -87.3;
            let x = x.clamp(-87.3, 88.0);
            let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = (-n).mul_add(1.428_606_8e-6, (-n).mul_add(0.693_145_75, x));
            let mut p: f32 = 1.0 / 5040.0;
            for c in [
                1.0 / 720.0,
                1.0 / 120.0,
                1.0 / 24.0,
                1.0 / 6.0,
                0.5,
                1.0,
                1.0,
            ] {
                p = p.mul_add(r, c);
            }
            let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
            if below {
                0.0
            } else {
                p * scale
            }
        };
        let mut x = -90.0f32;
        while x < 90.0 {
            assert_eq!(exp(x).to_bits(), by_cast(x).to_bits(), "x = {x}");
            x += 0.000_977;
        }
        for x in [
            -87.3f32,
            -87.299,
            88.0,
            87.999,
            0.5 * std::f32::consts::LN_2,
            -0.0,
            0.0,
        ] {
            assert_eq!(exp(x).to_bits(), by_cast(x).to_bits(), "x = {x}");
        }
    }

    /// GELU′ from every ISA's copy: bitwise the same as the portable copy (the same f32
    /// operations in each lane), and within f32 rounding of the f64 derivative
    /// Φ(x) + x·φ(x); outputs start as NaN so an unwritten one fails.
    #[test]
    fn every_isa_computes_the_gelu_derivative() {
        let x: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) / 17.0).collect();
        let dy: Vec<f32> = (0..203)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let mut portable = vec![f32::NAN; x.len()];
        gelu_erf_backward(Isa::Scalar, &x, &dy, &mut portable);
        for isa in Isa::all_supported() {
            let mut out = vec![f32::NAN; x.len()];
            gelu_erf_backward(isa, &x, &dy, &mut out);
            for (i, ((&o, &p), (&xv, &g))) in
                out.iter().zip(&portable).zip(x.iter().zip(&dy)).enumerate()
            {
                assert_eq!(o.to_bits(), p.to_bits(), "{isa:?} element {i}");
                let xd = xv as f64;
                let cdf = 0.5 * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let want = g as f64 * (cdf + xd * pdf);
                assert!(
                    (o as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()),
                    "{isa:?} x {xv}: {o} vs {want}"
                );
            }
        }
    }

    /// GELU from every ISA's copy: bitwise the portable copy's values, and within f32
    /// rounding of the f64 x·Φ(x) (the fused erf fit's error is below 1e-7 absolute). The
    /// inputs include both zeros, the infinities, NaN and the values around each bound of
    /// the erf's pieces (where the per-lane kernels switch coefficients), and every length
    /// up to 48 runs too, so each copy's two-vector, one-vector and scalar steps are covered.
    #[test]
    fn every_isa_computes_gelu() {
        use crate::runtime::backend::{ERF_BOUNDS, ERF_ONE_FROM};
        let x: Vec<f32> = (0..407).map(|i| (i as f32 - 203.0) / 31.0).collect();
        let mut special = vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-30];
        for bound in [ERF_BOUNDS[1], ERF_BOUNDS[2], ERF_ONE_FROM] {
            let at = bound * std::f32::consts::SQRT_2;
            for step in -3i32..=3 {
                let v = f32::from_bits(at.to_bits().wrapping_add_signed(step));
                special.extend([v, -v]);
            }
        }
        let mixed: Vec<f32> = special.iter().chain(&x).copied().collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for isa in Isa::all_supported() {
            for len in 0..=48 {
                let (mut want, mut got) = (mixed[..len].to_vec(), mixed[..len].to_vec());
                gelu_erf(Isa::Scalar, &mut want);
                gelu_erf(isa, &mut got);
                assert_eq!(bits(&got), bits(&want), "{isa:?} length {len}");
            }
            let mut want = mixed.clone();
            gelu_erf(Isa::Scalar, &mut want);
            let mut got = mixed.clone();
            gelu_erf(isa, &mut got);
            assert_eq!(bits(&got), bits(&want), "{isa:?}");
        }
        let mut portable = x.clone();
        gelu_erf(Isa::Scalar, &mut portable);
        for isa in Isa::all_supported() {
            let mut out = x.clone();
            gelu_erf(isa, &mut out);
            for (i, ((&o, &p), &xv)) in out.iter().zip(&portable).zip(&x).enumerate() {
                assert_eq!(o.to_bits(), p.to_bits(), "{isa:?} element {i}");
                let xd = xv as f64;
                let want = 0.5 * xd * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
                assert!(
                    (o as f64 - want).abs() <= 2e-7 * (1.0 + xd.abs()),
                    "{isa:?} x {xv}: {o} vs {want}"
                );
            }
        }
    }

    /// The fused bias + activation of every ISA's copy: bitwise the two passes it replaces
    /// (add the bias, then the activation's own copy for that ISA), on rows of 37 values.
    #[test]
    fn every_isa_fuses_bias_and_activation_bitwise() {
        for width in [37, 61] {
            fuses_bias_and_activation_bitwise(width);
        }
    }

    /// Rows of `width` values (37: two-vector steps and a scalar tail with 8 or 16 lanes;
    /// 61: a one-vector step too, with either).
    fn fuses_bias_and_activation_bitwise(width: usize) {
        use crate::runtime::Activation;
        let bias: Vec<f32> = (0..width).map(|j| (j as f32 - 18.0) / 7.0).collect();
        let x: Vec<f32> = (0..width * 11)
            .map(|i| ((i * 29 % 83) as f32 - 41.0) / 9.0)
            .collect();
        for isa in Isa::all_supported() {
            for act in [
                Activation::None,
                Activation::GeluErf,
                Activation::GeluTanh,
                Activation::Relu,
                Activation::Tanh,
            ] {
                let mut want = x.clone();
                for row in want.chunks_exact_mut(width) {
                    row.iter_mut().zip(&bias).for_each(|(v, b)| *v += b);
                    activation(isa, act, row);
                }
                let mut got = x.clone();
                bias_activation(isa, act, Some(&bias), &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "{isa:?} {act:?} element {i}");
                }
                let mut plain = x.clone();
                bias_activation(isa, act, None, &mut plain);
                let mut want = x.clone();
                activation(isa, act, &mut want);
                assert_eq!(plain, want, "{isa:?} {act:?} without a bias");
            }
        }
    }

    /// GELU's tanh form from every ISA's copy: bitwise the portable copy's values (every
    /// lane runs the same f32 operations), and within a few f32 ulps of the f64
    /// 0.5·x·(1 + tanh u) (see the bound), from the far negative tail (x = −20) to x = 20.
    #[test]
    fn every_isa_computes_gelu_tanh() {
        let x: Vec<f32> = (0..1201).map(|i| (i as f32 - 600.0) / 30.0).collect();
        let mut portable = x.clone();
        gelu_tanh(Isa::Scalar, &mut portable);
        for isa in Isa::all_supported() {
            let mut out = x.clone();
            gelu_tanh(isa, &mut out);
            for (i, ((&o, &p), &xv)) in out.iter().zip(&portable).zip(&x).enumerate() {
                assert_eq!(o.to_bits(), p.to_bits(), "{isa:?} element {i}");
                let xd = xv as f64;
                let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd);
                // 0.5·x·(1 + tanh u) written as x·σ(2u): equal, and free of f64's own
                // cancellation (1 + tanh u rounds to 0 below u ≈ −19).
                let sig = 1.0 / (1.0 + (-2.0 * u).exp());
                let want = xd * sig;
                // A few ulps of the result, plus u's own f32 rounding (relative ε·|u|) carried
                // through d(out)/du = 2x·σ(1 − σ): in the tail, where 2|u| ≈ 50, that term
                // dominates, as it does for any f32 evaluation (tanh's included).
                let du = 2.0 * xd * sig * (1.0 - sig);
                // Past −2u = 80 the kernel gives 0 (the true value is below |x|·e^−80).
                let tol = 4.0 * f32::EPSILON as f64 * (want.abs() + u.abs() * du.abs())
                    + xd.abs() * (-80f64).exp();
                assert!(
                    (o as f64 - want).abs() <= tol,
                    "{isa:?} x {xv}: {o} vs {want}"
                );
            }
        }
    }

    /// The one-query attention loops: every ISA's copy within f32 accumulation error of the
    /// f64 sums, for dims with and without a remainder, strided rows, and no rows at all.
    #[test]
    fn every_isa_computes_strided_dots_and_weighted_rows() {
        for isa in Isa::all_supported() {
            for (d, rows) in [(64usize, 37usize), (80, 5), (7, 3), (64, 0)] {
                let stride = d + 5;
                let q: Vec<f32> = (0..d).map(|i| ((i * 29 % 17) as f32 - 8.0) / 6.0).collect();
                let k: Vec<f32> = (0..rows * stride)
                    .map(|i| ((i * 13 % 23) as f32 - 11.0) / 7.0)
                    .collect();
                let mut s = vec![f32::NAN; rows];
                dots(isa, &q, &k, stride, &mut s);
                for (j, &got) in s.iter().enumerate() {
                    let row = &k[j * stride..j * stride + d];
                    let want: f64 = q.iter().zip(row).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let mag: f64 = q
                        .iter()
                        .zip(row)
                        .map(|(a, b)| (*a as f64 * *b as f64).abs())
                        .sum();
                    let tol = (d as f64 + 2.0) * f32::EPSILON as f64 * mag;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{isa:?} dot {j}: {got} vs {want}"
                    );
                }
                let p: Vec<f32> = (0..rows).map(|j| (j % 5) as f32 / 9.0).collect();
                let mut out = vec![f32::NAN; d];
                weighted_rows(isa, &p, &k, stride, &mut out);
                for (c, &got) in out.iter().enumerate() {
                    let want: f64 = (0..rows)
                        .map(|j| p[j] as f64 * k[j * stride + c] as f64)
                        .sum();
                    let mag: f64 = (0..rows)
                        .map(|j| (p[j] as f64 * k[j * stride + c] as f64).abs())
                        .sum();
                    let tol = (rows as f64 + 2.0) * f32::EPSILON as f64 * mag;
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{isa:?} column {c}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Each supported ISA's copy gives the sequential f64 answer within f32 rounding, on
    /// lengths with and without a remainder.
    #[test]
    fn every_isa_computes_max_exp_sum_and_layer_norm() {
        for isa in Isa::all_supported() {
            for len in [1usize, 15, 16, 37, 384] {
                let x: Vec<f32> = (0..len)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
                    .collect();
                let r: Vec<f32> = (0..len)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                    .collect();
                let g: Vec<f32> = (0..len).map(|i| 0.5 + (i % 7) as f32 / 10.0).collect();
                let b: Vec<f32> = (0..len).map(|i| (i % 5) as f32 / 10.0 - 0.2).collect();
                let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max(isa, &x), m, "{isa:?} max");
                let mut e = x.clone();
                let s = exp_sum(isa, &mut e, 0.7, m * 0.7);
                let want: Vec<f64> = x
                    .iter()
                    .map(|&v| (v as f64 * 0.7 - m as f64 * 0.7).exp())
                    .collect();
                let ws: f64 = want.iter().sum();
                assert!(
                    ((s as f64) - ws).abs() <= 1e-5 * ws,
                    "{isa:?} sum {s} vs {ws}"
                );
                for (got, w) in e.iter().zip(&want) {
                    assert!(
                        (*got as f64 - w).abs() <= 1e-6 * w.max(1e-30) + 1e-38,
                        "{isa:?} exp"
                    );
                }
                let mut out = vec![f32::NAN; len];
                layer_norm_row(isa, &x, Some(&r), &g, &b, 1e-5, &mut out);
                let v: Vec<f64> = x
                    .iter()
                    .zip(&r)
                    .map(|(a, c)| *a as f64 + *c as f64)
                    .collect();
                let mean = v.iter().sum::<f64>() / len as f64;
                let var = v.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / len as f64;
                for (i, (((got, vi), gi), bi)) in out.iter().zip(&v).zip(&g).zip(&b).enumerate() {
                    let want = (vi - mean) / (var + 1e-5).sqrt() * *gi as f64 + *bi as f64;
                    assert!(
                        (*got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{isa:?} layer norm [{i}] of {len}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
