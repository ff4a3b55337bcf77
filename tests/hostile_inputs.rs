//! Hostile input never crashes us (issue 20): one regression test per case of the adversarial
//! corpus (scripts/hostile-corpus.sh), on the committed tiny BERT and tiny GPT-2. Each ends in
//! a clean error that names the problem, or in correct output.

mod hostile;

use cuattn::runtime::bert::{Bert, BertConfig};
use cuattn::runtime::checkpoint::Checkpoint;
use cuattn::runtime::generate::Sampling;
use cuattn::runtime::gpt2::Gpt2Config;
use cuattn::runtime::pooling::Pooling;
use cuattn::runtime::sentence::SentenceEmbedder;
use cuattn::runtime::Cpu;
use hostile::{fill_tensor, repo, scratch, set_json, tiny_bert, tiny_gpt2};
use rand::SeedableRng;
use serde_json::json;
use std::process::{Command, Output, Stdio};

fn cuattn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cuattn"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A clean error: exit status 1, one `error:` line naming `says`, no panic.
fn assert_clean_error(o: &Output, says: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.contains(says),
        "{says}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn bert_config() -> serde_json::Value {
    hostile::json_file(&repo("tests/fixtures/tiny-bert/config.json"))
}

fn gpt2_config() -> serde_json::Value {
    hostile::json_file(&repo("tests/fixtures/tiny-gpt2/config.json"))
}

#[test]
fn config_fields_of_the_wrong_type_or_out_of_range_are_errors_naming_them() {
    for (key, value) in [
        ("num_hidden_layers", json!(1_000_000_000u64)),
        ("num_hidden_layers", json!(1_000_000_000_000_000_000u64)),
        ("num_hidden_layers", json!(1e18)),
        ("layer_norm_eps", json!(-1)),
        ("layer_norm_eps", json!(1e300)),
        ("hidden_act", json!(5)),
        ("hidden_size", json!("32")),
        ("vocab_size", json!(1_000_000_000_000_000u64)),
        ("intermediate_size", json!(0)),
        ("num_attention_heads", json!(-3)),
        ("type_vocab_size", json!(1e18)),
        ("position_embedding_type", json!(["absolute"])),
    ] {
        let mut v = bert_config();
        v[key] = value.clone();
        let e = BertConfig::from_json(&v, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{key} = {value}: {e}");
    }
    for (key, value) in [
        ("n_layer", json!(1_000_000_000_000_000_000u64)),
        ("layer_norm_epsilon", json!(-1)),
        ("activation_function", json!(7)),
        ("n_positions", json!(1_000_000_000_000u64)),
        ("n_inner", json!(1_000_000_000_000u64)),
        ("eos_token_id", json!(99_999_999_999u64)),
        ("scale_attn_weights", json!("yes")),
    ] {
        let mut v = gpt2_config();
        v[key] = value.clone();
        let e = Gpt2Config::from_json(&v, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{key} = {value}: {e}");
    }
}

#[test]
fn config_is_cross_checked_against_the_checkpoint_before_allocating() {
    // In range, but not what the file holds: the error names the config field.
    for (key, value, says) in [
        ("num_hidden_layers", 4000, "num_hidden_layers"),
        ("vocab_size", 100_000, "vocab_size"),
        ("hidden_size", 64, "hidden_size"),
    ] {
        let dir = tiny_bert(&format!("cross-{key}"));
        set_json(&dir.join("config.json"), key, json!(value));
        if key == "hidden_size" {
            set_json(&dir.join("config.json"), "num_attention_heads", json!(4));
        }
        let e = Bert::from_folder(&Cpu, &dir).err().unwrap().to_string();
        assert!(e.contains(says), "{key}: {e}");
    }
    let dir = tiny_gpt2("cross-gpt2");
    set_json(&dir.join("config.json"), "n_layer", json!(4000));
    let e = cuattn::runtime::gpt2::Gpt2::from_folder(&Cpu, &dir)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("n_layer"), "{e}");
}

#[test]
fn oversized_or_endless_config_files_are_errors_after_a_bounded_read() {
    let dir = tiny_bert("big-config");
    std::fs::write(dir.join("config.json"), vec![b' '; 5 << 20]).unwrap();
    let e = BertConfig::from_folder(&dir).unwrap_err().to_string();
    assert!(e.contains("larger than"), "{e}");
    #[cfg(unix)]
    {
        std::fs::remove_file(dir.join("config.json")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("config.json")).unwrap();
        let e = BertConfig::from_folder(&dir).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::os::unix::fs::symlink("/dev/zero", dir.join("modules.json")).unwrap();
        let e = Pooling::from_folder(&dir).unwrap_err().to_string();
        assert!(e.contains("modules.json"), "{e}");
    }
}

#[test]
fn corrupt_checkpoints_are_errors() {
    let dir = scratch("ckpt");
    let good = std::fs::read(repo("tests/fixtures/tiny-bert/model.safetensors")).unwrap();
    let mut huge_header = vec![0xff; 7];
    huge_header.push(0x7f);
    huge_header.extend(b"{}");
    for (name, bytes) in [
        ("empty", vec![]),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("header-2^63", huge_header),
        (
            "garbage",
            (0..4096u32).map(|i| (i * 2654435761) as u8).collect(),
        ),
    ] {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let e = Checkpoint::open(&path).unwrap_err().to_string();
        assert!(e.contains(name), "{name}: {e}");
    }
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn paths_a_model_folder_names_stay_inside_it() {
    for bad in ["../../../../etc", "/etc", "1_Pooling/../../x"] {
        let dir = tiny_bert("paths");
        let modules = json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": bad, "type": "sentence_transformers.models.Pooling"}
        ]);
        std::fs::write(dir.join("modules.json"), modules.to_string()).unwrap();
        let e = Pooling::from_folder(&dir).unwrap_err().to_string();
        assert!(e.contains("leaves the model folder"), "{bad}: {e}");
    }
}

#[test]
fn nan_or_infinite_weights_make_embedding_an_error_naming_the_input() {
    for (value, tensor) in [
        (f32::NAN, "encoder.layer.0.output.dense.bias"),
        (f32::INFINITY, "embeddings.LayerNorm.bias"),
    ] {
        let dir = tiny_bert("nonfinite");
        fill_tensor(&dir.join("model.safetensors"), tensor, value);
        let model = SentenceEmbedder::from_folder(&Cpu, &dir).unwrap();
        let e = model
            .embed(&Cpu, &["the cat", "the dog sat"], 8, |_| {})
            .unwrap_err();
        assert!(
            matches!(e, cuattn::Error::NonFinite { input: 1 | 2, .. }),
            "{e}"
        );
        let o = cuattn()
            .args(["embed", "--device", "cpu", "--json", "--model"])
            .arg(&dir)
            .args(["the cat", "the dog"])
            .output()
            .unwrap();
        assert_clean_error(&o, "input ");
    }
}

/// Embedding on lanes (several batches at once, one per thread) gives bit for bit what one
/// batch after another gives, for a list whose batches do not divide evenly among the lanes,
/// and the same error when every batch fails.
#[test]
fn embedding_on_lanes_gives_the_serial_results_and_errors() {
    let dir = tiny_bert("lanes");
    let model = SentenceEmbedder::from_folder(&Cpu, &dir).unwrap();
    let words = [
        "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "home", "9",
    ];
    let texts: Vec<String> = (0..43)
        .map(|i| {
            let n = 1 + (i * 7) % 23;
            (0..n)
                .map(|j| words[(i + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let on = |threads: usize, model: &SentenceEmbedder<Cpu>| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut seen = Vec::new();
        let out = pool.install(|| model.embed(&Cpu, &texts, 4, |n| seen.push(n)));
        (out, seen)
    };
    let (serial, serial_progress) = on(1, &model);
    let serial = serial.unwrap();
    for threads in [2, 3] {
        let (lanes, progress) = on(threads, &model);
        let lanes = lanes.unwrap();
        assert_eq!(lanes, serial, "{threads} lanes");
        // Every batch reported once, the counts rising to the total.
        assert_eq!(progress.len(), serial_progress.len());
        assert!(progress.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(progress.last(), Some(&texts.len()));
    }
    fill_tensor(
        &dir.join("model.safetensors"),
        "embeddings.LayerNorm.bias",
        f32::NAN,
    );
    let model = SentenceEmbedder::from_folder(&Cpu, &dir).unwrap();
    let serial = on(1, &model).0.unwrap_err().to_string();
    for threads in [2, 3] {
        assert_eq!(on(threads, &model).0.unwrap_err().to_string(), serial);
    }
}

#[test]
fn an_infinite_logit_is_certain_and_nan_or_all_minus_infinity_is_an_error() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let s = |temperature: f32, top_k: usize, top_p: f32| Sampling {
        temperature,
        top_k,
        top_p,
        seed: 0,
    };
    let logits = [3.0, f32::INFINITY, 5.0, -1.0];
    for sampling in [
        s(0.0, 0, 1.0),
        s(1.0, 0, 1.0),
        s(0.5, 2, 0.9),
        s(2.0, 0, 0.1),
    ] {
        for _ in 0..50 {
            assert_eq!(sampling.sample(&logits, &mut rng).unwrap(), 1);
        }
    }
    // Two certain tokens: greedy takes the first, sampling either, never a finite one.
    let two = [f32::INFINITY, 0.0, f32::INFINITY];
    assert_eq!(s(0.0, 0, 1.0).sample(&two, &mut rng).unwrap(), 0);
    let picks: std::collections::BTreeSet<u32> = (0..64)
        .map(|_| s(1.0, 0, 1.0).sample(&two, &mut rng).unwrap())
        .collect();
    assert_eq!(picks, [0, 2].into());
    // A temperature so small the scaled logits overflow still picks the largest.
    assert_eq!(
        s(1e-30, 0, 1.0).sample(&[0.0, 1.0, 0.5], &mut rng).unwrap(),
        1
    );
    assert!(s(1.0, 0, 1.0).sample(&[0.0, f32::NAN], &mut rng).is_err());
    assert!(s(1.0, 0, 1.0)
        .sample(&[f32::NEG_INFINITY; 3], &mut rng)
        .is_err());
}

#[test]
fn closed_pipe_ends_quietly_and_a_full_disk_is_one_error_line() {
    let dir = tiny_bert("pipe");
    let input = dir.join("lines.txt");
    std::fs::write(&input, "the cat sat on the mat\n".repeat(3000)).unwrap();
    // 3000 vectors are far more than a pipe buffer: the writes after the reader is gone fail.
    let mut child = cuattn()
        .args(["embed", "--device", "cpu", "--model"])
        .arg(&dir)
        .arg("--input")
        .arg(&input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    if std::path::Path::new("/dev/full").exists() {
        for args in [
            vec!["info"],
            vec![
                "embed",
                "--device",
                "cpu",
                "--model",
                dir.to_str().unwrap(),
                "hello",
            ],
        ] {
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap();
            let o = cuattn().args(&args).stdout(full).output().unwrap();
            assert_clean_error(&o, "No space left");
            assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        }
    }
}

#[test]
fn endless_or_invalid_input_is_an_error_and_a_huge_line_embeds_its_truncation() {
    let dir = tiny_bert("input");
    #[cfg(unix)]
    {
        let o = cuattn()
            .args([
                "embed",
                "--device",
                "cpu",
                "--input",
                "/dev/zero",
                "--model",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        assert_clean_error(&o, "longer than 64 MiB");
    }
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, b"fine\n\xff\xfe not utf-8\n").unwrap();
    let o = cuattn()
        .args(["embed", "--device", "cpu", "--model"])
        .arg(&dir)
        .arg("--input")
        .arg(&bad)
        .output()
        .unwrap();
    assert_clean_error(&o, "line 2: not valid UTF-8");
    // A 20 MB line gives the embedding of what truncation keeps (22 words + [CLS], [SEP]).
    let long = dir.join("long.txt");
    std::fs::write(&long, "hello world ".repeat(1_750_000)).unwrap();
    let embed = |args: &[&str]| -> String {
        let o = cuattn()
            .args(["embed", "--device", "cpu", "--json", "--model"])
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let from_file = embed(&["--input", long.to_str().unwrap()]);
    let short = "hello world ".repeat(11);
    assert_eq!(from_file, embed(&[short.trim_end()]));
}

#[test]
fn batch_size_beyond_memory_is_cut_and_results_do_not_depend_on_it() {
    let dir = tiny_bert("batch");
    let input = dir.join("lines.txt");
    let lines: Vec<String> = (0..300)
        .map(|i| "the cat sat on the mat ".repeat(1 + i % 5))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let run = |batch: &str| -> Vec<Vec<f64>> {
        let o = cuattn()
            .args(["embed", "--device", "cpu", "--batch-size", batch, "--model"])
            .arg(&dir)
            .arg("--input")
            .arg(&input)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
            .collect()
    };
    let (huge, small) = (run("100000"), run("3"));
    assert_eq!(huge.len(), 300);
    for (a, b) in huge.iter().zip(&small) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 2e-6, "{x} vs {y}");
        }
    }
    let o = cuattn()
        .args(["embed", "--device", "cpu", "--batch-size", "0", "--model"])
        .arg(&dir)
        .arg("x")
        .output()
        .unwrap();
    assert_clean_error(&o, "--batch-size");
}

#[test]
fn many_prompts_run_in_groups_with_the_same_greedy_results() {
    let dir = tiny_gpt2("prompts");
    let run = |prompts: &[String]| -> Vec<String> {
        let mut c = cuattn();
        c.args([
            "generate",
            "--device",
            "cpu",
            "--max-new-tokens",
            "2",
            "--model",
        ])
        .arg(&dir);
        for p in prompts {
            c.args(["--prompt", p]);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let prompts: Vec<String> = (0..130).map(|i| format!("prompt {i}")).collect();
    let all = run(&prompts);
    assert_eq!(all.len(), 130);
    // Greedy continuations do not depend on which group a prompt ran in.
    for i in [0, 63, 64, 129] {
        assert_eq!(run(&prompts[i..i + 1]), [all[i].clone()], "prompt {i}");
    }
}

#[test]
fn options_without_effect_are_refused_with_the_reason() {
    let bert = tiny_bert("flags");
    let gpt2 = tiny_gpt2("flags");
    let gen = |args: &[&str]| {
        cuattn()
            .args(["generate", "--device", "cpu", "--model"])
            .arg(&gpt2)
            .args(args)
            .output()
            .unwrap()
    };
    assert_clean_error(&gen(&["--prompt", "hi", "--top-k", "5"]), "--temperature");
    assert_clean_error(&gen(&["--prompt", "hi", "--top-p", "0.5"]), "--temperature");
    assert_clean_error(&gen(&["--prompt", "hi", "--dtype", "f16"]), "CPU");
    assert_clean_error(
        &gen(&["--prompt", "hi", "--max-new-tokens", "500"]),
        "at most 127 new tokens fit",
    );
    let o = cuattn()
        .args(["embed", "--device", "cpu", "--dtype", "f16", "--model"])
        .arg(&bert)
        .arg("hi")
        .output()
        .unwrap();
    assert_clean_error(&o, "CPU");
    // Checked before looking for a GPU: the same answer on any machine.
    let o = cuattn()
        .args(["bench", "attention", "--sweep"])
        .output()
        .unwrap();
    assert_clean_error(&o, "only `bench layernorm`");
}

#[test]
fn end_of_text_written_in_a_prompt_is_the_special_token() {
    let dir = tiny_gpt2("eot");
    let o = cuattn()
        .args([
            "generate",
            "--device",
            "cpu",
            "--json",
            "--max-new-tokens",
            "1",
        ])
        .args(["--prompt", "Hi<|endoftext|>"])
        .arg("--model")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_ids"], json!([17250, 50256]));
}

#[test]
fn exit_statuses_are_distinct_for_usage_runtime_and_no_gpu() {
    let usage = cuattn().args(["embed", "--frobnicate"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let runtime = cuattn()
        .args(["embed", "--device", "cpu", "--model", "/nonexistent", "x"])
        .output()
        .unwrap();
    assert_eq!(runtime.status.code(), Some(1));
    let check = cuattn().arg("check").output().unwrap();
    if !check.status.success() && stderr(&check).contains("needs a CUDA GPU") {
        assert_eq!(check.status.code(), Some(3), "{}", stderr(&check));
    }
    let help = cuattn().arg("--help").output().unwrap();
    let text = String::from_utf8(help.stdout).unwrap();
    for command in ["info", "check", "bench", "embed", "generate", "Exit status"] {
        assert!(text.contains(command), "{command}: {text}");
    }
}
