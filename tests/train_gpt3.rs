//! The decoder-only model with GPT-3's alternating dense and local attention
//! (`cuattn::runtime::seq2seq::gpt3`) on the CPU backend:
//!
//! - the training attention's sliding window (`AttentionMask::window`): dQ, dK, dV against
//!   finite differences of the f64 reference attention, causal and two-sided windows with key
//!   padding;
//! - the whole model's gradients against finite differences of its f64 reference
//!   (`cuattn::reference::seq2seq::gpt3_lm_loss`), with a local layer whose window is shorter
//!   than the sequences;
//! - the window is really used: after training, the alternating model's logits differ from
//!   the same weights with every layer global on a sequence longer than the window, and equal
//!   them on one that fits it;
//! - the Hugging Face folder it saves loads in the runtime (`GptNeo`) with the training
//!   model's logits, and its byte-level tokenizer encodes text as its UTF-8 bytes;
//! - greedy decoding and typed errors.
//!
//! Tolerances: ops as tests/train_layers.rs (the f32 rule of `cuattn::tolerance` for sums of
//! n terms of magnitude ≤ scale); the whole model as tests/train_seq2seq.rs (each gradient
//! element within 1e-4 of its tensor's largest, plus 1e-7; its norm within 1e-4 relative).

use cuattn::reference::runtime::{attention_with, widen, AttentionSizes, HeadsRef};
use cuattn::reference::seq2seq as reference;
use cuattn::runtime::backend::{CausalAlign, Window};
use cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer;
use cuattn::runtime::gpt_neo::{AttentionKind, GptNeo};
use cuattn::runtime::seq2seq::gpt3::joined_batch;
use cuattn::runtime::seq2seq::hf_export::{encode_bytes, save_gpt_neo, BYTE_VOCAB, END_OF_TEXT_ID};
use cuattn::runtime::seq2seq::tasks::{Sampler, Task, VOCAB};
use cuattn::runtime::seq2seq::text::TextCorpus;
use cuattn::runtime::seq2seq::{Gpt3, Gpt3Config, Seq2Seq, Seq2SeqBatch, EOS};
use cuattn::runtime::train::{AdamW, AdamWConfig, CrossEntropy, TrainBackend};
use cuattn::runtime::{AttentionMask, Backend, Cpu, CpuTensor, Heads};
use cuattn::tolerance::{compare, Tolerance};
use cuattn::DType;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::PathBuf;

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

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuattn-gpt3-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// The training attention's window.

/// Causal alignment, window, key lengths.
type MaskCase<'a> = (Option<CausalAlign>, Window, Option<&'a [usize]>);

#[test]
fn windowed_attention_backward_matches_finite_differences() {
    let (batch, len, heads, dim) = (2, 7, 2, 3);
    let lens = [7usize, 5];
    // A causal window of 3 positions (GPT-Neo's local layer), and a two-sided window with
    // key padding and no causal mask.
    let masks: [MaskCase<'_>; 2] = [
        (
            Some(CausalAlign::TopLeft),
            Window::new(2, 0, CausalAlign::TopLeft),
            None,
        ),
        (None, Window::new(1, 2, CausalAlign::TopLeft), Some(&lens)),
    ];
    for (case, (causal, window, key_lens)) in masks.into_iter().enumerate() {
        let mut rng = SmallRng::seed_from_u64(40 + case as u64);
        let rows = batch * len;
        let w = heads * dim;
        let (q, k, v, dout) = (
            rand_vec(&mut rng, rows * w, 1.5),
            rand_vec(&mut rng, rows * w, 1.5),
            rand_vec(&mut rng, rows * w, 1.0),
            rand_vec(&mut rng, rows * w, 1.0),
        );
        let mask = AttentionMask {
            batch,
            len_q: len,
            len_k: len,
            key_lens,
            causal,
            window: Some(window),
            scale: None,
        };
        let (tq, tk, tv, td) = (
            up(&[rows, w], &q),
            up(&[rows, w], &k),
            up(&[rows, w], &v),
            up(&[rows, w], &dout),
        );
        let hv = |t| Heads {
            tensor: t,
            col: 0,
            heads,
            dim,
        };
        let (o, lse) = Cpu
            .attention_with_lse(hv(&tq), hv(&tk), hv(&tv), &mask, None)
            .unwrap();
        let g = Cpu
            .attention_backward(hv(&tq), hv(&tk), hv(&tv), &o, &lse, &td, &mask, None)
            .unwrap();
        let sizes = AttentionSizes {
            batch,
            len_q: len,
            len_k: len,
            key_lens,
            causal,
            window: Some(window),
            scale: 1.0 / (dim as f64).sqrt(),
        };
        fn hr(data: &[f64], width: usize, heads: usize) -> HeadsRef<'_, f64> {
            HeadsRef {
                data,
                width,
                col: 0,
                heads,
                dim: width / heads,
            }
        }
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let (o, _) = attention_with(
                hr(q, w, heads),
                hr(k, w, heads),
                hr(v, w, heads),
                &sizes,
                None,
            );
            o.iter().zip(&dout).map(|(a, &b)| a * b as f64).sum()
        };
        // The forward itself against the reference (the window's band, not all keys).
        let (qd, kd, vd) = (widen(&q), widen(&k), widen(&v));
        let (o_ref, _) = attention_with(
            hr(&qd, w, heads),
            hr(&kd, w, heads),
            hr(&vd, w, heads),
            &sizes,
            None,
        );
        let c = compare(
            &host(&o),
            &o_ref,
            Tolerance::for_output(DType::F32, len + dim, max_abs(&v)),
        );
        assert!(c.passed, "case {case}: forward {c:?}");
        let nq = numeric_grad(&qd, |x| loss(x, &kd, &vd));
        let nk = numeric_grad(&kd, |x| loss(&qd, x, &vd));
        let nv = numeric_grad(&vd, |x| loss(&qd, &kd, x));
        let scale = 1.0 / (dim as f64).sqrt();
        let dp = 2.0 * dim as f64 * max_abs(&dout) * max_abs(&v);
        for (name, got, num, n, s) in [
            ("dQ", &g.dq, &nq, len + dim, scale * dp * max_abs(&k)),
            ("dK", &g.dk, &nk, len + dim, scale * dp * max_abs(&q)),
            ("dV", &g.dv, &nv, len + dim, max_abs(&dout)),
        ] {
            let c = compare(&host(got), num, Tolerance::for_output(DType::F32, n, s));
            assert!(c.passed, "case {case}: {name} {c:?}");
        }
        // The window matters here: the same inputs without it give another output.
        let full = AttentionMask {
            window: None,
            ..mask
        };
        let (o_full, _) = Cpu
            .attention_with_lse(hv(&tq), hv(&tk), hv(&tv), &full, None)
            .unwrap();
        let diff = host(&o)
            .iter()
            .zip(host(&o_full))
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff > 1e-2,
            "case {case}: the window changed nothing ({diff})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The whole model.

fn tiny_config(dense: bool) -> Gpt3Config {
    Gpt3Config {
        vocab: VOCAB,
        d_model: 8,
        heads: 2,
        ff: 12,
        context: 16,
        attention: Gpt3Config::alternating(2, dense),
        window: 3,
        ln_eps: 1e-5,
        eos: EOS,
    }
}

fn tiny_batch() -> Seq2SeqBatch {
    // Joined sequences of 8, 6 and 5 tokens: longer than the window of 3.
    Seq2SeqBatch::from_pairs(&[
        (vec![5, 9, 7, 4], vec![4, 7, 9]),
        (vec![8], vec![6, 5, 13, 3]),
        (vec![12, 3, 6], vec![10]),
    ])
    .unwrap()
}

/// Parameter values by name, in f64.
type Params = HashMap<String, Vec<f64>>;

fn sizes(c: &Gpt3Config) -> reference::Gpt3Sizes {
    reference::Gpt3Sizes {
        vocab: c.vocab,
        d_model: c.d_model,
        heads: c.heads,
        local: c
            .attention
            .iter()
            .map(|k| *k == AttentionKind::Local)
            .collect(),
        window: c.window,
        ln_eps: c.ln_eps,
    }
}

#[test]
fn gradients_with_a_local_layer_match_finite_differences_of_the_f64_reference() {
    let c = tiny_config(false);
    let m = Gpt3::new(&Cpu, c.clone(), 11).unwrap();
    let batch = tiny_batch();
    let (ids, labels, len) = joined_batch(&batch);
    assert!(len > c.window);
    let z = sizes(&c);
    let loss = |p: &Params| -> f64 {
        let look = |n: &str| -> &[f64] {
            p.get(n)
                .unwrap_or_else(|| panic!("no parameter {n}"))
                .as_slice()
        };
        reference::gpt3_lm_loss(&look, &z, &ids, &labels, batch.batch, len)
    };
    let ce = CrossEntropy::default();
    let (l, grads) = m.loss_and_grads(&Cpu, &batch, &ce).unwrap();
    let params: Params = m
        .parameters()
        .iter()
        .map(|p| (p.name.clone(), widen(&host(&p.value))))
        .collect();
    let l_ref = loss(&params);
    assert!(
        (l as f64 - l_ref).abs() <= 1e-5 * l_ref.abs().max(1.0),
        "loss {l} vs reference {l_ref}"
    );
    // The reference with every layer global is another function: the window is in play.
    let mut z_dense = z.clone();
    z_dense.local = vec![false; z.local.len()];
    let look = |n: &str| -> &[f64] { params[n].as_slice() };
    let l_dense = reference::gpt3_lm_loss(&look, &z_dense, &ids, &labels, batch.batch, len);
    assert!((l_dense - l_ref).abs() > 1e-9, "window without effect");
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
    }
    assert_eq!(grads.names.len(), m.parameters().len());
}

fn train_steps<M: Seq2Seq<Cpu>>(m: &mut M, steps: usize) -> (f32, f32) {
    let mut s = Sampler::new(Task::Reverse, false, 9);
    let fixed: Vec<(Vec<u32>, Vec<u32>)> =
        s.batch(16).into_iter().map(|e| (e.src, e.tgt)).collect();
    let batch = Seq2SeqBatch::from_pairs(&fixed).unwrap();
    let ce = CrossEntropy::default();
    let mut opt = AdamW::new(&Cpu, m.parameters(), AdamWConfig::default()).unwrap();
    let first = m.loss_and_grads(&Cpu, &batch, &ce).unwrap().0;
    for _ in 0..steps {
        let (_, g) = m.loss_and_grads(&Cpu, &batch, &ce).unwrap();
        opt.step(&Cpu, m.parameters_mut(), &g, 3e-3).unwrap();
    }
    (first, m.loss_and_grads(&Cpu, &batch, &ce).unwrap().0)
}

#[test]
fn trained_local_layers_differ_from_all_global_only_past_the_window() {
    let mut c = tiny_config(false);
    c.d_model = 16;
    c.context = 32;
    c.attention = Gpt3Config::alternating(4, false);
    let mut m = Gpt3::new(&Cpu, c.clone(), 5).unwrap();
    let (before, after) = train_steps(&mut m, 20);
    assert!(after < before, "loss {before} → {after}");
    let dense = m
        .with_attention(&Cpu, Gpt3Config::alternating(4, true))
        .unwrap();
    let long: Vec<u32> = (0..12).map(|i| 4 + (i * 7 % 10)).collect();
    let (a, b) = (
        m.sequence_logits(&Cpu, &long).unwrap(),
        dense.sequence_logits(&Cpu, &long).unwrap(),
    );
    let v = c.vocab;
    let row_diff = |i: usize| {
        a[i * v..(i + 1) * v]
            .iter()
            .zip(&b[i * v..(i + 1) * v])
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    };
    // Positions whose window holds every earlier position see the same keys either way
    // (the same arithmetic: bitwise equal); the later ones do not.
    for i in 0..c.window {
        assert_eq!(row_diff(i), 0.0, "position {i} inside the window");
    }
    let past = (c.window..long.len()).map(row_diff).fold(0f32, f32::max);
    assert!(
        past > 1e-3,
        "past the window the logits differ by only {past}"
    );
}

#[test]
fn saved_folder_loads_in_the_runtime_with_the_training_models_logits() {
    let text = "In the beginning God created the heaven and the earth. \
                And the earth was without form, and void; and darkness was upon the face \
                of the deep. Caf\u{e9} \u{2014} bytes beyond ASCII.\n";
    let corpus = TextCorpus::from_text(&text.repeat(3));
    let c = Gpt3Config {
        vocab: BYTE_VOCAB,
        d_model: 16,
        heads: 2,
        ff: 32,
        context: 24,
        attention: Gpt3Config::alternating(2, false),
        window: 5,
        ln_eps: 1e-5,
        eos: END_OF_TEXT_ID,
    };
    let mut m = Gpt3::new(&Cpu, c.clone(), 3).unwrap();
    let mut opt = AdamW::new(&Cpu, m.parameters(), AdamWConfig::default()).unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..3 {
        let b = corpus.batch(&mut rng, false, 4, c.context).unwrap();
        let (_, g) = m
            .lm_loss_and_grads(
                &Cpu,
                &b.ids,
                &b.labels,
                b.batch,
                b.len,
                &CrossEntropy::default(),
            )
            .unwrap();
        opt.step(&Cpu, m.parameters_mut(), &g, 1e-2).unwrap();
    }
    let dir = tempdir("export");
    save_gpt_neo(&Cpu, &m, &dir, true).unwrap();

    let loaded = GptNeo::from_folder(&Cpu, &dir).unwrap();
    assert_eq!(loaded.config.window_size, c.window);
    assert_eq!(
        loaded.config.attention_layers,
        [AttentionKind::Global, AttentionKind::Local]
    );
    let ids = &corpus.train[..c.context];
    let ours = m.sequence_logits(&Cpu, ids).unwrap();
    let theirs = loaded.sequence_logits(&Cpu, ids).unwrap();
    // Both are f32 forwards of the same weights by different code (fused QKV, the inference
    // attention): the f32 bound for sums over the model width, at the logits' scale.
    let cmp = compare(
        &theirs,
        &widen(&ours),
        Tolerance::for_output(DType::F32, 4 * c.ff, max_abs(&ours).max(1.0)),
    );
    assert!(cmp.passed, "loaded logits {cmp:?}");

    let tok = Gpt2Tokenizer::from_folder(&dir, BYTE_VOCAB).unwrap();
    let sample = "Caf\u{e9} \u{2014} <|endoftext|> x";
    let mut want = encode_bytes("Caf\u{e9} \u{2014} ");
    want.push(END_OF_TEXT_ID);
    want.extend(encode_bytes(" x"));
    assert_eq!(tok.encode(sample).unwrap(), want);
    assert_eq!(
        tok.decode(&encode_bytes("Caf\u{e9} \u{2014}")).unwrap(),
        "Caf\u{e9} \u{2014}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn greedy_decoding_gives_one_attention_row_per_step_over_source_and_separator() {
    let m = Gpt3::new(&Cpu, tiny_config(false), 2).unwrap();
    let sources = vec![vec![5, 6, 7], vec![9]];
    let out = m.greedy(&Cpu, &sources, 4).unwrap();
    for (d, s) in out.iter().zip(&sources) {
        assert!(!d.attention.is_empty() && d.attention.len() <= 4);
        assert!(d.tokens.len() <= d.attention.len());
        for row in &d.attention {
            assert_eq!(row.len(), s.len() + 1);
            assert!(row
                .iter()
                .all(|p| p.is_finite() && (0.0..=1.0 + 1e-5).contains(p)));
        }
    }
}

#[test]
fn bad_configs_and_inputs_are_typed_errors() {
    let mut c = tiny_config(false);
    c.heads = 3;
    assert!(Gpt3::new(&Cpu, c, 0).is_err());
    let mut c = tiny_config(false);
    c.window = 0;
    assert!(Gpt3::new(&Cpu, c, 0).is_err());
    let mut c = tiny_config(false);
    c.eos = VOCAB as u32;
    assert!(Gpt3::new(&Cpu, c, 0).is_err());
    let m = Gpt3::new(&Cpu, tiny_config(false), 0).unwrap();
    // Longer than the context, a token outside the vocabulary, mismatched labels.
    assert!(m.sequence_logits(&Cpu, &[4; 17]).is_err());
    assert!(m.sequence_logits(&Cpu, &[4, 99]).is_err());
    assert!(m
        .lm_loss_and_grads(&Cpu, &[4, 5], &[5], 1, 2, &CrossEntropy::default())
        .is_err());
    assert!(m
        .with_attention(&Cpu, Gpt3Config::alternating(3, true))
        .is_err());
    // A byte-level tokenizer needs the byte vocabulary.
    let dir = tempdir("bad-export");
    assert!(save_gpt_neo(&Cpu, &m, &dir, true).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
