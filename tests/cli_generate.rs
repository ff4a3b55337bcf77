//! `cuattn generate` end to end with the tiny Hugging Face GPT-2 fixture (GPT-2's vocabulary,
//! no tokenizer files: the built-in GPT-2 BPE): `--json` is exactly one object with Hugging
//! Face's greedy ids and text and the stop reason, plain output streams the text, batches give arrays, `--recompute`
//! and `--warmup` change nothing, bad input exits non-zero with a message (never a panic), and
//! `--device cuda` either matches Hugging Face in f32 or, without a GPU, says so (with
//! `CUATTN_REQUIRE_GPU=1` it must run).

#[allow(dead_code)] // the runtime tests use the rest
mod fixture_files;

use fixture_files::{fixture, json, uints};
use std::path::PathBuf;
use std::process::{Command, Output};

/// The CLI cargo built, or, in a GPU bundle run from the repository root on another machine,
/// the bundle's copy.
fn cuattn() -> Command {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_cuattn"));
    Command::new(if built.exists() {
        built
    } else {
        PathBuf::from("gpu-bundle/bin/cuattn")
    })
}

fn run(args: &[&str]) -> Output {
    let model = fixture("tests/fixtures/tiny-gpt2");
    cuattn()
        .args(["generate", "--model", model.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The first fixture case: prompt, its ids, Hugging Face's greedy ids and text.
fn case(i: usize) -> (String, Vec<u32>, Vec<u32>, String) {
    let f = json("tests/fixtures/tiny-gpt2-outputs.json");
    let c = &f["cases"][i];
    (
        c["prompt"].as_str().unwrap().to_string(),
        uints(&c["ids"]),
        uints(&c["greedy"]),
        c["greedy_text"].as_str().unwrap().to_string(),
    )
}

fn check_json(o: &Output, ids: &[u32], greedy: &[u32], text: &str) {
    assert!(o.status.success(), "{}", stderr(o));
    let out = stdout(o);
    let v: serde_json::Value = serde_json::from_str(out.trim_end()).expect("one JSON object");
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(uints(&v["prompt_ids"]), ids);
    // GPT-2's tiny fixture never picks end-of-text in these continuations.
    assert_eq!(v["stop_reason"], "max_new_tokens");
    assert_eq!(uints(&v["generated_ids"]), greedy);
    assert_eq!(v["text"].as_str().unwrap(), text);
    assert_eq!(out.matches('\n').count(), 1, "one line: {out}");
}

#[test]
fn json_is_one_object_with_hugging_faces_greedy_continuation() {
    let (prompt, ids, greedy, text) = case(0);
    let n = greedy.len().to_string();
    let base = [
        "--device",
        "cpu",
        "--prompt",
        &prompt,
        "--max-new-tokens",
        &n,
    ];
    check_json(
        &run(&[&base[..], &["--json"]].concat()),
        &ids,
        &greedy,
        &text,
    );
    check_json(
        &run(&[
            &base[..],
            &["--json", "--recompute", "--warmup", "--timing"],
        ]
        .concat()),
        &ids,
        &greedy,
        &text,
    );
}

#[test]
fn plain_output_is_the_continuation_text() {
    let (prompt, _, greedy, text) = case(0);
    let n = greedy.len().to_string();
    let o = run(&[
        "--device",
        "cpu",
        "--prompt",
        &prompt,
        "--max-new-tokens",
        &n,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{text}\n"));
}

#[test]
fn several_prompts_give_arrays_in_order() {
    let (p0, ids0, g0, t0) = case(0);
    let (p1, ids1, g1, t1) = case(1);
    let n = g0.len().min(g1.len()).to_string();
    let o = run(&[
        "--device",
        "cpu",
        "--json",
        "--max-new-tokens",
        &n,
        "--prompt",
        &p0,
        "--prompt",
        &p1,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim_end()).unwrap();
    let arr = |k: &str, i: usize| uints(&v[k][i]);
    assert_eq!((arr("prompt_ids", 0), arr("prompt_ids", 1)), (ids0, ids1));
    assert_eq!((arr("generated_ids", 0), arr("generated_ids", 1)), (g0, g1));
    assert_eq!(v["text"][0].as_str().unwrap(), t0);
    assert_eq!(v["text"][1].as_str().unwrap(), t1);
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let long = "word ".repeat(300);
    for (args, says) in [
        (vec!["--prompt", ""], "empty"),
        (vec!["--prompt", "Hi", "--top-p", "0"], "top_p"),
        (vec!["--prompt", "Hi", "--top-p", "1.5"], "top_p"),
        (vec!["--prompt", "Hi", "--temperature=-1"], "temperature"),
        (vec!["--prompt", &long], "context"),
        // The CPU has no decoding graph to turn off.
        (vec!["--prompt", "Hi", "--no-cuda-graph"], "--no-cuda-graph"),
    ] {
        let o = run(&[&["--device", "cpu"][..], &args[..]].concat());
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let o = cuattn()
        .args(["generate", "--model", "/nonexistent/gpt2", "--prompt", "Hi"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/gpt2"), "{}", stderr(&o));
}

#[test]
fn cuda_device_matches_hugging_face_in_f32_or_says_there_is_no_gpu() {
    let (prompt, ids, greedy, text) = case(0);
    let n = greedy.len().to_string();
    // The decoding steps from a CUDA graph (the default), then op by op.
    for extra in [None, Some("--no-cuda-graph")] {
        cuda_case(&prompt, &n, extra, (&ids, &greedy, &text));
    }
}

fn cuda_case(
    prompt: &str,
    n: &str,
    extra: Option<&str>,
    (ids, greedy, text): (&[u32], &[u32], &str),
) {
    let mut args = vec![
        "--device",
        "cuda",
        "--dtype",
        "f32",
        "--json",
        "--prompt",
        prompt,
        "--max-new-tokens",
        n,
    ];
    args.extend(extra);
    let o = run(&args);
    let required = std::env::var("CUATTN_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if o.status.success() || required {
        // f32 on the GPU: the logits stay within 1e-4 of Hugging Face's, far inside the
        // smallest greedy margin (8.7e-3), so the tokens are the same.
        check_json(&o, ids, greedy, text);
    } else {
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.starts_with("error: "), "{err}");
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        use std::io::Write;
        let line =
            format!("SKIPPED (no CUDA device): cuda_device_matches_hugging_face_in_f32: {err}");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}
