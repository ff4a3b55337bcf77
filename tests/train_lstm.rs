//! The LSTM step (`cuattn::runtime::train::rnn_ops::lstm_step`, PyTorch's `nn.LSTM` gate
//! equations) on the CPU backend: forward against the f64 reference
//! (`cuattn::reference::seq2seq::lstm_cell`) as a property test with inactive (padded) rows;
//! backward against central finite differences of that reference; and a whole `nn.LSTM`
//! layer over a packed batch (lengths 3, 2, 1) against PyTorch's outputs and autograd
//! gradients (`tests/fixtures/lstm-tiny.json`, `scripts/make_fixtures.py --only lstm`), the
//! recurrence and its backward through time written here from the step and GEMMs.
//!
//! Tolerance: the f32 rule of `cuattn::tolerance` for sums of n terms of magnitude ≤ scale
//! (as tests/train_seq2seq.rs); the fixture comparison holds every value to it with n the
//! longest sum on its path (steps × (input + hidden) for the weight gradients).

use cuattn::reference::runtime::widen;
use cuattn::reference::seq2seq as reference;
use cuattn::runtime::train::rnn_ops::{lstm_step, lstm_step_backward};
use cuattn::runtime::train::{Op, TrainBackend};
use cuattn::runtime::{Activation, Backend, Cpu, CpuTensor};
use cuattn::tolerance::{compare, Tolerance};
use cuattn::DType;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn up(shape: &[usize], v: &[f32]) -> CpuTensor {
    Cpu.upload_as(shape, v, DType::F32).unwrap()
}

fn host(t: &CpuTensor) -> Vec<f32> {
    Cpu.to_f32(t).unwrap()
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |a, &b| a.max((b as f64).abs()))
}

fn numeric_grad(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-5 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let lp = loss(&xp);
            xp[i] = x[i] - h;
            let lm = loss(&xp);
            xp[i] = x[i];
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

#[track_caller]
fn expect_close(what: &str, got: &[f32], want: &[f64], n: usize, scale: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let c = compare(got, want, Tolerance::for_output(DType::F32, n, scale));
    assert!(
        c.passed,
        "{what}: {c:?} (got {} vs {})",
        got[c.worst_index], want[c.worst_index]
    );
}

/// The reference step with inactive rows keeping (h, c).
fn reference_step(
    gi: &[f64],
    gh: &[f64],
    h: &[f64],
    c: &[f64],
    hidden: usize,
    active: &[bool],
) -> (Vec<f64>, Vec<f64>) {
    let (mut hn, mut cn) = reference::lstm_cell(gi, gh, c, hidden);
    for (b, &a) in active.iter().enumerate() {
        if !a {
            hn[b * hidden..(b + 1) * hidden].copy_from_slice(&h[b * hidden..(b + 1) * hidden]);
            cn[b * hidden..(b + 1) * hidden].copy_from_slice(&c[b * hidden..(b + 1) * hidden]);
        }
    }
    (hn, cn)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn lstm_step_matches_the_f64_reference_and_keeps_inactive_rows(
        seed in 0u64..1000, batch in 1usize..5, hidden in 1usize..9,
    ) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let gi = rand_vec(&mut rng, batch * 4 * hidden, 2.0);
        let gh = rand_vec(&mut rng, batch * 4 * hidden, 2.0);
        let h = rand_vec(&mut rng, batch * hidden, 1.0);
        let c = rand_vec(&mut rng, batch * hidden, 2.0);
        let active: Vec<bool> = (0..batch).map(|_| rng.gen_bool(0.7)).collect();
        let (hn, cn, _) = lstm_step(
            &Cpu,
            &up(&[batch, 4 * hidden], &gi),
            &up(&[batch, 4 * hidden], &gh),
            &up(&[batch, hidden], &h),
            &up(&[batch, hidden], &c),
            Some(&active),
        )
        .unwrap();
        let (want_h, want_c) =
            reference_step(&widen(&gi), &widen(&gh), &widen(&h), &widen(&c), hidden, &active);
        // c' = f∘c + i∘g: two terms ≤ max(|c|, 1); h' = o∘tanh(c'), bounded by 1.
        expect_close("c'", &host(&cn), &want_c, 2, 1.0 + max_abs(&c));
        expect_close("h'", &host(&hn), &want_h, 3, 1.0 + max_abs(&c));
    }
}

#[test]
fn lstm_step_backward_matches_finite_differences() {
    let (batch, hidden) = (3, 5);
    let mut rng = SmallRng::seed_from_u64(12);
    let gi = rand_vec(&mut rng, batch * 4 * hidden, 2.0);
    let gh = rand_vec(&mut rng, batch * 4 * hidden, 2.0);
    let h = rand_vec(&mut rng, batch * hidden, 1.0);
    let c = rand_vec(&mut rng, batch * hidden, 2.0);
    let (wh, wc) = (
        rand_vec(&mut rng, batch * hidden, 1.0),
        rand_vec(&mut rng, batch * hidden, 1.0),
    );
    // Row 1 is a padded step: it keeps (h, c) and passes (dh', dc') straight back.
    let active = [true, false, true];
    let ct = up(&[batch, hidden], &c);
    let (_, _, cache) = lstm_step(
        &Cpu,
        &up(&[batch, 4 * hidden], &gi),
        &up(&[batch, 4 * hidden], &gh),
        &up(&[batch, hidden], &h),
        &ct,
        Some(&active),
    )
    .unwrap();
    let g = lstm_step_backward(
        &Cpu,
        &cache,
        &ct,
        &up(&[batch, hidden], &wh),
        &up(&[batch, hidden], &wc),
        Some(&active),
    )
    .unwrap();
    let loss = |gi: &[f64], gh: &[f64], hh: &[f64], cc: &[f64]| {
        let (hn, cn) = reference_step(gi, gh, hh, cc, hidden, &active);
        hn.iter().zip(&wh).map(|(a, &b)| a * b as f64).sum::<f64>()
            + cn.iter().zip(&wc).map(|(a, &b)| a * b as f64).sum::<f64>()
    };
    let (gid, ghd, hd, cd) = (widen(&gi), widen(&gh), widen(&h), widen(&c));
    let s = (max_abs(&wh) + max_abs(&wc)) * (1.0 + max_abs(&c));
    let ngi = numeric_grad(&gid, |x| loss(x, &ghd, &hd, &cd));
    let ngh = numeric_grad(&ghd, |x| loss(&gid, x, &hd, &cd));
    // The gates see gi + gh: both get the same gradient.
    expect_close("dgi", &host(&g.dgates), &ngi, 4, s);
    expect_close("dgh", &host(&g.dgates), &ngh, 4, s);
    // h reaches an active row only through gh (the caller's GEMM); an inactive row copies it.
    expect_close(
        "dh",
        &host(&g.dh),
        &numeric_grad(&hd, |x| loss(&gid, &ghd, x, &cd)),
        1,
        s,
    );
    expect_close(
        "dc",
        &host(&g.dc),
        &numeric_grad(&cd, |x| loss(&gid, &ghd, &hd, x)),
        3,
        s,
    );
    // Mismatched shapes are typed errors.
    assert!(lstm_step(&Cpu, &cache, &cache, &ct, &ct, None).is_err());
    assert!(lstm_step_backward(&Cpu, &ct, &ct, &ct, &ct, None).is_err());
}

fn floats(v: &serde_json::Value, key: &str) -> Vec<f32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn doubles(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn lstm_layer_over_a_packed_batch_matches_pytorch_outputs_and_autograd() {
    let text = std::fs::read_to_string("tests/fixtures/lstm-tiny.json").unwrap();
    let f: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = |k: &str| f[k].as_u64().unwrap() as usize;
    let (bn, steps, xin, hd) = (n("batch"), n("steps"), n("input"), n("hidden"));
    let lengths: Vec<usize> = f["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let (x, h0, c0) = (floats(&f, "x"), floats(&f, "h0"), floats(&f, "c0"));
    let (w_out, w_h, w_c) = (floats(&f, "w_out"), floats(&f, "w_h"), floats(&f, "w_c"));
    let w_ih = up(&[4 * hd, xin], &floats(&f, "weight_ih"));
    let w_hh = up(&[4 * hd, hd], &floats(&f, "weight_hh"));
    let b_ih = up(&[4 * hd], &floats(&f, "bias_ih"));
    let b_hh = up(&[4 * hd], &floats(&f, "bias_hh"));
    // Time-major step inputs x_t `[batch, input]`.
    let xs: Vec<CpuTensor> = (0..steps)
        .map(|t| {
            let rows: Vec<f32> = (0..bn)
                .flat_map(|b| x[(b * steps + t) * xin..][..xin].to_vec())
                .collect();
            up(&[bn, xin], &rows)
        })
        .collect();
    let active: Vec<Vec<bool>> = (0..steps)
        .map(|t| lengths.iter().map(|&l| t < l).collect())
        .collect();
    let mut h = up(&[bn, hd], &h0);
    let mut c = up(&[bn, hd], &c0);
    let mut tape = Vec::new();
    let mut outs = Vec::new();
    for t in 0..steps {
        let gi = Cpu
            .linear(&xs[t], &w_ih, Some(&b_ih), Activation::None)
            .unwrap();
        let gh = Cpu
            .linear(&h, &w_hh, Some(&b_hh), Activation::None)
            .unwrap();
        let (hn, cn, cache) = lstm_step(&Cpu, &gi, &gh, &h, &c, Some(&active[t])).unwrap();
        let (h_in, c_in) = (std::mem::replace(&mut h, hn), std::mem::replace(&mut c, cn));
        outs.push(host(&h));
        tape.push((h_in, c_in, cache));
    }
    // Outputs at the valid steps and the final states against PyTorch.
    let want_out = doubles(&f["out"]);
    let scale = 1.0 + max_abs(&c0);
    for (t, o) in outs.iter().enumerate() {
        for b in 0..bn {
            if t < lengths[b] {
                expect_close(
                    &format!("out[{b}, {t}]"),
                    &o[b * hd..][..hd],
                    &want_out[(b * steps + t) * hd..][..hd],
                    steps * (xin + hd),
                    scale,
                );
            }
        }
    }
    let n_fwd = steps * (xin + hd);
    expect_close("h_n", &host(&h), &doubles(&f["h_n"]), n_fwd, scale);
    expect_close("c_n", &host(&c), &doubles(&f["c_n"]), n_fwd, scale);

    // Backward through time: dh' = w_out(t) + carry, dc' from the next step; the final
    // states' weights start the carries.
    let mut dh = up(&[bn, hd], &w_h);
    let mut dc = up(&[bn, hd], &w_c);
    let mut dw_ih = Cpu.zeros(&[4 * hd, xin]).unwrap();
    let mut dw_hh = Cpu.zeros(&[4 * hd, hd]).unwrap();
    let mut db = Cpu.zeros(&[4 * hd]).unwrap();
    let mut dx = vec![0f32; bn * steps * xin];
    for t in (0..steps).rev() {
        let wt: Vec<f32> = (0..bn)
            .flat_map(|b| w_out[(b * steps + t) * hd..][..hd].to_vec())
            .collect();
        Cpu.accumulate(&mut dh, &up(&[bn, hd], &wt)).unwrap();
        let (h_in, c_in, cache) = &tape[t];
        let g = lstm_step_backward(&Cpu, cache, c_in, &dh, &dc, Some(&active[t])).unwrap();
        Cpu.accumulate(
            &mut dw_ih,
            &Cpu.matmul(&g.dgates, Op::T, &xs[t], Op::N).unwrap(),
        )
        .unwrap();
        Cpu.accumulate(
            &mut dw_hh,
            &Cpu.matmul(&g.dgates, Op::T, h_in, Op::N).unwrap(),
        )
        .unwrap();
        Cpu.accumulate(&mut db, &Cpu.sum_rows(&g.dgates).unwrap())
            .unwrap();
        let dxt = host(&Cpu.matmul(&g.dgates, Op::N, &w_ih, Op::N).unwrap());
        for b in 0..bn {
            dx[(b * steps + t) * xin..][..xin].copy_from_slice(&dxt[b * xin..][..xin]);
        }
        dh = g.dh;
        Cpu.accumulate(
            &mut dh,
            &Cpu.matmul(&g.dgates, Op::N, &w_hh, Op::N).unwrap(),
        )
        .unwrap();
        dc = g.dc;
    }
    let grads = &f["grads"];
    let gs = max_abs(&w_out).max(max_abs(&w_h)).max(max_abs(&w_c)) * scale * 4.0;
    let n_bwd = steps * (xin + hd) * 4;
    expect_close("dx", &dx, &doubles(&grads["x"]), n_bwd, gs);
    expect_close("dh0", &host(&dh), &doubles(&grads["h0"]), n_bwd, gs);
    expect_close("dc0", &host(&dc), &doubles(&grads["c0"]), n_bwd, gs);
    expect_close(
        "dweight_ih",
        &host(&dw_ih),
        &doubles(&grads["weight_ih"]),
        n_bwd * bn,
        gs * max_abs(&x).max(1.0),
    );
    expect_close(
        "dweight_hh",
        &host(&dw_hh),
        &doubles(&grads["weight_hh"]),
        n_bwd * bn,
        gs,
    );
    // nn.LSTM's two biases both get the gates' gradient.
    let db = host(&db);
    expect_close("dbias_ih", &db, &doubles(&grads["bias_ih"]), n_bwd * bn, gs);
    expect_close("dbias_hh", &db, &doubles(&grads["bias_hh"]), n_bwd * bn, gs);
}
