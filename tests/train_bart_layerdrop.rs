//! BART's LayerDrop and recomputation in the denoising step, on the CPU (the tiny fixtures of
//! tests/train_bart_denoise.rs and tests/train_bart_untied_dropout.rs, their batch).
//!
//! LayerDrop as Hugging Face's `BartEncoder`/`BartDecoder`: in training each layer is skipped
//! for the whole batch when a uniform draw is below `encoder_layerdrop` (`decoder_layerdrop`),
//! never in eval; our draw is the Philox word of (seed, LAYERDROP_STREAM | step, layer), so a
//! step stays a function of (weights, batch, seed, step). Proven here: p = 0 never skips and
//! is the same step as a draw that happens to skip nothing, bit for bit; p = 1 skips every
//! layer, the step still runs and every layer parameter's gradient is exactly zero and listed
//! in `Gradients::no_grad` (with the encoder's own parameters when nothing reads it); the
//! gradient with a draw that skips some layers matches central differences of the loss under
//! the same draw; the same (seed, step) twice is the same step; eval ignores p; the draws skip
//! about p of the layers.
//!
//! Recomputation (`StepOptions::recompute`): the gradients, loss and logits are bitwise those
//! of the step that keeps every intermediate, with and without dropout and LayerDrop.

use cuattn::runtime::bart::BartConfig;
use cuattn::runtime::checkpoint::HostParam;
use cuattn::runtime::train::{
    BartForConditionalGeneration, DenoisingBatch, DenoisingOutput, SkippedLayers, StepOptions,
};
use cuattn::runtime::{Backend, Cpu, CpuTensor};
use cuattn::Error;

#[allow(dead_code)] // the BERT batch helpers are for other binaries
mod fixture_files;

use fixture_files::{fixture, floats, json};

type Model = BartForConditionalGeneration<Cpu>;

fn tied() -> Model {
    Model::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart")).unwrap()
}

fn untied() -> Model {
    Model::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart-untied")).unwrap()
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect()
}

fn batch() -> DenoisingBatch {
    let v = &json("tests/fixtures/tiny-bart-denoise-step.json")["variants"]["tiny-bart"];
    DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: floats(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    }
}

fn host(t: &CpuTensor) -> Vec<f32> {
    Cpu.to_f32(t).unwrap()
}

fn bits(t: &CpuTensor) -> Vec<u32> {
    host(t).iter().map(|x| x.to_bits()).collect()
}

/// Loss, logits and every gradient, bit for bit.
fn same_step(a: &DenoisingOutput<CpuTensor>, b: &DenoisingOutput<CpuTensor>) -> bool {
    a.loss.to_bits() == b.loss.to_bits()
        && bits(&a.logits) == bits(&b.logits)
        && a.grads.names == b.grads.names
        && a.grads
            .tensors
            .iter()
            .zip(&b.grads.tensors)
            .all(|(x, y)| bits(x) == bits(y))
}

fn train(seed: u64, step: u64) -> StepOptions {
    StepOptions {
        dropout_seed: Some(seed),
        step,
        ..Default::default()
    }
}

fn with_layerdrop(mut m: Model, enc: f32, dec: f32) -> Model {
    m.config.encoder_layerdrop = enc;
    m.config.decoder_layerdrop = dec;
    m
}

fn with_dropout(mut m: Model) -> Model {
    m.config.dropout = 0.1;
    m.config.attention_dropout = 0.1;
    m.config.activation_dropout = 0.05;
    m
}

/// Whether `name` is a parameter of encoder (decoder) layer `l`.
fn in_layer(name: &str, stack: &str, l: usize) -> bool {
    name.starts_with(&format!("model.{stack}.layers.{l}."))
}

fn some_but_not_all(v: &[bool]) -> bool {
    v.iter().any(|&x| x) && !v.iter().all(|&x| x)
}

/// The first (seed, step 0) whose draw at p = 0.5 skips some but not all layers of each stack.
fn mixed_draw(m: &Model) -> (StepOptions, SkippedLayers) {
    for seed in 0..200 {
        let opts = train(seed, 0);
        let s = m.skipped_layers(&opts).unwrap();
        if some_but_not_all(&s.encoder) && some_but_not_all(&s.decoder) {
            return (opts, s);
        }
    }
    panic!("no seed below 200 skips some but not all layers");
}

#[test]
fn zero_layerdrop_never_skips_and_is_the_step_whose_draw_skips_nothing() {
    for m in [with_dropout(tied()), with_dropout(untied())] {
        assert_eq!(
            (m.config.encoder_layerdrop, m.config.decoder_layerdrop),
            (0.0, 0.0)
        );
        let b = batch();
        for step in 0..8 {
            let s = m.skipped_layers(&train(3, step)).unwrap();
            assert!(!s.encoder.iter().chain(&s.decoder).any(|&x| x));
        }
        // p = 0.3 with a (seed, step) whose draw skips no layer: the same step bit for bit.
        let p = with_layerdrop(with_dropout(untied_or_tied(&m)), 0.3, 0.3);
        let opts = (0..200)
            .map(|seed| train(seed, 4))
            .find(|o| {
                let s = p.skipped_layers(o).unwrap();
                !s.encoder.iter().chain(&s.decoder).any(|&x| x)
            })
            .expect("a draw that skips nothing");
        let zero = m.forward_backward_with(&Cpu, &b, &opts).unwrap();
        assert!(same_step(
            &p.forward_backward_with(&Cpu, &b, &opts).unwrap(),
            &zero
        ));
        // Dropout is on in this step (else it would be the eval step).
        assert!(!same_step(&zero, &m.forward_backward(&Cpu, &b).unwrap()));
    }
}

/// A fresh copy of `m`'s fixture (tied or untied).
fn untied_or_tied(m: &Model) -> Model {
    if m.config.tie_word_embeddings {
        tied()
    } else {
        untied()
    }
}

/// p = 1 skips every layer of its stack; the step runs, every parameter of a skipped layer
/// gets an exact zero gradient, the rest finite ones. With both stacks skipped nothing reads
/// the encoder (the cross-attention lives in the decoder's layers): its embeddings' gradients
/// are zero too; with the decoder's layers on they are not.
#[test]
fn layerdrop_one_skips_every_layer_and_their_gradients_are_zero() {
    let b = batch();
    for m0 in [tied(), untied()] {
        for (enc_p, dec_p) in [(1.0, 1.0), (1.0, 0.0)] {
            let m = with_layerdrop(with_dropout(untied_or_tied(&m0)), enc_p, dec_p);
            let opts = train(11, 2);
            let s = m.skipped_layers(&opts).unwrap();
            assert!(s.encoder.iter().all(|&x| x));
            assert!(s.decoder.iter().all(|&x| x == (dec_p == 1.0)));
            let sites = m.dropout_sites(&b, &opts).unwrap();
            let per_dec_layer = 6 * m.config.decoder_layers * (dec_p == 0.0) as usize;
            assert_eq!(sites.len(), 2 + per_dec_layer);
            let out = m.forward_backward_with(&Cpu, &b, &opts).unwrap();
            assert!(out.loss.is_finite());
            for (i, (name, g)) in out.grads.names.iter().zip(&out.grads.tensors).enumerate() {
                let g = host(g);
                assert!(g.iter().all(|x| x.is_finite()), "{name}");
                let skipped_layer = name.starts_with("model.encoder.layers.")
                    || (dec_p == 1.0 && name.starts_with("model.decoder.layers."));
                let unread = dec_p == 1.0 && name.starts_with("model.encoder.");
                // Torch's autograd leaves exactly these without a gradient (AdamW skips them).
                assert_eq!(
                    out.grads.has_grad(i),
                    !(skipped_layer || unread),
                    "{name}: in no_grad"
                );
                if skipped_layer || unread {
                    assert!(g.iter().all(|&x| x == 0.0), "{name}: a non-zero gradient");
                } else if !name.ends_with("k_proj.bias") {
                    // (Softmax cancels a key bias: its gradient is zero up to rounding.)
                    assert!(g.iter().any(|&x| x != 0.0), "{name}: all zero");
                }
            }
        }
    }
}

#[test]
fn eval_ignores_layerdrop_and_the_same_seed_and_step_is_the_same_step() {
    let b = batch();
    let eval = tied().forward_backward(&Cpu, &b).unwrap();
    let m = with_layerdrop(tied(), 1.0, 1.0);
    let off = StepOptions {
        dropout_seed: None,
        step: 5,
        ..Default::default()
    };
    let s = m.skipped_layers(&off).unwrap();
    assert!(!s.encoder.iter().chain(&s.decoder).any(|&x| x));
    assert!(same_step(&m.forward_backward(&Cpu, &b).unwrap(), &eval));
    assert!(same_step(
        &m.forward_backward_with(&Cpu, &b, &off).unwrap(),
        &eval
    ));
    let m = with_layerdrop(with_dropout(untied()), 0.5, 0.5);
    let (opts, _) = mixed_draw(&m);
    let first = m.forward_backward_with(&Cpu, &b, &opts).unwrap();
    assert!(same_step(
        &m.forward_backward_with(&Cpu, &b, &opts).unwrap(),
        &first
    ));
}

/// Over many (seed, step) pairs the draws skip about p of the layers (within 4.5σ of the
/// binomial), differ between steps, and encoder and decoder draw independently.
#[test]
fn the_draws_skip_about_p_of_the_layers() {
    let m = with_layerdrop(tied(), 0.25, 0.6);
    let (mut n, mut enc, mut dec) = (0usize, 0usize, 0usize);
    let mut patterns = std::collections::BTreeSet::new();
    for seed in 0..16 {
        for step in 0..32 {
            let s = m.skipped_layers(&train(seed, step)).unwrap();
            enc += s.encoder.iter().filter(|&&x| x).count();
            dec += s.decoder.iter().filter(|&&x| x).count();
            n += s.encoder.len();
            assert_eq!(s.encoder.len(), s.decoder.len());
            patterns.insert((s.encoder, s.decoder));
        }
    }
    for (count, p) in [(enc, 0.25f64), (dec, 0.6)] {
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        assert!(
            (count as f64 - mean).abs() <= 4.5 * sd,
            "skipped {count} of {n}, expected {mean:.0} ± {sd:.0}"
        );
    }
    // 2 + 2 layers: all 16 patterns appear in 512 draws.
    assert_eq!(patterns.len(), 16);
}

/// Richardson-extrapolated central differences of our own f32 loss under a fixed draw that
/// skips some layers of each stack (the same (seed, step) at every evaluation, so the same
/// layers and dropout masks), as tests/train_bart_denoise.rs: bound 5e-4 + 1e-2·|g| at
/// h = 1e-2 (the untied fixture scales its token lookups by √d_model: 1e-2/√d_model there).
/// A skipped layer's parameters do not change the loss at all: their gradient and their
/// finite differences are both exactly zero.
#[test]
fn gradients_with_skipped_layers_match_finite_differences_under_the_same_draw() {
    for m0 in [
        with_layerdrop(with_dropout(tied()), 0.5, 0.5),
        with_layerdrop(with_dropout(untied()), 0.5, 0.5),
    ] {
        let (opts, skip) = mixed_draw(&m0);
        let b = batch();
        let base = m0.forward_backward_with(&Cpu, &b, &opts).unwrap();
        let host0: Vec<(String, HostParam)> = m0
            .parameters()
            .iter()
            .map(|p| {
                let shape = Cpu.shape(&p.value).to_vec();
                (
                    p.name.clone(),
                    HostParam {
                        shape,
                        values: host(&p.value),
                    },
                )
            })
            .collect();
        let bias = m0.final_logits_bias(&Cpu).unwrap();
        let loss_at = |name: &str, i: usize, d: f32| -> f64 {
            let mut h = host0.clone();
            h.iter_mut().find(|(n, _)| n == name).unwrap().1.values[i] += d;
            let m = Model::from_host(&Cpu, m0.config.clone(), h, &bias).unwrap();
            m.forward_backward_with(&Cpu, &b, &opts).unwrap().loss as f64
        };
        let (e_on, e_off) = (
            skip.encoder.iter().position(|&x| !x).unwrap(),
            skip.encoder.iter().position(|&x| x).unwrap(),
        );
        let (d_on, d_off) = (
            skip.decoder.iter().position(|&x| !x).unwrap(),
            skip.decoder.iter().position(|&x| x).unwrap(),
        );
        let table = if m0.config.tie_word_embeddings {
            "model.shared.weight"
        } else {
            "model.encoder.embed_tokens.weight"
        };
        let names = [
            table.to_string(),
            "model.encoder.layernorm_embedding.weight".into(),
            format!("model.encoder.layers.{e_on}.self_attn.v_proj.weight"),
            format!("model.encoder.layers.{e_on}.fc1.weight"),
            format!("model.encoder.layers.{e_off}.fc2.weight"),
            format!("model.decoder.layers.{d_on}.encoder_attn.q_proj.weight"),
            format!("model.decoder.layers.{d_on}.final_layer_norm.bias"),
            format!("model.decoder.layers.{d_off}.self_attn.out_proj.weight"),
        ];
        let hstep = 1e-2f32;
        for name in &names {
            let g = host(base.grads.get(name).unwrap());
            let skipped = in_layer(name, "encoder", e_off) || in_layer(name, "decoder", d_off);
            if skipped {
                assert!(
                    g.iter().all(|&x| x == 0.0),
                    "{name}: skipped, yet a gradient"
                );
                for i in [0, g.len() / 2] {
                    assert_eq!(loss_at(name, i, hstep), base.loss as f64, "{name}[{i}]");
                }
                continue;
            }
            let mut order: Vec<usize> = (0..g.len()).collect();
            order.sort_by(|&a, &c| g[c].abs().total_cmp(&g[a].abs()));
            let h0 = if name.contains("embed_tokens") && m0.config.scale_embedding {
                hstep / (m0.config.d_model as f32).sqrt()
            } else {
                hstep
            };
            for &i in &order[..2] {
                let d = |h: f32| (loss_at(name, i, h) - loss_at(name, i, -h)) / (2.0 * h as f64);
                let fd = (4.0 * d(h0 / 2.0) - d(h0)) / 3.0;
                let bound = 5e-4 + 1e-2 * (g[i] as f64).abs();
                assert!(
                    (fd - g[i] as f64).abs() <= bound,
                    "{name}[{i}]: backward {} vs finite differences {fd} (bound {bound:.1e})",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn recomputation_gives_the_same_step_bit_for_bit() {
    let b = batch();
    for m0 in [tied(), untied()] {
        let plain = untied_or_tied(&m0);
        let dropout = with_dropout(untied_or_tied(&m0));
        let layerdrop = with_layerdrop(with_dropout(untied_or_tied(&m0)), 0.5, 0.5);
        let (mixed, _) = mixed_draw(&layerdrop);
        for (what, m, opts) in [
            ("eval", &plain, StepOptions::default()),
            ("dropout", &dropout, train(7, 3)),
            ("dropout + LayerDrop", &layerdrop, mixed),
        ] {
            let full = m.forward_backward_with(&Cpu, &b, &opts).unwrap();
            let re = StepOptions {
                recompute: true,
                ..opts
            };
            let recomputed = m.forward_backward_with(&Cpu, &b, &re).unwrap();
            assert!(
                same_step(&recomputed, &full),
                "{what}: recomputation differs"
            );
        }
    }
}

#[test]
fn a_layerdrop_outside_zero_to_one_is_a_config_error() {
    let cfg = std::fs::read_to_string(fixture("tests/fixtures/tiny-bart/config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    for (key, p, ok) in [
        ("encoder_layerdrop", 1.0, true),
        ("decoder_layerdrop", 0.25, true),
        ("encoder_layerdrop", 1.5, false),
        ("decoder_layerdrop", -0.1, false),
    ] {
        let mut v = v.clone();
        v[key] = p.into();
        let c = BartConfig::from_json(&v, "config.json");
        match ok {
            true => assert_eq!(
                if key == "encoder_layerdrop" {
                    c.unwrap().encoder_layerdrop
                } else {
                    c.unwrap().decoder_layerdrop
                },
                p as f32
            ),
            false => assert!(matches!(c, Err(Error::Config { .. })), "{key} = {p}"),
        }
    }
    // A probability set on the config by hand is checked at the step.
    let m = with_layerdrop(tied(), 2.0, 0.0);
    assert!(matches!(
        m.forward_backward_with(&Cpu, &batch(), &train(1, 0)),
        Err(Error::InvalidArgument { .. })
    ));
}
