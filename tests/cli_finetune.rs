//! `cuattn finetune` and `cuattn classify` end to end on the CPU:
//! - the tiny classifier of tests/fixtures/finetune-tiny trained by the CLI against the same
//!   run in PyTorch (scripts/make_fixtures.py --only finetune): losses, rates and every weight;
//! - the folder it writes: config, tokenizer, train_log.csv, loss.png, and Hugging Face's
//!   logits for it (tests/fixtures/finetune-tiny/hf-logits.json, from scripts/hf_logits.py)
//!   against `cuattn classify`;
//! - a new head on a bare encoder (labels from the file, seeded dropout reproducible);
//! - the errors a user meets, each naming the problem, never a panic;
//! - the shipped sentiment data set's shape.

#[path = "fixture_files/mod.rs"]
#[allow(dead_code)]
mod fixture_files;

use fixture_files::{fixture, floats, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn cuattn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cuattn"))
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cuattn-ft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// Fails unless the command failed cleanly (exit 1, an `error:` line, no panic) with a message
/// containing every one of `needles`.
fn fails_with(o: Output, needles: &[&str]) {
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("error:") && !e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "expected `{n}` in: {e}");
    }
}

/// The fixture run's options, as expected.json records them.
fn fixture_run_args(out: &Path) -> Vec<String> {
    let e = json("tests/fixtures/finetune-tiny/expected.json");
    let r = &e["run"];
    let mut a: Vec<String> = ["finetune", "--device", "cpu", "--no-shuffle", "--json"]
        .map(String::from)
        .to_vec();
    a.push("--model".into());
    a.push(
        fixture("tests/fixtures/finetune-tiny/model")
            .display()
            .to_string(),
    );
    a.push("--train".into());
    a.push(
        fixture("tests/fixtures/finetune-tiny/train.tsv")
            .display()
            .to_string(),
    );
    a.push("--out".into());
    a.push(out.display().to_string());
    for key in [
        "batch_size",
        "grad_accum",
        "max_steps",
        "lr",
        "weight_decay",
        "warmup_steps",
        "max_grad_norm",
        "max_len",
    ] {
        a.push(format!("--{}", key.replace('_', "-")));
        a.push(r[key].to_string());
    }
    a
}

/// One run of the fixture options, shared by the tests that read its folder.
fn fixture_run() -> &'static (PathBuf, serde_json::Value) {
    static RUN: OnceLock<(PathBuf, serde_json::Value)> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = temp("fixture-run");
        let o = ok(cuattn().args(fixture_run_args(&out)).output().unwrap());
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim())
                .expect("exactly one JSON object");
        (out, v)
    })
}

fn read_safetensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, vals)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn four_steps_match_pytorch_losses_rates_and_weights() {
    let (out, v) = fixture_run();
    let e = json("tests/fixtures/finetune-tiny/expected.json");
    let steps = e["steps"].as_array().unwrap();
    assert_eq!(v["steps"], steps.len());
    assert!(v["eval"].is_null());
    assert_eq!(v["out"], out.display().to_string());
    // Losses: the same f32 model on the same batches; they differ by summation order only.
    for (ours, theirs) in floats(&v["losses"]).iter().zip(steps) {
        let t = theirs["loss"].as_f64().unwrap();
        assert!(
            (ours - t).abs() <= 1e-5 * t.abs().max(1.0),
            "loss {ours} vs {t}"
        );
    }
    // Rates, from train_log.csv (warm-up step 1 at rate 0, then linear decay).
    let log = std::fs::read_to_string(out.join("train_log.csv")).unwrap();
    let rows: Vec<&str> = log.lines().skip(1).collect();
    assert_eq!(rows.len(), steps.len());
    for (row, theirs) in rows.iter().zip(steps) {
        let lr: f64 = row.split(',').nth(3).unwrap().parse().unwrap();
        let t = theirs["lr"].as_f64().unwrap();
        assert!((lr - t).abs() <= 1e-12, "lr {lr} vs {t}");
    }
    // Weights: AdamW moves a weight by about lr per step whatever the gradient's size, so
    // gradients that agree to f32 rounding give updates that agree to a small fraction of lr;
    // 1% of lr is far below one step (a missing clip, a wrong schedule, decay on a LayerNorm
    // weight or a wrong accumulation scale each move weights by a sizeable part of lr; the
    // worst difference measured is about 1e-4·lr).
    // Except the key biases: their gradient is zero in exact arithmetic (a key bias adds the
    // same q·b to every score of a row, which softmax ignores), so both sides hold rounding
    // noise there, which Adam normalises into steps of up to about lr in either direction.
    // They are only held to moving no more than noise can (4·lr per step on each side).
    let lr = e["run"]["lr"].as_f64().unwrap();
    let ours = read_safetensors(&out.join("model.safetensors"));
    let theirs = read_safetensors(&fixture(
        "tests/fixtures/finetune-tiny/expected.safetensors",
    ));
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs), "the same HF tensor names");
    let initial = read_safetensors(&fixture(
        "tests/fixtures/finetune-tiny/model/model.safetensors",
    ));
    let mut worst = (0.0f64, String::new());
    let mut moved = 0usize;
    let steps_lr: f64 = steps.iter().map(|s| s["lr"].as_f64().unwrap()).sum();
    for (((name, a), (_, b)), (_, w0)) in ours.iter().zip(&theirs).zip(&initial) {
        assert_eq!(a.len(), b.len(), "{name}");
        if name.ends_with("attention.self.key.bias") {
            for (x, z) in a.iter().zip(w0) {
                assert!(
                    ((x - z).abs() as f64) <= 4.0 * steps_lr,
                    "{name}: {x} from {z}"
                );
            }
            continue;
        }
        for ((x, y), z) in a.iter().zip(b).zip(w0) {
            let d = (*x as f64 - *y as f64).abs();
            if d > worst.0 {
                worst = (d, name.clone());
            }
            moved += usize::from((*y - *z).abs() as f64 > 0.5 * lr);
        }
    }
    assert!(
        worst.0 <= 0.01 * lr,
        "worst weight difference {} in {} (bound {})",
        worst.0,
        worst.1,
        0.01 * lr
    );
    assert!(moved > 1000, "the run must move weights: {moved}");
}

#[test]
fn output_folder_is_a_complete_hf_classifier() {
    let (out, _) = fixture_run();
    let c = json(&out.join("config.json").display().to_string());
    assert_eq!(c["architectures"][0], "BertForSequenceClassification");
    assert_eq!(c["id2label"]["0"], "negative");
    assert_eq!(c["label2id"]["positive"], 1);
    let src = json("tests/fixtures/finetune-tiny/model/config.json");
    for key in [
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "model_type",
        "pad_token_id",
    ] {
        assert_eq!(c[key], src[key], "{key} carried over");
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixture(&format!("tests/fixtures/finetune-tiny/model/{f}"))).unwrap(),
            "{f} copied"
        );
    }
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let log = std::fs::read_to_string(out.join("train_log.csv")).unwrap();
    assert!(log.starts_with("step,epoch,loss,lr,samples_per_s,eval_loss,eval_accuracy\n"));
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt"),
        "transformers refuses safetensors without format metadata"
    );
}

#[test]
fn classify_gives_the_logits_hugging_face_computes_from_our_folder() {
    let (out, _) = fixture_run();
    let hf = json("tests/fixtures/finetune-tiny/hf-logits.json");
    let texts: Vec<String> = hf["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let o = ok(cuattn()
        .args(["classify", "--device", "cpu", "--json", "--model"])
        .arg(out)
        .args(&texts)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["id2label"], hf["id2label"]);
    let labels = v["labels"].as_array().unwrap();
    assert_eq!(labels.len(), texts.len());
    for (i, row) in hf["logits"].as_array().unwrap().iter().enumerate() {
        let theirs = floats(row);
        let ours = floats(&v["logits"][i]);
        // f32 forward of a 2-layer model: a few ulps of the activations' size.
        for (a, b) in ours.iter().zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "text {i}: {ours:?} vs {theirs:?}"
            );
        }
        let probs = floats(&v["probabilities"][i]);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        let best = if theirs[1] > theirs[0] { 1 } else { 0 };
        assert_eq!(labels[i], hf["id2label"][best.to_string()]);
    }
    // The plain output: one line per text with its label and probability, in input order.
    let o = ok(cuattn()
        .args(["classify", "--device", "cpu", "--model"])
        .arg(out)
        .args(&texts)
        .output()
        .unwrap());
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), texts.len());
    for (line, t) in lines.iter().zip(&texts) {
        assert!(line.ends_with(t.as_str()), "{line}");
    }
}

/// A bare encoder (tests/fixtures/tiny-bert, dropout 0.1) with the fixture's tokenizer.
fn bare_encoder(name: &str) -> PathBuf {
    let dir = temp(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixture(&format!("tests/fixtures/tiny-bert/{f}")),
            dir.join(f),
        )
        .unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt"] {
        std::fs::copy(
            fixture(&format!("tests/fixtures/finetune-tiny/model/{f}")),
            dir.join(f),
        )
        .unwrap();
    }
    dir
}

const JSONL: &str = "{\"text\": \"the film was great\", \"label\": \"happy\"}\n\
                     {\"text\": \"the food was cold\", \"label\": \"sad\"}\n\
                     {\"text\": \"we hated it\", \"label\": \"angry\"}\n\
                     {\"text\": \"so kind and fast\", \"label\": \"happy\"}\n\
                     {\"text\": \"the room was dirty\", \"label\": \"sad\"}\n";

#[test]
fn new_head_takes_sorted_labels_from_the_file_and_seeded_runs_repeat() {
    let model = bare_encoder("bare");
    let data = temp("bare-data");
    std::fs::create_dir_all(&data).unwrap();
    let train = data.join("train.jsonl");
    std::fs::write(&train, JSONL).unwrap();
    let run = |out: &Path, seed: &str| {
        ok(cuattn()
            .args(["finetune", "--device", "cpu", "--json", "--max-steps", "3"])
            .args([
                "--batch-size",
                "2",
                "--lr",
                "1e-3",
                "--max-len",
                "16",
                "--seed",
                seed,
            ])
            .arg("--model")
            .arg(&model)
            .arg("--train")
            .arg(&train)
            .arg("--eval")
            .arg(&train)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap())
    };
    let (a, b, c) = (temp("seed1a"), temp("seed1b"), temp("seed2"));
    let va: serde_json::Value = serde_json::from_slice(&run(&a, "1").stdout).unwrap();
    run(&b, "1");
    run(&c, "2");
    let cfg = json(&a.join("config.json").display().to_string());
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "angry", "1": "happy", "2": "sad"})
    );
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    // Shuffling, dropout and the new head all follow the seed.
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    assert_eq!(wa, std::fs::read(b.join("model.safetensors")).unwrap());
    assert_ne!(wa, std::fs::read(c.join("model.safetensors")).unwrap());
    let names: Vec<String> = read_safetensors(&a.join("model.safetensors"))
        .into_iter()
        .map(|t| t.0)
        .collect();
    assert!(names.contains(&"classifier.weight".to_string()));
    assert!(names.contains(&"bert.pooler.dense.weight".to_string()));
    assert!(names
        .iter()
        .all(|n| n.starts_with("bert.") || n.starts_with("classifier.")));
    // The evaluation at the end: accuracy is a fraction of 5 examples, the loss finite.
    let acc = va["eval"]["accuracy"].as_f64().unwrap();
    assert!((acc * 5.0 - (acc * 5.0).round()).abs() < 1e-9, "{acc}");
    assert!(va["eval"]["loss"].as_f64().unwrap().is_finite());
    assert_eq!(va["losses"].as_array().unwrap().len(), 3);
}

#[test]
fn bad_options_and_folders_are_clear_errors() {
    let model = fixture("tests/fixtures/finetune-tiny/model");
    let train = fixture("tests/fixtures/finetune-tiny/train.tsv");
    let base = |out: &Path| {
        let mut c = cuattn();
        c.args(["finetune", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--train")
            .arg(&train)
            .arg("--out")
            .arg(out);
        c
    };
    let out = temp("never-written");
    for (flag, value, needle) in [
        ("--batch-size", "0", "batch_size"),
        ("--lr", "0", "lr"),
        ("--lr", "-1e-3", "lr"),
        ("--lr", "NaN", "lr"),
        ("--grad-accum", "0", "grad_accum"),
        ("--max-steps", "0", "max_steps"),
        ("--max-grad-norm", "-1", "max_grad_norm"),
    ] {
        // `--flag=value`: a bare `-1` would read as an option.
        let arg = format!("{flag}={value}");
        fails_with(base(&out).arg(arg).output().unwrap(), &[needle]);
        assert!(
            !out.exists(),
            "{flag} {value}: nothing written on bad input"
        );
    }
    fails_with(
        base(&out).args(["--dtype", "bf16"]).output().unwrap(),
        &["f32"],
    );
    // An existing folder is refused unless --overwrite.
    let existing = temp("existing");
    std::fs::create_dir_all(&existing).unwrap();
    fails_with(
        base(&existing).output().unwrap(),
        &["already exists", "--overwrite"],
    );
    // Writing over the model being read is refused even with --overwrite.
    fails_with(
        base(&model).arg("--overwrite").output().unwrap(),
        &["model folder itself"],
    );
    // A model folder without tokenizer.json.
    fails_with(
        cuattn()
            .args(["finetune", "--device", "cpu", "--model"])
            .arg(fixture("tests/fixtures/tiny-bert"))
            .arg("--train")
            .arg(&train)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap(),
        &["tokenizer.json"],
    );
}

#[test]
fn bad_data_files_name_the_file_and_line() {
    let model = fixture("tests/fixtures/finetune-tiny/model");
    let dir = temp("bad-data");
    std::fs::create_dir_all(&dir).unwrap();
    let out = temp("bad-data-out");
    let run = |name: &str, body: &str, eval: bool| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let mut c = cuattn();
        c.args(["finetune", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out);
        if eval {
            c.arg("--train")
                .arg(fixture("tests/fixtures/finetune-tiny/train.tsv"))
                .arg("--eval")
                .arg(&p);
        } else {
            c.arg("--train").arg(&p);
        }
        c.output().unwrap()
    };
    // The fixture model's head knows negative/positive only.
    fails_with(
        run(
            "unknown.tsv",
            "text\tlabel\ngood\tpositive\nmeh\tneutral\n",
            true,
        ),
        &["unknown.tsv", "line 3", "`neutral`", "negative, positive"],
    );
    fails_with(
        run("nolabel.csv", "text,target\ngood,1\n", false),
        &["nolabel.csv", "line 1", "`label`"],
    );
    fails_with(run("empty.tsv", "", false), &["empty.tsv", "empty"]);
    fails_with(
        run("header-only.jsonl", "\n", false),
        &["header-only.jsonl", "empty"],
    );
    fails_with(
        run(
            "short.tsv",
            "text\tlabel\ngood\tpositive\njust text\n",
            false,
        ),
        &["short.tsv", "line 3", "malformed"],
    );
    fails_with(
        run(
            "broken.jsonl",
            "{\"text\": \"a\", \"label\": 0}\n{\"text\": \n",
            false,
        ),
        &["broken.jsonl", "line 2", "malformed"],
    );
    fails_with(
        run("data.txt", "text\tlabel\na\tpositive\n", false),
        &[".tsv, .csv or .jsonl"],
    );
    assert!(!out.exists());
}

#[test]
fn classify_refuses_a_model_without_a_head() {
    let model = bare_encoder("classify-bare");
    fails_with(
        cuattn()
            .args(["classify", "--device", "cpu", "--model"])
            .arg(&model)
            .arg("hello")
            .output()
            .unwrap(),
        &["classifier.weight", "cuattn finetune"],
    );
    fails_with(
        cuattn()
            .args(["classify", "--device", "cpu", "--model"])
            .arg(fixture("tests/fixtures/finetune-tiny/model"))
            .output()
            .unwrap(),
        &["no texts to classify"],
    );
}

#[test]
fn sentiment_data_set_is_balanced_disjoint_and_large_enough() {
    let read = |f: &str| -> Vec<(String, String)> {
        let text = std::fs::read_to_string(fixture(&format!("data/sentiment/{f}"))).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("text\tlabel"));
        lines
            .map(|l| {
                let (t, y) = l.split_once('\t').expect("two columns");
                assert!(!y.contains('\t') && !t.is_empty(), "{l}");
                (t.to_string(), y.to_string())
            })
            .collect()
    };
    let (train, test) = (read("train.tsv"), read("test.tsv"));
    assert!(train.len() + test.len() >= 600);
    for set in [&train, &test] {
        let pos = set.iter().filter(|r| r.1 == "positive").count();
        let neg = set.iter().filter(|r| r.1 == "negative").count();
        assert_eq!(pos + neg, set.len(), "labels are negative/positive only");
        assert_eq!(pos, neg, "balanced");
    }
    let mut all: Vec<&String> = train.iter().chain(&test).map(|r| &r.0).collect();
    all.sort();
    let n = all.len();
    all.dedup();
    assert_eq!(
        all.len(),
        n,
        "no sentence twice (in particular none in both files)"
    );
}
