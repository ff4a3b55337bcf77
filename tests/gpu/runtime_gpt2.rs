//! GPT-2 on the CUDA backend against Hugging Face (tests/fixtures/tiny-gpt2*): f32 logits to
//! the CPU bound; in f16 the greedy token at every step of Hugging Face's greedy path wherever
//! its top-2 logit margin is above [`F16_MARGIN`]; and the generation loop on the device.

use cuattn::check::gpu_or_skip;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::generate::{generate, GenerateOptions};
use cuattn::runtime::gpt2::Gpt2;
use cuattn::DType;

/// Smallest top-2 margin at which an f16 run must pick Hugging Face's token. The tiny model's
/// logits reach |6.9|; f16 keeps 2⁻¹¹ ≈ 4.9e-4 relative per rounding and the 2-layer model
/// stores about 12 intermediates in a row (the tiny-BERT test's budget), so one logit may be
/// off by ~12·4.9e-4·6.9 ≈ 0.04 and a difference of two by ~0.08: 0.1 leaves a little room.
/// A budget, not a measured fit (no device run has checked it yet).
const F16_MARGIN: f64 = 0.1;

use crate::fixture_files::{fixture, uints};

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn runtime_gpt2_matches_hugging_face() {
    let Some(gpu) = gpu_or_skip("runtime_gpt2_matches_hugging_face") else {
        return;
    };
    let f: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tests/fixtures/tiny-gpt2-outputs.json")).unwrap(),
    )
    .unwrap();
    let cases = f["cases"].as_array().unwrap();
    let dir = fixture("tests/fixtures/tiny-gpt2");

    // f32: the fixture's logits within the CPU bound.
    let be = Cuda::new(gpu.clone(), DType::F32).unwrap();
    let model = Gpt2::from_folder(&be, &dir).unwrap();
    let vocab = model.config.vocab_size;
    for case in cases {
        let logits = model.sequence_logits(&be, &uints(&case["ids"])).unwrap();
        let mut worst = 0f64;
        for (t, pos) in case["logits"].as_array().unwrap().iter().enumerate() {
            for (c, v) in uints(&pos["columns"])
                .iter()
                .zip(pos["values"].as_array().unwrap())
            {
                let d = (logits[t * vocab + *c as usize] as f64 - v.as_f64().unwrap()).abs();
                worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
            }
        }
        eprintln!("tiny GPT-2 f32 on GPU: max abs logit error {worst:.2e}");
        assert!(worst <= 1e-4, "f32 logits off by {worst}");
    }

    // f16: Hugging Face's greedy path, teacher-forced, token by token.
    let be = Cuda::new(gpu, DType::F16).unwrap();
    let model = Gpt2::from_folder(&be, &dir).unwrap();
    let (mut checked, mut skipped) = (0, 0);
    for case in cases {
        let prompt = uints(&case["ids"]);
        let greedy = uints(&case["greedy"]);
        let margins: Vec<f64> = case["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let mut seq = prompt.clone();
        seq.extend(&greedy);
        let logits = model.sequence_logits(&be, &seq).unwrap();
        assert!(
            logits.iter().all(|x| x.is_finite()),
            "non-finite f16 logits"
        );
        for (i, (&want, &margin)) in greedy.iter().zip(&margins).enumerate() {
            let t = prompt.len() - 1 + i;
            let got = argmax(&logits[t * vocab..(t + 1) * vocab]);
            if margin > F16_MARGIN {
                assert_eq!(
                    got, want,
                    "step {i} of {:?} (HF margin {margin})",
                    case["prompt"]
                );
                checked += 1;
            } else {
                skipped += 1;
            }
        }
        // The generation loop on the device: same tokens up to the first close call.
        let first_close = margins
            .iter()
            .position(|&m| m <= F16_MARGIN)
            .unwrap_or(margins.len());
        let opts = GenerateOptions {
            max_new_tokens: greedy.len(),
            ..GenerateOptions::default()
        };
        let out = generate(&be, &model, &[prompt], &opts, &mut |_, _| {}).unwrap();
        assert_eq!(out.generated[0][..first_close], greedy[..first_close]);
    }
    eprintln!("tiny GPT-2 f16 on GPU: {checked} greedy steps match, {skipped} under the margin");
    assert!(checked >= 60, "too few steps above the margin: {checked}");
}
