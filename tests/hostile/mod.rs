//! Model folders for the hostile-input tests and the fuzz harness: the committed tiny BERT
//! and tiny GPT-2 copied into a scratch folder (to be corrupted there), and a WordPiece
//! `tokenizer.json` for the tiny BERT's 101-token vocabulary, written with the `tokenizers`
//! crate so `cuattn embed` runs end to end on it.

use std::path::{Path, PathBuf};

pub fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A fresh, empty scratch folder unique to this process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cuattn-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny BERT (config, weights) plus a WordPiece tokenizer, in a scratch folder.
pub fn tiny_bert(name: &str) -> PathBuf {
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo("tests/fixtures/tiny-bert").join(f), dir.join(f)).unwrap();
    }
    write_wordpiece(&dir.join("tokenizer.json"));
    dir
}

/// The tiny GPT-2 (config, weights; GPT-2's own vocabulary) in a scratch folder.
pub fn tiny_gpt2(name: &str) -> PathBuf {
    let dir = scratch(name);
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo("tests/fixtures/tiny-gpt2").join(f), dir.join(f)).unwrap();
    }
    dir
}

/// The tiny BERT's vocabulary: specials, letters, their `##` continuations, digits, some
/// punctuation and words: 101 tokens.
pub fn wordpiece_vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .map(String::from)
        .to_vec();
    v.extend(('a'..='z').map(String::from));
    v.extend(('a'..='z').map(|c| format!("##{c}")));
    v.extend(('0'..='9').map(String::from));
    v.extend([".", ",", "!", "?", "'", "-"].map(String::from));
    for w in [
        "the", "a", "man", "is", "eating", "food", "word", "hello", "world", "cat", "dog", "on",
        "sat", "mat", "and", "of", "to", "in", "it", "was", "he", "she", "for", "with", "as",
        "his", "her", "at", "by", "be", "this", "are",
    ] {
        if v.len() < 101 {
            v.push(w.into());
        }
    }
    assert_eq!(v.len(), 101);
    v
}

/// Writes a BERT-style WordPiece `tokenizer.json` over [`wordpiece_vocab`].
pub fn write_wordpiece(path: &Path) {
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;
    // The builder takes the vocabulary as a file (one token per line, ids in line order).
    let vocab = path.with_extension("vocab.txt");
    std::fs::write(&vocab, wordpiece_vocab().join("\n")).unwrap();
    let model = WordPiece::from_file(vocab.to_str().unwrap())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    std::fs::remove_file(&vocab).unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_normalizer(Some(BertNormalizer::default()))
        .unwrap();
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap(),
    ));
    tok.save(path, false).unwrap();
}

/// Rewrites one field of a folder's JSON file.
pub fn set_json(file: &Path, key: &str, value: serde_json::Value) {
    let mut v = json_file(file);
    v[key] = value;
    std::fs::write(file, v.to_string()).unwrap();
}

/// Overwrites every element of f32 tensor `name` of a safetensors file with `value`.
pub fn fill_tensor(file: &Path, name: &str, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32", "{name}");
    let lo = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let hi = header[name]["data_offsets"][1].as_u64().unwrap() as usize;
    for chunk in bytes[8 + n + lo..8 + n + hi].chunks_exact_mut(4) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    std::fs::write(file, bytes).unwrap();
}

/// A JSON file's value.
pub fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
