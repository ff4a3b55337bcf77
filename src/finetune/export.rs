//! Writing a fine-tuned model as a Hugging Face folder that
//! `BertForSequenceClassification.from_pretrained` (and `AutoTokenizer.from_pretrained`) load
//! unchanged:
//! - `config.json`: the source config with `architectures`, `id2label`, `label2id` and
//!   `problem_type` set, everything else carried over;
//! - `model.safetensors`: every parameter in f32 under its Hugging Face name, with the
//!   `{"format": "pt"}` metadata transformers checks for;
//! - the tokenizer files of the source folder (sentence-transformers' own files such as
//!   `modules.json` are left out: the result is a plain classification model).

use super::data::LabelSet;
use crate::error::{Error, Result};
use crate::runtime::checkpoint::write_json;
use std::path::Path;

/// Tokenizer files copied when the source folder has them (`tokenizer.json` is required).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
];

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks `--out` before any work: it must not exist (unless `overwrite`) and must not be the
/// model folder being read (its weights are memory-mapped while training runs).
pub fn check_out_dir(out: &Path, model: &Path, overwrite: bool) -> Result<()> {
    if out.exists() {
        let same = match (out.canonicalize(), model.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            return Err(Error::invalid(
                "out",
                format!(
                    "{} is the model folder itself; write the fine-tuned model elsewhere",
                    out.display()
                ),
            ));
        }
        if !overwrite {
            return Err(Error::invalid(
                "out",
                format!(
                    "{} already exists (pass --overwrite to replace its files)",
                    out.display()
                ),
            ));
        }
        if !out.is_dir() {
            return Err(Error::invalid(
                "out",
                format!("{} exists and is not a folder", out.display()),
            ));
        }
    }
    Ok(())
}

// The writer lives with the reader (`runtime::checkpoint`) so that training code can save
// without depending on `finetune`.
pub use crate::runtime::checkpoint::{write_safetensors, NamedTensor};

/// The classification config: `source` (the model folder's config.json) with the head's
/// labels and architecture.
pub fn classification_config(source: &serde_json::Value, labels: &LabelSet) -> serde_json::Value {
    let mut config = source.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "architectures".into(),
            serde_json::json!(["BertForSequenceClassification"]),
        );
        obj.insert("id2label".into(), labels.id2label_json());
        obj.insert("label2id".into(), labels.label2id_json());
        obj.insert("problem_type".into(), "single_label_classification".into());
        // A stale count would contradict id2label.
        obj.remove("num_labels");
        obj.remove("_num_labels");
    }
    config
}

/// Writes `config.json` and copies the tokenizer files from `model_dir` into `out`.
pub fn write_config_and_tokenizer(
    out: &Path,
    model_dir: &Path,
    config: &serde_json::Value,
) -> Result<()> {
    write_json(&out.join("config.json"), config)?;
    for name in TOKENIZER_FILES {
        let src = model_dir.join(name);
        if src.exists() {
            let dst = out.join(name);
            std::fs::copy(&src, &dst).map_err(|e| io_err(&dst, e))?;
        }
    }
    Ok(())
}

/// Creates `out` (and its parents) if needed.
pub fn create_out_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| io_err(out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cuattn-export-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn safetensors_round_trip_with_pt_metadata() {
        let dir = temp("st");
        create_out_dir(&dir).unwrap();
        let p = dir.join("model.safetensors");
        let w = [1.0f32, -2.5, 3.25, 0.0, 5.0, 6.0];
        let b = [0.5f32, -0.5];
        write_safetensors(
            &p,
            &[
                NamedTensor {
                    name: "classifier.weight".into(),
                    shape: vec![2, 3],
                    values: &w,
                },
                NamedTensor {
                    name: "classifier.bias".into(),
                    shape: vec![2],
                    values: &b,
                },
            ],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata().as_ref().and_then(|m| m.get("format")),
            Some(&"pt".to_string())
        );
        let mut ck = crate::runtime::checkpoint::Checkpoint::open(&p).unwrap();
        assert_eq!(ck.take("classifier.weight", &[2, 3]).unwrap().values, w);
        assert_eq!(ck.take("classifier.bias", &[2]).unwrap().values, b);
        ck.finish().unwrap();
        let e = write_safetensors(
            &p,
            &[NamedTensor {
                name: "x".into(),
                shape: vec![4],
                values: &b,
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("`x`"), "{e}");
    }

    #[test]
    fn config_gets_labels_and_architecture_and_keeps_the_rest() {
        let src = serde_json::json!({
            "architectures": ["BertModel"], "hidden_size": 8, "num_labels": 5,
            "hidden_dropout_prob": 0.1
        });
        let labels = LabelSet {
            names: vec!["negative".into(), "positive".into()],
        };
        let c = classification_config(&src, &labels);
        assert_eq!(c["architectures"][0], "BertForSequenceClassification");
        assert_eq!(c["id2label"]["1"], "positive");
        assert_eq!(c["label2id"]["negative"], 0);
        assert_eq!(c["hidden_size"], 8);
        assert_eq!(c["hidden_dropout_prob"], 0.1);
        assert!(c.get("num_labels").is_none());
    }

    #[test]
    fn out_dir_must_be_new_or_overwritten_and_never_the_model() {
        let model = temp("model");
        create_out_dir(&model).unwrap();
        let e = check_out_dir(&model, &model, true).unwrap_err().to_string();
        assert!(e.contains("model folder itself"), "{e}");
        let out = temp("out");
        check_out_dir(&out, &model, false).unwrap();
        create_out_dir(&out).unwrap();
        let e = check_out_dir(&out, &model, false).unwrap_err().to_string();
        assert!(
            e.contains("already exists") && e.contains("--overwrite"),
            "{e}"
        );
        check_out_dir(&out, &model, true).unwrap();
    }
}
