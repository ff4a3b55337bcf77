//! One MLM + NSP training step of the trainable BertForPreTraining on the CPU against PyTorch
//! (fixtures from `scripts/make_fixtures.py --only bert-pretrain-step`: the tiny
//! BertForPreTraining, dropout off, on a padded pair batch with 30% of tokens masked): both
//! losses, the NSP logits, the gradient of every parameter (the word embeddings' from the
//! lookup and the tied decoder together), every parameter after one `torch.optim.AdamW` step,
//! and finite differences of our own loss on a few coordinates.
//!
//! Tolerances are tests/train_bert.rs's, derived the same way: f32 on both sides with
//! different summation orders, so each gradient is bounded by `1e-4·max(1, max|g_torch|)` per
//! element and 1e-4 in relative norm; the losses by 1e-5 relative.

use cuattn::runtime::tokenizer::TokenBatch;
use cuattn::runtime::train::{AdamW, AdamWConfig, BertForPreTraining, StepOptions};
use cuattn::runtime::{Backend, Cpu};
use cuattn::Error;

#[allow(dead_code)] // the BERT batch helpers are for other binaries
mod fixture_files;

use fixture_files::{errors, fixture, floats, json, torch};

fn model() -> BertForPreTraining<Cpu> {
    BertForPreTraining::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bert-pretraining")).unwrap()
}

fn flat_ints(v: &serde_json::Value) -> Vec<i64> {
    let mut out = Vec::new();
    for row in v.as_array().unwrap() {
        match row.as_array() {
            Some(r) => out.extend(r.iter().map(|x| x.as_i64().unwrap())),
            None => out.push(row.as_i64().unwrap()),
        }
    }
    out
}

/// The pair batch, its MLM labels (−100 where not masked) and NSP labels.
fn batch() -> (TokenBatch, Vec<i64>, Vec<i64>) {
    let f = json("tests/fixtures/tiny-bert-pretraining-outputs.json");
    let b = &f["batch"];
    let ids = flat_ints(&b["ids"]);
    let lens: Vec<usize> = flat_ints(&b["lens"]).iter().map(|&l| l as usize).collect();
    let len = ids.len() / lens.len();
    let batch = TokenBatch {
        ids: ids.iter().map(|&i| i as u32).collect(),
        type_ids: flat_ints(&b["type_ids"])
            .iter()
            .map(|&i| i as u32)
            .collect(),
        lens,
        len,
        truncated: vec![],
    };
    (
        batch,
        flat_ints(&b["mlm_labels"]),
        flat_ints(&b["nsp_labels"]),
    )
}

fn step(
    m: &BertForPreTraining<Cpu>,
    opts: &StepOptions,
) -> cuattn::runtime::train::PretrainingOutput<cuattn::runtime::CpuTensor> {
    let (b, mlm, nsp) = batch();
    m.forward_backward(&Cpu, &b, &mlm, &nsp, opts).unwrap()
}

/// The PyTorch fixture's tensors by name, as f32.
fn torch_tensors() -> Vec<(String, Vec<f32>)> {
    fixture_files::torch_tensors("tests/fixtures/tiny-bert-pretrain-step.safetensors")
}

#[test]
fn losses_and_every_gradient_match_pytorch_autograd() {
    let f = json("tests/fixtures/tiny-bert-pretrain-step.json");
    let m = model();
    let out = step(&m, &StepOptions::default());
    for (got, key) in [
        (out.mlm_loss, "mlm_loss"),
        (out.nsp_loss, "nsp_loss"),
        (out.loss, "loss"),
    ] {
        let want = f[key].as_f64().unwrap();
        assert!(
            (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{key}: {got} vs {want}"
        );
    }
    let want_nsp: Vec<f32> = floats(&f["nsp_logits"]).iter().map(|&v| v as f32).collect();
    assert!(errors(&Cpu.to_f32(&out.nsp_logits).unwrap(), &want_nsp).0 <= 1e-4);
    let (_, labels, _) = batch();
    let masked = labels.iter().filter(|&&l| l != -100).count();
    assert!(masked > 0);
    assert_eq!(out.masked_rows.len(), masked);
    assert_eq!(
        Cpu.shape(out.mlm_logits.as_ref().unwrap()),
        [masked, m.config.bert.vocab_size]
    );
    // Same names in the same order as PyTorch's named_parameters().
    let names = m.parameter_names();
    let want_names: Vec<String> = f["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, want_names);
    assert_eq!(out.grads.names, names);
    let all = torch_tensors();
    let mut worst = (0f64, String::new());
    for (name, g) in names.iter().zip(&out.grads.tensors) {
        let want = torch(&all, &format!("grad.{name}"));
        let (e, max_w, rel) = errors(&Cpu.to_f32(g).unwrap(), &want);
        let bound = 1e-4 * max_w.max(1.0);
        if name.ends_with("attention.self.key.bias") {
            // Exactly zero: q·b_k shifts every score of a query alike and the softmax cancels
            // it. Both sides return rounding noise; only its size is checked.
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
fn the_tied_word_embeddings_get_the_decoders_gradient_too() {
    // The padding row [PAD] = 0 gets nothing from the lookup (padding_idx) but a full row from
    // the decoder, whose softmax covers every vocabulary entry: non-zero here, and PyTorch's.
    let m = model();
    let out = step(&m, &StepOptions::default());
    let h = m.config.bert.hidden_size;
    let g = Cpu
        .to_f32(
            out.grads
                .get("bert.embeddings.word_embeddings.weight")
                .unwrap(),
        )
        .unwrap();
    let want = torch(
        &torch_tensors(),
        "grad.bert.embeddings.word_embeddings.weight",
    );
    let row0 = &g[..h];
    assert!(row0.iter().any(|&v| v.abs() > 1e-6), "padding row {row0:?}");
    assert!(errors(row0, &want[..h]).0 <= 1e-4);
}

#[test]
fn one_adamw_step_matches_torch_optim_adamw() {
    let f = json("tests/fixtures/tiny-bert-pretrain-step.json");
    let hp = &f["adamw"];
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
    let out = step(&m, &StepOptions::default());
    opt.step(&Cpu, m.parameters_mut(), &out.grads, lr).unwrap();
    // A first Adam step moves each weight by about lr·sign(g); within 1% of lr of PyTorch is
    // the same step (a flipped sign would be 2·lr off). Elements whose gradient is below 1%
    // of the gradient test's bound have no determined sign and are skipped.
    let all = torch_tensors();
    let (mut worst, mut total, mut skipped) = (0f64, 0usize, 0usize);
    for p in m.parameters() {
        if p.name.ends_with("attention.self.key.bias") {
            continue; // zero up to rounding, see above
        }
        let want = torch(&all, &format!("adamw1.{}", p.name));
        let got = Cpu.to_f32(&p.value).unwrap();
        let g1 = torch(&all, &format!("grad.{}", p.name));
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
    eprintln!(
        "one AdamW step: max weight difference {worst:.2e} (lr {lr}); {skipped} of {total} skipped"
    );
    assert!(skipped * 1000 < total, "{skipped} of {total} skipped");
}

/// Finite differences of our own f32 loss, with Richardson extrapolation
/// D = (4·D(h/2) − D(h))/3 (truncation O(h⁴)). At h = 1e-2 the loss's f32 rounding
/// (≈ 1e-6 here, relative 2⁻²⁴ of a loss ≈ 5 times a few summation steps) contributes about
/// 1e-6/h ≈ 1e-4 to the derivative: bound 5e-4 + 1e-2·|g|.
#[test]
fn gradients_match_finite_differences_of_the_loss() {
    let m0 = model();
    let (b, mlm, nsp) = batch();
    let base = m0
        .forward_backward(&Cpu, &b, &mlm, &nsp, &StepOptions::default())
        .unwrap();
    let host: Vec<(String, cuattn::runtime::checkpoint::HostParam)> = m0
        .parameters()
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                cuattn::runtime::checkpoint::HostParam {
                    shape: Cpu.shape(&p.value).to_vec(),
                    values: Cpu.to_f32(&p.value).unwrap(),
                },
            )
        })
        .collect();
    let loss_at = |name: &str, i: usize, d: f32| -> f64 {
        let mut h = host.clone();
        let p = h.iter_mut().find(|(n, _)| n == name).unwrap();
        p.1.values[i] += d;
        let m = BertForPreTraining::from_host(&Cpu, m0.config.clone(), h).unwrap();
        m.forward_backward(&Cpu, &b, &mlm, &nsp, &StepOptions::default())
            .unwrap()
            .loss as f64
    };
    let hstep = 1e-2f32;
    let mut checked = 0;
    for name in [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.intermediate.dense.weight",
        "bert.pooler.dense.weight",
        "cls.predictions.bias",
        "cls.predictions.transform.dense.weight",
        "cls.predictions.transform.LayerNorm.weight",
        "cls.seq_relationship.weight",
    ] {
        let g = Cpu.to_f32(base.grads.get(name).unwrap()).unwrap();
        // The two largest coordinates (a real signal, not rounding).
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
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn recomputation_gives_the_same_gradients_bit_for_bit() {
    let m = model();
    let opts = StepOptions {
        dropout_seed: Some(3),
        ..Default::default()
    };
    let a = step(&m, &opts);
    let b = step(
        &m,
        &StepOptions {
            recompute: true,
            ..opts
        },
    );
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    for (x, y) in a.grads.tensors.iter().zip(&b.grads.tensors) {
        assert_eq!(Cpu.to_f32(x).unwrap(), Cpu.to_f32(y).unwrap());
    }
}

#[test]
fn no_masked_token_leaves_only_the_nsp_loss() {
    let m = model();
    let (b, mlm, nsp) = batch();
    let none = vec![-100i64; mlm.len()];
    let out = m
        .forward_backward(&Cpu, &b, &none, &nsp, &StepOptions::default())
        .unwrap();
    assert_eq!(out.mlm_loss, 0.0);
    assert!(out.mlm_logits.is_none());
    assert_eq!(out.loss, out.nsp_loss);
    let g = Cpu
        .to_f32(
            out.grads
                .get("cls.predictions.transform.dense.weight")
                .unwrap(),
        )
        .unwrap();
    assert!(g.iter().all(|&v| v == 0.0));
    let full = m
        .forward_backward(&Cpu, &b, &mlm, &nsp, &StepOptions::default())
        .unwrap();
    assert_eq!(out.nsp_loss.to_bits(), full.nsp_loss.to_bits());
}

#[test]
fn bad_labels_are_typed_errors() {
    let m = model();
    let (b, mlm, nsp) = batch();
    let o = StepOptions::default();
    assert!(matches!(
        m.forward_backward(&Cpu, &b, &mlm[1..], &nsp, &o),
        Err(Error::Shape { .. })
    ));
    assert!(m.forward_backward(&Cpu, &b, &mlm, &nsp[..1], &o).is_err());
    assert!(m.forward_backward(&Cpu, &b, &mlm, &[0, 2], &o).is_err());
    let mut bad = mlm.clone();
    let i = bad.iter().position(|&l| l != -100).unwrap();
    bad[i] = m.config.bert.vocab_size as i64;
    assert!(m.forward_backward(&Cpu, &b, &bad, &nsp, &o).is_err());
    // The classifier's folder has no pretraining heads.
    assert!(
        BertForPreTraining::<Cpu>::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bert-cls"))
            .is_err()
    );
}
