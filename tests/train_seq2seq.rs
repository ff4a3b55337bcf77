//! The sequence-to-sequence models of `cuattn::runtime::seq2seq` on the CPU backend: the GRU
//! step and additive attention against their f64 references (property tests, with poisoned
//! padding) and finite differences; both whole models' gradients (Bahdanau with GRU and with
//! LSTM cells) against finite differences of their f64 references
//! (`cuattn::reference::seq2seq`) on tiny shapes; the Bahdanau model against PyTorch (`nn.GRU`
//! with packed sequences and `nn.GRUCell`, or `nn.LSTM` and `nn.LSTMCell`) on the same
//! weights; a padded batch against its pairs alone; and a few optimizer steps lowering the
//! loss.
//!
//! Op tolerance: the f32 rule of `cuattn::tolerance` for sums of n terms of magnitude ≤ scale
//! (as tests/train_layers.rs). Whole-model tolerance: errors compound through the recurrence
//! and the layers, so each gradient tensor is held to 1e-4 of its largest element (plus 1e-7
//! absolute, the finite differences' own resolution), elementwise, and its norm to 1e-4
//! relative: the bound tests/train_bert.rs uses against PyTorch, fixed before the first run.

use cuattn::reference::runtime::widen;
use cuattn::reference::seq2seq as reference;
use cuattn::runtime::seq2seq::tasks::{Sampler, Task, VOCAB};
use cuattn::runtime::seq2seq::{
    Bahdanau, BahdanauConfig, Cell, Seq2Seq, Seq2SeqBatch, Transformer, TransformerConfig,
};
use cuattn::runtime::train::{AdamW, AdamWConfig, CrossEntropy, TrainBackend};
use cuattn::runtime::{Backend, Cpu, CpuTensor};
use cuattn::tolerance::{compare, Tolerance};
use cuattn::DType;
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

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

fn project(y: &[f64], w: &[f32]) -> f64 {
    assert_eq!(y.len(), w.len());
    y.iter().zip(w).map(|(&a, &b)| a * b as f64).sum()
}

#[track_caller]
fn expect_close(what: &str, got: &[f32], want: &[f64], n: usize, scale: f64) {
    let c = compare(got, want, Tolerance::for_output(DType::F32, n, scale));
    assert!(
        c.passed,
        "{what}: {c:?} (got {} vs {})",
        got[c.worst_index], want[c.worst_index]
    );
}

// ---------------------------------------------------------------------------------------
// The GRU step.

fn gru_case(seed: u64, batch: usize, hidden: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = SmallRng::seed_from_u64(seed);
    (
        rand_vec(&mut rng, batch * 3 * hidden, 2.0),
        rand_vec(&mut rng, batch * 3 * hidden, 2.0),
        rand_vec(&mut rng, batch * hidden, 1.0),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn gru_cell_matches_the_f64_reference(seed in 0u64..1000, batch in 1usize..5, hidden in 1usize..9) {
        let (gi, gh, h) = gru_case(seed, batch, hidden);
        let (out, _) = Cpu
            .gru_cell(&up(&[batch, 3 * hidden], &gi), &up(&[batch, 3 * hidden], &gh), &up(&[batch, hidden], &h), None)
            .unwrap();
        let want = reference::gru_cell(&widen(&gi), &widen(&gh), &widen(&h), hidden);
        // h' = n + z(h − n): three terms of magnitude ≤ 1 + |h|.
        expect_close("h'", &host(&out), &want, 3, 1.0 + max_abs(&h));
    }

    #[test]
    fn additive_attention_matches_the_f64_reference_and_never_reads_padding(
        seed in 0u64..1000, batch in 1usize..4, len_k in 1usize..7, a in 1usize..6, d in 1usize..6,
    ) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let q = rand_vec(&mut rng, batch * a, 1.5);
        let mut keys = rand_vec(&mut rng, batch * len_k * a, 1.5);
        let v = rand_vec(&mut rng, a, 1.5);
        let mut values = rand_vec(&mut rng, batch * len_k * d, 1.0);
        let lens: Vec<usize> = (0..batch).map(|_| rng.gen_range(0..=len_k)).collect();
        // Padded keys and values are NaN: any read of them shows in the output.
        for b in 0..batch {
            for j in lens[b]..len_k {
                keys[(b * len_k + j) * a..][..a].fill(f32::NAN);
                values[(b * len_k + j) * d..][..d].fill(f32::NAN);
            }
        }
        let (ctx, alpha) = Cpu
            .additive_attention(
                &up(&[batch, a], &q),
                &up(&[batch * len_k, a], &keys),
                &up(&[a], &v),
                &up(&[batch * len_k, d], &values),
                Some(&lens[..]),
            )
            .unwrap();
        let (want_c, want_a) = reference::additive_attention(
            &widen(&q), &widen(&keys), &widen(&v), &widen(&values), len_k, &lens,
        );
        // e sums A terms ≤ |v|; exp/normalise keep α's error relative; c sums len_k terms ≤ max|h|.
        expect_close("α", &host(&alpha), &want_a, a + len_k, 1.0);
        let finite: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
        expect_close("context", &host(&ctx), &want_c, len_k + a, max_abs(&finite));
    }
}

#[test]
fn gru_cell_backward_matches_finite_differences() {
    let (batch, hidden) = (3, 5);
    let (gi, gh, h) = gru_case(7, batch, hidden);
    let mut rng = SmallRng::seed_from_u64(8);
    let w = rand_vec(&mut rng, batch * hidden, 1.0);
    // Row 1 is a padded step: it keeps h and passes dh' straight back.
    let active = [true, false, true];
    let (gi_t, gh_t, h_t) = (
        up(&[batch, 3 * hidden], &gi),
        up(&[batch, 3 * hidden], &gh),
        up(&[batch, hidden], &h),
    );
    let (out, cache) = Cpu.gru_cell(&gi_t, &gh_t, &h_t, Some(&active[..])).unwrap();
    let hv = host(&out);
    assert_eq!(&hv[hidden..2 * hidden], &h[hidden..2 * hidden]);
    let g = Cpu
        .gru_cell_backward(&cache, &h_t, &up(&[batch, hidden], &w), Some(&active[..]))
        .unwrap();
    let f = |gi: &[f64], gh: &[f64], hh: &[f64]| {
        let mut y = reference::gru_cell(gi, gh, hh, hidden);
        y[hidden..2 * hidden].copy_from_slice(&hh[hidden..2 * hidden]);
        project(&y, &w)
    };
    let (gid, ghd, hd) = (widen(&gi), widen(&gh), widen(&h));
    let ndgi = numeric_grad(&gid, |x| f(x, &ghd, &hd));
    let ndgh = numeric_grad(&ghd, |x| f(&gid, x, &hd));
    let ndh = numeric_grad(&hd, |x| f(&gid, &ghd, x));
    // Each gradient element is a product of ≤ 4 factors bounded by max|w|·max(|gh|, |h|, 1).
    let s = max_abs(&w) * (1.0 + max_abs(&gh) + max_abs(&h));
    expect_close("dgi", &host(&g.dgi), &ndgi, 4, s);
    // dL/dgh through the gates, and dL/dh's direct part z·dh' (the rest flows through gh).
    expect_close("dgh", &host(&g.dgh), &ndgh, 4, s);
    expect_close("dh", &host(&g.dh), &ndh, 2, s);
}

#[test]
fn additive_attention_backward_matches_finite_differences() {
    let (batch, len_k, a, d) = (3, 5, 4, 3);
    let mut rng = SmallRng::seed_from_u64(11);
    let q = rand_vec(&mut rng, batch * a, 1.0);
    let keys = rand_vec(&mut rng, batch * len_k * a, 1.0);
    let v = rand_vec(&mut rng, a, 1.5);
    let values = rand_vec(&mut rng, batch * len_k * d, 1.0);
    let w = rand_vec(&mut rng, batch * d, 1.0);
    let lens = [5usize, 2, 0];
    let t = |s: &[usize], x: &[f32]| up(s, x);
    let (qt, kt, vt, valt) = (
        t(&[batch, a], &q),
        t(&[batch * len_k, a], &keys),
        t(&[a], &v),
        t(&[batch * len_k, d], &values),
    );
    let (ctx, alpha) = Cpu
        .additive_attention(&qt, &kt, &vt, &valt, Some(&lens[..]))
        .unwrap();
    assert!(
        host(&ctx)[2 * d..].iter().all(|&x| x == 0.0),
        "no keys: zero context"
    );
    let g = Cpu
        .additive_attention_backward(
            &qt,
            &kt,
            &vt,
            &valt,
            &alpha,
            &t(&[batch, d], &w),
            Some(&lens[..]),
        )
        .unwrap();
    let (qd, kd, vd, vald) = (widen(&q), widen(&keys), widen(&v), widen(&values));
    let f = |q: &[f64], k: &[f64], v: &[f64], val: &[f64]| {
        project(
            &reference::additive_attention(q, k, v, val, len_k, &lens).0,
            &w,
        )
    };
    let n = len_k * (a + d);
    // de_j = α_j(dα_j − Σα·dα) with |dα_j| ≤ D·max|w|·max|h|; dq, dk, dv multiply it by
    // |v| or |t| ≤ 1 and sum over keys (and sequences for dv).
    let s = 2.0 * d as f64 * max_abs(&w) * max_abs(&values) * max_abs(&v).max(1.0);
    expect_close(
        "dq",
        &host(&g.dq),
        &numeric_grad(&qd, |x| f(x, &kd, &vd, &vald)),
        n,
        s,
    );
    expect_close(
        "dkeys",
        &host(&g.dkeys),
        &numeric_grad(&kd, |x| f(&qd, x, &vd, &vald)),
        n,
        s,
    );
    expect_close(
        "dv",
        &host(&g.dv),
        &numeric_grad(&vd, |x| f(&qd, &kd, x, &vald)),
        batch * n,
        s,
    );
    expect_close(
        "dvalues",
        &host(&g.dvalues),
        &numeric_grad(&vald, |x| f(&qd, &kd, &vd, x)),
        1,
        max_abs(&w),
    );
}

#[test]
fn fused_ops_refuse_mismatched_shapes_with_typed_errors() {
    let t = |s: &[usize]| up(s, &vec![0.0; s.iter().product()]);
    assert!(Cpu
        .gru_cell(&t(&[2, 9]), &t(&[2, 9]), &t(&[2, 4]), None)
        .is_err());
    assert!(Cpu
        .gru_cell(&t(&[2, 12]), &t(&[2, 12]), &t(&[2, 4]), Some(&[true][..]))
        .is_err());
    assert!(Cpu
        .additive_attention(&t(&[2, 3]), &t(&[5, 3]), &t(&[3]), &t(&[5, 2]), None)
        .is_err());
    assert!(Cpu
        .additive_attention(
            &t(&[2, 3]),
            &t(&[6, 3]),
            &t(&[3]),
            &t(&[6, 2]),
            Some(&[4, 1][..])
        )
        .is_err());
}

// ---------------------------------------------------------------------------------------
// Whole models.

fn tiny_batch() -> Seq2SeqBatch {
    // Different source and target lengths, so padding is exercised on both sides.
    Seq2SeqBatch::from_pairs(&[
        (vec![5, 9, 7, 4], vec![4, 7, 9]),
        (vec![8], vec![6, 5, 13, 3]),
        (vec![12, 3, 6], vec![10]),
    ])
    .unwrap()
}

/// Parameter values by name, in f64.
type Params = HashMap<String, Vec<f64>>;

fn host_params<M: Seq2Seq<Cpu>>(m: &M) -> Params {
    m.parameters()
        .iter()
        .map(|p| (p.name.clone(), widen(&host(&p.value))))
        .collect()
}

/// Every parameter's gradient against central differences of `loss` over that parameter,
/// under the whole-model bound of the module docs.
fn check_model_grads<M: Seq2Seq<Cpu>>(
    m: &M,
    batch: &Seq2SeqBatch,
    ce: &CrossEntropy,
    loss: &dyn Fn(&Params) -> f64,
) {
    let (l, grads) = m.loss_and_grads(&Cpu, batch, ce).unwrap();
    let params = host_params(m);
    let l_ref = loss(&params);
    assert!(
        (l as f64 - l_ref).abs() <= 1e-5 * l_ref.abs().max(1.0),
        "loss {l} vs reference {l_ref}"
    );
    let mut names_seen = 0;
    for (name, g) in grads.names.iter().zip(&grads.tensors) {
        let x = &params[name];
        let got = host(g);
        let numeric = numeric_grad(x, |v| {
            let mut p = params.clone();
            p.insert(name.clone(), v.to_vec());
            loss(&p)
        });
        let scale = numeric.iter().fold(0f64, |a, b| a.max(b.abs()));
        let bound = 1e-4 * scale + 1e-7;
        let (mut diff2, mut ref2) = (0f64, 0f64);
        for (i, (&a, &b)) in got.iter().zip(&numeric).enumerate() {
            let e = (a as f64 - b).abs();
            assert!(
                e <= bound,
                "{name}[{i}]: got {a}, finite differences {b} (bound {bound:e})"
            );
            diff2 += e * e;
            ref2 += b * b;
        }
        assert!(
            diff2.sqrt() <= 1e-4 * ref2.sqrt() + 1e-7,
            "{name}: relative error in norm {}",
            (diff2 / ref2).sqrt()
        );
        names_seen += 1;
    }
    assert_eq!(names_seen, m.parameters().len());
}

fn lookup<'a>(p: &'a HashMap<String, Vec<f64>>) -> impl Fn(&str) -> &'a [f64] + 'a {
    move |n: &str| {
        p.get(n)
            .unwrap_or_else(|| panic!("no parameter {n}"))
            .as_slice()
    }
}

const TINY_BAHDANAU: BahdanauConfig = BahdanauConfig {
    vocab: VOCAB,
    emb: 4,
    enc_hidden: 3,
    dec_hidden: 5,
    attn: 4,
    readout: 6,
    cell: Cell::Gru,
};

#[test]
fn bahdanau_gradients_match_finite_differences_of_its_f64_reference() {
    let m = Bahdanau::new(&Cpu, TINY_BAHDANAU, 3).unwrap();
    let sizes = reference::BahdanauSizes {
        vocab: VOCAB,
        emb: 4,
        enc_hidden: 3,
        dec_hidden: 5,
        cell: Cell::Gru,
    };
    let batch = tiny_batch();
    let ce = CrossEntropy {
        label_smoothing: 0.1,
        ..CrossEntropy::default()
    };
    check_model_grads(&m, &batch, &ce, &|p| {
        reference::bahdanau_loss(&lookup(p), &sizes, &batch, 0.1)
    });
}

#[test]
fn bahdanau_with_lstm_cells_gradients_match_finite_differences_of_its_f64_reference() {
    let m = Bahdanau::new(
        &Cpu,
        BahdanauConfig {
            cell: Cell::Lstm,
            ..TINY_BAHDANAU
        },
        3,
    )
    .unwrap();
    let names: Vec<&str> = m.parameters().iter().map(|p| p.name.as_str()).collect();
    assert!(names.contains(&"encoder.lstm.weight_hh_l0_reverse"));
    assert!(names.contains(&"decoder.lstm.weight_ih"));
    let sizes = reference::BahdanauSizes {
        vocab: VOCAB,
        emb: 4,
        enc_hidden: 3,
        dec_hidden: 5,
        cell: Cell::Lstm,
    };
    let batch = tiny_batch();
    let ce = CrossEntropy {
        label_smoothing: 0.1,
        ..CrossEntropy::default()
    };
    check_model_grads(&m, &batch, &ce, &|p| {
        reference::bahdanau_loss(&lookup(p), &sizes, &batch, 0.1)
    });
}

/// Each pair of `tiny_batch` alone against the padded batch: its logits rows are the same,
/// and the batch's token-weighted loss and gradients are the sums of the lone pairs' (so a
/// padded step adds nothing). Bound: 1e-5 of the largest logit, and the whole-model bound
/// (1e-4 of the largest element, + 1e-7) for loss and gradients.
fn check_padding_changes_nothing(cell: Cell) {
    let m = Bahdanau::new(
        &Cpu,
        BahdanauConfig {
            cell,
            ..TINY_BAHDANAU
        },
        5,
    )
    .unwrap();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![5, 9, 7, 4, 11, 6], vec![4, 7, 9]),
        (vec![8], vec![6, 5, 13, 3, 12]),
        (vec![12, 3, 6], vec![10]),
    ];
    let ce = CrossEntropy::default();
    let batch = Seq2SeqBatch::from_pairs(&pairs).unwrap();
    let (bn, ty) = (batch.batch, batch.tgt_len);
    let logits = host(&m.logits(&Cpu, &batch).unwrap());
    let (loss, grads) = m.loss_and_grads(&Cpu, &batch, &ce).unwrap();
    let tokens = |p: &(Vec<u32>, Vec<u32>)| (p.1.len() + 1) as f64;
    let total: f64 = pairs.iter().map(tokens).sum();
    let mut loss_sum = 0f64;
    let mut grad_sum: Vec<Vec<f64>> = grads
        .tensors
        .iter()
        .map(|g| vec![0.0; host(g).len()])
        .collect();
    for (b, pair) in pairs.iter().enumerate() {
        let alone = Seq2SeqBatch::from_pairs(std::slice::from_ref(pair)).unwrap();
        let want = host(&m.logits(&Cpu, &alone).unwrap());
        let v = VOCAB;
        for i in 0..alone.tgt_len {
            let got = &logits[(i * bn + b) * v..][..v];
            let w = &want[i * v..][..v];
            let scale = w.iter().fold(1f32, |a, x| a.max(x.abs()));
            for (x, y) in got.iter().zip(w) {
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "{cell:?}: pair {b} step {i}: logit {x} in the batch, {y} alone"
                );
            }
        }
        let (l, g) = m.loss_and_grads(&Cpu, &alone, &ce).unwrap();
        loss_sum += l as f64 * tokens(pair);
        for (acc, t) in grad_sum.iter_mut().zip(&g.tensors) {
            for (a, x) in acc.iter_mut().zip(host(t)) {
                *a += x as f64 * tokens(pair);
            }
        }
    }
    assert!(ty > 1);
    let batch_loss = loss as f64 * total;
    assert!(
        (batch_loss - loss_sum).abs() <= 1e-4 * loss_sum,
        "{cell:?}: batch loss·tokens {batch_loss} vs the pairs' {loss_sum}"
    );
    for ((name, g), want) in grads.names.iter().zip(&grads.tensors).zip(&grad_sum) {
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        for (i, (&x, &y)) in host(g).iter().zip(want).enumerate() {
            let x = x as f64 * total;
            assert!(
                (x - y).abs() <= 1e-4 * scale + 1e-7,
                "{cell:?}: {name}[{i}]: batch {x} vs the pairs' sum {y}"
            );
        }
    }
}

#[test]
fn padding_changes_nothing_for_the_real_rows_of_either_cell() {
    check_padding_changes_nothing(Cell::Gru);
    check_padding_changes_nothing(Cell::Lstm);
}

fn tiny_transformer(pre_ln: bool, shared: bool) -> TransformerConfig {
    TransformerConfig {
        vocab: VOCAB,
        d_model: 8,
        heads: 2,
        ff: 12,
        enc_layers: 2,
        dec_layers: 1,
        pre_ln,
        shared_embeddings: shared,
        ln_eps: 1e-5,
    }
}

#[test]
fn transformer_gradients_match_finite_differences_post_and_pre_ln() {
    for (seed, pre_ln, shared) in [(4, false, true), (5, true, false)] {
        let c = tiny_transformer(pre_ln, shared);
        let m = Transformer::new(&Cpu, c, seed).unwrap();
        let sizes = reference::TransformerSizes {
            vocab: c.vocab,
            d_model: c.d_model,
            heads: c.heads,
            ff: c.ff,
            enc_layers: c.enc_layers,
            dec_layers: c.dec_layers,
            pre_ln,
            shared_embeddings: shared,
            ln_eps: c.ln_eps,
        };
        let batch = tiny_batch();
        let ce = CrossEntropy {
            label_smoothing: 0.1,
            ..CrossEntropy::default()
        };
        check_model_grads(&m, &batch, &ce, &|p| {
            reference::transformer_loss(&lookup(p), &sizes, &batch, 0.1)
        });
    }
}

fn steps_lower_the_loss<M: Seq2Seq<Cpu>>(m: &mut M, lr: f32) {
    let mut s = Sampler::new(Task::Reverse, false, 9);
    let fixed: Vec<(Vec<u32>, Vec<u32>)> =
        s.batch(16).into_iter().map(|e| (e.src, e.tgt)).collect();
    let batch = Seq2SeqBatch::from_pairs(&fixed).unwrap();
    let ce = CrossEntropy::default();
    let mut opt = AdamW::new(
        &Cpu,
        m.parameters(),
        AdamWConfig {
            lr,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let (first, _) = m.loss_and_grads(&Cpu, &batch, &ce).unwrap();
    let mut last = first;
    for _ in 0..30 {
        let (l, mut g) = m.loss_and_grads(&Cpu, &batch, &ce).unwrap();
        g.clip_global_norm(&Cpu, 1.0).unwrap();
        opt.step(&Cpu, m.parameters_mut(), &g, lr).unwrap();
        last = l;
    }
    assert!(
        last < 0.8 * first,
        "{}: loss {first} → {last} after 30 steps on one batch",
        m.arch()
    );
}

#[test]
fn a_few_steps_lower_the_loss_of_both_models() {
    for cell in [Cell::Gru, Cell::Lstm] {
        let mut b = Bahdanau::new(
            &Cpu,
            BahdanauConfig {
                vocab: VOCAB,
                emb: 16,
                enc_hidden: 16,
                dec_hidden: 32,
                attn: 16,
                readout: 32,
                cell,
            },
            1,
        )
        .unwrap();
        steps_lower_the_loss(&mut b, 3e-3);
    }
    let mut t = Transformer::new(
        &Cpu,
        TransformerConfig {
            d_model: 32,
            ff: 64,
            ..tiny_transformer(false, true)
        },
        1,
    )
    .unwrap();
    steps_lower_the_loss(&mut t, 1e-3);
}

#[test]
fn greedy_decoding_returns_one_attention_row_per_output_step() {
    let srcs = vec![vec![5, 6, 7], vec![9]];
    let lstm = BahdanauConfig {
        cell: Cell::Lstm,
        ..TINY_BAHDANAU
    };
    let out: Vec<_> = [TINY_BAHDANAU, lstm]
        .into_iter()
        .flat_map(|c| {
            Bahdanau::new(&Cpu, c, 3)
                .unwrap()
                .greedy(&Cpu, &srcs, 6)
                .unwrap()
        })
        .collect();
    for (d, s) in out.iter().zip(srcs.iter().cycle()) {
        // One row per emitted token, plus the EOS step when it came.
        assert!(d.attention.len() == d.tokens.len() || d.attention.len() == d.tokens.len() + 1);
        for row in &d.attention {
            assert_eq!(row.len(), s.len() + 1);
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "attention sums to {sum}");
        }
    }
    let t = Transformer::new(&Cpu, tiny_transformer(false, true), 3).unwrap();
    for d in t.greedy(&Cpu, &srcs, 6).unwrap() {
        for row in &d.attention {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "attention sums to {sum}");
        }
    }
}

#[test]
fn bad_batches_and_configs_are_typed_errors() {
    assert!(Seq2SeqBatch::from_pairs(&[]).is_err());
    // PAD, BOS and EOS cannot appear inside a sequence.
    assert!(Seq2SeqBatch::from_pairs(&[(vec![2], vec![5])]).is_err());
    let m = Bahdanau::new(&Cpu, TINY_BAHDANAU, 3).unwrap();
    let bad = Seq2SeqBatch::from_pairs(&[(vec![40], vec![5])]).unwrap();
    assert!(m
        .loss_and_grads(&Cpu, &bad, &CrossEntropy::default())
        .is_err());
    assert!(Transformer::new(
        &Cpu,
        TransformerConfig {
            heads: 3,
            ..tiny_transformer(false, true)
        },
        0
    )
    .is_err());
    assert!(Bahdanau::new(
        &Cpu,
        BahdanauConfig {
            emb: 0,
            ..TINY_BAHDANAU
        },
        0
    )
    .is_err());
}

#[test]
fn held_out_sources_never_appear_in_training_draws() {
    use cuattn::runtime::seq2seq::tasks::is_test;
    for task in [Task::Reverse, Task::Sort, Task::Add] {
        let mut train = Sampler::new(task, false, 1);
        let mut test = Sampler::new(task, true, 1);
        assert!(train.batch(500).iter().all(|e| !is_test(&e.src)));
        let t = test.batch(200);
        assert!(t.iter().all(|e| is_test(&e.src)));
        for e in &t {
            assert_eq!(e.tgt, task.target(&e.src));
        }
    }
    // 5 + 17 = 22, 99 + 1 = 100.
    let d = cuattn::runtime::seq2seq::tasks::digit;
    let plus = cuattn::runtime::seq2seq::tasks::PLUS;
    assert_eq!(
        Task::Add.target(&[d(5), plus, d(1), d(7)]),
        vec![d(2), d(2)]
    );
    assert_eq!(
        Task::Add.target(&[d(9), d(9), plus, d(1)]),
        vec![d(1), d(0), d(0)]
    );
}

#[test]
fn bahdanau_matches_pytorch_gru_and_autograd_on_the_same_weights() {
    check_bahdanau_against_pytorch("tests/fixtures/bahdanau-tiny.json", Cell::Gru);
}

#[test]
fn bahdanau_with_lstm_cells_matches_pytorch_lstm_and_autograd_on_the_same_weights() {
    check_bahdanau_against_pytorch("tests/fixtures/bahdanau-lstm-tiny.json", Cell::Lstm);
}

/// The loss and every gradient of the model on the fixture's weights and padded batch against
/// PyTorch's (f64 autograd), under the whole-model bound of the module docs.
fn check_bahdanau_against_pytorch(path: &str, cell: Cell) {
    let text = std::fs::read_to_string(path).unwrap();
    let f: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = &f["config"];
    let get = |k: &str| c[k].as_u64().unwrap() as usize;
    let config = BahdanauConfig {
        vocab: get("vocab"),
        emb: get("emb"),
        enc_hidden: get("enc_hidden"),
        dec_hidden: get("dec_hidden"),
        attn: get("attn"),
        readout: get("readout"),
        cell,
    };
    assert_eq!(
        c["cell"].as_str().unwrap_or("gru"),
        cell.name(),
        "the fixture's cell"
    );
    let mut m = Bahdanau::new(&Cpu, config, 0).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let mut loaded = 0;
    for p in m.parameters_mut() {
        let values: Vec<f32> = floats(&f["params"][&p.name])
            .iter()
            .map(|&x| x as f32)
            .collect();
        let shape = Cpu.shape(&p.value).to_vec();
        assert_eq!(values.len(), shape.iter().product::<usize>(), "{}", p.name);
        p.value = up(&shape, &values);
        loaded += 1;
    }
    assert_eq!(loaded, f["params"].as_object().unwrap().len());
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = f["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let seq = |v: &serde_json::Value| -> Vec<u32> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            (seq(&p[0]), seq(&p[1]))
        })
        .collect();
    let batch = Seq2SeqBatch::from_pairs(&pairs).unwrap();
    let ce = CrossEntropy {
        label_smoothing: f["label_smoothing"].as_f64().unwrap() as f32,
        ..CrossEntropy::default()
    };
    let (loss, grads) = m.loss_and_grads(&Cpu, &batch, &ce).unwrap();
    assert_eq!(grads.names.len(), loaded);
    let want = f["loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want).abs() <= 1e-5 * want.abs(),
        "loss {loss} vs PyTorch {want}"
    );
    for (name, g) in grads.names.iter().zip(&grads.tensors) {
        let want = floats(&f["grads"][name]);
        let got = host(g);
        assert_eq!(got.len(), want.len(), "{name}");
        let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
        let bound = 1e-4 * scale + 1e-7;
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - b).abs() <= bound,
                "{name}[{i}]: got {a}, PyTorch {b} (bound {bound:e})"
            );
        }
    }
}

/// A Transformer trained for a few hundred steps on reverse, so that its decodes end with EOS.
fn trained_transformer() -> Transformer<Cpu> {
    const STEPS: usize = 300;
    let mut t = Transformer::new(
        &Cpu,
        TransformerConfig {
            d_model: 32,
            ff: 64,
            ..tiny_transformer(false, true)
        },
        7,
    )
    .unwrap();
    let mut s = Sampler::new(Task::Reverse, false, 21);
    let mut opt = AdamW::new(&Cpu, t.parameters(), AdamWConfig::default()).unwrap();
    let ce = CrossEntropy::default();
    for _ in 0..STEPS {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            s.batch(32).into_iter().map(|e| (e.src, e.tgt)).collect();
        let batch = Seq2SeqBatch::from_pairs(&pairs).unwrap();
        let (_, mut g) = t.loss_and_grads(&Cpu, &batch, &ce).unwrap();
        g.clip_global_norm(&Cpu, 1.0).unwrap();
        opt.step(&Cpu, t.parameters_mut(), &g, 3e-3).unwrap();
    }
    t
}

#[test]
fn transformer_beam_search_of_one_beam_is_greedy_and_more_beams_score_at_least_as_well() {
    let t = trained_transformer();
    let srcs: Vec<Vec<u32>> = Sampler::new(Task::Reverse, true, 3)
        .batch(8)
        .into_iter()
        .map(|e| e.src)
        .collect();
    let max_len = 16;
    let strip = |mut v: Vec<u32>| {
        if v.last() == Some(&cuattn::runtime::seq2seq::EOS) {
            v.pop();
        }
        v
    };
    // One beam through the shared loop: the model's own greedy decoding, token for token.
    let greedy = t.greedy(&Cpu, &srcs, max_len).unwrap();
    let one = t.beam_search(&Cpu, &srcs, max_len, 1, 1.0).unwrap();
    for (i, (g, o)) in greedy.iter().zip(&one.generated).enumerate() {
        assert_eq!(g.tokens, strip(o.clone()), "source {i}");
    }
    // Four beams, no length penalty: the score is Σ log p, which the best hypothesis must
    // reach at least as high as the greedy sequence (checked by teacher forcing both). Beam
    // search does not promise this in general (the greedy prefix can fall out of the beam):
    // on an undertrained model (60 steps) one of eight sources here did; trained for 300
    // steps, where the decodes are confident, none may.
    let four = t.beam_search(&Cpu, &srcs, max_len, 4, 0.0).unwrap();
    let mut finished = 0;
    for (i, src) in srcs.iter().enumerate() {
        let (g, b) = (&greedy[i], &four.generated[i]);
        if g.tokens.len() >= max_len || b.last() != Some(&cuattn::runtime::seq2seq::EOS) {
            continue; // an unfinished decode has no complete score to compare
        }
        finished += 1;
        let scores = t
            .sequence_log_probs(
                &Cpu,
                &[
                    (src.clone(), g.tokens.clone()),
                    (src.clone(), strip(b.clone())),
                ],
            )
            .unwrap();
        // The loop's own score of the hypothesis is the teacher-forced one.
        assert!(
            (four.scores[i] as f64 - scores[1]).abs() <= 1e-4 * scores[1].abs().max(1.0),
            "source {i}: beam score {} vs teacher-forced {}",
            four.scores[i],
            scores[1]
        );
        assert!(
            scores[1] >= scores[0] - 1e-5,
            "source {i}: beam {} < greedy {}",
            scores[1],
            scores[0]
        );
    }
    assert!(finished >= 6, "only {finished} of 8 decodes finished");
    // A KV cache is refused with a typed error (the decoder recomputes).
    let opts = cuattn::runtime::generate::GenerateOptions::default();
    assert!(cuattn::runtime::generate::generate(&Cpu, &t, &srcs, &opts, &mut |_, _| {}).is_err());
}
