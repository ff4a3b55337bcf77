//! `cuattn embed` end to end on the CPU with the real MiniLM (skipped, visibly, when
//! models/all-MiniLM-L6-v2 is absent): JSON output shape and order, --input files, and the
//! errors a user meets (no sentences, no model folder).

use std::path::PathBuf;
use std::process::Command;

fn minilm_or_skip(test: &str) -> Option<PathBuf> {
    use std::io::Write;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    let line =
        format!("SKIPPED (models/all-MiniLM-L6-v2 absent; run scripts/fetch-minilm.sh): {test}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    None
}

fn cuattn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cuattn"))
}

#[test]
fn json_output_is_one_object_in_input_order() {
    let Some(model) = minilm_or_skip("json_output_is_one_object_in_input_order") else {
        return;
    };
    let file = std::env::temp_dir().join(format!("cuattn-cli-{}.txt", std::process::id()));
    std::fs::write(
        &file,
        "A man is riding a horse.\nA monkey is playing drums.\n",
    )
    .unwrap();
    let out = cuattn()
        .args([
            "embed",
            "--device",
            "cpu",
            "--json",
            "--batch-size",
            "2",
            "--model",
        ])
        .arg(&model)
        .arg("--input")
        .arg(&file)
        .args(["A man is eating food.", "A man is eating a piece of bread."])
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("exactly one JSON object");
    assert_eq!(v["dim"], 384);
    assert_eq!(v["model"], model.display().to_string());
    let e = v["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 4);
    let vec = |i: usize| -> Vec<f32> {
        e[i].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let cos = |a: usize, b: usize| cuattn::runtime::pooling::cosine(&vec(a), &vec(b));
    // TEXT arguments first, then the file's lines: the two eating sentences are the close pair.
    assert!(
        cos(0, 1) > 0.6 && cos(0, 1) > cos(0, 2) && cos(0, 1) > cos(0, 3),
        "{} {} {}",
        cos(0, 1),
        cos(0, 2),
        cos(0, 3)
    );
    assert_eq!(vec(0).len(), 384);
}

#[test]
fn no_sentences_or_no_model_is_a_clear_error() {
    let Some(model) = minilm_or_skip("no_sentences_or_no_model_is_a_clear_error") else {
        return;
    };
    let out = cuattn()
        .args(["embed", "--device", "cpu", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no sentences to embed"), "{err}");

    let out = cuattn()
        .args([
            "embed",
            "--device",
            "cpu",
            "--model",
            "/nonexistent/model",
            "hello",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json") && err.contains("not found"),
        "{err}"
    );
}
