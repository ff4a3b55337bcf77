//! GPT-Neo on the CUDA backend (tests/fixtures/tiny-gpt-neo: global/local alternating, window
//! 4, prompts longer than the window) against the CPU backend and Hugging Face: f32 logits at
//! every position (the local layers' prefill runs the fused kernel's sliding window), greedy
//! tokens through the device KV cache (decode steps of local layers whose cache outgrew the
//! window run the fused kernel with the window as its band; the others the split-KV decode
//! kernel), and every cached decode step against a full forward pass, in f32 and f16.

use cuattn::check::gpu_or_skip;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::generate::{generate, GenerateOptions, StopReason};
use cuattn::runtime::gpt_neo::GptNeo;
use cuattn::runtime::Cpu;
use cuattn::DType;

use crate::fixture_files::{fixture, json, uints};
use crate::gpt2_cache::{beside_a_full_context, cache_vs_recompute};

const DIR: &str = "tests/fixtures/tiny-gpt-neo";

/// f16 bound of the cache-vs-recompute comparison: the tiny GPT-2 test's
/// (`F16_CACHE_BOUND` in runtime_gpt2.rs: twice a per-logit budget of ~12 stored f16
/// intermediates at the logits' size); this model has 4 layers instead of 2 and logits of
/// about the same size, so twice that again. A budget, not a measured fit.
const F16_CACHE_BOUND: f32 = 0.16;

/// f32 logits on the device against the CPU backend's and Hugging Face's (the CPU bound of
/// tests/runtime_gpt_neo.rs), and greedy generation on the device, through the cache and
/// without it, alone and batched: Hugging Face's (and the CPU's) tokens exactly (their
/// smallest top-2 margin, 2.4e-3, is far above the 2e-4 two logits within 1e-4 can move).
#[test]
fn runtime_gpt_neo_matches_cpu_and_hugging_face_on_the_device() {
    let Some(gpu) = gpu_or_skip("runtime_gpt_neo_matches_cpu_and_hugging_face_on_the_device")
    else {
        return;
    };
    let f = json("tests/fixtures/tiny-gpt-neo-outputs.json");
    let cases = f["cases"].as_array().unwrap();
    let max_new = f["max_new_tokens"].as_u64().unwrap() as usize;
    let be = Cuda::new(gpu, DType::F32).unwrap();
    let model = GptNeo::from_folder(&be, &fixture(DIR)).unwrap();
    let cpu = GptNeo::from_folder(&Cpu, &fixture(DIR)).unwrap();
    let vocab = model.config.vocab_size;
    for case in cases {
        let ids = uints(&case["ids"]);
        let logits = model.sequence_logits(&be, &ids).unwrap();
        let on_cpu = cpu.sequence_logits(&Cpu, &ids).unwrap();
        let vs_cpu = logits
            .iter()
            .zip(&on_cpu)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0f32,
                |w, d| if d.is_nan() { f32::INFINITY } else { w.max(d) },
            );
        let mut vs_hf = 0f64;
        for (t, pos) in case["logits"].as_array().unwrap().iter().enumerate() {
            for (c, v) in uints(&pos["columns"])
                .iter()
                .zip(pos["values"].as_array().unwrap())
            {
                let d = (logits[t * vocab + *c as usize] as f64 - v.as_f64().unwrap()).abs();
                vs_hf = vs_hf.max(if d.is_nan() { f64::INFINITY } else { d });
            }
        }
        eprintln!(
            "tiny GPT-Neo f32 on GPU: max abs logit error {vs_hf:.2e} (HF), {vs_cpu:.2e} (CPU)"
        );
        assert!(vs_hf <= 1e-4 && vs_cpu <= 1e-4, "{vs_hf:e} / {vs_cpu:e}");
    }
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| uints(&c["ids"])).collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(|c| uints(&c["greedy"])).collect();
    let greedy = |use_kv_cache| GenerateOptions {
        max_new_tokens: max_new,
        use_kv_cache,
        ..GenerateOptions::default()
    };
    for (p, e) in prompts.iter().zip(&expected) {
        for use_kv_cache in [true, false] {
            let out = generate(
                &be,
                &model,
                std::slice::from_ref(p),
                &greedy(use_kv_cache),
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(&out.generated[0], e, "kv cache {use_kv_cache}");
            assert_eq!(out.stop, [StopReason::MaxNewTokens]);
        }
    }
    let out = generate(&be, &model, &prompts, &greedy(true), &mut |_, _| {}).unwrap();
    assert_eq!(out.generated, expected);
    let cpu_out = generate(&Cpu, &cpu, &prompts, &greedy(true), &mut |_, _| {}).unwrap();
    assert_eq!(cpu_out.generated, expected);
    let got = beside_a_full_context(&be, &model, &prompts[2], expected[2].len());
    assert_eq!(got, expected[2]);
}

/// Every decode step through the device cache against a full forward pass over the same
/// tokens (two prompts of 5 and 2 tokens, 30 steps: the local layers' caches outgrow the
/// window of 4 early), in f32 and f16.
#[test]
fn runtime_gpt_neo_device_cache_matches_recompute() {
    let Some(gpu) = gpu_or_skip("runtime_gpt_neo_device_cache_matches_recompute") else {
        return;
    };
    for (dtype, bound) in [(DType::F32, 1e-4f32), (DType::F16, F16_CACHE_BOUND)] {
        let be = Cuda::new(gpu.clone(), dtype).unwrap();
        let model = GptNeo::from_folder(&be, &fixture(DIR)).unwrap();
        let worst = cache_vs_recompute(&be, &model, 30, 12);
        eprintln!("tiny GPT-Neo {dtype} on GPU: device cache vs recompute max abs {worst:.2e}");
        assert!(worst <= bound, "{dtype}: {worst:e} > {bound:e}");
    }
}
