//! GPT-2 on the CPU backend against Hugging Face transformers (fixtures from
//! scripts/make_fixtures.py): tokenization, logits, greedy continuations; the KV cache against
//! full recompute; sampling; checkpoint variants; bad inputs.

use cuattn::runtime::generate::{
    generate, GenerateOptions, Generation, HostKvCache, Sampling, StepKvCache, StopReason,
};
use cuattn::runtime::gpt2::Gpt2;
use cuattn::runtime::gpt2_tokenizer::{byte_to_unicode, Gpt2Tokenizer, Utf8Stream};
use cuattn::runtime::layers::KvCache;
use cuattn::runtime::Cpu;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

mod gpt2_cache;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn outputs() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2-outputs.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn model() -> Gpt2<Cpu> {
    Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap()
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        ..GenerateOptions::default()
    }
}

fn run(m: &Gpt2<Cpu>, prompts: &[Vec<u32>], opts: &GenerateOptions) -> Generation {
    generate(&Cpu, m, prompts, opts, &mut |_, _| {}).unwrap()
}

/// Max |a − b| over the columns the fixture kept; NaN fails.
fn max_abs_err(ours: &[f32], columns: &[u32], reference: &[f64]) -> f64 {
    columns
        .iter()
        .zip(reference)
        .map(|(&c, &r)| {
            let d = (ours[c as usize] as f64 - r).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn tokenizer_matches_hugging_face_and_round_trips_bytes() {
    let tok = Gpt2Tokenizer::from_folder(&fixture("tiny-gpt2"), 50257).unwrap();
    assert_eq!(tok.source_name(), "tiktoken-rs r50k_base");
    for case in outputs()["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(tok.encode(prompt).unwrap(), expected, "{prompt:?}");
        assert_eq!(tok.decode_bytes(&expected).unwrap(), prompt.as_bytes());
        let greedy = ids(&case["greedy"]);
        assert_eq!(
            tok.decode(&greedy).unwrap(),
            case["greedy_text"].as_str().unwrap()
        );
    }
    // Streaming a multi-byte character split across tokens prints it whole.
    let emoji = tok.encode("🤖!").unwrap();
    assert!(emoji.len() > 2, "the emoji spans several byte tokens");
    let mut stream = Utf8Stream::default();
    let mut pieces = Vec::new();
    for &t in &emoji {
        pieces.push(stream.push(&tok.token_bytes(t).unwrap()));
    }
    assert_eq!(pieces.concat() + &stream.finish(), "🤖!");
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
}

#[test]
fn logits_match_hugging_face() {
    let m = model();
    for case in outputs()["cases"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let logits = m.sequence_logits(&Cpu, &prompt).unwrap();
        let vocab = m.config.vocab_size;
        let mut worst = 0f64;
        for (t, pos) in case["logits"].as_array().unwrap().iter().enumerate() {
            let cols = ids(&pos["columns"]);
            let vals: Vec<f64> = pos["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            worst = worst.max(max_abs_err(
                &logits[t * vocab..(t + 1) * vocab],
                &cols,
                &vals,
            ));
        }
        println!("{:?}: max abs error {worst:.2e}", case["prompt"]);
        assert!(worst <= 1e-4, "max abs error {worst:e} > 1e-4");
    }
}

#[test]
fn greedy_tokens_match_hugging_face_alone_and_batched() {
    let m = model();
    let out = outputs();
    let cases = out["cases"].as_array().unwrap();
    let max_new = out["max_new_tokens"].as_u64().unwrap() as usize;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let expected: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["greedy"])).collect();
    for (p, e) in prompts.iter().zip(&expected) {
        for use_kv_cache in [true, false] {
            let opts = GenerateOptions {
                use_kv_cache,
                ..greedy(max_new)
            };
            let g = run(&m, std::slice::from_ref(p), &opts);
            assert_eq!(&g.generated[0], e, "kv cache {use_kv_cache}");
            assert_eq!(g.stop[0], StopReason::MaxNewTokens);
        }
    }
    // All four prompts (6 to 15 tokens) in one batch.
    let mut streamed = vec![Vec::new(); prompts.len()];
    let g = generate(&Cpu, &m, &prompts, &greedy(max_new), &mut |b, t| {
        streamed[b].push(t)
    })
    .unwrap();
    assert_eq!(g.generated, expected);
    assert_eq!(streamed, expected);
    assert_eq!(g.steps, max_new);
}

/// Logits of every decode step through the KV cache against a full forward pass over the
/// same tokens, for a batch of two prompts of different lengths, one finishing early.
#[test]
fn kv_cache_decode_equals_full_recompute() {
    let worst = gpt2_cache::cache_vs_recompute(&Cpu, &model(), 30, 12);
    println!("max abs difference cache vs recompute: {worst:.2e}");
    assert!(worst <= 1e-4, "{worst:e}");
}

/// A sequence whose cache is full (a prompt of the whole context) beside one that generates:
/// the latter still gets Hugging Face's greedy tokens.
#[test]
fn a_full_context_neighbour_changes_nothing() {
    let out = outputs();
    let case = &out["cases"][1];
    let greedy = ids(&case["greedy"]);
    let got = gpt2_cache::beside_a_full_context(&Cpu, &model(), &ids(&case["ids"]), greedy.len());
    assert_eq!(got, greedy);
}

/// The cache's own checks: lengths past the capacity, a wrong batch, several tokens after the
/// prefill.
#[test]
fn kv_cache_rejects_misuse() {
    let m = model();
    let c = m.config.clone();
    let mut cache = HostKvCache::new(c.n_layer, 2, 6, c.n_embd).unwrap();
    assert!(
        cache.begin_step(&[7, 1]).is_err(),
        "7 positions in a cache of 6"
    );
    assert!(
        cache.begin_step(&[1]).is_err(),
        "one count for two sequences"
    );
    assert!(HostKvCache::new(1, 0, 4, 8).is_err());
    // Prefill 3 + 2 tokens, then a step of 2 tokens per sequence.
    cache.begin_step(&[3, 2]).unwrap();
    run_step(&m, &mut cache, &[1, 2, 3, 4, 5, 0], 3).unwrap();
    cache.begin_step(&[1, 1]).unwrap();
    let err = run_step(&m, &mut cache, &[1, 2, 3, 4], 2).unwrap_err();
    assert!(err.to_string().contains("1 token per sequence"), "{err}");
}

fn run_step(m: &Gpt2<Cpu>, cache: &mut HostKvCache, ids: &[u32], len: usize) -> cuattn::Result<()> {
    let positions: Vec<u32> = (0..ids.len()).map(|r| (r % len) as u32).collect();
    let mut layers = cache.layers();
    let mut refs: Vec<&mut dyn KvCache<Cpu>> = layers
        .iter_mut()
        .map(|l| &mut **l as &mut dyn KvCache<Cpu>)
        .collect();
    m.forward(&Cpu, ids, &positions, 2, len, Some(&mut refs))
        .map(|_| ())
}

#[test]
fn sampling_is_reproducible_and_top_k_1_is_greedy() {
    let m = model();
    let prompts = vec![vec![15496u32, 11, 616, 3290], vec![818u32, 37166]];
    let sampled = |seed, temperature, top_k, top_p| {
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: Sampling {
                temperature,
                top_k,
                top_p,
                seed,
            },
            ..GenerateOptions::default()
        };
        run(&m, &prompts, &opts).generated
    };
    let a = sampled(7, 1.5, 0, 1.0);
    assert_eq!(a, sampled(7, 1.5, 0, 1.0), "same seed, same tokens");
    assert_ne!(a, sampled(8, 1.5, 0, 1.0), "another seed, other tokens");
    let g = run(&m, &prompts, &greedy(12)).generated;
    assert_ne!(a, g, "sampling at temperature 1.5 is not greedy");
    assert_eq!(sampled(3, 0.8, 1, 1.0), g, "top-k 1 is greedy");
    assert_eq!(
        sampled(3, 0.8, 0, 1e-9),
        g,
        "a tiny top-p keeps only the top token"
    );
    // Recompute and cache draw the same tokens from the same seed.
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            seed: 11,
        },
        use_kv_cache: false,
        ..GenerateOptions::default()
    };
    let recomputed = run(&m, &prompts, &opts).generated;
    let cached = run(
        &m,
        &prompts,
        &GenerateOptions {
            use_kv_cache: true,
            ..opts
        },
    )
    .generated;
    assert_eq!(recomputed, cached);
}

/// The sampler's frequencies against the filtered softmax it should draw from.
#[test]
fn sampler_draws_from_the_filtered_distribution() {
    let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0, 3.0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let draws = 40_000;
    let freq = |s: Sampling, rng: &mut rand::rngs::StdRng| {
        let mut counts = [0usize; 6];
        for _ in 0..draws {
            counts[s.sample(&logits, rng).unwrap() as usize] += 1;
        }
        counts.map(|c| c as f64 / draws as f64)
    };
    let softmax = |t: f64, keep: &[usize]| {
        let z: f64 = keep.iter().map(|&i| (logits[i] as f64 / t).exp()).sum();
        let mut p = [0f64; 6];
        for &i in keep {
            p[i] = (logits[i] as f64 / t).exp() / z;
        }
        p
    };
    let check = |got: [f64; 6], want: [f64; 6], what: &str| {
        for i in 0..6 {
            assert!(
                (got[i] - want[i]).abs() < 0.01,
                "{what}: token {i} drawn {:.4}, expected {:.4}",
                got[i],
                want[i]
            );
        }
    };
    let s = |temperature, top_k, top_p| Sampling {
        temperature,
        top_k,
        top_p,
        seed: 0,
    };
    check(
        freq(s(1.0, 0, 1.0), &mut rng),
        softmax(1.0, &[0, 1, 2, 3, 4, 5]),
        "plain",
    );
    check(
        freq(s(2.0, 0, 1.0), &mut rng),
        softmax(2.0, &[0, 1, 2, 3, 4, 5]),
        "T=2",
    );
    check(
        freq(s(1.0, 3, 1.0), &mut rng),
        softmax(1.0, &[5, 0, 1]),
        "top-k 3",
    );
    // At T=1: p(5) ≈ 0.61, p(0) ≈ 0.22 → top-p 0.8 keeps tokens 5 and 0 (0.84 ≥ 0.8).
    check(
        freq(s(1.0, 0, 0.8), &mut rng),
        softmax(1.0, &[5, 0]),
        "top-p 0.8",
    );
    assert_eq!(s(0.0, 0, 1.0).sample(&logits, &mut rng).unwrap(), 5);
    assert!(s(1.0, 0, 1.0).sample(&[0.0, f32::NAN], &mut rng).is_err());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let m = model();
    let err = |prompts: &[Vec<u32>], opts: GenerateOptions| {
        generate(&Cpu, &m, prompts, &opts, &mut |_, _| {})
            .unwrap_err()
            .to_string()
    };
    let e = err(&[vec![]], greedy(4));
    assert!(e.contains("empty"), "{e}");
    let e = err(&[], greedy(4));
    assert!(e.contains("no prompts"), "{e}");
    let e = err(&[vec![1; 129]], greedy(4));
    assert!(e.contains("129 tokens") && e.contains("128"), "{e}");
    let e = err(&[vec![50257]], greedy(4));
    assert!(e.contains("50257") && e.contains("vocabulary"), "{e}");
    for top_p in [0.0, -0.5, 1.5, f32::NAN] {
        let opts = GenerateOptions {
            sampling: Sampling {
                temperature: 1.0,
                top_p,
                ..Sampling::default()
            },
            ..greedy(4)
        };
        let e = err(&[vec![1]], opts);
        assert!(e.contains("top_p") && e.contains("(0, 1]"), "{e}");
    }
    for temperature in [-1.0, f32::INFINITY, f32::NAN] {
        let opts = GenerateOptions {
            sampling: Sampling {
                temperature,
                ..Sampling::default()
            },
            ..greedy(4)
        };
        assert!(err(&[vec![1]], opts).contains("temperature"));
    }
    // A prompt that fills the context gets nothing; one a token short gets one token.
    let g = run(&m, &[vec![1; 128], vec![1; 127]], &greedy(5));
    assert_eq!(g.generated[0].len(), 0);
    assert_eq!(g.generated[1].len(), 1);
    assert_eq!(g.stop, [StopReason::ContextFull, StopReason::ContextFull]);
    // No tokenizer files and a vocabulary that is not GPT-2's.
    let dir = tempdir("no-tokenizer");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2/config.json")).unwrap())
            .unwrap();
    config["vocab_size"] = 1000.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = Gpt2Tokenizer::from_folder(&dir, 1000)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1000") && e.contains("50257"), "{e}");
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuattn-gpt2-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Rewrites the fixture checkpoint with names mapped by `rename` (None drops a tensor) and
/// `extra` tensors added, into a new folder with the fixture's config.
fn rewritten(
    name: &str,
    rename: impl Fn(&str) -> Option<String>,
    extra: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(fixture("tiny-gpt2/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let extra_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = extra
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    for (n, view) in st.tensors() {
        if let Some(new) = rename(&n) {
            views.push((new, view));
        }
    }
    for (n, s, b) in &extra_bytes {
        views.push((
            n.clone(),
            TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
        ));
    }
    let dir = tempdir(name);
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("tiny-gpt2/config.json"), dir.join("config.json")).unwrap();
    dir
}

#[test]
fn checkpoint_variants_load_and_missing_tensors_are_named() {
    let m = model();
    let prompt = [15496u32, 11, 616, 3290, 318, 13779];
    let reference = m.sequence_logits(&Cpu, &prompt).unwrap();
    assert!(!m.has_own_lm_head());
    // Bare GPT2Model names, a saved lm_head equal to the embedding (held once), and the old
    // causal-mask buffers.
    let wte =
        cuattn::runtime::checkpoint::Checkpoint::open(&fixture("tiny-gpt2/model.safetensors"))
            .and_then(|mut c| c.take("transformer.wte.weight", &[50257, 16]))
            .unwrap();
    let buffers = (0..2)
        .map(|i| {
            (
                format!("h.{i}.attn.bias"),
                vec![1, 1, 2, 2],
                vec![1.0, 0.0, 1.0, 1.0],
            )
        })
        .collect::<Vec<_>>();
    let mut extra = vec![(
        "lm_head.weight".to_string(),
        vec![50257, 16],
        wte.values.clone(),
    )];
    extra.extend(buffers);
    let dir = rewritten(
        "bare",
        |n| Some(n.strip_prefix("transformer.").unwrap_or(n).to_string()),
        extra,
    );
    let bare = Gpt2::from_folder(&Cpu, &dir).unwrap();
    assert!(!bare.has_own_lm_head());
    assert_eq!(bare.sequence_logits(&Cpu, &prompt).unwrap(), reference);
    // A stored head that differs is the head even though the config ties (transformers 5
    // loads it so): twice the embedding gives exactly twice the logits.
    let doubled: Vec<f32> = wte.values.iter().map(|w| 2.0 * w).collect();
    let dir = rewritten(
        "own-head",
        |n| Some(n.to_string()),
        vec![("lm_head.weight".into(), vec![50257, 16], doubled)],
    );
    let own = Gpt2::from_folder(&Cpu, &dir).unwrap();
    assert!(own.has_own_lm_head());
    let twice: Vec<f32> = reference.iter().map(|l| 2.0 * l).collect();
    assert_eq!(own.sequence_logits(&Cpu, &prompt).unwrap(), twice);
    // An untied config without a head is refused, naming the tensor.
    let dir = rewritten("untied", |n| Some(n.to_string()), vec![]);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["tie_word_embeddings"] = serde_json::json!(false);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = Gpt2::from_folder(&Cpu, &dir).err().unwrap().to_string();
    assert!(e.contains("lm_head.weight"), "{e}");
    // A missing tensor is named.
    let dir = rewritten(
        "missing",
        |n| (n != "transformer.h.1.mlp.c_fc.bias").then(|| n.to_string()),
        vec![],
    );
    let e = Gpt2::from_folder(&Cpu, &dir).err().unwrap().to_string();
    assert!(e.contains("transformer.h.1.mlp.c_fc.bias"), "{e}");
    // An unexpected one too.
    let dir = rewritten(
        "extra",
        |n| Some(n.to_string()),
        vec![(
            "transformer.h.2.ln_1.weight".into(),
            vec![16],
            vec![1.0; 16],
        )],
    );
    let e = Gpt2::from_folder(&Cpu, &dir).err().unwrap().to_string();
    assert!(e.contains("transformer.h.2.ln_1.weight"), "{e}");
}

#[test]
fn config_n_inner_set_or_null() {
    use cuattn::runtime::gpt2::Gpt2Config;
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-gpt2/config.json")).unwrap())
            .unwrap();
    assert_eq!(Gpt2Config::from_json(&v, "c").unwrap().n_inner, 64);
    v["n_inner"] = 24.into();
    assert_eq!(Gpt2Config::from_json(&v, "c").unwrap().n_inner, 24);
    v["n_head"] = 3.into();
    assert!(Gpt2Config::from_json(&v, "c").is_err());
    v["n_head"] = 2.into();
    v["model_type"] = "bert".into();
    assert!(Gpt2Config::from_json(&v, "c")
        .unwrap_err()
        .to_string()
        .contains("bert"));
}

/// vocab.json + merges.txt and tokenizer.json: a small byte-level BPE written here.
#[test]
fn tokenizer_from_vocab_merges_and_tokenizer_json() {
    let chars = byte_to_unicode();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let merges = ["h e", "Ġ t", "Ġt he", "l l", "he ll"];
    for (i, m) in merges.iter().enumerate() {
        vocab.insert(m.replace(' ', ""), (256 + i).into());
    }
    let dir = tempdir("bpe-files");
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
    let tok = Gpt2Tokenizer::from_folder(&dir, 261).unwrap();
    assert_eq!(tok.source_name(), "tokenizers");
    let text = "hello the naïve 🤖";
    let ids = tok.encode(text).unwrap();
    // "hello" → "hell" (260) + "o"; " the" → 258.
    assert_eq!(&ids[..3], &[260, 'o' as u32, 258]);
    assert_eq!(tok.decode_bytes(&ids).unwrap(), text.as_bytes());
    // The same BPE saved as a tokenizer.json by the tokenizers crate.
    let mut hf = tokenizers::Tokenizer::new(
        tokenizers::models::bpe::BPE::from_file(
            &dir.join("vocab.json").display().to_string(),
            &dir.join("merges.txt").display().to_string(),
        )
        .build()
        .unwrap(),
    );
    let byte_level = tokenizers::decoders::byte_level::ByteLevel::new(false, true, true);
    hf.with_pre_tokenizer(Some(byte_level));
    hf.with_decoder(Some(byte_level));
    let json_dir = tempdir("tokenizer-json");
    hf.save(json_dir.join("tokenizer.json"), false).unwrap();
    let tok = Gpt2Tokenizer::from_folder(&json_dir, 261).unwrap();
    assert_eq!(tok.encode(text).unwrap(), ids);
    assert_eq!(tok.decode_bytes(&ids).unwrap(), text.as_bytes());
}
