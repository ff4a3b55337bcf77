//! BERT and sentence embeddings against the real thing: the tiny random BERT's hidden states
//! and pooled output against Hugging Face transformers', MiniLM's sentence embeddings and
//! token ids against sentence-transformers' (fixtures from scripts/make_fixtures.py), and
//! every kind of bad model folder or input.

use cuattn::runtime::bert::Bert;
use cuattn::runtime::checkpoint::Checkpoint;
use cuattn::runtime::pooling::cosine;
use cuattn::runtime::sentence::SentenceEmbedder;
use cuattn::runtime::tokenizer::TokenBatch;
use cuattn::runtime::{Backend, Cpu};
use cuattn::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

mod fixture_files;

use fixture_files::{fixture, floats, json, tiny_bert_batch, uints};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_dir() -> PathBuf {
    fixture("tests/fixtures/tiny-bert")
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

/// Runs the model in `dir` on the fixture batch; returns (hidden, pooled) max abs errors.
fn errors_vs_hf(dir: &Path) -> Result<(f64, f64), Error> {
    let (batch, f) = tiny_bert_batch();
    let bert = Bert::from_folder(&Cpu, dir)?;
    let out = bert.forward(&Cpu, &batch)?;
    let hidden = Cpu.to_f32(&out.hidden)?;
    let pooled = Cpu.to_f32(out.pooled.as_ref().expect("the fixture has a pooler"))?;
    Ok((
        max_abs_diff(&hidden, &floats(&f["hidden"])),
        max_abs_diff(&pooled, &floats(&f["pooled"])),
    ))
}

#[test]
fn tiny_bert_matches_hugging_face() {
    let (hidden, pooled) = errors_vs_hf(&tiny_dir()).unwrap();
    eprintln!("tiny BERT vs Hugging Face: max abs err hidden {hidden:.2e}, pooled {pooled:.2e}");
    assert!(hidden <= 1e-4, "hidden states max abs err {hidden}");
    assert!(pooled <= 1e-4, "pooled output max abs err {pooled}");
}

/// The packed forward (no padding rows in any GEMM) gives Hugging Face's hidden states of
/// every real token, on a batch that has padding; unpacking is checked row by row.
#[test]
fn packed_forward_matches_hugging_face_on_every_real_token() {
    let (batch, f) = tiny_bert_batch();
    assert!(
        batch.lens.iter().any(|&n| n < batch.len),
        "the fixture batch must have padding for this test to mean anything"
    );
    let bert = Bert::from_folder(&Cpu, &tiny_dir()).unwrap();
    let packed = Cpu
        .to_f32(&bert.forward_packed(&Cpu, &batch).unwrap())
        .unwrap();
    let want = floats(&f["hidden"]);
    let width = bert.config.hidden_size;
    let real: usize = batch.lens.iter().sum();
    assert_eq!(packed.len(), real * width, "one row per real token");
    let mut row = 0;
    let mut worst = 0f64;
    for (b, &n) in batch.lens.iter().enumerate() {
        for t in 0..n {
            let at = (b * batch.len + t) * width;
            let got = &packed[row * width..(row + 1) * width];
            worst = worst.max(max_abs_diff(got, &want[at..at + width]));
            row += 1;
        }
    }
    eprintln!("tiny BERT packed vs Hugging Face: max abs err {worst:.2e}");
    assert!(worst <= 1e-4, "packed hidden states max abs err {worst}");
}

#[test]
fn more_tokens_than_positions_is_an_error_and_ids_are_checked() {
    let bert = Bert::from_folder(&Cpu, &tiny_dir()).unwrap();
    let positions = bert.config.max_position_embeddings;
    let long = TokenBatch {
        ids: vec![1; positions + 1],
        type_ids: vec![0; positions + 1],
        lens: vec![positions + 1],
        len: positions + 1,
        truncated: vec![],
    };
    match bert.forward(&Cpu, &long) {
        Err(Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains("positions"), "{reason}")
        }
        other => panic!("expected an error, got {:?}", other.err()),
    }
    let bad_id = TokenBatch {
        ids: vec![bert.config.vocab_size as u32],
        type_ids: vec![0],
        lens: vec![1],
        len: 1,
        truncated: vec![],
    };
    assert!(matches!(
        bert.forward(&Cpu, &bad_id),
        Err(Error::InvalidArgument { arg: "ids", .. })
    ));
}

/// A scratch copy of the tiny model whose tensors `edit` may change.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cuattn-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(tiny_dir().join("config.json"), dir.join("config.json")).unwrap();
        std::fs::copy(
            tiny_dir().join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
        Scratch(dir)
    }

    /// Rewrites model.safetensors with the tensors `edit` leaves, as (name, dtype, shape, bytes).
    fn edit(&self, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
        let bytes = std::fs::read(tiny_dir().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        edit(&mut tensors);
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(
            self.0.join("model.safetensors"),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    }

    fn load(&self) -> Result<Bert<Cpu>, Error> {
        Bert::from_folder(&Cpu, &self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn checkpoint_error(r: Result<Bert<Cpu>, Error>) -> String {
    match r {
        Err(e @ Error::Checkpoint { .. }) => e.to_string(),
        Err(e) => panic!("expected a checkpoint error, got {e}"),
        Ok(_) => panic!("expected a checkpoint error, the model loaded"),
    }
}

#[test]
fn missing_extra_and_misshaped_tensors_are_named() {
    let s = Scratch::new("missing");
    s.edit(|t| t.retain(|(n, ..)| n != "encoder.layer.1.output.dense.bias"));
    let e = checkpoint_error(s.load());
    assert!(
        e.contains("missing tensor `encoder.layer.1.output.dense.bias`"),
        "{e}"
    );

    let s = Scratch::new("extra");
    s.edit(|t| {
        t.push((
            "encoder.layer.7.surprise".into(),
            Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let e = checkpoint_error(s.load());
    assert!(e.contains("encoder.layer.7.surprise"), "{e}");

    let s = Scratch::new("shape");
    s.edit(|t| {
        let w = t
            .iter_mut()
            .find(|(n, ..)| n == "pooler.dense.weight")
            .unwrap();
        w.2 = vec![16, 64];
    });
    let e = checkpoint_error(s.load());
    assert!(
        e.contains("`pooler.dense.weight` has shape [16, 64], expected [32, 32]"),
        "{e}"
    );

    let s = Scratch::new("dtype");
    s.edit(|t| {
        let w = t
            .iter_mut()
            .find(|(n, ..)| n == "embeddings.LayerNorm.bias")
            .unwrap();
        w.1 = Dtype::I32;
    });
    let e = checkpoint_error(s.load());
    assert!(
        e.contains("`embeddings.LayerNorm.bias` has dtype I32"),
        "{e}"
    );
}

#[test]
fn truncated_or_corrupt_safetensors_is_an_error() {
    let s = Scratch::new("truncated");
    let path = s.0.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = checkpoint_error(s.load());
    assert!(e.contains("corrupt or truncated"), "{e}");
    std::fs::write(&path, b"not a safetensors file at all").unwrap();
    let e = checkpoint_error(s.load());
    assert!(e.contains("corrupt or truncated"), "{e}");
    std::fs::write(&path, b"").unwrap();
    checkpoint_error(s.load());
    std::fs::remove_file(&path).unwrap();
    let e = checkpoint_error(s.load());
    assert!(e.contains("cannot open"), "{e}");
}

#[test]
fn folder_without_config_or_of_another_architecture_is_an_error() {
    let s = Scratch::new("config");
    std::fs::remove_file(s.0.join("config.json")).unwrap();
    match s.load() {
        Err(Error::Config { file, reason }) => {
            assert!(
                file.ends_with("config.json") && reason.contains("not found"),
                "{file}: {reason}"
            )
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    std::fs::write(
        s.0.join("config.json"),
        r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#,
    )
    .unwrap();
    match s.load() {
        Err(Error::Config { reason, .. }) => {
            assert!(
                reason.contains("unsupported architecture") && reason.contains("gpt2"),
                "{reason}"
            )
        }
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    std::fs::write(s.0.join("config.json"), "{ not json").unwrap();
    assert!(matches!(s.load(), Err(Error::Config { .. })));
}

#[test]
fn prefixed_keys_and_buffers_load_to_the_same_model() {
    let s = Scratch::new("prefix");
    s.edit(|t| {
        for (n, ..) in t.iter_mut() {
            *n = format!("bert.{n}");
        }
        // A position_ids buffer, as older checkpoints carry: skipped, not an error.
        t.push((
            "bert.embeddings.position_ids".into(),
            Dtype::I64,
            vec![1, 24],
            vec![0; 24 * 8],
        ));
    });
    let (hidden, pooled) = errors_vs_hf(&s.0).unwrap();
    assert!(hidden <= 1e-4 && pooled <= 1e-4, "{hidden} {pooled}");
}

#[test]
fn half_precision_tensors_convert_exactly() {
    let s = Scratch::new("half");
    let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.3 - 0.7).collect();
    let f16: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let views = vec![
        (
            "a".to_string(),
            TensorView::new(Dtype::F16, vec![2, 3], &f16).unwrap(),
        ),
        (
            "b".to_string(),
            TensorView::new(Dtype::BF16, vec![6], &bf16).unwrap(),
        ),
    ];
    let path = s.0.join("half.safetensors");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let mut c = Checkpoint::open(&path).unwrap();
    let a = c.take("a", &[2, 3]).unwrap();
    let b = c.take("b", &[6]).unwrap();
    c.finish().unwrap();
    for (i, &v) in values.iter().enumerate() {
        assert_eq!(a.values[i], half::f16::from_f32(v).to_f32());
        assert_eq!(b.values[i], half::bf16::from_f32(v).to_f32());
    }
}

// ------------------------------------------------------------------------------ MiniLM

/// The MiniLM folder, or None after a visible SKIPPED line (fetch it with
/// scripts/fetch-minilm.sh; CI does).
fn minilm_or_skip(test: &str) -> Option<PathBuf> {
    use std::io::Write;
    let dir = root().join("models/all-MiniLM-L6-v2");
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    let line =
        format!("SKIPPED (models/all-MiniLM-L6-v2 absent; run scripts/fetch-minilm.sh): {test}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    None
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = minilm_or_skip("minilm_matches_sentence_transformers") else {
        return;
    };
    let f = json("tests/fixtures/minilm-embeddings.json");
    let sentences: Vec<&str> = f["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let model = SentenceEmbedder::from_folder(&Cpu, &dir).unwrap();
    assert_eq!(
        model.tokenizer.max_len(),
        f["max_seq_length"].as_u64().unwrap() as usize
    );

    // Token ids, sentence by sentence, as sentence-transformers makes them (truncation included).
    for (i, s) in sentences.iter().enumerate() {
        let b = model.tokenizer.encode_batch(&[s]).unwrap();
        assert_eq!(
            b.ids[..b.lens[0]],
            uints(&f["token_ids"][i])[..],
            "token ids of sentence {i}"
        );
    }

    // Batches of 5 (the fixture used 4): results must not depend on batch-mates.
    let out = model.embed(&Cpu, &sentences, 5, |_| {}).unwrap();
    assert_eq!(out.dim, 384);
    let long = sentences.len() - 1;
    assert_eq!(
        out.truncated,
        vec![long],
        "only the last sentence exceeds 256 tokens"
    );
    let mut worst = 1.0f64;
    for (i, want) in f["embeddings"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f32> = floats(want).iter().map(|&x| x as f32).collect();
        let c = cosine(&out.vectors[i], &want);
        let norm: f64 = out.vectors[i]
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-5,
            "sentence {i}: normalized output has norm {norm}"
        );
        worst = worst.min(c);
        assert!(c >= 0.9999, "sentence {i} ({:?}): cosine {c}", sentences[i]);
    }
    eprintln!(
        "MiniLM vs sentence-transformers: worst cosine {worst:.7} over {} sentences",
        sentences.len()
    );

    // One at a time gives the same vectors as batched with longer sentences.
    let single = model.embed(&Cpu, &sentences[..3], 1, |_| {}).unwrap();
    for i in 0..3 {
        assert!(cosine(&single.vectors[i], &out.vectors[i]) >= 0.999_999);
    }
}

#[test]
fn empty_input_list_is_an_error() {
    let Some(dir) = minilm_or_skip("empty_input_list_is_an_error") else {
        return;
    };
    let model = SentenceEmbedder::from_folder(&Cpu, &dir).unwrap();
    assert!(matches!(
        model.embed(&Cpu, &[], 8, |_| {}),
        Err(Error::InvalidArgument { arg: "texts", .. })
    ));
    assert!(matches!(
        model.embed(&Cpu, &["x"], 0, |_| {}),
        Err(Error::InvalidArgument {
            arg: "batch_size",
            ..
        })
    ));
}
