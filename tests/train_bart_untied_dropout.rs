//! BART's denoising step with an untied model and with dropout, on the CPU.
//!
//! Untied (`tests/fixtures/tiny-bart-untied`, fixtures from `scripts/make_fixtures.py --only
//! bart-denoise-step-untied`, the tied fixture's batch): in transformers 5 the encoder's and
//! the decoder's `embed_tokens` and `lm_head` are separate parameters and `model.shared` is read
//! by nothing (autograd gives it no gradient, AdamW skips it). Held to PyTorch with the tied
//! test's bounds (tests/train_bart_denoise.rs): the loss within 1e-5 relative, each gradient
//! within `1e-4·max(1, max|g_torch|)` per element and 1e-4 in relative norm, AdamW steps
//! within 1% of lr per weight.
//!
//! Dropout: the fixture also holds PyTorch's loss and gradients in train mode with our Philox
//! masks substituted for torch's dropout (the script checks that Hugging Face's dropout calls
//! come in our site order with our shapes), so the placement of every site and the 1/(1−p)
//! scaling are compared with autograd directly. Besides: p = 0 with a seed is the eval step
//! bit for bit; eval ignores the config's probabilities; the gradient with dropout on matches
//! central differences of the loss under the same masks; each site keeps ≈ 1 − p of its
//! elements, scaled by 1/(1 − p); a step is a function of (seed, step).

use cuattn::runtime::bart::{Bart, BartConfig};
use cuattn::runtime::checkpoint::HostParam;
use cuattn::runtime::train::{
    AdamW, AdamWConfig, BartForConditionalGeneration, DenoisingBatch, DenoisingOutput, StepOptions,
    TrainBackend,
};
use cuattn::runtime::{Backend, Cpu, CpuTensor};
use cuattn::Error;

#[allow(dead_code)] // the BERT batch helpers are for other binaries
mod fixture_files;

use fixture_files::{errors, fixture, floats, json, torch};

type Model = BartForConditionalGeneration<Cpu>;

const TABLES: [&str; 3] = [
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
];

fn untied() -> Model {
    Model::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart-untied")).unwrap()
}

fn record() -> serde_json::Value {
    json("tests/fixtures/tiny-bart-untied-denoise-step.json")
}

fn torch_tensors() -> Vec<(String, Vec<f32>)> {
    fixture_files::torch_tensors("tests/fixtures/tiny-bart-untied-denoise-step.safetensors")
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect()
}

/// The tied fixture's batch (the untied fixture was made on it).
fn batch() -> DenoisingBatch {
    let v = &json("tests/fixtures/tiny-bart-denoise-step.json")["variants"]["tiny-bart"];
    DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: floats(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    }
}

/// The fixture's dropout probabilities on `m`'s config and its (seed, step) as options.
fn with_fixture_dropout(m: &mut Model) -> StepOptions {
    let d = &record()["dropout"];
    let p = |k: &str| d[k].as_f64().unwrap() as f32;
    m.config.dropout = p("dropout");
    m.config.attention_dropout = p("attention_dropout");
    m.config.activation_dropout = p("activation_dropout");
    StepOptions {
        dropout_seed: Some(d["seed"].as_u64().unwrap()),
        step: d["step"].as_u64().unwrap(),
        ..Default::default()
    }
}

fn is_key_bias(name: &str) -> bool {
    name.ends_with("k_proj.bias")
}

/// Every gradient of `out` against the fixture's `{prefix}<name>` under the tied test's bound;
/// returns the worst error as a fraction of its bound.
fn assert_grads_match(out: &DenoisingOutput<CpuTensor>, prefix: &str) -> f64 {
    let all = torch_tensors();
    let mut worst = 0f64;
    for (name, g) in out.grads.names.iter().zip(&out.grads.tensors) {
        let want = torch(&all, &format!("{prefix}{name}"));
        let (e, max_w, rel) = errors(&Cpu.to_f32(g).unwrap(), &want);
        let bound = 1e-4 * max_w.max(1.0);
        if is_key_bias(name) {
            // Softmax cancels a key bias: zero up to rounding on both sides.
            assert!(
                e <= bound && max_w <= 1e-5,
                "{name}: {e:.3e}, |torch| ≤ {max_w:.1e}"
            );
            continue;
        }
        assert!(
            e <= bound && (rel <= 1e-4 || max_w == 0.0),
            "{prefix}{name}: max abs err {e:.3e} (bound {bound:.1e}), rel norm err {rel:.3e}"
        );
        worst = worst.max(e / bound);
    }
    worst
}

fn assert_loss(got: f32, want: f64) {
    assert!(
        (got as f64 - want).abs() <= 1e-5 * want.max(1.0),
        "loss {got} vs {want}"
    );
}

fn host_params(m: &Model) -> Vec<(String, HostParam)> {
    m.parameters()
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
        .collect()
}

/// The checkpoint's final_logits_bias, read with safetensors directly.
fn final_logits_bias() -> Vec<f32> {
    let bytes =
        std::fs::read(fixture("tests/fixtures/tiny-bart-untied/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("final_logits_bias")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn host(t: &CpuTensor) -> Vec<f32> {
    Cpu.to_f32(t).unwrap()
}

/// Loss and gradients, bit for bit.
fn same_step(a: &DenoisingOutput<CpuTensor>, b: &DenoisingOutput<CpuTensor>) -> bool {
    a.loss.to_bits() == b.loss.to_bits()
        && a.grads.names == b.grads.names
        && a.grads.tensors.iter().zip(&b.grads.tensors).all(|(x, y)| {
            host(x)
                .iter()
                .zip(host(y))
                .all(|(p, q)| p.to_bits() == q.to_bits())
        })
}

#[test]
fn an_untied_model_trains_its_three_tables_under_their_hugging_face_names() {
    let r = record();
    let m = untied();
    let names = m.parameter_names();
    let want: Vec<String> = r["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, want);
    for t in TABLES {
        assert!(names.iter().any(|n| n == t), "{t} missing");
    }
    // Read by nothing in transformers 5's untied BART: not a parameter here.
    assert_eq!(r["without_gradient"][0], "model.shared.weight");
    assert!(!names.iter().any(|n| n == "model.shared.weight"));
    // Three different tables: the encoder's, the decoder's and the head's gradients differ.
    let out = m.forward_backward(&Cpu, &batch()).unwrap();
    let g: Vec<Vec<f32>> = TABLES
        .iter()
        .map(|t| host(out.grads.get(t).unwrap()))
        .collect();
    assert!(g[0] != g[1] && g[1] != g[2] && g[0] != g[2]);
}

#[test]
fn untied_loss_logits_and_every_gradient_match_pytorch_autograd() {
    let r = record();
    let out = untied().forward_backward(&Cpu, &batch()).unwrap();
    assert_loss(out.loss, r["loss"].as_f64().unwrap());
    let row0: Vec<f32> = floats(&r["logits_row0"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert!(errors(&host(&out.logits)[..row0.len()], &row0).0 <= 1e-4);
    let worst = assert_grads_match(&out, "grad.");
    eprintln!("untied: worst gradient vs PyTorch {worst:.2} of its bound");
}

#[test]
fn two_adamw_steps_of_the_untied_model_match_torch_optim_adamw() {
    let r = record();
    let hp = &r["adamw"];
    let betas = floats(&hp["betas"]);
    let lr = hp["lr"].as_f64().unwrap() as f32;
    let cfg = AdamWConfig {
        lr,
        beta1: betas[0] as f32,
        beta2: betas[1] as f32,
        eps: hp["eps"].as_f64().unwrap() as f32,
        weight_decay: hp["weight_decay"].as_f64().unwrap() as f32,
    };
    let mut m = untied();
    let b = batch();
    let mut opt = AdamW::new(&Cpu, m.parameters(), cfg).unwrap();
    let all = torch_tensors();
    let mut grads: Vec<Vec<Vec<f32>>> = Vec::new();
    for step in 1..=2 {
        let out = m.forward_backward(&Cpu, &b).unwrap();
        if step == 2 {
            assert_loss(out.loss, r["loss_after_step1"].as_f64().unwrap());
        }
        grads.push(out.grads.tensors.iter().map(host).collect());
        opt.step(&Cpu, m.parameters_mut(), &out.grads, lr).unwrap();
        // An Adam step moves a weight by about lr·m̂/√v̂: within 1% of lr of PyTorch is the same
        // step. Elements with a gradient (of either step so far) below 1% of the gradient
        // bound have no determined sign and are skipped.
        let (mut worst, mut total, mut skipped) = (0f64, 0usize, 0usize);
        for (pi, p) in m.parameters().iter().enumerate() {
            if is_key_bias(&p.name) {
                continue;
            }
            let want = torch(&all, &format!("adamw{step}.{}", p.name));
            let got = host(&p.value);
            let undetermined = |g: &[f32], i: usize| {
                let gmax = g.iter().fold(0f64, |a, &x| a.max(x.abs() as f64));
                g[i] != 0.0 && (g[i].abs() as f64) < 1e-4 * gmax.max(1.0) * 1e-2
            };
            for i in 0..got.len() {
                total += 1;
                if grads.iter().any(|g| undetermined(&g[pi], i)) {
                    skipped += 1;
                    continue;
                }
                let e = (got[i] as f64 - want[i] as f64).abs();
                assert!(
                    e <= 0.01 * lr as f64,
                    "step {step} {}[{i}]: {e:.3e} off PyTorch",
                    p.name
                );
                worst = worst.max(e);
            }
        }
        eprintln!(
            "AdamW step {step}: max weight difference {worst:.2e}; {skipped} of {total} skipped"
        );
        assert!(skipped * 100 < total, "{skipped} of {total} skipped");
    }
}

#[test]
fn dropout_step_matches_pytorch_under_the_same_masks() {
    let mut m = untied();
    let opts = with_fixture_dropout(&mut m);
    let d = &record()["dropout"];
    let out = m.forward_backward_with(&Cpu, &batch(), &opts).unwrap();
    assert_loss(out.loss, d["loss"].as_f64().unwrap());
    // Dropout changed the step (else this would compare the eval step again).
    assert!((out.loss as f64 - record()["loss"].as_f64().unwrap()).abs() > 1e-3);
    let worst = assert_grads_match(&out, "dropout.grad.");
    eprintln!("dropout on: worst gradient vs PyTorch {worst:.2} of its bound");
    // The site count the fixture script checked Hugging Face's calls against.
    let sites = m.dropout_sites(&batch(), &opts).unwrap();
    assert_eq!(sites.len() as u64, d["sites_per_step"].as_u64().unwrap());
}

#[test]
fn zero_probabilities_with_a_seed_are_the_eval_step_bit_for_bit() {
    for m in [
        untied(),
        Model::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart")).unwrap(),
    ] {
        assert_eq!(
            (
                m.config.dropout,
                m.config.attention_dropout,
                m.config.activation_dropout
            ),
            (0.0, 0.0, 0.0)
        );
        let b = batch();
        let eval = m.forward_backward(&Cpu, &b).unwrap();
        let opts = StepOptions {
            dropout_seed: Some(5),
            step: 9,
            ..Default::default()
        };
        assert!(m.dropout_sites(&b, &opts).unwrap().is_empty());
        assert!(same_step(
            &m.forward_backward_with(&Cpu, &b, &opts).unwrap(),
            &eval
        ));
    }
}

#[test]
fn eval_mode_ignores_the_configs_probabilities() {
    let b = batch();
    let eval = untied().forward_backward(&Cpu, &b).unwrap();
    let mut m = untied();
    let train = with_fixture_dropout(&mut m);
    let off = StepOptions {
        dropout_seed: None,
        ..train
    };
    assert!(m.dropout_sites(&b, &off).unwrap().is_empty());
    assert!(same_step(&m.forward_backward(&Cpu, &b).unwrap(), &eval));
    assert!(same_step(
        &m.forward_backward_with(&Cpu, &b, &off).unwrap(),
        &eval
    ));
    assert!(!same_step(
        &m.forward_backward_with(&Cpu, &b, &train).unwrap(),
        &eval
    ));
}

#[test]
fn a_step_is_a_function_of_seed_and_step() {
    let mut m = untied();
    let opts = with_fixture_dropout(&mut m);
    let b = batch();
    let run = |o: &StepOptions| m.forward_backward_with(&Cpu, &b, o).unwrap();
    let first = run(&opts);
    assert!(same_step(&run(&opts), &first));
    for other in [
        StepOptions {
            dropout_seed: Some(opts.dropout_seed.unwrap() + 1),
            ..opts
        },
        StepOptions {
            step: opts.step + 1,
            ..opts
        },
    ] {
        let o = run(&other);
        assert!(o.loss != first.loss, "{other:?}: the same loss");
        assert!(!same_step(&o, &first));
    }
}

/// Each site of a step has its own Philox stream (offset step·sites + its number, no two
/// alike, none shared with the next step), keeps ≈ 1 − p of its elements (within 4.5σ of the
/// binomial) and scales each kept one by exactly 1/(1 − p) in f32.
#[test]
fn every_site_keeps_about_one_minus_p_scaled_by_its_inverse() {
    let mut m = untied();
    // Larger probabilities than the fixture's, so every site has a sizeable dropped count.
    m.config.dropout = 0.3;
    m.config.attention_dropout = 0.2;
    m.config.activation_dropout = 0.5;
    let b = batch();
    let opts = StepOptions {
        dropout_seed: Some(77),
        step: 4,
        ..Default::default()
    };
    let sites = m.dropout_sites(&b, &opts).unwrap();
    let c = &m.config;
    let per_step = 2 + 4 * c.encoder_layers as u64 + 6 * c.decoder_layers as u64;
    assert_eq!(sites.len() as u64, per_step);
    let next = m
        .dropout_sites(&b, &StepOptions { step: 5, ..opts })
        .unwrap();
    let mut offsets: Vec<u64> = sites.iter().chain(&next).map(|s| s.site.offset).collect();
    let first: Vec<u64> = sites.iter().map(|s| s.site.offset).collect();
    assert_eq!(first, (4 * per_step..5 * per_step).collect::<Vec<_>>());
    offsets.dedup();
    assert_eq!(offsets.len(), 2 * sites.len());
    let (mut kept_all, mut n_all, mut want_all) = (0usize, 0usize, 0f64);
    for s in &sites {
        let p = match s.kind {
            "dropout" => c.dropout,
            "attention_dropout" => c.attention_dropout,
            "activation_dropout" => c.activation_dropout,
            k => panic!("unknown kind {k}"),
        };
        assert_eq!(s.site.p, p, "{}", s.name);
        assert_eq!(s.site.seed, 77);
        let n: usize = s.shape.iter().product();
        let y = host(
            &Cpu.dropout(&Cpu.upload(&[n], &vec![1.0; n]).unwrap(), s.site)
                .unwrap(),
        );
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        assert!(
            y.iter().all(|&v| v == 0.0 || v == scale),
            "{}: a value other than 0 or {scale}",
            s.name
        );
        let kept = y.iter().filter(|&&v| v != 0.0).count();
        let (mean, sd) = (
            n as f64 * (1.0 - p as f64),
            (n as f64 * p as f64 * (1.0 - p as f64)).sqrt(),
        );
        assert!(
            (kept as f64 - mean).abs() <= 4.5 * sd,
            "{}: kept {kept} of {n}, expected {mean:.0} ± {sd:.0}",
            s.name
        );
        kept_all += kept;
        n_all += n;
        want_all += mean;
    }
    eprintln!("kept {kept_all} of {n_all} (expected {want_all:.0})");
}

/// Richardson-extrapolated central differences of our own f32 loss with dropout on (the same
/// seed and step, so the same masks at every evaluation), as tests/train_bart_denoise.rs:
/// bound 5e-4 + 1e-2·|g| at h = 1e-2 (1e-2/√d_model for the token tables, whose lookups scale
/// the step by √d_model: the untied fixture has `scale_embedding` and ReLU, and a step of 4e-2
/// crosses ReLU kinks), on the two largest coordinates of several tensors, among them all
/// three tables.
#[test]
fn dropout_gradients_match_finite_differences_under_the_same_masks() {
    let mut m0 = untied();
    let opts = with_fixture_dropout(&mut m0);
    let b = batch();
    let base = m0.forward_backward_with(&Cpu, &b, &opts).unwrap();
    let host0 = host_params(&m0);
    let bias = final_logits_bias();
    let loss_at = |name: &str, i: usize, d: f32| -> f64 {
        let mut h = host0.clone();
        h.iter_mut().find(|(n, _)| n == name).unwrap().1.values[i] += d;
        let m = Model::from_host(&Cpu, m0.config.clone(), h, &bias).unwrap();
        m.forward_backward_with(&Cpu, &b, &opts).unwrap().loss as f64
    };
    let hstep = 1e-2f32;
    for name in TABLES.into_iter().chain([
        "model.encoder.layers.1.self_attn.v_proj.weight",
        "model.encoder.layers.0.fc1.weight",
        "model.decoder.layers.0.encoder_attn.q_proj.weight",
        "model.decoder.layers.1.fc2.weight",
        "model.decoder.layernorm_embedding.bias",
    ]) {
        let g = host(base.grads.get(name).unwrap());
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &c| g[c].abs().total_cmp(&g[a].abs()));
        // The lookups multiply a table's step by √d_model (scale_embedding).
        let h0 = if name.contains("embed_tokens") {
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

/// A stack whose own table the checkpoint lacks reads `model.shared` (as the inference
/// loader does): with the encoder's table moved into `model.shared`, the step is the same and
/// `model.shared` gets the encoder table's gradient.
#[test]
fn a_stack_without_its_own_table_reads_model_shared() {
    let m = untied();
    let b = batch();
    let full = m.forward_backward(&Cpu, &b).unwrap();
    let mut h = host_params(&m);
    let at = h
        .iter()
        .position(|(n, _)| n == "model.encoder.embed_tokens.weight")
        .unwrap();
    let (_, enc) = h.remove(at);
    h.insert(0, ("model.shared.weight".into(), enc));
    let moved = Model::from_host(&Cpu, m.config.clone(), h, &final_logits_bias()).unwrap();
    assert_eq!(moved.parameter_names()[0], "model.shared.weight");
    let out = moved.forward_backward(&Cpu, &b).unwrap();
    assert_eq!(out.loss.to_bits(), full.loss.to_bits());
    assert_eq!(
        host(out.grads.get("model.shared.weight").unwrap()),
        host(full.grads.get("model.encoder.embed_tokens.weight").unwrap())
    );
}

#[test]
fn bad_untied_parameters_options_and_probabilities_are_typed_errors() {
    let m = untied();
    let bias = final_logits_bias();
    // An untied list without its head.
    let mut h = host_params(&m);
    h.retain(|(n, _)| n != "lm_head.weight");
    assert!(matches!(
        Model::from_host(&Cpu, m.config.clone(), h, &bias),
        Err(Error::InvalidArgument { .. })
    ));
    // A table of the wrong shape.
    let mut h = host_params(&m);
    h[0].1.shape = vec![1, h[0].1.values.len()];
    assert!(Model::from_host(&Cpu, m.config.clone(), h, &bias).is_err());
    let opts = StepOptions {
        loss_scale: Some(-1.0),
        ..Default::default()
    };
    assert!(m.forward_backward_with(&Cpu, &batch(), &opts).is_err());
    // A dropout probability outside [0, 1) in config.json.
    let cfg =
        std::fs::read_to_string(fixture("tests/fixtures/tiny-bart-untied/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["attention_dropout"] = 1.0.into();
    assert!(matches!(
        BartConfig::from_json(&v, "config.json"),
        Err(Error::Config { .. })
    ));
}

/// A loss scale multiplies every gradient and leaves the loss alone (f16 training's scaling).
#[test]
fn a_loss_scale_scales_the_gradients_not_the_loss() {
    let m = untied();
    let b = batch();
    let one = m.forward_backward(&Cpu, &b).unwrap();
    let opts = StepOptions {
        loss_scale: Some(1024.0),
        ..Default::default()
    };
    let scaled = m.forward_backward_with(&Cpu, &b, &opts).unwrap();
    assert_eq!(scaled.loss.to_bits(), one.loss.to_bits());
    for (a, s) in one.grads.tensors.iter().zip(&scaled.grads.tensors) {
        let (a, s) = (host(a), host(s));
        for (x, y) in a.iter().zip(&s) {
            assert!(
                (*y as f64 - 1024.0 * *x as f64).abs()
                    <= 1e-3 * (1024.0 * x.abs() as f64).max(1e-3)
            );
        }
    }
}

/// A copy of model folder `src` (its config.json) whose checkpoint is `edit` of the original's
/// tensors (name → f32 values and shape).
fn edited_copy(
    src: &str,
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) -> std::path::PathBuf {
    use safetensors::tensor::TensorView;
    let dir = fixture(src);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, v.shape().to_vec(), values)
        })
        .collect();
    edit(&mut tensors);
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            let v = TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    let out = std::env::temp_dir().join(format!("cuattn-bart-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(dir.join("config.json"), out.join("config.json")).unwrap();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

/// The training loader reads the tables the inference loader reads (whose logits match
/// Hugging Face, tests/runtime_bart.rs): the first sequence's teacher-forced logits agree
/// within 1e-4, for the untied fixture, for an untied checkpoint without the encoder's own
/// table (the encoder reads `model.shared`) and for a tied config whose checkpoint stores a
/// different `lm_head.weight` (transformers 5 keeps that head apart: a parameter here).
#[test]
fn the_training_loader_reads_the_tables_the_inference_loader_reads() {
    let no_encoder_table = edited_copy("tests/fixtures/tiny-bart-untied", "no-enc", |t| {
        t.retain(|(n, _, _)| n != "model.encoder.embed_tokens.weight")
    });
    let own_head = edited_copy("tests/fixtures/tiny-bart", "own-head", |t| {
        let (_, shape, shared) = t
            .iter()
            .find(|(n, _, _)| n == "model.shared.weight")
            .unwrap()
            .clone();
        let head = shared.iter().map(|x| -x + 0.05).collect();
        t.push(("lm_head.weight".into(), shape, head));
    });
    let b = batch();
    for (dir, has, lacks) in [
        (
            fixture("tests/fixtures/tiny-bart-untied"),
            &TABLES[..],
            &["model.shared.weight"][..],
        ),
        (
            no_encoder_table.clone(),
            &[
                "model.shared.weight",
                "model.decoder.embed_tokens.weight",
                "lm_head.weight",
            ][..],
            &["model.encoder.embed_tokens.weight"][..],
        ),
        (
            own_head.clone(),
            &["model.shared.weight", "lm_head.weight"][..],
            &TABLES[..2],
        ),
    ] {
        let m = Model::from_folder(&Cpu, &dir).unwrap();
        let names = m.parameter_names();
        for n in has {
            assert!(names.iter().any(|x| x == n), "{dir:?}: no {n}");
        }
        for n in lacks {
            assert!(!names.iter().any(|x| x == n), "{dir:?}: has {n}");
        }
        let out = m.forward_backward(&Cpu, &b).unwrap();
        let len_out = b.labels.len() / b.input_lens.len();
        let inference = Bart::from_folder(&Cpu, &dir).unwrap();
        let want = inference
            .sequence_logits(
                &Cpu,
                &b.input_ids[..b.input_lens[0]],
                &out.decoder_input_ids[..len_out],
            )
            .unwrap();
        let got = host(&out.logits);
        let (e, _, _) = errors(&got[..want.len()], &want);
        assert!(e <= 1e-4, "{dir:?}: logits differ by {e:.2e}");
    }
    let _ = std::fs::remove_dir_all(no_encoder_table);
    let _ = std::fs::remove_dir_all(own_head);
}
