//! The pretraining models' training steps on the CUDA backend against the CPU backend, in f32:
//! BertForPreTraining's MLM + NSP step and BART's denoising step (the same fixtures as
//! tests/train_bert_pretrain.rs, tests/train_bart_denoise.rs and
//! tests/train_bart_untied_dropout.rs: tied, and untied with and without dropout; the dropout
//! masks are the same Philox streams on both backends). Both models are written on
//! the `TrainBackend` trait, so no kernel is new here: these check that the CUDA backend's ops
//! compose into the same losses and gradients. Bounds: the loss within 1e-5 relative and
//! every gradient within the bound the CPU meets against PyTorch (1e-4·max(1, max|g|) per
//! element, 1e-4 in relative norm; the key projections' exact-zero bias gradients by size
//! only). LayerDrop and recomputation: the untied step recomputing on the GPU against the
//! CPU keeping everything, and a GPU model saved and read back on the CPU.

use cuattn::check::gpu_or_skip;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::tokenizer::TokenBatch;
use cuattn::runtime::train::{
    BartForConditionalGeneration, BertForPreTraining, DenoisingBatch, Gradients, StepOptions,
};
use cuattn::runtime::{Backend, Cpu};
use cuattn::DType;

use crate::fixture_files::{fixture, json};

fn ints(v: &serde_json::Value) -> Vec<i64> {
    let mut out = Vec::new();
    for x in v.as_array().unwrap() {
        match x.as_array() {
            Some(r) => out.extend(r.iter().map(|y| y.as_i64().unwrap())),
            None => out.push(x.as_i64().unwrap()),
        }
    }
    out
}

/// Every GPU gradient against the CPU's under the bound above.
fn compare<G: Backend>(
    what: &str,
    g: &G,
    got: &Gradients<G::Tensor>,
    want: &Gradients<cuattn::runtime::CpuTensor>,
) {
    assert_eq!(got.names, want.names);
    for ((name, gt), ct) in got.names.iter().zip(&got.tensors).zip(&want.tensors) {
        let (a, b) = (g.to_f32(gt).unwrap(), Cpu.to_f32(ct).unwrap());
        let (mut err, mut max_w, mut d2, mut w2) = (0f64, 0f64, 0f64, 0f64);
        for (&x, &y) in a.iter().zip(&b) {
            let (x, y) = (x as f64, y as f64);
            assert!(x.is_finite(), "{what} {name}: non-finite");
            err = err.max((x - y).abs());
            max_w = max_w.max(y.abs());
            d2 += (x - y).powi(2);
            w2 += y * y;
        }
        let rel = (d2 / w2.max(1e-300)).sqrt();
        let bound = 1e-4 * max_w.max(1.0);
        let key_bias = name.ends_with("key.bias") || name.ends_with("k_proj.bias");
        assert!(
            err <= bound && (key_bias || rel <= 1e-4 || max_w == 0.0),
            "{what} {name}: max abs err {err:.3e} (bound {bound:.1e}), rel norm err {rel:.3e}"
        );
    }
}

#[test]
fn bert_pretraining_step_matches_the_cpu_backend_in_f32() {
    let Some(gpu) = gpu_or_skip("bert_pretraining_step_matches_the_cpu_backend_in_f32") else {
        return;
    };
    let g = Cuda::new(gpu, DType::F32).unwrap();
    let dir = fixture("tests/fixtures/tiny-bert-pretraining");
    let b = &json("tests/fixtures/tiny-bert-pretraining-outputs.json")["batch"];
    let ids = ints(&b["ids"]);
    let lens: Vec<usize> = ints(&b["lens"]).iter().map(|&l| l as usize).collect();
    let batch = TokenBatch {
        len: ids.len() / lens.len(),
        ids: ids.iter().map(|&i| i as u32).collect(),
        type_ids: ints(&b["type_ids"]).iter().map(|&i| i as u32).collect(),
        lens,
        truncated: vec![],
    };
    let (mlm, nsp) = (ints(&b["mlm_labels"]), ints(&b["nsp_labels"]));
    let c = BertForPreTraining::from_folder(&Cpu, &dir)
        .unwrap()
        .forward_backward(&Cpu, &batch, &mlm, &nsp, &StepOptions::default())
        .unwrap();
    let o = BertForPreTraining::from_folder(&g, &dir)
        .unwrap()
        .forward_backward(&g, &batch, &mlm, &nsp, &StepOptions::default())
        .unwrap();
    assert!(
        (o.loss - c.loss).abs() <= 1e-5 * c.loss.abs().max(1.0),
        "loss {} vs {}",
        o.loss,
        c.loss
    );
    compare("BertForPreTraining", &g, &o.grads, &c.grads);
}

#[test]
fn bart_denoising_step_matches_the_cpu_backend_in_f32() {
    let Some(gpu) = gpu_or_skip("bart_denoising_step_matches_the_cpu_backend_in_f32") else {
        return;
    };
    let g = Cuda::new(gpu, DType::F32).unwrap();
    let dir = fixture("tests/fixtures/tiny-bart");
    let v = &json("tests/fixtures/tiny-bart-denoise-step.json")["variants"]["tiny-bart"];
    let batch = DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: ints(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    };
    let c = BartForConditionalGeneration::from_folder(&Cpu, &dir)
        .unwrap()
        .forward_backward(&Cpu, &batch)
        .unwrap();
    let o = BartForConditionalGeneration::from_folder(&g, &dir)
        .unwrap()
        .forward_backward(&g, &batch)
        .unwrap();
    assert!(
        (o.loss - c.loss).abs() <= 1e-5 * c.loss.abs().max(1.0),
        "loss {} vs {}",
        o.loss,
        c.loss
    );
    compare("BART", &g, &o.grads, &c.grads);
}

#[test]
fn untied_bart_denoising_step_with_dropout_matches_the_cpu_backend_in_f32() {
    let Some(gpu) =
        gpu_or_skip("untied_bart_denoising_step_with_dropout_matches_the_cpu_backend_in_f32")
    else {
        return;
    };
    let g = Cuda::new(gpu, DType::F32).unwrap();
    let dir = fixture("tests/fixtures/tiny-bart-untied");
    let v = &json("tests/fixtures/tiny-bart-denoise-step.json")["variants"]["tiny-bart"];
    let batch = DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: ints(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    };
    let d = &json("tests/fixtures/tiny-bart-untied-denoise-step.json")["dropout"];
    let p = |k: &str| d[k].as_f64().unwrap() as f32;
    let train = StepOptions {
        dropout_seed: Some(d["seed"].as_u64().unwrap()),
        step: d["step"].as_u64().unwrap(),
        ..Default::default()
    };
    for (what, opts) in [
        ("untied BART, eval", StepOptions::default()),
        ("untied BART, dropout", train),
    ] {
        let mut cm = BartForConditionalGeneration::from_folder(&Cpu, &dir).unwrap();
        let mut gm = BartForConditionalGeneration::from_folder(&g, &dir).unwrap();
        for c in [&mut cm.config, &mut gm.config] {
            c.dropout = p("dropout");
            c.attention_dropout = p("attention_dropout");
            c.activation_dropout = p("activation_dropout");
        }
        let c = cm.forward_backward_with(&Cpu, &batch, &opts).unwrap();
        let o = gm.forward_backward_with(&g, &batch, &opts).unwrap();
        assert!(
            (o.loss - c.loss).abs() <= 1e-5 * c.loss.abs().max(1.0),
            "{what}: loss {} vs {}",
            o.loss,
            c.loss
        );
        compare(what, &g, &o.grads, &c.grads);
    }
}

/// LayerDrop and recomputation on the CUDA backend: the untied model with the fixture's dropout
/// and LayerDrop 0.5 under a draw that skips some layers, recomputing on the GPU, against the
/// CPU's step that keeps every intermediate (the draw is host-side Philox: the same layers
/// are skipped on both); then the GPU-trained parameters saved by `save_pretrained` read back
/// on the CPU bit for bit.
#[test]
fn untied_bart_step_with_layerdrop_and_recomputation_matches_the_cpu_backend_in_f32() {
    let Some(gpu) = gpu_or_skip(
        "untied_bart_step_with_layerdrop_and_recomputation_matches_the_cpu_backend_in_f32",
    ) else {
        return;
    };
    let g = Cuda::new(gpu, DType::F32).unwrap();
    let dir = fixture("tests/fixtures/tiny-bart-untied");
    let v = &json("tests/fixtures/tiny-bart-denoise-step.json")["variants"]["tiny-bart"];
    let batch = DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: ints(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    };
    let d = &json("tests/fixtures/tiny-bart-untied-denoise-step.json")["dropout"];
    let p = |k: &str| d[k].as_f64().unwrap() as f32;
    let mut cm = BartForConditionalGeneration::from_folder(&Cpu, &dir).unwrap();
    let mut gm = BartForConditionalGeneration::from_folder(&g, &dir).unwrap();
    for c in [&mut cm.config, &mut gm.config] {
        c.dropout = p("dropout");
        c.attention_dropout = p("attention_dropout");
        c.activation_dropout = p("activation_dropout");
        c.encoder_layerdrop = 0.5;
        c.decoder_layerdrop = 0.5;
    }
    let mixed = |v: &[bool]| v.iter().any(|&x| x) && !v.iter().all(|&x| x);
    let opts = (0..200)
        .map(|seed| StepOptions {
            dropout_seed: Some(seed),
            step: 1,
            ..Default::default()
        })
        .find(|o| {
            let s = cm.skipped_layers(o).unwrap();
            mixed(&s.encoder) && mixed(&s.decoder)
        })
        .expect("a draw that skips some layers");
    assert_eq!(
        gm.skipped_layers(&opts).unwrap(),
        cm.skipped_layers(&opts).unwrap()
    );
    let c = cm.forward_backward_with(&Cpu, &batch, &opts).unwrap();
    let re = StepOptions {
        recompute: true,
        ..opts
    };
    let o = gm.forward_backward_with(&g, &batch, &re).unwrap();
    assert!(
        (o.loss - c.loss).abs() <= 1e-5 * c.loss.abs().max(1.0),
        "loss {} vs {}",
        o.loss,
        c.loss
    );
    compare(
        "untied BART, LayerDrop + recomputation",
        &g,
        &o.grads,
        &c.grads,
    );
    let out = std::env::temp_dir().join(format!("cuattn-gpu-bart-save-{}", std::process::id()));
    gm.save_pretrained(&g, &out).unwrap();
    let back = BartForConditionalGeneration::from_folder(&Cpu, &out).unwrap();
    for (a, b) in back.parameters().iter().zip(gm.parameters()) {
        assert_eq!(
            Cpu.to_f32(&a.value).unwrap(),
            g.to_f32(&b.value).unwrap(),
            "{}",
            a.name
        );
    }
    let _ = std::fs::remove_dir_all(out);
}
