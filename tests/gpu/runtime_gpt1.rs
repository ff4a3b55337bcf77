//! GPT-1 (post-LayerNorm blocks) on the CUDA backend: f32 logits against Hugging Face's
//! (tests/fixtures/tiny-gpt1, the CPU bound of tests/runtime_gpt1.rs) and greedy generation
//! through the device KV cache against Hugging Face's tokens.

use cuattn::check::gpu_or_skip;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::generate::{generate, GenerateOptions};
use cuattn::runtime::gpt1::Gpt1;
use cuattn::DType;

use crate::fixture_files::{fixture, json, uints};

#[test]
fn runtime_gpt1_matches_hugging_face_on_the_device() {
    let Some(gpu) = gpu_or_skip("runtime_gpt1_matches_hugging_face_on_the_device") else {
        return;
    };
    let f = json("tests/fixtures/tiny-gpt1-outputs.json");
    let cases = f["cases"].as_array().unwrap();
    let be = Cuda::new(gpu, DType::F32).unwrap();
    let model = Gpt1::from_folder(&be, &fixture("tests/fixtures/tiny-gpt1")).unwrap();
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
        eprintln!("tiny GPT-1 f32 on GPU: max abs logit error {worst:.2e}");
        assert!(worst <= 1e-4, "f32 logits off by {worst}");
    }
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| uints(&c["ids"])).collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(|c| uints(&c["greedy"])).collect();
    let opts = GenerateOptions {
        max_new_tokens: f["max_new_tokens"].as_u64().unwrap() as usize,
        ..GenerateOptions::default()
    };
    let out = generate(&be, &model, &prompts, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(out.generated, expected);
}
