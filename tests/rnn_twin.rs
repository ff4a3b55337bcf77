//! The recurrent ops' kernel twins (`cuattn::twin::rnn`: the loops of kernels/rnn_ops.cu in
//! f32) against f64: the GRU and LSTM steps' grid-stride loops under several grid shapes with
//! inactive rows, and the additive-attention blocks at several block sizes with padded, empty and full
//! sequences and widths on both sides of a warp. Forward outputs are held to
//! `cuattn::reference::seq2seq`; the backward to the chain rule in f64 written out here, itself
//! checked against central differences of the f64 forward. CPU only.

use cuattn::dtype::DType;
use cuattn::reference::seq2seq as reference;
use cuattn::runtime::train::rnn_ops::AdditiveDims;
use cuattn::tolerance::{expect_close, Tolerance};
use cuattn::twin::rnn as twin;
use proptest::prelude::*;
use rand::{rngs::SmallRng, Rng, SeedableRng};

fn values(rng: &mut SmallRng, n: usize, spread: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-spread..spread)).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The GRU backward in f64 from the pre-activations: (dgi, dgh, dh direct).
fn gru_backward_f64(gi: &[f64], gh: &[f64], h: &[f64], dout: &[f64], hd: usize) -> [Vec<f64>; 3] {
    let batch = h.len() / hd;
    let (mut dgi, mut dgh, mut dh) = (
        vec![0.0; batch * 3 * hd],
        vec![0.0; batch * 3 * hd],
        vec![0.0; batch * hd],
    );
    for b in 0..batch {
        for u in 0..hd {
            let (g, i) = (b * 3 * hd + u, b * hd + u);
            let r = sigmoid(gi[g] + gh[g]);
            let z = sigmoid(gi[g + hd] + gh[g + hd]);
            let n = (gi[g + 2 * hd] + r * gh[g + 2 * hd]).tanh();
            let d = dout[i];
            let dn = d * (1.0 - z) * (1.0 - n * n);
            let dz = d * (h[i] - n) * z * (1.0 - z);
            let dr = dn * gh[g + 2 * hd] * r * (1.0 - r);
            dh[i] = d * z;
            dgi[g] = dr;
            dgi[g + hd] = dz;
            dgi[g + 2 * hd] = dn;
            dgh[g] = dr;
            dgh[g + hd] = dz;
            dgh[g + 2 * hd] = dn * r;
        }
    }
    [dgi, dgh, dh]
}

/// The LSTM backward in f64 from the pre-activations, c and (dh', dc'): (dgates, dc). The
/// direct part of dh is zero (h enters only through gh).
fn lstm_backward_f64(
    gi: &[f64],
    gh: &[f64],
    c: &[f64],
    dh_out: &[f64],
    dc_out: &[f64],
    hd: usize,
) -> [Vec<f64>; 2] {
    let batch = c.len() / hd;
    let (mut dgates, mut dc) = (vec![0.0; batch * 4 * hd], vec![0.0; batch * hd]);
    for b in 0..batch {
        for u in 0..hd {
            let (g, k) = (b * 4 * hd + u, b * hd + u);
            let a = |j: usize| gi[g + j * hd] + gh[g + j * hd];
            let (i, f, gg, o) = (sigmoid(a(0)), sigmoid(a(1)), a(2).tanh(), sigmoid(a(3)));
            let t = (f * c[k] + i * gg).tanh();
            let dct = dc_out[k] + dh_out[k] * o * (1.0 - t * t);
            dgates[g] = dct * gg * i * (1.0 - i);
            dgates[g + hd] = dct * c[k] * f * (1.0 - f);
            dgates[g + 2 * hd] = dct * i * (1.0 - gg * gg);
            dgates[g + 3 * hd] = dh_out[k] * t * o * (1.0 - o);
            dc[k] = dct * f;
        }
    }
    [dgates, dc]
}

/// Additive attention's backward in f64: (dq, dkeys, dv, dvalues), padded keys zero.
#[allow(clippy::too_many_arguments)]
fn additive_backward_f64(
    q: &[f64],
    keys: &[f64],
    v: &[f64],
    values: &[f64],
    dctx: &[f64],
    d: &AdditiveDims,
    lens: &[usize],
) -> [Vec<f64>; 4] {
    let (a, dv_, l) = (d.dim_a, d.dim_v, d.len_k);
    let (_, alpha) = reference::additive_attention(q, keys, v, values, l, lens);
    let mut dq = vec![0.0; d.batch * a];
    let mut dk = vec![0.0; d.batch * l * a];
    let mut dv = vec![0.0; a];
    let mut dval = vec![0.0; d.batch * l * dv_];
    for b in 0..d.batch {
        let len = lens[b];
        let da: Vec<f64> = (0..len)
            .map(|j| {
                (0..dv_)
                    .map(|c| dctx[b * dv_ + c] * values[(b * l + j) * dv_ + c])
                    .sum()
            })
            .collect();
        let mean: f64 = (0..len).map(|j| alpha[b * l + j] * da[j]).sum();
        for j in 0..len {
            let aj = alpha[b * l + j];
            for c in 0..dv_ {
                dval[(b * l + j) * dv_ + c] = aj * dctx[b * dv_ + c];
            }
            let de = aj * (da[j] - mean);
            for c in 0..a {
                let t = (q[b * a + c] + keys[(b * l + j) * a + c]).tanh();
                let du = de * v[c] * (1.0 - t * t);
                dk[(b * l + j) * a + c] = du;
                dq[b * a + c] += du;
                dv[c] += de * t;
            }
        }
    }
    [dq, dk, dv, dval]
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// The f64 chain rule above agrees with central differences of the f64 forward (loss =
/// dctx · ctx), so the twin is held to a derivative, not to a copy of its own formulas.
#[test]
fn the_f64_backward_matches_central_differences() {
    let mut rng = SmallRng::seed_from_u64(7);
    let d = AdditiveDims {
        batch: 2,
        len_k: 5,
        dim_a: 3,
        dim_v: 4,
    };
    let lens = [5usize, 3];
    let q = f64s(&values(&mut rng, 6, 1.0));
    let keys = f64s(&values(&mut rng, 30, 1.0));
    let v = f64s(&values(&mut rng, 3, 1.0));
    let vals = f64s(&values(&mut rng, 40, 1.0));
    let dctx = f64s(&values(&mut rng, 8, 1.0));
    let loss = |q: &[f64], k: &[f64], v: &[f64], x: &[f64]| -> f64 {
        let (c, _) = reference::additive_attention(q, k, v, x, 5, &lens);
        c.iter().zip(&dctx).map(|(a, b)| a * b).sum()
    };
    let [dq, dk, dv, dval] = additive_backward_f64(&q, &keys, &v, &vals, &dctx, &d, &lens);
    let h = 1e-6;
    let fd = |which: usize, i: usize| {
        let mut ins = [q.clone(), keys.clone(), v.clone(), vals.clone()];
        ins[which][i] += h;
        let up = loss(&ins[0], &ins[1], &ins[2], &ins[3]);
        ins[which][i] -= 2.0 * h;
        let down = loss(&ins[0], &ins[1], &ins[2], &ins[3]);
        (up - down) / (2.0 * h)
    };
    for (which, grad) in [&dq, &dk, &dv, &dval].into_iter().enumerate() {
        for (i, &g) in grad.iter().enumerate() {
            let n = fd(which, i);
            assert!((g - n).abs() < 1e-7, "input {which}[{i}]: {g} vs {n}");
        }
    }
    let (gi, gh, hs, dout) = (
        f64s(&values(&mut rng, 6, 2.0)),
        f64s(&values(&mut rng, 6, 2.0)),
        f64s(&values(&mut rng, 2, 1.0)),
        f64s(&values(&mut rng, 2, 1.0)),
    );
    let [dgi, dgh, dh] = gru_backward_f64(&gi, &gh, &hs, &dout, 1);
    let gru_loss = |gi: &[f64], gh: &[f64], h: &[f64]| -> f64 {
        let o = reference::gru_cell(gi, gh, h, 1);
        o.iter().zip(&dout).map(|(a, b)| a * b).sum()
    };
    for i in 0..6 {
        for (which, grad) in [(0, &dgi), (1, &dgh)] {
            let mut ins = [gi.clone(), gh.clone()];
            ins[which][i] += h;
            let up = gru_loss(&ins[0], &ins[1], &hs);
            ins[which][i] -= 2.0 * h;
            let down = gru_loss(&ins[0], &ins[1], &hs);
            let n = (up - down) / (2.0 * h);
            assert!((grad[i] - n).abs() < 1e-7, "gru input {which}[{i}]");
        }
    }
    // dh here is the direct path only: with gh held fixed, ∂h'/∂h = z.
    for i in 0..2 {
        let mut hp = hs.clone();
        hp[i] += h;
        let up = gru_loss(&gi, &gh, &hp);
        hp[i] -= 2.0 * h;
        let down = gru_loss(&gi, &gh, &hp);
        assert!(
            (dh[i] - (up - down) / (2.0 * h)).abs() < 1e-7,
            "gru dh[{i}]"
        );
    }
}

/// The f64 LSTM chain rule against central differences of `reference::lstm_cell` (loss =
/// dh'·h' + dc'·c'), for both GEMM inputs and c.
#[test]
fn the_f64_lstm_backward_matches_central_differences() {
    let mut rng = SmallRng::seed_from_u64(9);
    let hd = 3;
    let gi = f64s(&values(&mut rng, 2 * 4 * hd, 2.0));
    let gh = f64s(&values(&mut rng, 2 * 4 * hd, 2.0));
    let c = f64s(&values(&mut rng, 2 * hd, 2.0));
    let dh_out = f64s(&values(&mut rng, 2 * hd, 1.0));
    let dc_out = f64s(&values(&mut rng, 2 * hd, 1.0));
    let loss = |ins: &[Vec<f64>; 3]| -> f64 {
        let (h, c) = reference::lstm_cell(&ins[0], &ins[1], &ins[2], hd);
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        dot(&h, &dh_out) + dot(&c, &dc_out)
    };
    let [dgates, dc] = lstm_backward_f64(&gi, &gh, &c, &dh_out, &dc_out, hd);
    let h = 1e-6;
    for (which, grad) in [(0, &dgates), (1, &dgates), (2, &dc)] {
        for (i, &g) in grad.iter().enumerate() {
            let mut ins = [gi.clone(), gh.clone(), c.clone()];
            ins[which][i] += h;
            let up = loss(&ins);
            ins[which][i] -= 2.0 * h;
            let down = loss(&ins);
            let n = (up - down) / (2.0 * h);
            assert!((g - n).abs() < 1e-7, "lstm input {which}[{i}]: {g} vs {n}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn lstm_twin_matches_the_reference_under_any_grid(
        batch in 1usize..6, hidden in 1usize..70, grid in 1usize..5, block_warps in 1usize..5,
        inactive in any::<u8>(), seed in any::<u64>(),
    ) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let gi = values(&mut rng, batch * 4 * hidden, 3.0);
        let gh = values(&mut rng, batch * 4 * hidden, 3.0);
        let h = values(&mut rng, batch * hidden, 1.0);
        let c = values(&mut rng, batch * hidden, 2.0);
        let dh_out = values(&mut rng, batch * hidden, 1.0);
        let dc_out = values(&mut rng, batch * hidden, 1.0);
        let active: Vec<bool> = (0..batch).map(|b| inactive >> (b % 8) & 1 == 0).collect();
        let block = 32 * block_warps;
        let (h_out, c_out, cache) =
            twin::lstm_forward(&gi, &gh, &h, &c, Some(&active), batch, hidden, grid, block);
        let (dgates, dh, dc) = twin::lstm_backward(
            &cache, &c, &dh_out, &dc_out, Some(&active), batch, hidden, grid, block);
        let (mut want_h, mut want_c) =
            reference::lstm_cell(&f64s(&gi), &f64s(&gh), &f64s(&c), hidden);
        let [mut want_dg, mut want_dc] = lstm_backward_f64(
            &f64s(&gi), &f64s(&gh), &f64s(&c), &f64s(&dh_out), &f64s(&dc_out), hidden);
        let mut want_dh = vec![0.0; batch * hidden];
        // Inactive rows keep (h, c) and pass (dh', dc') through with zero gate gradients.
        for b in (0..batch).filter(|&b| !active[b]) {
            for k in b * hidden..(b + 1) * hidden {
                want_h[k] = h[k] as f64;
                want_c[k] = c[k] as f64;
                want_dh[k] = dh_out[k] as f64;
                want_dc[k] = dc_out[k] as f64;
            }
            want_dg[b * 4 * hidden..(b + 1) * 4 * hidden].fill(0.0);
        }
        // c' = f c + i g sums two terms ≤ 2; each gradient is a product of ≤ 5 factors
        // bounded by max(|dh'|, |dc'|)·(1 + |c|) ≤ 6.
        let tol = |scale: f64| Tolerance::for_output(DType::F32, 8, scale);
        expect_close("h'", &h_out, &want_h, tol(3.0)).map_err(TestCaseError::fail)?;
        expect_close("c'", &c_out, &want_c, tol(3.0)).map_err(TestCaseError::fail)?;
        expect_close("dgates", &dgates, &want_dg, tol(6.0)).map_err(TestCaseError::fail)?;
        expect_close("dc", &dc, &want_dc, tol(6.0)).map_err(TestCaseError::fail)?;
        expect_close("dh", &dh, &want_dh, tol(1.0)).map_err(TestCaseError::fail)?;
        prop_assert!(cache.iter().all(|x| x.is_finite()), "cache fully written");
    }

    #[test]
    fn gru_twin_matches_the_reference_under_any_grid(
        batch in 1usize..6, hidden in 1usize..70, grid in 1usize..5, block_warps in 1usize..5,
        inactive in any::<u8>(), seed in any::<u64>(),
    ) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let gi = values(&mut rng, batch * 3 * hidden, 3.0);
        let gh = values(&mut rng, batch * 3 * hidden, 3.0);
        let h = values(&mut rng, batch * hidden, 1.0);
        let dout = values(&mut rng, batch * hidden, 1.0);
        let active: Vec<bool> = (0..batch).map(|b| inactive >> (b % 8) & 1 == 0).collect();
        let block = 32 * block_warps;
        let (out, cache) = twin::gru_forward(&gi, &gh, &h, Some(&active), batch, hidden, grid, block);
        let (dgi, dgh, dh) = twin::gru_backward(&cache, &h, &dout, Some(&active), batch, hidden, grid, block);
        let full = reference::gru_cell(&f64s(&gi), &f64s(&gh), &f64s(&h), hidden);
        let [wdgi, wdgh, wdh] = gru_backward_f64(&f64s(&gi), &f64s(&gh), &f64s(&h), &f64s(&dout), hidden);
        // Inactive rows keep h and pass dh' through with zero gate gradients.
        let (mut want_out, mut want_dgi, mut want_dgh, mut want_dh) = (full, wdgi, wdgh, wdh);
        for b in (0..batch).filter(|&b| !active[b]) {
            for u in 0..hidden {
                want_out[b * hidden + u] = h[b * hidden + u] as f64;
                want_dh[b * hidden + u] = dout[b * hidden + u] as f64;
            }
            for g in 0..3 * hidden {
                want_dgi[b * 3 * hidden + g] = 0.0;
                want_dgh[b * 3 * hidden + g] = 0.0;
            }
        }
        let tol = |scale: f64| Tolerance::for_output(DType::F32, 8, scale);
        expect_close("h'", &out, &want_out, tol(3.0)).map_err(TestCaseError::fail)?;
        expect_close("dgi", &dgi, &want_dgi, tol(3.0)).map_err(TestCaseError::fail)?;
        expect_close("dgh", &dgh, &want_dgh, tol(3.0)).map_err(TestCaseError::fail)?;
        expect_close("dh", &dh, &want_dh, tol(1.0)).map_err(TestCaseError::fail)?;
        prop_assert!(cache.iter().all(|x| x.is_finite()), "cache fully written");
    }

    #[test]
    fn additive_twin_matches_the_reference_at_any_block_size(
        batch in 1usize..5, len_k in 1usize..40, dim_a in 1usize..70, dim_v in 1usize..70,
        warps in prop::sample::select(vec![1usize, 2, 8]), lens_seed in any::<u64>(),
        seed in any::<u64>(),
    ) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let d = AdditiveDims { batch, len_k, dim_a, dim_v };
        let q = values(&mut rng, batch * dim_a, 1.5);
        let keys = values(&mut rng, batch * len_k * dim_a, 1.5);
        let v = values(&mut rng, dim_a, 1.0);
        let vals = values(&mut rng, batch * len_k * dim_v, 1.0);
        let dctx = values(&mut rng, batch * dim_v, 1.0);
        // Lengths from empty to full; the device lengths are clamped, so also one out of range.
        let mut lr = SmallRng::seed_from_u64(lens_seed);
        let lens: Vec<usize> = (0..batch)
            .map(|b| match b { 0 => len_k, 1 => 0, _ => lr.gen_range(0..=len_k) })
            .collect();
        let mut device_lens: Vec<i32> = lens.iter().map(|&n| n as i32).collect();
        if batch > 2 && lens[2] == len_k {
            device_lens[2] = len_k as i32 + 5;
        }
        let threads = 32 * warps;
        let (ctx, alpha) = twin::additive_forward(&q, &keys, &v, &vals, &d, Some(&device_lens), threads);
        let (wctx, walpha) = reference::additive_attention(
            &f64s(&q), &f64s(&keys), &f64s(&v), &f64s(&vals), len_k, &lens);
        expect_close("ctx", &ctx, &wctx, Tolerance::for_output(DType::F32, len_k * dim_a, 1.0))
            .map_err(TestCaseError::fail)?;
        expect_close("alpha", &alpha, &walpha, Tolerance::for_output(DType::F32, dim_a, 1.0))
            .map_err(TestCaseError::fail)?;
        let [dq, dkeys, dvalues, dv_part] = twin::additive_backward(
            &q, &keys, &v, &vals, &alpha, &dctx, &d, Some(&device_lens), threads);
        // The host sums dv_part over the batch in order.
        let dv: Vec<f32> = (0..dim_a)
            .map(|c| (0..batch).map(|b| dv_part[b * dim_a + c]).sum())
            .collect();
        let [wdq, wdk, wdv, wdval] = additive_backward_f64(
            &f64s(&q), &f64s(&keys), &f64s(&v), &f64s(&vals), &f64s(&dctx), &d, &lens);
        let n = len_k * (dim_a + dim_v);
        for (what, out, want) in [
            ("dq", &dq, &wdq), ("dkeys", &dkeys, &wdk), ("dv", &dv, &wdv),
            ("dvalues", &dvalues, &wdval),
        ] {
            let scale = max_abs(want).max(1.0);
            expect_close(what, out, want, Tolerance::for_output(DType::F32, n * batch, scale))
                .map_err(TestCaseError::fail)?;
        }
    }
}
