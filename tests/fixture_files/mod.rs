//! The committed Hugging Face fixtures (tests/fixtures/, written by scripts/make_fixtures.py),
//! shared by the runtime's CPU and GPU tests.

use cuattn::runtime::tokenizer::TokenBatch;
use std::path::PathBuf;

/// A path relative to the repository root: next to the test's source or, in a GPU bundle run
/// from the repository root on another machine, in the working directory.
pub fn fixture(rel: &str) -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    if here.exists() {
        here
    } else {
        PathBuf::from(rel)
    }
}

/// A JSON file under the repository root.
pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn uints(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The tiny BERT's padded input batch and Hugging Face's outputs for it.
pub fn tiny_bert_batch() -> (TokenBatch, serde_json::Value) {
    let f = json("tests/fixtures/tiny-bert-outputs.json");
    let batch = TokenBatch {
        ids: uints(&f["ids"]),
        type_ids: uints(&f["type_ids"]),
        lens: f["lens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect(),
        len: f["len"].as_u64().unwrap() as usize,
        truncated: vec![],
    };
    (batch, f)
}
