//! Checks the f64 LayerNorm reference against math it does not share: closed forms on
//! hand-built rows, the single-pass E[x²] − E[x]² formula, invariances, exact backward
//! identities, and central finite differences of the forward. CPU only.

use cuattn::dtype::DType;
use cuattn::reference::layernorm::{backward, forward, residual_add, row_stats};
use proptest::prelude::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};

const EPS64: f64 = f64::EPSILON;

/// Fails on NaN as well as on a large error.
#[track_caller]
fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    let err = (got - want).abs();
    assert!(
        err <= tol,
        "{what}: got {got}, want {want}, |err| {err:e} > tol {tol:e}"
    );
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

fn random_vec(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// Two-pass mean and variance of an f64 row; used only to size steps and tolerances.
fn mean_var(row: &[f64]) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().sum::<f64>() / n;
    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var)
}

/// Central difference (f(v+h) − f(v−h)) / 2h, dividing by the step the f64 sums actually took.
fn central(f: impl Fn(f64) -> f64, v: f64, h: f64) -> f64 {
    let (p, m) = (v + h, v - h);
    (f(p) - f(m)) / (p - m)
}

/// `v` with element `j` replaced by `t`.
fn with(v: &[f64], j: usize, t: f64) -> Vec<f64> {
    let mut v = v.to_vec();
    v[j] = t;
    v
}

/// Conditioning of a row's normalisation: how much an absolute rounding error in x (relative to
/// max|x|) is amplified once divided by σ. Rows far from zero relative to their spread lose digits.
fn cond(row: &[f64], rstd: f64) -> f64 {
    1.0 + row.iter().fold(0.0f64, |m, v| m.max(v.abs())) * rstd
}

/// LayerNorm in f64 for inputs that are not f32 (finite-difference perturbations). Same math as
/// the reference, so `own_f64_forward_agrees_with_reference_forward` ties the two together.
fn forward_f64(
    x: &[f64],
    hidden: usize,
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
    eps: f64,
) -> Vec<f64> {
    x.chunks_exact(hidden)
        .flat_map(|row| {
            let (mean, var) = mean_var(row);
            let rstd = 1.0 / (var + eps).sqrt();
            row.iter().enumerate().map(move |(j, v)| {
                (v - mean) * rstd * gamma.map_or(1.0, |g| g[j]) + beta.map_or(0.0, |b| b[j])
            })
        })
        .collect()
}

/// Checks `forward` against the single-pass var = E[x²] − E[x]². Error bounds: recursive
/// summation puts the two means within ε·Σ|x| of each other (2× that is allowed); the single pass loses up to ~4(n+2)·ε·E[x²] of var to cancellation,
/// which rstd = (var+eps)^-½ turns into a relative error ≤ Δvar/(var+eps).
fn check_forward_single_pass(
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) {
    let out = forward(x, hidden, gamma, beta, eps).unwrap();
    assert_eq!(
        (out.y.len(), out.mean.len(), out.rstd.len()),
        (x.len(), x.len() / hidden, x.len() / hidden)
    );
    let (n, eps) = (hidden as f64, eps as f64);
    for (i, row) in x.chunks_exact(hidden).enumerate() {
        let (s1, s2, sa) = row
            .iter()
            .map(|&v| v as f64)
            .fold((0.0, 0.0, 0.0), |(s1, s2, sa), v| {
                (s1 + v, s2 + v * v, sa + v.abs())
            });
        let (mean, mean_sq) = (s1 / n, s2 / n);
        let rstd = 1.0 / (mean_sq - mean * mean + eps).sqrt();
        let d_mean = 2.0 * EPS64 * sa;
        let d_rstd = rstd * (4.0 * (n + 2.0) * EPS64 * mean_sq * rstd * rstd + 4.0 * EPS64);
        assert_close(out.mean[i], mean, d_mean, &format!("mean[{i}]"));
        assert_close(out.rstd[i], rstd, d_rstd, &format!("rstd[{i}]"));
        for (j, &v) in row.iter().enumerate() {
            let g = gamma.map_or(1.0, |g| g[j] as f64);
            let b = beta.map_or(0.0, |b| b[j] as f64);
            let c = v as f64 - mean;
            let y = c * rstd * g + b;
            // Errors carried from mean and rstd, plus four roundings on each side in c·rstd·γ + β.
            let tol =
                g.abs() * (d_mean * rstd + c.abs() * d_rstd) + 8.0 * EPS64 * (y.abs() + b.abs());
            assert_close(out.y[i * hidden + j], y, tol, &format!("y[{i},{j}]"));
        }
    }
}

/// Checks `backward` against central differences of L = Σ dy·y, computed with `forward_f64`.
/// Absent γ is γ = 1 for the dγ check.
fn check_backward_fd(
    dy: &[f32],
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) {
    let bw = backward(dy, x, hidden, gamma, eps).unwrap();
    assert_eq!(
        (bw.dx.len(), bw.dgamma.len(), bw.dbeta.len()),
        (x.len(), hidden, hidden)
    );
    let (dy, x) = (to_f64(dy), to_f64(x));
    let gamma = gamma.map_or_else(|| vec![1.0; hidden], to_f64);
    let beta = beta.map_or_else(|| vec![0.0; hidden], to_f64);
    let (n, eps) = (hidden as f64, eps as f64);

    // dx: only the perturbed row's terms of L move (β adds a constant there, so it is left out).
    for (i, (xr, dyr)) in x
        .chunks_exact(hidden)
        .zip(dy.chunks_exact(hidden))
        .enumerate()
    {
        let loss = |row: &[f64]| dot(dyr, &forward_f64(row, hidden, Some(&gamma), None, eps));
        let sigma = (mean_var(xr).1 + eps).sqrt();
        let rstd = 1.0 / sigma;
        let s: f64 = dyr.iter().zip(&gamma).map(|(d, g)| (d * g).abs()).sum();
        // L is smooth on the scale σ: each x-derivative brings a factor rstd, so with h = 1e-5·σ
        // truncation is (h·rstd)²/6·|∂³L| ≲ 1e-10·C·rstd·Σ|dy·γ| with C = O(1); 1e-9 covers C ≤ 10.
        // Rounding: L is evaluated to ~n·ε·cond·Σ|dy·γ|, then divided by 2h.
        let h = 1e-5 * sigma;
        let tol = 1e-9 * rstd * s + 8.0 * n * EPS64 * cond(xr, rstd) * s / h;
        for j in 0..hidden {
            let fd = central(|t| loss(&with(xr, j, t)), xr[j], h);
            assert_close(bw.dx[i * hidden + j], fd, tol, &format!("dx[{i},{j}]"));
        }
    }

    // dγ, dβ: L is linear in both, so central differences have no truncation error; what is left
    // is L's rounding, ~N·ε·Σ|dy·y| over all N elements, divided by 2h.
    let loss = |g: &[f64], b: &[f64]| dot(&dy, &forward_f64(&x, hidden, Some(g), Some(b), eps));
    let y = forward_f64(&x, hidden, Some(&gamma), Some(&beta), eps);
    let l_mag: f64 = dy.iter().zip(&y).map(|(d, y)| (d * y).abs()).sum::<f64>() + 1.0;
    let h = 1e-5;
    let tol = 8.0 * x.len() as f64 * EPS64 * l_mag / h;
    for j in 0..hidden {
        let fd_gamma = central(|t| loss(&with(&gamma, j, t), &beta), gamma[j], h);
        let fd_beta = central(|t| loss(&gamma, &with(&beta, j, t)), beta[j], h);
        assert_close(bw.dgamma[j], fd_gamma, tol, &format!("dgamma[{j}]"));
        assert_close(bw.dbeta[j], fd_beta, tol, &format!("dbeta[{j}]"));
    }
}

/// Exact identities of the backward, from invariances of y. With g = dy·γ and x̂ the normalised row:
/// - shift: y(x + t·1) = y(x), so Σ_j dx_j = 0;
/// - scale about the mean: x̂(m + c(x−m)) = c·x̂/√(c²var+eps)·√(var+eps), whose c-derivative at 1
///   is x̂·eps/(var+eps); since x−m = σ·x̂, Σ_j dx_j·x̂_j = rstd·eps/(var+eps)·Σ_j g_j·x̂_j
///   (zero only when eps = 0);
/// - dβ_j = Σ_rows dy, dγ_j = Σ_rows dy·x̂ (y is affine in γ and β).
fn check_backward_identities(
    dy: &[f32],
    x: &[f32],
    hidden: usize,
    gamma: Option<&[f32]>,
    eps: f32,
) {
    let bw = backward(dy, x, hidden, gamma, eps).unwrap();
    let xhat = forward(x, hidden, None, None, eps).unwrap().y;
    let (dy, x) = (to_f64(dy), to_f64(x));
    let gamma = gamma.map_or_else(|| vec![1.0; hidden], to_f64);
    let (n, eps) = (hidden as f64, eps as f64);
    for (i, xr) in x.chunks_exact(hidden).enumerate() {
        let rows = i * hidden..(i + 1) * hidden;
        let (dx, xh, dyr) = (&bw.dx[rows.clone()], &xhat[rows.clone()], &dy[rows]);
        let var = mean_var(xr).1;
        let rstd = 1.0 / (var + eps).sqrt();
        let g: Vec<f64> = dyr.iter().zip(&gamma).map(|(d, g)| d * g).collect();
        // dx_j = O(rstd·Σ|g|) and carries x̂'s rounding, which is amplified by cond.
        let tol =
            8.0 * n * n * EPS64 * cond(xr, rstd) * rstd * g.iter().map(|v| v.abs()).sum::<f64>();
        assert_close(dx.iter().sum(), 0.0, tol, &format!("Σ dx, row {i}"));
        assert_close(
            dot(dx, xh),
            rstd * eps / (var + eps) * dot(&g, xh),
            tol,
            &format!("Σ dx·x̂, row {i}"),
        );
    }
    let rows = x.len() / hidden;
    for j in 0..hidden {
        let col = |v: &[f64], i: usize| v[i * hidden + j];
        let dbeta: f64 = (0..rows).map(|i| col(&dy, i)).sum();
        let dgamma: f64 = (0..rows).map(|i| col(&dy, i) * col(&xhat, i)).sum();
        let mag: f64 = (0..rows)
            .map(|i| col(&dy, i).abs() * (1.0 + col(&xhat, i).abs()))
            .sum();
        assert_close(
            bw.dbeta[j],
            dbeta,
            4.0 * rows as f64 * EPS64 * mag,
            &format!("dbeta[{j}]"),
        );
        assert_close(
            bw.dgamma[j],
            dgamma,
            4.0 * rows as f64 * EPS64 * mag,
            &format!("dgamma[{j}]"),
        );
    }
}

#[test]
fn constant_row_normalises_to_beta() {
    // Σ of n equal f32 values is exact in f64, so mean = c and var = 0 exactly: y = β, rstd = eps^-½.
    let eps = 1e-5f32;
    for hidden in 1..=9 {
        for c in [0.1f32, -3.7, 1e4, 0.0] {
            let beta: Vec<f32> = (0..hidden).map(|j| j as f32 * 0.5 - 1.0).collect();
            let gamma = vec![2.5f32; hidden];
            let out = forward(&vec![c; hidden], hidden, Some(&gamma), Some(&beta), eps).unwrap();
            assert_eq!(out.y, to_f64(&beta), "hidden {hidden}, c {c}");
            assert_eq!(out.mean, [c as f64]);
            assert_close(
                out.rstd[0],
                1.0 / (eps as f64).sqrt(),
                2.0 * EPS64 * out.rstd[0],
                "rstd",
            );
        }
    }
}

#[test]
fn two_element_row_matches_closed_form() {
    // [a, b]: mean (a+b)/2, var ((a−b)/2)², y = ±((a−b)/2)·rstd.
    let exact = forward(&[3.0, -1.0], 2, Some(&[2.0, 0.5]), Some(&[0.25, -1.0]), 0.0).unwrap();
    assert_eq!((exact.mean[0], exact.rstd[0]), (1.0, 0.5));
    assert_eq!(exact.y, [2.25, -1.5]);

    let mut rng = SmallRng::seed_from_u64(2);
    for _ in 0..200 {
        let (a, b) = (rng.gen_range(-10.0f32..10.0), rng.gen_range(-10.0f32..10.0));
        let eps = rng.gen_range(0.0f32..0.1);
        let half = (a as f64 - b as f64) / 2.0;
        let rstd = 1.0 / (half * half + eps as f64).sqrt();
        let out = forward(&[a, b], 2, None, None, eps).unwrap();
        assert_close(out.mean[0], (a as f64 + b as f64) / 2.0, 0.0, "mean");
        assert_close(out.rstd[0], rstd, 4.0 * EPS64 * rstd, "rstd");
        assert_close(out.y[0], half * rstd, 8.0 * EPS64, "y0");
        assert_close(out.y[1], -half * rstd, 8.0 * EPS64, "y1");
    }
}

#[test]
fn forward_matches_single_pass_formula() {
    let mut rng = SmallRng::seed_from_u64(3);
    for (rows, hidden) in [(1, 1), (3, 2), (2, 7), (4, 64), (5, 333)] {
        let x = random_vec(&mut rng, rows * hidden, -10.0, 10.0);
        let gamma = random_vec(&mut rng, hidden, -2.0, 2.0);
        let beta = random_vec(&mut rng, hidden, -2.0, 2.0);
        check_forward_single_pass(&x, hidden, None, None, 1e-5);
        check_forward_single_pass(&x, hidden, Some(&gamma), Some(&beta), 1e-5);
    }
}

#[test]
fn normalised_row_has_zero_mean_and_unit_variance() {
    // eps = 0, no affine: Σy/n = 0 and Σy²/n = 1 up to rounding.
    let mut rng = SmallRng::seed_from_u64(4);
    for hidden in [2, 3, 9, 100] {
        let x = random_vec(&mut rng, hidden, -10.0, 10.0);
        let y = forward(&x, hidden, None, None, 0.0).unwrap().y;
        let n = hidden as f64;
        assert_close(y.iter().sum::<f64>() / n, 0.0, 8.0 * n * EPS64, "mean(y)");
        assert_close(dot(&y, &y) / n, 1.0, 8.0 * n * EPS64, "mean(y²)");
    }
}

#[test]
fn eps_shrinks_output_variance_to_var_over_var_plus_eps() {
    // mean(y²) = var·rstd² = var/(var+eps), with var from the single-pass formula here.
    let mut rng = SmallRng::seed_from_u64(5);
    for (hidden, eps) in [(2, 1.0f32), (5, 0.1), (9, 1e-3), (50, 4.0)] {
        let x = random_vec(&mut rng, hidden, -2.0, 2.0);
        let y = forward(&x, hidden, None, None, eps).unwrap().y;
        let (n, xs) = (hidden as f64, to_f64(&x));
        let mean = xs.iter().sum::<f64>() / n;
        let var = dot(&xs, &xs) / n - mean * mean;
        assert_close(
            dot(&y, &y) / n,
            var / (var + eps as f64),
            64.0 * n * EPS64,
            "mean(y²)",
        );
    }
}

#[test]
fn output_is_invariant_to_shift_and_positive_scale() {
    // With eps = 0, forward(c·x + d).unwrap() = forward(x).unwrap() for c > 0; mean → c·mean + d, rstd → rstd/c.
    // x holds multiples of 1/8 so that c·x + d is exact in f32.
    let mut rng = SmallRng::seed_from_u64(6);
    for hidden in [2, 5, 16] {
        let x: Vec<f32> = (0..hidden)
            .map(|_| rng.gen_range(-80i32..80) as f32 / 8.0)
            .collect();
        if x.iter().all(|&v| v == x[0]) {
            continue; // a constant row has rstd = 1/√0
        }
        let gamma = random_vec(&mut rng, hidden, -2.0, 2.0);
        let beta = random_vec(&mut rng, hidden, -2.0, 2.0);
        let base = forward(&x, hidden, Some(&gamma), Some(&beta), 0.0).unwrap();
        for (c, d) in [(3.0f32, 0.5f32), (0.5, -7.25), (1024.0, 100.0)] {
            let moved: Vec<f32> = x.iter().map(|&v| c * v + d).collect();
            let out = forward(&moved, hidden, Some(&gamma), Some(&beta), 0.0).unwrap();
            let (c, d) = (c as f64, d as f64);
            assert_close(
                out.mean[0],
                c * base.mean[0] + d,
                1e-12 * (c * 10.0 + d.abs()),
                "mean",
            );
            assert_close(
                out.rstd[0],
                base.rstd[0] / c,
                1e-12 * base.rstd[0] / c,
                "rstd",
            );
            for (a, b) in out.y.iter().zip(&base.y) {
                assert_close(*a, *b, 1e-12, "y");
            }
        }
    }
}

#[test]
fn rows_are_normalised_independently() {
    let mut rng = SmallRng::seed_from_u64(7);
    let hidden = 6;
    let x = random_vec(&mut rng, 4 * hidden, -10.0, 10.0);
    let gamma = random_vec(&mut rng, hidden, -2.0, 2.0);
    let all = forward(&x, hidden, Some(&gamma), None, 1e-5).unwrap();
    for (i, row) in x.chunks_exact(hidden).enumerate() {
        let one = forward(row, hidden, Some(&gamma), None, 1e-5).unwrap();
        assert_eq!(one.y, all.y[i * hidden..(i + 1) * hidden]);
        assert_eq!((one.mean[0], one.rstd[0]), (all.mean[i], all.rstd[i]));
        assert_eq!((one.mean[0], one.rstd[0]), row_stats(row, 1e-5));
    }
}

#[test]
fn own_f64_forward_agrees_with_reference_forward() {
    let mut rng = SmallRng::seed_from_u64(8);
    for hidden in [1, 2, 7, 40] {
        let x = random_vec(&mut rng, 3 * hidden, -10.0, 10.0);
        let gamma = random_vec(&mut rng, hidden, -2.0, 2.0);
        let beta = random_vec(&mut rng, hidden, -2.0, 2.0);
        let theirs = forward(&x, hidden, Some(&gamma), Some(&beta), 1e-3)
            .unwrap()
            .y;
        let ours = forward_f64(
            &to_f64(&x),
            hidden,
            Some(&to_f64(&gamma)),
            Some(&to_f64(&beta)),
            1e-3f32 as f64,
        );
        let plain = forward(&x, hidden, None, None, 1e-3).unwrap().y;
        let ours_plain = forward_f64(&to_f64(&x), hidden, None, None, 1e-3f32 as f64);
        for (a, b) in theirs
            .iter()
            .chain(&plain)
            .zip(ours.iter().chain(&ours_plain))
        {
            assert_close(*a, *b, 1e-12, "y");
        }
    }
}

/// Rows 1..=4, hidden 1..=9, γ present and absent, rows spread over [-10, 10] and rows nearly
/// constant (var ≪ eps, where eps dominates).
fn backward_cases(
    mut check: impl FnMut(&[f32], &[f32], usize, Option<&[f32]>, Option<&[f32]>, f32),
) {
    let mut rng = SmallRng::seed_from_u64(9);
    for rows in 1..=4 {
        for hidden in 1..=9 {
            let n = rows * hidden;
            let dy = random_vec(&mut rng, n, -2.0, 2.0);
            let gamma = random_vec(&mut rng, hidden, -2.0, 2.0);
            let beta = random_vec(&mut rng, hidden, -2.0, 2.0);
            let spread = random_vec(&mut rng, n, -10.0, 10.0);
            let flat: Vec<f32> = random_vec(&mut rng, n, -1e-3, 1e-3)
                .iter()
                .map(|v| 3.0 + v)
                .collect();
            for x in [&spread, &flat] {
                check(&dy, x, hidden, Some(&gamma), Some(&beta), 1e-5);
                check(&dy, x, hidden, None, None, 1e-5);
            }
        }
    }
}

#[test]
fn backward_matches_central_finite_differences() {
    backward_cases(check_backward_fd);
}

#[test]
fn dx_sums_to_zero_and_its_projection_on_xhat_follows_eps() {
    backward_cases(|dy, x, hidden, gamma, _, eps| {
        check_backward_identities(dy, x, hidden, gamma, eps);
        if hidden > 1 {
            // eps = 0: dx ⟂ x̂ exactly (a single element has var = 0 and needs eps > 0).
            check_backward_identities(dy, x, hidden, gamma, 0.0);
        }
    });
}

#[test]
fn residual_add_rounds_the_sum_to_f16() {
    let p = |e: i32| 2f32.powi(e);
    let cases = [
        (1.0, p(-12), 1.0),                // below half an ulp (2^-11): rounds down
        (1.0, 3.0 * p(-12), 1.0 + p(-10)), // above half an ulp: rounds up
        (1.0, p(-11), 1.0),                // tie: to even
        (1.0, 3.0 * p(-11), 1.0 + p(-9)),  // tie: to even, upwards
        (2048.0, 1.0, 2048.0),             // ulp is 2 from 2048 up
        (-1.0, -p(-12), -1.0),
    ];
    for (a, b, want) in cases {
        assert_eq!(
            residual_add(&[a], &[b], DType::F16).unwrap(),
            [want],
            "{a} + {b}"
        );
        assert_eq!(
            residual_add(&[a], &[b], DType::F32).unwrap(),
            [a + b],
            "{a} + {b} in f32 is exact"
        );
    }
}

#[test]
fn residual_add_rounds_the_sum_to_bf16() {
    let cases = [
        (1.0, 2f32.powi(-9), 1.0), // below half an ulp (2^-8)
        (1.0, 2f32.powi(-7), 1.0 + 2f32.powi(-7)),
        (256.0, 1.0, 256.0), // ulp 2: tie to even
        (256.0, 3.0, 260.0), // tie to even, upwards
    ];
    for (a, b, want) in cases {
        assert_eq!(
            residual_add(&[a], &[b], DType::BF16).unwrap(),
            [want],
            "{a} + {b}"
        );
    }
}

#[test]
fn residual_add_forms_the_sum_in_f32_before_rounding() {
    // 1 + 2^-11 + 2^-30 rounds to 1 + 2^-10 in one step, but the f32 sum drops 2^-30 and leaves
    // an f16 tie, which rounds to even: 1.
    assert_eq!(
        residual_add(&[1.0 + 2f32.powi(-11)], &[2f32.powi(-30)], DType::F16).unwrap(),
        [1.0]
    );
}

#[test]
fn residual_add_returns_the_nearest_value_of_the_dtype() {
    let mut rng = SmallRng::seed_from_u64(10);
    let x = random_vec(&mut rng, 1000, -10.0, 10.0);
    let r = random_vec(&mut rng, 1000, -10.0, 10.0);
    for dt in DType::ALL {
        // f16 sums below 2^-14 are subnormal, with absolute spacing 2^-24.
        let floor = if dt == DType::F16 {
            2f64.powi(-25)
        } else {
            0.0
        };
        for ((&a, &b), &s) in x.iter().zip(&r).zip(&residual_add(&x, &r, dt).unwrap()) {
            assert_eq!(dt.round(s), s, "{dt}: {s} is not representable");
            let exact = a as f64 + b as f64;
            let tol = (dt.unit_roundoff() + DType::F32.unit_roundoff()) * exact.abs() + floor;
            assert_close(s as f64, exact, tol, &format!("{dt}: {a} + {b}"));
        }
    }
}

/// One random LayerNorm problem; eps is log-uniform in [1e-6, 1e-2].
#[derive(Clone, Debug)]
struct Case {
    hidden: usize,
    x: Vec<f32>,
    dy: Vec<f32>,
    gamma: Option<Vec<f32>>,
    beta: Option<Vec<f32>>,
    eps: f32,
}

fn layernorm_case() -> impl Strategy<Value = Case> {
    (1usize..=6, 1usize..=40).prop_flat_map(|(rows, hidden)| {
        let v = |n| prop::collection::vec(-10.0f32..10.0, n);
        let eps = (-6.0f64..-2.0).prop_map(|e| 10f64.powf(e) as f32);
        let affine = (prop::option::of(v(hidden)), prop::option::of(v(hidden)));
        (v(rows * hidden), v(rows * hidden), affine, eps).prop_map(
            move |(x, dy, (gamma, beta), eps)| Case {
                hidden,
                x,
                dy,
                gamma,
                beta,
                eps,
            },
        )
    })
}

// Default 256 cases (~0.1 s); PROPTEST_CASES raises it for a stress run.
proptest! {
    #[test]
    fn prop_forward_matches_single_pass(c in layernorm_case()) {
        check_forward_single_pass(&c.x, c.hidden, c.gamma.as_deref(), c.beta.as_deref(), c.eps);
    }

    #[test]
    fn prop_backward_matches_finite_differences_and_identities(c in layernorm_case()) {
        check_backward_fd(&c.dy, &c.x, c.hidden, c.gamma.as_deref(), c.beta.as_deref(), c.eps);
        check_backward_identities(&c.dy, &c.x, c.hidden, c.gamma.as_deref(), c.eps);
    }
}
