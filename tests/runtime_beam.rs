//! The decoding loop's beam search and logits processors on the tiny GPT-2 against Hugging
//! Face's `generate` (tests/fixtures/tiny-gpt2-beams.json from scripts/make_fixtures.py):
//! identical ids and sequence scores; the KV cache (reordered by beam every step) against full
//! recomputation; a batch of inputs against each input alone; bad options.

use cuattn::runtime::generate::{generate, EarlyStopping, GenerateOptions, Generation};
use cuattn::runtime::gpt2::Gpt2;
use cuattn::runtime::Cpu;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `generate()` keyword arguments as options.
fn options(kw: &serde_json::Value) -> GenerateOptions {
    let mut o = GenerateOptions::default();
    let get = |k: &str| kw.get(k).filter(|v| !v.is_null());
    if let Some(v) = get("max_new_tokens") {
        o.max_new_tokens = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = get("num_beams") {
        o.num_beams = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = get("num_return_sequences") {
        o.num_return_sequences = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = get("length_penalty") {
        o.length_penalty = v.as_f64().unwrap() as f32;
    }
    if let Some(v) = get("no_repeat_ngram_size") {
        o.no_repeat_ngram_size = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = get("min_new_tokens") {
        o.min_new_tokens = v.as_u64().unwrap() as usize;
    }
    if let Some(v) = get("early_stopping") {
        o.early_stopping = match v {
            serde_json::Value::Bool(true) => EarlyStopping::Yes,
            serde_json::Value::Bool(false) => EarlyStopping::Heuristic,
            _ => EarlyStopping::Never,
        };
    }
    o
}

fn run(m: &Gpt2<Cpu>, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Generation {
    generate(&Cpu, m, prompts, opts, &mut |_, _| {}).unwrap()
}

fn cases() -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2-beams.json")).unwrap())
            .unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn beam_search_and_processors_match_hugging_face() {
    let m = Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap();
    for case in cases() {
        let prompts: Vec<Vec<u32>> = case["ids"].as_array().unwrap().iter().map(ids).collect();
        let opts = options(&case["options"]);
        let out = run(&m, &prompts, &opts);
        let expected: Vec<Vec<u32>> = case["generated"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(out.generated, expected, "options {}", case["options"]);
        let scores: Vec<f64> = case["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(out.scores.len(), scores.len());
        for (ours, theirs) in out.scores.iter().zip(&scores) {
            // Sums of ≤ 10 log-probabilities whose logits agree with HF to ~1e-5.
            assert!(
                (*ours as f64 - theirs).abs() <= 1e-3,
                "score {ours} vs {theirs} ({})",
                case["options"]
            );
        }
    }
}

#[test]
fn beam_search_with_the_cache_equals_recomputation() {
    let m = Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap();
    let prompts = vec![
        vec![15496u32, 11, 616],
        vec![464u32, 2068, 7586, 21831, 18045],
    ];
    for early_stopping in [
        EarlyStopping::Yes,
        EarlyStopping::Heuristic,
        EarlyStopping::Never,
    ] {
        let opts = GenerateOptions {
            max_new_tokens: 6,
            num_beams: 3,
            num_return_sequences: 3,
            early_stopping,
            ..GenerateOptions::default()
        };
        let cached = run(&m, &prompts, &opts);
        let recomputed = run(
            &m,
            &prompts,
            &GenerateOptions {
                use_kv_cache: false,
                ..opts
            },
        );
        assert_eq!(cached.generated, recomputed.generated);
        for (a, b) in cached.scores.iter().zip(&recomputed.scores) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
        // A batch gives each input what it gets alone.
        for (i, p) in prompts.iter().enumerate() {
            let alone = run(&m, std::slice::from_ref(p), &opts);
            assert_eq!(alone.generated, cached.generated[3 * i..3 * i + 3]);
        }
    }
}

#[test]
fn greedy_is_beam_search_with_one_beam_and_processors_hold() {
    let m = Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap();
    let prompt = vec![vec![15496u32, 11, 616, 3290, 318, 13779]];
    let opts = GenerateOptions {
        max_new_tokens: 14,
        no_repeat_ngram_size: 1,
        forced_bos_token_id: Some(7),
        forced_eos_token_id: Some(50256),
        ..GenerateOptions::default()
    };
    let g = run(&m, &prompt, &opts).generated.remove(0);
    // no_repeat_ngram_size 1: no token twice, the prompt's included.
    let mut all = prompt[0].clone();
    all.extend(&g);
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len(), "a repeated token in {all:?}");
    // Forced BOS applies at decoder length 1 only (not to a 6-token prompt); forced EOS ends
    // the sequence at the last step.
    assert_ne!(g[0], 7);
    assert_eq!(g.len(), 14);
    assert_eq!(*g.last().unwrap(), 50256);
    // min_new_tokens forbids end-of-text before it: with forced EOS at the last step and
    // min_new_tokens past it, the EOS stays forbidden... the forced one wins as in HF (the
    // forced processor runs last).
    let opts = GenerateOptions {
        max_new_tokens: 5,
        min_new_tokens: 10,
        forced_eos_token_id: Some(50256),
        ..GenerateOptions::default()
    };
    let g = run(&m, &prompt, &opts).generated.remove(0);
    assert_eq!(g.last(), Some(&50256));
}

#[test]
fn bad_beam_options_are_errors() {
    let m = Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap();
    let prompt = vec![vec![15496u32]];
    for (opts, needle) in [
        (
            GenerateOptions {
                num_beams: 0,
                ..GenerateOptions::default()
            },
            "num_beams",
        ),
        (
            GenerateOptions {
                num_beams: 2,
                num_return_sequences: 3,
                ..GenerateOptions::default()
            },
            "num_return_sequences",
        ),
        (
            GenerateOptions {
                length_penalty: f32::NAN,
                num_beams: 2,
                ..GenerateOptions::default()
            },
            "length_penalty",
        ),
    ] {
        let e = generate(&Cpu, &m, &prompt, &opts, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }
}
