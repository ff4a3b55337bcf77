//! One function per fuzz target: each takes arbitrary bytes, feeds them to a parser that reads
//! untrusted model-folder files or model output, and checks what must hold whatever the bytes:
//! no panic, and the properties stated at each target. Shared by the stable harness
//! (`tests/fuzz_parsers.rs`, proptest and a time-bounded loop in CI) and the cargo-fuzz
//! targets in `fuzz/` (longer runs).

use cuattn::runtime::bert::BertConfig;
use cuattn::runtime::checkpoint::Checkpoint;
use cuattn::runtime::generate::Sampling;
use cuattn::runtime::gpt2::Gpt2Config;
use cuattn::runtime::gpt2_tokenizer::{Gpt2Tokenizer, Utf8Stream};
use cuattn::runtime::pooling::Pooling;
use cuattn::runtime::tokenizer::Tokenizer;
use std::path::PathBuf;

/// A scratch folder for this thread (targets write the bytes as a model folder's files).
fn scratch() -> PathBuf {
    let id = format!("{:?}", std::thread::current().id());
    let id: String = id.chars().filter(char::is_ascii_digit).collect();
    let dir = std::env::temp_dir().join(format!("cuattn-fuzz-{}-{id}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The safetensors reader: open, then take every tensor with the shape the header gives.
pub fn safetensors(data: &[u8]) {
    let path = scratch().join("model.safetensors");
    std::fs::write(&path, data).unwrap();
    let Ok(mut ckpt) = Checkpoint::open(&path) else {
        return;
    };
    let names: Vec<String> = ckpt.names().map(str::to_string).collect();
    for n in &names {
        let shape = ckpt.shape(n).expect("a listed tensor has a shape");
        if let Ok(p) = ckpt.take(n, &shape) {
            assert_eq!(p.values.len(), shape.iter().product::<usize>());
        }
    }
    let _ = ckpt.expect_layers("encoder.layer.", 1_000_000_000, "num_hidden_layers");
    let _ = ckpt.finish();
}

/// The config parsers (BERT, GPT-2) on a JSON value, and the folder readers that parse
/// `modules.json`, the pooling config and `sentence_bert_config.json` from the same bytes.
pub fn config(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(c) = BertConfig::from_json(&v, "config.json") {
            assert!(c.hidden_size % c.num_attention_heads == 0);
            assert!(c.layer_norm_eps > 0.0 && c.layer_norm_eps.is_finite());
        }
        if let Ok(c) = Gpt2Config::from_json(&v, "config.json") {
            assert!(c.n_embd % c.n_head == 0);
            assert!((c.eos_token_id as usize) < c.vocab_size);
        }
    }
    let dir = scratch().join("folder");
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    std::fs::write(dir.join("modules.json"), data).unwrap();
    std::fs::write(dir.join("1_Pooling/config.json"), data).unwrap();
    let _ = Pooling::from_folder(&dir);
    let _ = BertConfig::from_folder(&dir);
}

/// `tokenizer.json` loading, then a batch through whatever loaded.
pub fn tokenizer(data: &[u8]) {
    let path = scratch().join("tokenizer.json");
    std::fs::write(&path, data).unwrap();
    if let Ok(t) = Tokenizer::from_file(&path, 16) {
        let text = String::from_utf8_lossy(data);
        if let Ok(b) = t.encode_batch(&["hello world", &text]) {
            assert!(b.lens.iter().all(|&l| l <= 16), "truncation at 16");
            assert_eq!(b.ids.len(), b.batch() * b.len);
        }
    }
}

/// GPT-2's tokenizer from `vocab.json` + `merges.txt` (the bytes split in two), then encoding
/// and decoding through whatever loaded.
pub fn gpt2_tokenizer(data: &[u8]) {
    let dir = scratch().join("gpt2");
    std::fs::create_dir_all(&dir).unwrap();
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len() / 2);
    std::fs::write(dir.join("vocab.json"), &data[..cut]).unwrap();
    std::fs::write(dir.join("merges.txt"), &data[cut.min(data.len())..]).unwrap();
    if let Ok(t) = Gpt2Tokenizer::from_folder(&dir, 50257) {
        if let Ok(ids) = t.encode(&String::from_utf8_lossy(data)) {
            let _ = t.decode(&ids);
        }
    }
}

/// GPT-2's own BPE (the embedded vocabulary): any text encodes and decodes back to itself;
/// any id sequence decodes or is an error; streamed decoding of any bytes never panics and
/// gives the same text as decoding them at once when they are valid UTF-8.
pub fn bpe(data: &[u8]) {
    static TOK: std::sync::OnceLock<Gpt2Tokenizer> = std::sync::OnceLock::new();
    let tok = TOK.get_or_init(|| {
        let empty = scratch().join("no-tokenizer-files");
        std::fs::create_dir_all(&empty).unwrap();
        Gpt2Tokenizer::from_folder(&empty, 50257).unwrap()
    });
    let text = String::from_utf8_lossy(data);
    let ids = tok.encode(&text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text, "round trip");
    let ids: Vec<u32> = data
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
        .collect();
    let _ = tok.decode(&ids);
    let mut stream = Utf8Stream::default();
    let mut streamed = String::new();
    for piece in data.chunks(3) {
        streamed.push_str(&stream.push(piece));
    }
    streamed.push_str(&stream.finish());
    if let Ok(s) = std::str::from_utf8(data) {
        assert_eq!(streamed, s);
    }
}

/// Sampling from arbitrary logits: NaN is an error; a +Inf logit is chosen; otherwise the
/// token is in range, and greedy picks a maximum.
pub fn sampling(data: &[u8]) {
    use rand::SeedableRng;
    if data.len() < 4 {
        return;
    }
    let (head, rest) = data.split_at(4);
    let logits: Vec<f32> = rest
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let s = Sampling {
        temperature: [0.0, 1.0, 0.7, 1e-30][head[0] as usize % 4],
        top_k: head[1] as usize % 5,
        top_p: [1.0, 0.9, 0.5, 1e-6][head[2] as usize % 4],
        seed: head[3] as u64,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    match s.sample(&logits, &mut rng) {
        Err(_) => assert!(
            logits.is_empty()
                || logits.iter().any(|x| x.is_nan())
                || logits.iter().all(|&x| x == f32::NEG_INFINITY),
            "{logits:?}"
        ),
        Ok(t) => {
            let t = t as usize;
            assert!(t < logits.len());
            assert!(!logits.iter().any(|x| x.is_nan()), "NaN accepted");
            if logits.contains(&f32::INFINITY) {
                assert_eq!(logits[t], f32::INFINITY, "{logits:?}");
            }
            if s.temperature == 0.0 {
                assert!(logits.iter().all(|&x| x <= logits[t]));
            }
        }
    }
}

/// A target's name and function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name (the harness and the cargo-fuzz targets use the same table).
pub const TARGETS: &[Target] = &[
    ("safetensors", safetensors),
    ("config", config),
    ("tokenizer", tokenizer),
    ("gpt2_tokenizer", gpt2_tokenizer),
    ("bpe", bpe),
    ("sampling", sampling),
];
