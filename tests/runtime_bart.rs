//! BART on the CPU backend against Hugging Face `BartForConditionalGeneration`
//! (tests/fixtures/tiny-bart*, from scripts/make_fixtures.py): a tied head without
//! scale_embedding and an untied one with it. Tokenization, encoder states, teacher-forced
//! logits, greedy and beam outputs (under the folder's generation_config.json), a padded batch,
//! the KV cache against recomputation, bad inputs.

use cuattn::runtime::bart::Bart;
use cuattn::runtime::generate::{generate, GenerateOptions, Generation, StopReason};
use cuattn::runtime::generation_config::GenerationConfig;
use cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer;
use cuattn::runtime::Cpu;
use std::path::{Path, PathBuf};

const VARIANTS: [&str; 2] = ["tiny-bart", "tiny-bart-untied"];

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn outputs() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-bart-outputs.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn ids_list(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

/// Max |a − b|; NaN counts as ∞.
fn max_abs_err(ours: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    ours.iter()
        .zip(reference)
        .map(|(&a, &r)| {
            let d = (a as f64 - r).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

/// The generation_config.json defaults, as `cuattn generate` applies them.
fn folder_options(name: &str) -> GenerateOptions {
    GenerationConfig::from_folder(&fixture(name))
        .unwrap()
        .apply(GenerateOptions::default(), 1)
}

fn run(m: &Bart<Cpu>, inputs: &[Vec<u32>], opts: &GenerateOptions) -> Generation {
    generate(&Cpu, m, inputs, opts, &mut |_, _| {}).unwrap()
}

#[test]
fn bart_matches_hugging_face_encoder_logits_greedy_and_beams() {
    let out = outputs();
    for name in VARIANTS {
        let v = &out["variants"][name];
        let m = Bart::from_folder(&Cpu, &fixture(name)).unwrap();
        assert_eq!(m.separate_lm_head, name.ends_with("untied"));
        assert_eq!(
            m.config.scale_embedding,
            v["config"]["scale_embedding"].as_bool().unwrap()
        );
        let tok = Gpt2Tokenizer::from_folder(&fixture(name), m.config.vocab_size).unwrap();
        let beam_opts = GenerateOptions {
            num_return_sequences: 2,
            ..folder_options(name)
        };
        let greedy_opts = GenerateOptions {
            num_beams: 1,
            max_new_tokens: 12,
            ..folder_options(name)
        };
        for case in v["cases"].as_array().unwrap() {
            let input = ids(&case["ids"]);
            // <s> text </s>, as BART's tokenizer makes it.
            let mut encoded = vec![m.config.bos_token_id];
            encoded.extend(tok.encode(case["text"].as_str().unwrap()).unwrap());
            encoded.push(m.config.eos_token_id);
            assert_eq!(encoded, input, "{name}: tokens of {}", case["text"]);

            let len = input.len();
            let hidden = m.encode_hidden(&Cpu, &input, 1, len, &[len]).unwrap();
            let err = max_abs_err(hidden.data(), &floats(&case["encoder_hidden"]));
            assert!(err <= 1e-4, "{name}: encoder states off by {err:e}");

            let logits = m
                .sequence_logits(&Cpu, &input, &ids(&case["decoder_ids"]))
                .unwrap();
            let err = max_abs_err(&logits, &floats(&case["logits"]));
            assert!(err <= 1e-4, "{name}: logits off by {err:e}");

            let g = run(&m, std::slice::from_ref(&input), &greedy_opts);
            assert_eq!(g.generated[0], ids(&case["greedy"]), "{name}: greedy");

            let b = run(&m, std::slice::from_ref(&input), &beam_opts);
            assert_eq!(b.generated, ids_list(&case["beams"]), "{name}: beams");
            for (ours, theirs) in b.scores.iter().zip(floats(&case["beam_scores"])) {
                assert!((*ours as f64 - theirs).abs() <= 1e-4, "{ours} vs {theirs}");
            }
            assert!(b
                .stop
                .iter()
                .zip(&b.generated)
                .all(|(s, g)| (*s == StopReason::EndOfText) == (g.last() == Some(&2))));
        }
    }
}

#[test]
fn padded_batches_give_every_input_its_own_output() {
    let out = outputs();
    for name in VARIANTS {
        let v = &out["variants"][name];
        let m = Bart::from_folder(&Cpu, &fixture(name)).unwrap();
        let inputs: Vec<Vec<u32>> = v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["ids"]))
            .collect();
        let greedy = GenerateOptions {
            num_beams: 1,
            max_new_tokens: 12,
            ..folder_options(name)
        };
        let g = run(&m, &inputs, &greedy);
        assert_eq!(g.generated, ids_list(&v["batch"]["greedy"]), "{name}");
        let b = run(&m, &inputs, &folder_options(name));
        assert_eq!(b.generated, ids_list(&v["batch"]["beams"]), "{name}");
        // Padded encoder states: every input's real rows as when alone.
        let (padded, len, lens) = m.pad_inputs(&inputs);
        let batch = m
            .encode_hidden(&Cpu, &padded, inputs.len(), len, &lens)
            .unwrap();
        for (i, x) in inputs.iter().enumerate() {
            let alone = m.encode_hidden(&Cpu, x, 1, x.len(), &[x.len()]).unwrap();
            let rows = &batch.data()[i * len * 16..(i * len + x.len()) * 16];
            let err = max_abs_err(
                rows,
                &alone.data().iter().map(|&y| y as f64).collect::<Vec<_>>(),
            );
            assert!(err <= 1e-5, "{name}: input {i} padded vs alone {err:e}");
        }
    }
}

#[test]
fn bart_cache_equals_recomputation() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let inputs = vec![vec![0u32, 50, 60, 70, 2], vec![0u32, 99, 2]];
    for num_beams in [1, 3] {
        let opts = GenerateOptions {
            num_beams,
            num_return_sequences: num_beams,
            max_new_tokens: 9,
            ..GenerateOptions::default()
        };
        let cached = run(&m, &inputs, &opts);
        let recomputed = run(
            &m,
            &inputs,
            &GenerateOptions {
                use_kv_cache: false,
                ..opts
            },
        );
        assert_eq!(cached.generated, recomputed.generated, "beams {num_beams}");
        assert_eq!(cached.stop, recomputed.stop);
    }
}

#[test]
fn bad_bart_inputs_are_errors() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let opts = GenerateOptions::default();
    for (inputs, needle) in [
        (vec![vec![]], "empty"),
        (vec![vec![0u32, 420]], "outside the vocabulary"),
        (vec![vec![5u32; 65]], "positions"),
    ] {
        let e = generate(&Cpu, &m, &inputs, &opts, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
    // A GPT-2 folder is not a BART.
    let e = Bart::from_folder(&Cpu, &fixture("tiny-gpt2"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model_type"), "{e}");
}
