//! `cuattn generate` with the tiny BART fixtures (beam search under generation_config.json,
//! flags overriding it), `cuattn noise` and `cuattn fill-mask` end to end.

#[allow(dead_code)] // the runtime tests use the rest
mod fixture_files;

use fixture_files::{fixture, json, uints};
use std::process::{Command, Output};

fn cuattn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cuattn"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout_json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(out.matches('\n').count(), 1, "one line: {out}");
    serde_json::from_str(out.trim_end()).expect("one JSON object")
}

#[test]
fn bart_generate_json_is_hugging_faces_beam_output_with_stop_reasons() {
    let f = json("tests/fixtures/tiny-bart-outputs.json");
    let case = &f["variants"]["tiny-bart"]["cases"][0];
    let model = fixture("tests/fixtures/tiny-bart");
    let text = case["text"].as_str().unwrap();
    let base = [
        "generate",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
    ];
    // generation_config.json: 4 beams, max_length 16, forced BOS/EOS, no_repeat_ngram 3.
    let v = stdout_json(&cuattn(
        &[
            &base[..],
            &["--prompt", text, "--json", "--num-return-sequences", "2"],
        ]
        .concat(),
    ));
    assert_eq!(uints(&v["prompt_ids"][0]), uints(&case["ids"]));
    let beams: Vec<Vec<u32>> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(uints)
        .collect();
    let expected: Vec<Vec<u32>> = case["beams"]
        .as_array()
        .unwrap()
        .iter()
        .map(uints)
        .collect();
    assert_eq!(beams, expected);
    assert_eq!(v["stop_reason"], serde_json::json!(["eos", "eos"]));
    assert_eq!(v["scores"].as_array().unwrap().len(), 2);
    // Flags override the folder: greedy, 12 new tokens.
    let v = stdout_json(&cuattn(
        &[
            &base[..],
            &[
                "--prompt",
                text,
                "--json",
                "--num-beams",
                "1",
                "--max-new-tokens",
                "12",
            ],
        ]
        .concat(),
    ));
    assert_eq!(uints(&v["generated_ids"]), uints(&case["greedy"]));
    // Text leaves out <s> and </s>.
    assert!(!v["text"].as_str().unwrap().contains("</s>"));
    // Beam flags are checked.
    let o = cuattn(
        &[
            &base[..],
            &[
                "--prompt",
                text,
                "--num-beams",
                "2",
                "--num-return-sequences",
                "3",
            ],
        ]
        .concat(),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("num_return_sequences"));
}

#[test]
fn noise_shows_each_transform_reproducibly() {
    let text = "A man is eating food. A man is riding a horse. The girl is carrying a baby.";
    for t in ["mask", "delete", "infill", "permute", "rotate"] {
        let args = ["noise", "--transform", t, "--seed", "3", "--json", text];
        let v = stdout_json(&cuattn(&args));
        assert_eq!(
            v,
            stdout_json(&cuattn(&args)),
            "{t}: same seed, same output"
        );
        let input = v["input"].as_array().unwrap().len();
        let output = v["output"].as_array().unwrap().len();
        match t {
            "mask" | "permute" | "rotate" => assert_eq!(input, output, "{t}"),
            "delete" => assert!(output <= input),
            _ => assert!(v["spans"].as_array().is_some()),
        }
    }
    let o = cuattn(&["noise", "--transform", "shuffle", text]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("transform"));
}

#[test]
fn fill_mask_prints_the_pipelines_proposals() {
    let f = json("tests/fixtures/tiny-bert-pretraining-outputs.json");
    let case = &f["fill_mask"][0];
    let model = fixture("tests/fixtures/tiny-bert-pretraining");
    let v = stdout_json(&cuattn(&[
        "fill-mask",
        "--model",
        model.to_str().unwrap(),
        "--top-k",
        "3",
        "--json",
        case["text"].as_str().unwrap(),
    ]));
    let got = v.as_array().unwrap();
    assert_eq!(got.len(), 3);
    for (p, r) in got.iter().zip(case["results"][0].as_array().unwrap()) {
        assert_eq!(p["token"], r["token"]);
        assert_eq!(p["sequence"], r["sequence"]);
    }
}
