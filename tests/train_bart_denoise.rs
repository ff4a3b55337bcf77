//! One BART denoising training step on the CPU against PyTorch (fixtures from
//! `scripts/make_fixtures.py --only bart-denoise-step`: the tied tiny BART, dropout 0): two
//! texts noised by our own text infilling (`cuattn::data::noise::infill`, checked here to give
//! the fixture's encoder input), the originals as labels, the decoder fed
//! `shift_tokens_right(labels)`; the loss, the gradient of every parameter (the shared table's
//! from the encoder lookup, the decoder lookup and the tied output projection together), every
//! parameter after one `torch.optim.AdamW` step, and finite differences of our own loss.
//!
//! Tolerances as tests/train_bert.rs derives them: f32 on both sides, so each gradient is held
//! to `1e-4·max(1, max|g_torch|)` per element and 1e-4 in relative norm; the loss to 1e-5
//! relative.

use cuattn::data::noise::{infill, NoiseOptions};
use cuattn::runtime::checkpoint::HostParam;
use cuattn::runtime::train::{
    shift_tokens_right, AdamW, AdamWConfig, BartForConditionalGeneration, DenoisingBatch,
};
use cuattn::runtime::{Backend, Cpu};
use cuattn::Error;

#[allow(dead_code)] // the BERT batch helpers are for other binaries
mod fixture_files;

use fixture_files::{errors, fixture, floats, json, torch};

const MASK: u32 = 4;

fn model() -> BartForConditionalGeneration<Cpu> {
    BartForConditionalGeneration::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart")).unwrap()
}

fn record() -> serde_json::Value {
    json("tests/fixtures/tiny-bart-denoise-step.json")
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect()
}

fn batch() -> DenoisingBatch {
    let v = &record()["variants"]["tiny-bart"];
    DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: floats(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    }
}

/// A key projection's bias shifts every score of a query alike, which the softmax cancels:
/// its gradient is zero up to rounding on both sides.
fn is_key_bias(name: &str) -> bool {
    name.ends_with("k_proj.bias")
}

/// The PyTorch fixture's tensors by name, as f32.
fn torch_tensors() -> Vec<(String, Vec<f32>)> {
    fixture_files::torch_tensors("tests/fixtures/tiny-bart-denoise-step.safetensors")
}

#[test]
fn the_encoder_input_is_our_text_infilling_of_the_labels() {
    let r = record();
    let noise = &r["noise"];
    let seeds: Vec<u64> = floats(&noise["seeds"]).iter().map(|&s| s as u64).collect();
    let b = batch();
    let n = b.input_lens.len();
    let (len_in, len_out) = (b.input_ids.len() / n, b.labels.len() / n);
    for (i, &seed) in seeds.iter().enumerate() {
        let original: Vec<u32> = b.labels[i * len_out..(i + 1) * len_out]
            .iter()
            .filter(|&&l| l != -100)
            .map(|&l| l as u32)
            .collect();
        let inner = &original[1..original.len() - 1];
        let opts = NoiseOptions {
            ratio: noise["ratio"].as_f64().unwrap(),
            poisson_lambda: noise["poisson_lambda"].as_f64().unwrap(),
            seed,
        };
        let (noised, spans) = infill(inner, &vec![true; inner.len()], &MASK, &opts).unwrap();
        assert!(!spans.is_empty());
        let mut want = vec![original[0]];
        want.extend(noised);
        want.push(*original.last().unwrap());
        let got = &b.input_ids[i * len_in..i * len_in + b.input_lens[i]];
        assert_eq!(got, &want[..], "sequence {i}");
        assert_eq!(got.iter().filter(|&&t| t == MASK).count(), spans.len());
    }
}

#[test]
fn the_decoder_is_fed_hugging_faces_shifted_labels() {
    let v = &record()["variants"]["tiny-bart"];
    let b = batch();
    let want: Vec<u32> = ints(&v["decoder_input_ids"])
        .iter()
        .map(|&i| i as u32)
        .collect();
    let m = model();
    let got = shift_tokens_right(
        &b.labels,
        b.input_lens.len(),
        m.config.pad_token_id,
        m.config.decoder_start_token_id,
    )
    .unwrap();
    assert_eq!(got, want);
    assert_eq!(
        m.forward_backward(&Cpu, &b).unwrap().decoder_input_ids,
        want
    );
}

#[test]
fn loss_and_every_gradient_match_pytorch_autograd() {
    let v = &record()["variants"]["tiny-bart"];
    let m = model();
    let out = m.forward_backward(&Cpu, &batch()).unwrap();
    let want = v["loss"].as_f64().unwrap();
    assert!(
        (out.loss as f64 - want).abs() <= 1e-5 * want.max(1.0),
        "loss {} vs {want}",
        out.loss
    );
    // The first decoder position's logits (final_logits_bias included).
    let logits = Cpu.to_f32(&out.logits).unwrap();
    let row0: Vec<f32> = floats(&v["logits_row0"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert!(errors(&logits[..row0.len()], &row0).0 <= 1e-4);
    let names = m.parameter_names();
    let want_names: Vec<String> = v["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, want_names);
    assert!(!names.iter().any(|n| n.contains("final_logits_bias")));
    let all = torch_tensors();
    let mut worst = (0f64, String::new());
    for (name, g) in names.iter().zip(&out.grads.tensors) {
        let want = torch(&all, &format!("tiny-bart.grad.{name}"));
        let (e, max_w, rel) = errors(&Cpu.to_f32(g).unwrap(), &want);
        let bound = 1e-4 * max_w.max(1.0);
        if is_key_bias(name) {
            assert!(
                e <= bound && max_w <= 1e-5,
                "{name}: {e:.3e}, |torch| ≤ {max_w:.1e}"
            );
            continue;
        }
        assert!(
            e <= bound && (rel <= 1e-4 || max_w == 0.0),
            "{name}: max abs err {e:.3e} (bound {bound:.1e}), rel norm err {rel:.3e}"
        );
        if e / bound > worst.0 {
            worst = (e / bound, name.clone());
        }
    }
    eprintln!(
        "worst gradient vs PyTorch: {:.2} of its bound ({})",
        worst.0, worst.1
    );
}

#[test]
fn one_adamw_step_matches_torch_optim_adamw() {
    let v = &record()["variants"]["tiny-bart"];
    let hp = &v["adamw"];
    let mut m = model();
    let betas = floats(&hp["betas"]);
    let lr = hp["lr"].as_f64().unwrap() as f32;
    let cfg = AdamWConfig {
        lr,
        beta1: betas[0] as f32,
        beta2: betas[1] as f32,
        eps: hp["eps"].as_f64().unwrap() as f32,
        weight_decay: hp["weight_decay"].as_f64().unwrap() as f32,
    };
    let mut opt = AdamW::new(&Cpu, m.parameters(), cfg).unwrap();
    let out = m.forward_backward(&Cpu, &batch()).unwrap();
    opt.step(&Cpu, m.parameters_mut(), &out.grads, lr).unwrap();
    // A first Adam step moves a weight by about lr·sign(g): within 1% of lr of PyTorch is the
    // same step. Elements whose gradient is below 1% of the gradient bound have no determined
    // sign and are skipped (exact zeros, e.g. unused vocabulary rows, are compared).
    let all = torch_tensors();
    let (mut worst, mut total, mut skipped) = (0f64, 0usize, 0usize);
    for p in m.parameters() {
        if is_key_bias(&p.name) {
            continue;
        }
        let want = torch(&all, &format!("tiny-bart.adamw1.{}", p.name));
        let got = Cpu.to_f32(&p.value).unwrap();
        let g1 = torch(&all, &format!("tiny-bart.grad.{}", p.name));
        let gmax = g1.iter().fold(0f64, |a, &b| a.max(b.abs() as f64));
        let undetermined = 1e-4 * gmax.max(1.0) * 1e-2;
        for i in 0..got.len() {
            total += 1;
            if g1[i] != 0.0 && (g1[i].abs() as f64) < undetermined {
                skipped += 1;
                continue;
            }
            let e = (got[i] as f64 - want[i] as f64).abs();
            assert!(
                e <= 0.01 * lr as f64,
                "{}[{i}]: {e:.3e} off PyTorch after one step (gradient {:.3e})",
                p.name,
                g1[i]
            );
            worst = worst.max(e);
        }
    }
    eprintln!("one AdamW step: max weight difference {worst:.2e}; {skipped} of {total} skipped");
    assert!(skipped * 1000 < total, "{skipped} of {total} skipped");
}

/// Richardson-extrapolated central differences of our own f32 loss, as
/// tests/train_bert_pretrain.rs: bound 5e-4 + 1e-2·|g| at h = 1e-2.
#[test]
fn gradients_match_finite_differences_of_the_loss() {
    let m0 = model();
    let b = batch();
    let base = m0.forward_backward(&Cpu, &b).unwrap();
    let host: Vec<(String, HostParam)> = m0
        .parameters()
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                HostParam {
                    shape: Cpu.shape(&p.value).to_vec(),
                    values: Cpu.to_f32(&p.value).unwrap(),
                },
            )
        })
        .collect();
    let bias = torch_free_bias();
    let loss_at = |name: &str, i: usize, d: f32| -> f64 {
        let mut h = host.clone();
        h.iter_mut().find(|(n, _)| n == name).unwrap().1.values[i] += d;
        let m = BartForConditionalGeneration::from_host(&Cpu, m0.config.clone(), h, &bias).unwrap();
        m.forward_backward(&Cpu, &b).unwrap().loss as f64
    };
    let hstep = 1e-2f32;
    for name in [
        "model.shared.weight",
        "model.encoder.embed_positions.weight",
        "model.encoder.layers.0.self_attn.q_proj.weight",
        "model.encoder.layernorm_embedding.weight",
        "model.decoder.layers.0.encoder_attn.v_proj.weight",
        "model.decoder.layers.1.fc1.weight",
        "model.decoder.layers.1.final_layer_norm.bias",
    ] {
        let g = Cpu.to_f32(base.grads.get(name).unwrap()).unwrap();
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &c| g[c].abs().total_cmp(&g[a].abs()));
        for &i in &order[..2] {
            let d = |h: f32| (loss_at(name, i, h) - loss_at(name, i, -h)) / (2.0 * h as f64);
            let fd = (4.0 * d(hstep / 2.0) - d(hstep)) / 3.0;
            let bound = 5e-4 + 1e-2 * (g[i] as f64).abs();
            assert!(
                (fd - g[i] as f64).abs() <= bound,
                "{name}[{i}]: backward {} vs finite differences {fd} (bound {bound:.1e})",
                g[i]
            );
        }
    }
}

/// The checkpoint's final_logits_bias, read with safetensors directly.
fn torch_free_bias() -> Vec<f32> {
    let bytes = std::fs::read(fixture("tests/fixtures/tiny-bart/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("final_logits_bias").unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// A tied parameter list is refused for an untied config and the other way round (untied
/// models: tests/train_bart_untied_dropout.rs).
#[test]
fn mismatched_parameter_lists_and_bad_batches_are_typed_errors() {
    let m = model();
    let host: Vec<(String, HostParam)> = m
        .parameters()
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                HostParam {
                    shape: Cpu.shape(&p.value).to_vec(),
                    values: Cpu.to_f32(&p.value).unwrap(),
                },
            )
        })
        .collect();
    let mut untied = m.config.clone();
    untied.tie_word_embeddings = false;
    assert!(matches!(
        BartForConditionalGeneration::from_host(&Cpu, untied, host, &torch_free_bias()),
        Err(Error::InvalidArgument { .. })
    ));
    let good = batch();
    let mut b = good.clone();
    b.input_ids.pop();
    assert!(m.forward_backward(&Cpu, &b).is_err());
    let mut b = good.clone();
    b.input_lens[0] = 0;
    assert!(m.forward_backward(&Cpu, &b).is_err());
    let mut b = good.clone();
    b.labels[1] = m.config.vocab_size as i64;
    assert!(m.forward_backward(&Cpu, &b).is_err());
    let mut b = good.clone();
    b.input_ids[0] = m.config.vocab_size as u32;
    assert!(m.forward_backward(&Cpu, &b).is_err());
    let mut b = good;
    b.labels[2] = -7;
    assert!(m.forward_backward(&Cpu, &b).is_err());
    assert!(shift_tokens_right(&[1, 2, 3], 2, 1, 2).is_err());
}
