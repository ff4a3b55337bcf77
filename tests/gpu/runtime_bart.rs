//! BART on the CUDA backend (tests/fixtures/tiny-bart*): in f32 the encoder states and the
//! teacher-forced decoder logits (cross-attention with len_q ≠ len_k through the fused kernel)
//! against the CPU backend and Hugging Face; greedy and beam outputs identical to Hugging Face
//! through the device KV cache (reordered by beam on the device) and the cross-attention K/V
//! computed once per input; a padded batch of inputs.

use cuattn::check::gpu_or_skip;
use cuattn::runtime::bart::Bart;
use cuattn::runtime::cuda::Cuda;
use cuattn::runtime::generate::{generate, GenerateOptions};
use cuattn::runtime::generation_config::GenerationConfig;
use cuattn::runtime::{Backend, Cpu};
use cuattn::DType;

use crate::fixture_files::{fixture, floats, json, uints};

/// f32 on the device against the CPU's f32: same bound as the CPU test against Hugging Face.
const F32_BOUND: f64 = 1e-4;

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x as f64 - y as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn runtime_bart_matches_cpu_and_hugging_face_in_f32() {
    let Some(gpu) = gpu_or_skip("runtime_bart_matches_cpu_and_hugging_face_in_f32") else {
        return;
    };
    let f = json("tests/fixtures/tiny-bart-outputs.json");
    let be = Cuda::new(gpu.clone(), DType::F32).unwrap();
    for name in ["tiny-bart", "tiny-bart-untied"] {
        let dir = fixture(&format!("tests/fixtures/{name}"));
        let v = &f["variants"][name];
        let dev = Bart::from_folder(&be, &dir).unwrap();
        let cpu = Bart::from_folder(&Cpu, &dir).unwrap();
        let folder = GenerationConfig::from_folder(&dir)
            .unwrap()
            .apply(GenerateOptions::default(), 1);
        let greedy = GenerateOptions {
            num_beams: 1,
            max_new_tokens: 12,
            ..folder
        };
        let beams = GenerateOptions {
            num_return_sequences: 2,
            ..folder
        };
        let mut inputs = Vec::new();
        for case in v["cases"].as_array().unwrap() {
            let input = uints(&case["ids"]);
            let len = input.len();
            let h_dev = be
                .to_f32(&dev.encode_hidden(&be, &input, 1, len, &[len]).unwrap())
                .unwrap();
            let h_cpu = cpu.encode_hidden(&Cpu, &input, 1, len, &[len]).unwrap();
            let err = max_abs(&h_dev, h_cpu.data());
            assert!(err <= F32_BOUND, "{name}: encoder states vs CPU {err:e}");
            let dec = uints(&case["decoder_ids"]);
            let l_dev = dev.sequence_logits(&be, &input, &dec).unwrap();
            let l_cpu = cpu.sequence_logits(&Cpu, &input, &dec).unwrap();
            let err = max_abs(&l_dev, &l_cpu);
            assert!(err <= F32_BOUND, "{name}: logits vs CPU {err:e}");
            let hf: Vec<f32> = floats(&case["logits"]).iter().map(|&x| x as f32).collect();
            let err = max_abs(&l_dev, &hf);
            assert!(err <= F32_BOUND, "{name}: logits vs Hugging Face {err:e}");

            let g = generate(
                &be,
                &dev,
                std::slice::from_ref(&input),
                &greedy,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(g.generated[0], uints(&case["greedy"]), "{name}: greedy");
            let b = generate(
                &be,
                &dev,
                std::slice::from_ref(&input),
                &beams,
                &mut |_, _| {},
            )
            .unwrap();
            let expected: Vec<Vec<u32>> = case["beams"]
                .as_array()
                .unwrap()
                .iter()
                .map(uints)
                .collect();
            assert_eq!(b.generated, expected, "{name}: beams");
            inputs.push(input);
        }
        // A padded batch: cross-attention masks each input's padding.
        let g = generate(&be, &dev, &inputs, &greedy, &mut |_, _| {}).unwrap();
        let expected: Vec<Vec<u32>> = v["batch"]["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(uints)
            .collect();
        assert_eq!(g.generated, expected, "{name}: batch greedy");
        let b = generate(&be, &dev, &inputs, &folder, &mut |_, _| {}).unwrap();
        let expected: Vec<Vec<u32>> = v["batch"]["beams"]
            .as_array()
            .unwrap()
            .iter()
            .map(uints)
            .collect();
        assert_eq!(b.generated, expected, "{name}: batch beams");
    }
}
