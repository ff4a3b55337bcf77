//! BERT's pretraining heads against Hugging Face (tests/fixtures/tiny-bert-pretraining*):
//! masked-LM and next-sentence logits and losses on a padded pair batch, and the fill-mask
//! pipeline's proposals.

use cuattn::runtime::bert_pretraining::{fill_mask, BertPretraining};
use cuattn::runtime::tokenizer::TokenBatch;
use cuattn::runtime::Cpu;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn outputs() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-bert-pretraining-outputs.json")).unwrap(),
    )
    .unwrap()
}

fn flat_u32(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
        })
        .collect()
}

fn model() -> BertPretraining<Cpu> {
    BertPretraining::from_folder(&Cpu, &fixture("tiny-bert-pretraining")).unwrap()
}

#[test]
fn mlm_and_nsp_logits_and_losses_match_hugging_face() {
    let m = model();
    assert!(m.has_nsp_head());
    let b = &outputs()["batch"];
    let lens: Vec<usize> = b["lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let ids = flat_u32(&b["ids"]);
    let len = ids.len() / lens.len();
    let batch = TokenBatch {
        ids: ids.clone(),
        type_ids: flat_u32(&b["type_ids"]),
        lens: lens.clone(),
        len,
        truncated: vec![0; lens.len()],
    };
    let labels: Vec<i64> = b["mlm_labels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect();
    let nsp: Vec<i64> = b["nsp_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    // Logits at the real (unpadded) positions.
    let out = m.bert.forward(&Cpu, &batch).unwrap();
    let rows: Vec<u32> = (0..lens.len())
        .flat_map(|s| (0..lens[s]).map(move |t| (s * len + t) as u32))
        .collect();
    let logits = m.mlm_logits(&Cpu, &out.hidden, &rows).unwrap();
    let reference: Vec<f64> = b["prediction_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let vocab = m.bert.config.vocab_size;
    let mut worst = 0f64;
    for (k, &r) in rows.iter().enumerate() {
        for j in 0..vocab {
            let d = (logits.data()[k * vocab + j] as f64 - reference[r as usize * vocab + j]).abs();
            worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
        }
    }
    assert!(worst <= 1e-4, "prediction logits off by {worst:e}");
    let pooled = out.pooled.as_ref().unwrap();
    let nsp_logits = m.nsp_logits(&Cpu, pooled).unwrap();
    for (a, b) in nsp_logits
        .data()
        .iter()
        .zip(b["nsp_logits"].as_array().unwrap())
    {
        assert!((*a as f64 - b.as_f64().unwrap()).abs() <= 1e-4);
    }
    let (mlm, nsp_loss, total) = m.losses(&Cpu, &batch, &labels, Some(&nsp)).unwrap();
    for (ours, key) in [
        (mlm, "mlm_loss"),
        (nsp_loss.unwrap(), "nsp_loss"),
        (total, "loss"),
    ] {
        let theirs = b[key].as_f64().unwrap();
        assert!((ours - theirs).abs() <= 1e-4, "{key}: {ours} vs {theirs}");
    }
}

#[test]
fn fill_mask_matches_the_hugging_face_pipeline() {
    let m = model();
    let tok =
        tokenizers::Tokenizer::from_file(fixture("tiny-bert-pretraining/tokenizer.json")).unwrap();
    for case in outputs()["fill_mask"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = fill_mask(&Cpu, &m, &tok, text, 5).unwrap();
        let expected = case["results"].as_array().unwrap();
        assert_eq!(got.len(), expected.len(), "{text}: masks");
        for (ours, theirs) in got.iter().zip(expected) {
            for (p, r) in ours.iter().zip(theirs.as_array().unwrap()) {
                assert_eq!(p.token, r["token"].as_u64().unwrap() as u32, "{text}");
                assert_eq!(p.token_str, r["token_str"].as_str().unwrap(), "{text}");
                assert_eq!(p.sequence, r["sequence"].as_str().unwrap(), "{text}");
                assert!((p.score - r["score"].as_f64().unwrap()).abs() <= 1e-5);
            }
        }
    }
    let e = fill_mask(&Cpu, &m, &tok, "no mask here", 5).unwrap_err();
    assert!(e.to_string().contains("[MASK]"), "{e}");
}

#[test]
fn a_plain_bert_folder_has_no_pretraining_heads() {
    let e = BertPretraining::from_folder(&Cpu, &fixture("tiny-bert"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("masked-LM head"), "{e}");
}
