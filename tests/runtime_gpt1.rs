//! GPT-1 on the CPU backend against Hugging Face's `OpenAIGPTLMHeadModel` and
//! `OpenAIGPTTokenizer` (fixtures from `scripts/make_fixtures.py --only gpt1`: a random
//! 2-layer model with a ~200-token BPE in GPT-1's pipeline): token ids of texts with capitals,
//! accents, punctuation, runs of whitespace and unknown characters, from tokenizer.json and
//! from vocab.json + merges.txt; decoded text; logits at every position; greedy continuations
//! (alone, batched, with and without the KV cache); the config's checks.

use cuattn::runtime::generate::{generate, GenerateOptions, StopReason};
use cuattn::runtime::gpt1::{Gpt1, Gpt1Config};
use cuattn::runtime::gpt1_tokenizer::Gpt1Tokenizer;
use cuattn::runtime::Cpu;
use std::path::PathBuf;

#[path = "fixture_files/mod.rs"]
#[allow(dead_code)]
mod fixture_files;
#[allow(dead_code)] // beside_a_full_context: the GPT-2 and GPT-Neo tests
mod gpt2_cache;

use fixture_files::{fixture, json, uints};

/// GPT-2's and GPT-Neo's f32 logit bound (tests/runtime_gpt2.rs); the greedy paths' smallest
/// top-2 margin is 9.4e-3.
const LOGIT_BOUND: f64 = 1e-4;

const DIR: &str = "tests/fixtures/tiny-gpt1";

fn outputs() -> serde_json::Value {
    json("tests/fixtures/tiny-gpt1-outputs.json")
}

fn model() -> Gpt1<Cpu> {
    Gpt1::from_folder(&Cpu, &fixture(DIR)).unwrap()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuattn-gpt1-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn greedy() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: outputs()["max_new_tokens"].as_u64().unwrap() as usize,
        ..GenerateOptions::default()
    }
}

#[test]
fn tokenizer_matches_hugging_face_from_either_source() {
    let json_tok = Gpt1Tokenizer::from_folder(&fixture(DIR)).unwrap();
    // The same BPE as vocab.json + merges.txt, with the pipeline built in Rust.
    let dir = tempdir("vocab-merges");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixture(&format!("{DIR}/{f}")), dir.join(f)).unwrap();
    }
    let files_tok = Gpt1Tokenizer::from_folder(&dir).unwrap();
    assert_eq!(json_tok.vocab_size(), model().config.vocab_size);
    for case in outputs()["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = uints(&case["ids"]);
        assert_eq!(json_tok.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(
            files_tok.encode(text).unwrap(),
            ids,
            "{text:?} (vocab + merges)"
        );
        let decoded = case["decoded"].as_str().unwrap();
        assert_eq!(json_tok.decode(&ids).unwrap(), decoded);
        assert_eq!(files_tok.decode(&ids).unwrap(), decoded);
    }
    assert!(json_tok.decode(&[100_000]).is_err());
    let empty = tempdir("no-tokenizer");
    assert!(Gpt1Tokenizer::from_folder(&empty).is_err());
}

#[test]
fn logits_match_hugging_face() {
    let m = model();
    let vocab = m.config.vocab_size;
    for case in outputs()["cases"].as_array().unwrap() {
        let logits = m.sequence_logits(&Cpu, &uints(&case["ids"])).unwrap();
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
        println!("{:?}: max abs error {worst:.2e}", case["text"]);
        assert!(worst <= LOGIT_BOUND, "max abs error {worst:e}");
    }
}

#[test]
fn greedy_tokens_match_hugging_face_alone_batched_and_recomputed() {
    let m = model();
    let out = outputs();
    let cases = out["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| uints(&c["ids"])).collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(|c| uints(&c["greedy"])).collect();
    for (p, e) in prompts.iter().zip(&expected) {
        for use_kv_cache in [true, false] {
            let opts = GenerateOptions {
                use_kv_cache,
                ..greedy()
            };
            let g = generate(&Cpu, &m, std::slice::from_ref(p), &opts, &mut |_, _| {}).unwrap();
            assert_eq!(&g.generated[0], e, "kv cache {use_kv_cache}");
            // No end-of-text token: only the length stops it.
            assert_eq!(g.stop, [StopReason::MaxNewTokens]);
        }
    }
    let g = generate(&Cpu, &m, &prompts, &greedy(), &mut |_, _| {}).unwrap();
    assert_eq!(g.generated, expected);
}

#[test]
fn kv_cache_decode_equals_full_recompute() {
    let worst = gpt2_cache::cache_vs_recompute(&Cpu, &model(), 30, 12);
    println!("max abs difference cache vs recompute: {worst:.2e}");
    assert!(worst <= 1e-4, "{worst:e}");
}

#[test]
fn config_checks_and_bad_inputs() {
    let base = json(&format!("{DIR}/config.json"));
    let c = Gpt1Config::from_json(&base, "c").unwrap();
    assert_eq!(c.eos_token_id, None);
    assert!(c.tie_word_embeddings);
    for (key, value, want) in [
        ("model_type", serde_json::json!("gpt2"), "gpt2"),
        ("afn", serde_json::json!("silu"), "silu"),
        ("n_head", serde_json::json!(3), "n_head"),
        ("n_positions", serde_json::json!(0), "n_positions"),
        ("eos_token_id", serde_json::json!(207), "eos_token_id"),
        (
            "tie_word_embeddings",
            serde_json::json!(1),
            "tie_word_embeddings",
        ),
    ] {
        let mut v = base.clone();
        v[key] = value;
        let e = Gpt1Config::from_json(&v, "c").unwrap_err().to_string();
        assert!(e.contains(want), "{key}: {e}");
    }
    let m = model();
    let err = |prompts: &[Vec<u32>]| {
        generate(&Cpu, &m, prompts, &greedy(), &mut |_, _| {})
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[vec![]]).contains("empty"));
    assert!(err(&[vec![207]]).contains("vocabulary"));
    assert!(err(&[vec![1; 49]]).contains("context of 48"));
}

#[test]
fn generate_cli_runs_gpt1_folders() {
    let case = &outputs()["cases"][0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cuattn"))
        .args(["generate", "--device", "cpu", "--json", "--model"])
        .arg(fixture(DIR))
        .args(["--max-new-tokens", "12", "--prompt"])
        .arg(case["text"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(uints(&v["prompt_ids"]), uints(&case["ids"]));
    let greedy = uints(&case["greedy"]);
    assert_eq!(uints(&v["generated_ids"]), greedy);
    assert_eq!(v["stop_reason"], "max_new_tokens");
    let tok = Gpt1Tokenizer::from_folder(&fixture(DIR)).unwrap();
    assert_eq!(v["text"], tok.decode(&greedy).unwrap());
}
