//! GPT-Neo on the CPU backends against Hugging Face's `GPTNeoForCausalLM` (fixtures from
//! `scripts/make_fixtures.py --only gpt-neo`: a random 4-layer model, global/local alternating,
//! window 4, prompts of 9–25 tokens): tokenizer ids, logits at every position, greedy
//! continuations past the window (alone, batched, with and without the KV cache, from the
//! CLI); the same weights with every layer global match Hugging Face's all-global run and
//! differ from the local one; a window one position wider or narrower misses Hugging Face's
//! logits; the config's checks.

use cuattn::runtime::generate::{generate, GenerateOptions, StopReason};
use cuattn::runtime::gpt2_tokenizer::Gpt2Tokenizer;
use cuattn::runtime::gpt_neo::{AttentionKind, GptNeo, GptNeoConfig};
use cuattn::runtime::{Cpu, CpuBf16};
use std::path::PathBuf;

#[path = "fixture_files/mod.rs"]
#[allow(dead_code)]
mod fixture_files;
mod gpt2_cache;

use fixture_files::{fixture, json, uints};

/// f32 logits against Hugging Face's f32 logits: the tiny model's logits reach about |10| and
/// pass through 4 layers of 16-wide sums, so both sides carry f32 rounding of ~1e-6 relative
/// per op; 1e-4 absolute is GPT-2's bound in tests/runtime_gpt2.rs, far below the ≥ 2.4e-3
/// top-2 margins of the greedy paths and the differences a wrong window makes (≥ 1e-2 below).
const LOGIT_BOUND: f64 = 1e-4;

const DIR: &str = "tests/fixtures/tiny-gpt-neo";

fn outputs() -> serde_json::Value {
    json("tests/fixtures/tiny-gpt-neo-outputs.json")
}

fn config_json() -> serde_json::Value {
    json(&format!("{DIR}/config.json"))
}

fn model() -> GptNeo<Cpu> {
    GptNeo::from_folder(&Cpu, &fixture(DIR)).unwrap()
}

/// The fixture's weights under an edited config (a fresh folder holding both).
fn model_with(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> GptNeo<Cpu> {
    let dir = tempdir(name);
    let mut config = config_json();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture(&format!("{DIR}/model.safetensors")),
        dir.join("model.safetensors"),
    )
    .unwrap();
    GptNeo::from_folder(&Cpu, &dir).unwrap()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuattn-gpt-neo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Max |ours − reference| over the columns the fixture kept at every position (∞ for NaN).
fn max_logit_error(ours: &[f32], vocab: usize, positions: &serde_json::Value) -> f64 {
    let mut worst = 0f64;
    for (t, pos) in positions.as_array().unwrap().iter().enumerate() {
        for (c, v) in uints(&pos["columns"])
            .iter()
            .zip(pos["values"].as_array().unwrap())
        {
            let d = (ours[t * vocab + *c as usize] as f64 - v.as_f64().unwrap()).abs();
            worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    worst
}

/// HF's greedy call: 16 new tokens (none of the fixture's paths reaches end-of-text).
fn greedy() -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: outputs()["max_new_tokens"].as_u64().unwrap() as usize,
        ..GenerateOptions::default()
    }
}

#[test]
fn config_alternates_global_and_local_layers() {
    let c = model().config;
    assert_eq!(
        c.attention_layers,
        [
            AttentionKind::Global,
            AttentionKind::Local,
            AttentionKind::Global,
            AttentionKind::Local
        ]
    );
    assert_eq!(c.window_size, 4);
    assert_eq!(c.intermediate_size, 64, "null: 4·hidden_size");
    assert!(c.tie_word_embeddings);
    let window = outputs()["window_size"].as_u64().unwrap() as usize;
    assert_eq!(window, c.window_size);
    // Every prompt is longer than the window, so local layers really cut keys off.
    for case in outputs()["cases"].as_array().unwrap() {
        assert!(uints(&case["ids"]).len() > 2 * window);
    }
}

#[test]
fn tokenizer_ids_match_hugging_face() {
    let tok = Gpt2Tokenizer::from_folder(&fixture(DIR), 320).unwrap();
    for case in outputs()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(prompt).unwrap(),
            uints(&case["ids"]),
            "{prompt:?}"
        );
    }
}

#[test]
fn logits_match_hugging_face_with_local_layers() {
    let m = model();
    for case in outputs()["cases"].as_array().unwrap() {
        let logits = m.sequence_logits(&Cpu, &uints(&case["ids"])).unwrap();
        let worst = max_logit_error(&logits, m.config.vocab_size, &case["logits"]);
        println!("{:?}: max abs error {worst:.2e}", case["prompt"]);
        assert!(
            worst <= LOGIT_BOUND,
            "max abs error {worst:e} > {LOGIT_BOUND:e}"
        );
    }
}

/// The window is exercised: with every layer global the same weights give Hugging Face's
/// all-global logits, which differ from the alternating model's wherever a query has keys
/// outside its window (position ≥ window_size) and agree before that.
#[test]
fn every_layer_global_matches_hugging_face_and_differs_from_local() {
    let local = model();
    let global = model_with("all-global", |c| {
        c["attention_types"] = serde_json::json!([[["global"], 4]]);
        c["attention_layers"] = serde_json::json!(vec!["global"; 4]);
    });
    assert!(global
        .config
        .attention_layers
        .iter()
        .all(|&k| k == AttentionKind::Global));
    let vocab = local.config.vocab_size;
    let w = local.config.window_size;
    for case in outputs()["cases"].as_array().unwrap() {
        let ids = uints(&case["ids"]);
        let g = global.sequence_logits(&Cpu, &ids).unwrap();
        let worst = max_logit_error(&g, vocab, &case["all_global_logits"]);
        assert!(worst <= LOGIT_BOUND, "all-global: {worst:e}");
        let l = local.sequence_logits(&Cpu, &ids).unwrap();
        let diff = |t: usize| {
            (0..vocab)
                .map(|c| (l[t * vocab + c] - g[t * vocab + c]).abs())
                .fold(0f32, f32::max)
        };
        for t in 0..w {
            assert!(diff(t) <= 1e-6, "position {t} sees its whole past in both");
        }
        let smallest = (w..ids.len()).map(diff).fold(f32::INFINITY, f32::min);
        println!(
            "{:?}: local vs global ≥ {smallest:.3} past the window",
            case["prompt"]
        );
        assert!(
            smallest > 1e-2,
            "the window changed position logits by only {smallest}"
        );
        // And the greedy continuations are Hugging Face's all-global ones.
        let out = generate(&Cpu, &global, &[ids], &greedy(), &mut |_, _| {}).unwrap();
        assert_eq!(out.generated[0], uints(&case["all_global_greedy"]));
        assert_ne!(out.generated[0], uints(&case["greedy"]));
    }
}

/// Hugging Face's local band is i − window < j ≤ i: a window one position narrower or wider
/// gives logits far outside the bound (the golden test pins the edge, not just "a window").
#[test]
fn a_window_off_by_one_misses_hugging_face() {
    let case = &outputs()["cases"][0];
    let ids = uints(&case["ids"]);
    for w in [3, 5] {
        let m = model_with(&format!("window-{w}"), |c| c["window_size"] = w.into());
        let logits = m.sequence_logits(&Cpu, &ids).unwrap();
        let worst = max_logit_error(&logits, m.config.vocab_size, &case["logits"]);
        println!("window {w}: max abs error {worst:.2e}");
        assert!(worst > 1e-2, "window {w} is within {worst} of window 4");
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
            assert_eq!(g.stop, [StopReason::MaxNewTokens]);
        }
    }
    // All four prompts (9 to 25 tokens) in one batch: each gets what it gets alone.
    let g = generate(&Cpu, &m, &prompts, &greedy(), &mut |_, _| {}).unwrap();
    assert_eq!(g.generated, expected);
}

/// The bf16-weight CPU backend decodes through the same windowed attention: its cached steps
/// (the few-row kernel with bf16 weights, local layers reading the last 4 positions) give its
/// own full forward pass's logits (the f32 bound: both read the same bf16 weights).
#[test]
fn bf16_weights_kv_cache_equals_full_recompute_past_the_window() {
    let m = GptNeo::from_folder(&CpuBf16, &fixture(DIR)).unwrap();
    let worst = gpt2_cache::cache_vs_recompute(&CpuBf16, &m, 30, 12);
    println!("bf16 weights: max abs difference cache vs recompute: {worst:.2e}");
    assert!(worst <= 1e-4, "{worst:e}");
}

/// Every decode step through the KV cache (local layers reading only the last 4 cached
/// positions) against a full forward pass, for two prompts of 5 and 2 tokens over 30 steps.
#[test]
fn kv_cache_decode_equals_full_recompute_past_the_window() {
    let worst = gpt2_cache::cache_vs_recompute(&Cpu, &model(), 30, 12);
    println!("max abs difference cache vs recompute: {worst:.2e}");
    assert!(worst <= 1e-4, "{worst:e}");
}

#[test]
fn a_full_context_neighbour_changes_nothing() {
    let case = &outputs()["cases"][2];
    let expected = uints(&case["greedy"]);
    let got =
        gpt2_cache::beside_a_full_context(&Cpu, &model(), &uints(&case["ids"]), expected.len());
    assert_eq!(got, expected);
}

#[test]
fn generate_cli_runs_gpt_neo_folders() {
    let case = &outputs()["cases"][1];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cuattn"))
        .args(["generate", "--device", "cpu", "--json", "--model"])
        .arg(fixture(DIR))
        .args(["--max-new-tokens", "16", "--prompt"])
        .arg(case["prompt"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(uints(&v["prompt_ids"]), uints(&case["ids"]));
    assert_eq!(uints(&v["generated_ids"]), uints(&case["greedy"]));
}

#[test]
fn malformed_configs_are_errors_naming_the_field() {
    let base = config_json();
    let check = |edit: &dyn Fn(&mut serde_json::Value), want: &[&str]| {
        let mut v = base.clone();
        edit(&mut v);
        let e = GptNeoConfig::from_json(&v, "config.json")
            .unwrap_err()
            .to_string();
        for w in want {
            assert!(e.contains(w), "{e:?} lacks {w:?}");
        }
    };
    check(&|v| v["model_type"] = "gpt2".into(), &["gpt2", "gpt_neo"]);
    check(
        &|v| v["attention_types"] = serde_json::json!([[["global", "sparse"], 2]]),
        &["attention_types", "sparse"],
    );
    check(
        &|v| v["attention_types"] = serde_json::json!([[["global", "local"], 3]]),
        &["attention_types", "num_layers (4)"],
    );
    check(
        &|v| v["attention_types"] = serde_json::json!([[["local"], 3]]),
        &["gives 3 layers", "num_layers is 4"],
    );
    // A corrupt count is refused before anything is expanded.
    check(
        &|v| v["attention_types"] = serde_json::json!([[["local"], u64::MAX]]),
        &["attention_types"],
    );
    check(
        &|v| v["attention_types"] = serde_json::json!([[[], u64::MAX]]),
        &["gives 0 layers"],
    );
    check(
        &|v| v["attention_types"] = serde_json::json!([["local", 4]]),
        &["attention_types", "entry 0"],
    );
    check(
        &|v| v["attention_types"] = serde_json::json!("global"),
        &["attention_types"],
    );
    check(
        &|v| v["attention_layers"] = serde_json::json!(["local", "global", "local", "global"]),
        &["attention_layers", "disagrees"],
    );
    check(&|v| v["window_size"] = 0.into(), &["window_size"]);
    check(&|v| v["window_size"] = (-4).into(), &["window_size"]);
    check(&|v| v["num_heads"] = 3.into(), &["num_heads"]);
    check(
        &|v| v["num_attention_heads"] = 4.into(),
        &["num_heads", "num_attention_heads"],
    );
    check(&|v| v["activation_function"] = "swish".into(), &["swish"]);
    check(&|v| v["eos_token_id"] = 320.into(), &["eos_token_id"]);
    check(
        &|v| v["tie_word_embeddings"] = "yes".into(),
        &["tie_word_embeddings"],
    );
    check(
        &|v| {
            v.as_object_mut().unwrap().remove("attention_types");
        },
        &["attention_types", "num_layers (4)"],
    );
    // Hugging Face's aliases stand in for the names.
    let mut v = base.clone();
    let o = v.as_object_mut().unwrap();
    let layers = o.remove("num_layers").unwrap();
    o.insert("num_hidden_layers".into(), layers);
    assert_eq!(GptNeoConfig::from_json(&v, "c").unwrap().num_layers, 4);
}

#[test]
fn untied_head_needs_its_weight_and_bad_inputs_are_errors() {
    let dir = tempdir("untied");
    let mut config = config_json();
    config["tie_word_embeddings"] = false.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        fixture(&format!("{DIR}/model.safetensors")),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let e = GptNeo::from_folder(&Cpu, &dir).err().unwrap().to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
    let m = model();
    let err = |prompts: &[Vec<u32>]| {
        generate(&Cpu, &m, prompts, &greedy(), &mut |_, _| {})
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[vec![]]).contains("empty"));
    assert!(err(&[vec![320]]).contains("vocabulary"));
    assert!(err(&[vec![1; 65]]).contains("context of 64"));
}
