//! The committed Hugging Face fixtures (tests/fixtures/, written by scripts/make_fixtures.py),
//! shared by the runtime's CPU and GPU tests.

use cuattn::runtime::tokenizer::TokenBatch;
use std::path::{Path, PathBuf};

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

/// A copy of model folder `dir` (every file) whose `model.safetensors` has each value rounded
/// to bf16 and stored as f32: what a bf16-weight backend (`CpuBf16`) should compute, in f32.
/// `tag` names the copy in the temporary folder.
#[allow(dead_code)] // not every test binary that includes this module needs it
pub fn bf16_rounded_copy(dir: &Path, tag: &str) -> PathBuf {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rounded: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: fixture dtype {other:?}"),
            };
            let data = values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_f32().to_le_bytes())
                .collect();
            (name, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = rounded
        .iter()
        .map(|(n, s, b)| {
            let v = TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap();
            (n.clone(), v)
        })
        .collect();
    let out =
        std::env::temp_dir().join(format!("cuattn-bf16-rounded-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
        }
    }
    // Hugging Face's metadata, so transformers would load the copy too.
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &out.join("model.safetensors")).unwrap();
    out
}

/// Every tensor of a committed PyTorch safetensors fixture (f32), by name in file order.
#[allow(dead_code)] // the training tests' PyTorch comparisons only
pub fn torch_tensors(rel: &str) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(fixture(rel)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, data)
        })
        .collect()
}

/// Tensor `name` of a [`torch_tensors`] list.
#[allow(dead_code)] // the training tests' PyTorch comparisons only
pub fn torch(all: &[(String, Vec<f32>)], name: &str) -> Vec<f32> {
    all.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("fixture has no {name}"))
        .1
        .clone()
}

/// Max abs error, max |want| and the relative norm error of `got`; a non-finite value fails.
#[allow(dead_code)] // the training tests' PyTorch comparisons only
pub fn errors(got: &[f32], want: &[f32]) -> (f64, f64, f64) {
    assert_eq!(got.len(), want.len());
    let (mut max_err, mut max_w, mut d2, mut w2) = (0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        assert!(g.is_finite(), "non-finite value");
        max_err = max_err.max((g - w).abs());
        max_w = max_w.max(w.abs());
        d2 += (g - w).powi(2);
        w2 += w * w;
    }
    (max_err, max_w, (d2 / w2.max(1e-300)).sqrt())
}
