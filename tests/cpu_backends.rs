//! The CPU backends' speed paths against the references: the few-row (decoding) linear kernel
//! on every shape class, the bf16-weight backend through the shared op and block checks, GPT-2
//! generation with the kernels forced down to AVX2 and to portable code (`CUATTN_CPU_ISA`, so
//! the AVX2 path runs, and is checked, on an AVX-512 machine too), and bf16 greedy decoding
//! against Hugging Face's f32 ids.

#[allow(dead_code)] // the runtime tests use the rest
mod fixture_files;

use cuattn::runtime::conformance as check;
use cuattn::runtime::generate::{generate, GenerateOptions};
use cuattn::runtime::gpt2::Gpt2;
use cuattn::runtime::{Activation, Cpu, CpuBf16};
use fixture_files::{fixture, json, uints};
use std::path::PathBuf;
use std::process::Command;

/// Rows 1 to 8 take the column-split kernel: tiles of 4 and 1 weight rows, 1 to 4 input rows
/// at a time, k with and without a vector remainder, on both backends.
#[test]
fn few_row_linear_matches_the_reference_on_every_tile_shape() {
    for (rows, inp, out) in [
        (1, 768, 9),
        (2, 37, 5),
        (3, 16, 4),
        (4, 200, 33),
        (7, 1, 6),
        (8, 96, 130),
    ] {
        for (i, act) in [Activation::None, Activation::GeluErf, Activation::GeluTanh]
            .into_iter()
            .enumerate()
        {
            check::linear(&Cpu, rows, inp, out, act, true, 300 + i as u64).unwrap();
            check::linear(&CpuBf16, rows, inp, out, act, i == 1, 400 + i as u64).unwrap();
        }
    }
}

/// bf16 storage, f32 arithmetic: every op and block of the shared checks, the many-row GEMM
/// path (70 rows) included, within bf16's budgets.
#[test]
fn bf16_backend_passes_the_op_and_block_checks() {
    for (rows, inp, out) in [(1, 64, 40), (5, 17, 3), (70, 64, 130)] {
        check::linear(&CpuBf16, rows, inp, out, Activation::GeluErf, true, 7).unwrap();
    }
    check::batched_matmul_nt(&CpuBf16, 3, 5, 7, 9, 1).unwrap();
    for (rows, width) in [(1, 1), (7, 32), (40, 384)] {
        check::elementwise(&CpuBf16, rows, width, 3).unwrap();
    }
    for (i, c) in check::attention_cases().iter().enumerate() {
        check::attention(&CpuBf16, c, 10 + i as u64).unwrap();
    }
    check::multi_head_self_attention(&CpuBf16, true, 2).unwrap();
    check::blocks(&CpuBf16, 5).unwrap();
    check::kv_cache_hook(&CpuBf16, 6).unwrap();
}

fn cuattn() -> Command {
    Command::new(PathBuf::from(env!("CARGO_BIN_EXE_cuattn")))
}

/// The fixture's prompts' ids and Hugging Face's greedy continuations.
/// Prompts, Hugging Face's greedy ids, its logit margins, and the new-token count.
type Cases = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<f64>>, usize);

fn cases() -> Cases {
    let f = json("tests/fixtures/tiny-gpt2-outputs.json");
    let cases = f["cases"].as_array().unwrap();
    let margins = cases
        .iter()
        .map(|c| {
            c["greedy_margins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_f64().unwrap())
                .collect()
        })
        .collect();
    (
        cases.iter().map(|c| uints(&c["ids"])).collect(),
        cases.iter().map(|c| uints(&c["greedy"])).collect(),
        margins,
        f["max_new_tokens"].as_u64().unwrap() as usize,
    )
}

/// `cuattn generate` on all four prompts at once (decode steps of 4 rows) and on one (1 row),
/// with the kernels at each level this CPU supports: Hugging Face's greedy ids every time.
#[test]
fn generation_with_avx2_and_portable_kernels_forced_gives_hugging_faces_ids() {
    let f = json("tests/fixtures/tiny-gpt2-outputs.json");
    let prompts: Vec<String> = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["prompt"].as_str().unwrap().to_string())
        .collect();
    let (_, greedy, _, max_new) = cases();
    let model = fixture("tests/fixtures/tiny-gpt2");
    for isa in ["avx512", "avx2", "scalar"] {
        for batch in [1, prompts.len()] {
            let mut cmd = cuattn();
            cmd.env("CUATTN_CPU_ISA", isa).args([
                "generate",
                "--device",
                "cpu",
                "--json",
                "--model",
                model.to_str().unwrap(),
                "--max-new-tokens",
                &max_new.to_string(),
            ]);
            for p in &prompts[..batch] {
                cmd.args(["--prompt", p]);
            }
            let o = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{isa}: {err}");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let got: Vec<Vec<u32>> = if batch == 1 {
                vec![uints(&v["generated_ids"])]
            } else {
                v["generated_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(uints)
                    .collect()
            };
            assert_eq!(got, greedy[..batch], "{isa}, batch {batch}");
        }
    }
}

#[test]
fn f16_on_the_cpu_is_refused_with_a_message() {
    let model = fixture("tests/fixtures/tiny-gpt2");
    let o = cuattn()
        .args([
            "generate", "--device", "cpu", "--dtype", "f16", "--prompt", "Hi", "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.starts_with("error: ") && err.contains("bf16"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// The fixture checkpoint with every value rounded to bf16 (stored as f32), in a
/// new folder with the fixture's config: what [`CpuBf16`] should compute exactly, in f32.
fn bf16_rounded_fixture() -> PathBuf {
    use safetensors::tensor::TensorView;
    let dir = fixture("tests/fixtures/tiny-gpt2");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rounded: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: fixture dtype {other:?}"),
            };
            let data = values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_f32().to_le_bytes())
                .collect();
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = rounded
        .iter()
        .map(|(n, s, b)| {
            let v = TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    let out = std::env::temp_dir().join(format!("cuattn-bf16-rounded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), out.join("config.json")).unwrap();
    out
}

/// bf16 storage is only a storage change: [`CpuBf16`] on the fixture gives the logits of
/// [`Cpu`] on the same checkpoint with its values rounded to bf16, within f32 summation-order
/// differences (the few-row kernel against the GEMM, 1e-4 as the f32 model is held to HF).
/// Greedy decoding then follows Hugging Face's f32 ids until a step whose f32 margin (top-1
/// minus top-2 logit) is within twice the largest logit change that rounding the weights
/// causes (measured over every prompt position), where a flip is explained by the rounding.
#[test]
fn bf16_weights_compute_the_rounded_model_and_follow_hugging_face_within_its_margins() {
    let dir = fixture("tests/fixtures/tiny-gpt2");
    let rounded_dir = bf16_rounded_fixture();
    let f32_model = Gpt2::from_folder(&Cpu, &dir).unwrap();
    let rounded = Gpt2::from_folder(&Cpu, &rounded_dir).unwrap();
    let bf16_model = Gpt2::from_folder(&CpuBf16, &dir).unwrap();
    let _ = std::fs::remove_dir_all(&rounded_dir);
    let (prompts, greedy, margins, max_new) = cases();
    let (mut storage, mut bound) = (0f32, 0f32);
    for p in &prompts {
        let a = f32_model.sequence_logits(&Cpu, p).unwrap();
        let r = rounded.sequence_logits(&Cpu, p).unwrap();
        // One row at a time too: the decode path (the few-row kernel with bf16 weights).
        let b = bf16_model.sequence_logits(&CpuBf16, p).unwrap();
        for ((x, y), z) in a.iter().zip(&b).zip(&r) {
            assert!(y.is_finite());
            storage = storage.max((y - z).abs());
            bound = bound.max((x - y).abs());
        }
    }
    println!("bf16 vs bf16-rounded f32 logits: {storage:.2e}; vs the f32 model: {bound:.3e}");
    assert!(storage <= 1e-4, "{storage:e}");
    let opts = GenerateOptions {
        max_new_tokens: max_new,
        ..GenerateOptions::default()
    };
    let g = generate(&CpuBf16, &bf16_model, &prompts, &opts, &mut |_, _| {}).unwrap();
    for (i, (got, want)) in g.generated.iter().zip(&greedy).enumerate() {
        assert_eq!(got.len(), want.len());
        match got.iter().zip(want).position(|(a, b)| a != b) {
            Some(t) => {
                let narrow = margins[i][..=t].iter().any(|&m| m <= 2.0 * bound as f64);
                assert!(
                    narrow,
                    "prompt {i}: bf16 ids leave Hugging Face's at step {t}, margins {:?} > 2·{bound}",
                    &margins[i][..=t]
                );
                println!("prompt {i}: first difference at step {t}, after a margin within 2·bound");
            }
            None => println!("prompt {i}: all {} ids equal to Hugging Face's", got.len()),
        }
    }
}
