//! Saving a trained BART (`BartForConditionalGeneration::save_pretrained`), on the CPU.
//!
//! A model of each fixture (tied `tests/fixtures/tiny-bart`, untied
//! `tests/fixtures/tiny-bart-untied`) trained a few AdamW steps with dropout and LayerDrop
//! (changed probabilities, so config.json must carry them) is saved and read back:
//! - by the training loader: the same parameter names and values bit for bit, the same
//!   `final_logits_bias` and config, and so the same step;
//! - by the inference loader (`runtime::bart::Bart`): the trained model's teacher-forced logits
//!   within 1e-4 (another implementation of the same forward, as in
//!   tests/train_bart_untied_dropout.rs);
//! - the folder holds exactly the tensor names and shapes transformers 5.24 writes
//!   (`save_pretrained` of the same fixture, which is what tests/fixtures/tiny-bart*/ are).
//!
//! Hugging Face itself: `tests/fixtures/tiny-bart-saved/` and `tiny-bart-untied-saved/` are
//! folders our `save_pretrained` wrote (the ignored test `write_the_saved_fixtures`), and
//! `scripts/make_fixtures.py --only bart-saved` loaded them with transformers 5.24's
//! `from_pretrained` and recorded its loading report, warnings and logits
//! (`tiny-bart-saved-hf.json`, `.safetensors`). Here: the report has no missing, unexpected or
//! mismatched key and no warning; both our loaders give transformers' logits within 1e-4;
//! transformers' own re-save has our tensor names; and loading and saving the committed folder
//! with today's code writes it again (tensors bit for bit, the same config), so the writer
//! transformers accepted is the one under test.

use cuattn::runtime::bart::Bart;
use cuattn::runtime::train::{
    AdamW, AdamWConfig, BartForConditionalGeneration, DenoisingBatch, DenoisingOutput, StepOptions,
};
use cuattn::runtime::{Backend, Cpu, CpuTensor};
use cuattn::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[allow(dead_code)] // the BERT batch helpers are for other binaries
mod fixture_files;

use fixture_files::{errors, fixture, floats, json, torch, torch_tensors};

type Model = BartForConditionalGeneration<Cpu>;

const SOURCES: [(&str, &str); 2] = [
    ("tests/fixtures/tiny-bart", "tests/fixtures/tiny-bart-saved"),
    (
        "tests/fixtures/tiny-bart-untied",
        "tests/fixtures/tiny-bart-untied-saved",
    ),
];

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
        .collect()
}

fn batch() -> DenoisingBatch {
    let v = &json("tests/fixtures/tiny-bart-denoise-step.json")["variants"]["tiny-bart"];
    DenoisingBatch {
        input_ids: ints(&v["input_ids"]).iter().map(|&i| i as u32).collect(),
        input_lens: floats(&v["lens"]).iter().map(|&l| l as usize).collect(),
        labels: ints(&v["labels"]),
    }
}

fn host(t: &CpuTensor) -> Vec<f32> {
    Cpu.to_f32(t).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same_step(a: &DenoisingOutput<CpuTensor>, b: &DenoisingOutput<CpuTensor>) -> bool {
    a.loss.to_bits() == b.loss.to_bits()
        && bits(&host(&a.logits)) == bits(&host(&b.logits))
        && a.grads.names == b.grads.names
        && a.grads
            .tensors
            .iter()
            .zip(&b.grads.tensors)
            .all(|(x, y)| bits(&host(x)) == bits(&host(y)))
}

/// The fixture at `src` trained three AdamW steps (lr 1e-2) on the batch, with dropout and
/// LayerDrop on (probabilities changed from the fixture's zeros).
fn trained(src: &str) -> Model {
    let mut m = Model::from_folder(&Cpu, &fixture(src)).unwrap();
    m.config.dropout = 0.1;
    m.config.attention_dropout = 0.05;
    m.config.encoder_layerdrop = 0.2;
    m.config.decoder_layerdrop = 0.1;
    let cfg = AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut opt = AdamW::new(&Cpu, m.parameters(), cfg).unwrap();
    let b = batch();
    for step in 0..3 {
        let opts = StepOptions {
            dropout_seed: Some(42),
            step,
            ..Default::default()
        };
        let out = m.forward_backward_with(&Cpu, &b, &opts).unwrap();
        opt.step(&Cpu, m.parameters_mut(), &out.grads, cfg.lr)
            .unwrap();
    }
    m
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cuattn-bart-save-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Tensor name → (shape, f32 values) of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, (v.shape().to_vec(), values))
        })
        .collect()
}

fn metadata(path: &Path) -> Option<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone()
}

/// Our loaders' teacher-forced logits of every batch sequence against `want`
/// (`[batch·len_out·vocab]`): the training loader's step and the inference loader's
/// `sequence_logits` (sequence by sequence, unpadded).
fn assert_logits(dir: &Path, want: &[f32], bound: f64) {
    let b = batch();
    let out = Model::from_folder(&Cpu, dir)
        .unwrap()
        .forward_backward(&Cpu, &b)
        .unwrap();
    let got = host(&out.logits);
    let (e, _, _) = errors(&got, want);
    assert!(
        e <= bound,
        "{dir:?}: training loader's logits off by {e:.2e}"
    );
    let inference = Bart::from_folder(&Cpu, dir).unwrap();
    let n = b.input_lens.len();
    let (len_in, len_out) = (b.input_ids.len() / n, b.labels.len() / n);
    let row = want.len() / n;
    for i in 0..n {
        let input = &b.input_ids[i * len_in..i * len_in + b.input_lens[i]];
        let dec = &out.decoder_input_ids[i * len_out..(i + 1) * len_out];
        let got = inference.sequence_logits(&Cpu, input, dec).unwrap();
        let (e, _, _) = errors(&got, &want[i * row..(i + 1) * row]);
        assert!(
            e <= bound,
            "{dir:?} sequence {i}: inference loader's logits off by {e:.2e}"
        );
    }
}

#[test]
fn a_trained_model_saved_and_reloaded_is_the_same_model() {
    for (src, _) in SOURCES {
        let m = trained(src);
        let dir = temp_dir(src.rsplit('/').next().unwrap());
        m.save_pretrained(&Cpu, &dir).unwrap();
        let back = Model::from_folder(&Cpu, &dir).unwrap();
        assert_eq!(back.config, m.config, "{src}: config");
        assert_eq!(back.parameter_names(), m.parameter_names());
        for (a, b) in back.parameters().iter().zip(m.parameters()) {
            assert_eq!(bits(&host(&a.value)), bits(&host(&b.value)), "{}", a.name);
        }
        assert_eq!(
            bits(&back.final_logits_bias(&Cpu).unwrap()),
            bits(&m.final_logits_bias(&Cpu).unwrap())
        );
        // Training moved the weights away from the fixture's.
        let start = Model::from_folder(&Cpu, &fixture(src)).unwrap();
        assert!(start
            .parameters()
            .iter()
            .zip(m.parameters())
            .any(|(a, b)| host(&a.value) != host(&b.value)));
        // The same step, with dropout and LayerDrop and without.
        let b = batch();
        let opts = StepOptions {
            dropout_seed: Some(9),
            step: 3,
            ..Default::default()
        };
        let trained_eval = m.forward_backward(&Cpu, &b).unwrap();
        assert!(same_step(
            &back.forward_backward(&Cpu, &b).unwrap(),
            &trained_eval
        ));
        assert!(same_step(
            &back.forward_backward_with(&Cpu, &b, &opts).unwrap(),
            &m.forward_backward_with(&Cpu, &b, &opts).unwrap()
        ));
        // The inference loader reads the trained model's logits.
        assert_logits(&dir, &host(&trained_eval.logits), 1e-4);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The names and shapes transformers 5.24's `save_pretrained` writes for the same model (the
/// fixture folders are its output; `--only bart-saved` also records its re-save of ours), the
/// `{"format": "pt"}` metadata, and a config.json that keeps the source's other fields.
#[test]
fn the_saved_folder_holds_what_transformers_writes() {
    for (src, _) in SOURCES {
        let m = trained(src);
        let dir = temp_dir(&format!("names-{}", src.rsplit('/').next().unwrap()));
        m.save_pretrained(&Cpu, &dir).unwrap();
        let ours = tensors(&dir.join("model.safetensors"));
        let theirs = tensors(&fixture(src).join("model.safetensors"));
        let shapes = |t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>| -> Vec<(String, Vec<usize>)> {
            t.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect()
        };
        assert_eq!(shapes(&ours), shapes(&theirs), "{src}");
        assert!(ours.contains_key("final_logits_bias"));
        let tied = m.config.tie_word_embeddings;
        assert_eq!(ours.contains_key("lm_head.weight"), !tied, "{src}");
        assert_eq!(
            metadata(&dir.join("model.safetensors")),
            Some([("format".to_string(), "pt".to_string())].into())
        );
        let config = json(dir.join("config.json").to_str().unwrap());
        let source = json(&format!("{src}/config.json"));
        for (k, v) in source.as_object().unwrap() {
            let changed = [
                "dropout",
                "attention_dropout",
                "encoder_layerdrop",
                "decoder_layerdrop",
            ];
            if !changed.contains(&k.as_str()) {
                assert_eq!(&config[k], v, "{src}: config.json's {k}");
            }
        }
        assert_eq!(config["dropout"], 0.1);
        assert_eq!(config["attention_dropout"], 0.05);
        assert_eq!(config["encoder_layerdrop"], 0.2);
        assert_eq!(config["decoder_layerdrop"], 0.1);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A model built from host parameters (no source config.json) saves a config transformers
/// and our loaders read, and the untied one writes all four tables.
#[test]
fn a_model_built_from_host_parameters_saves_a_complete_folder() {
    for (src, _) in SOURCES {
        let m = Model::from_folder(&Cpu, &fixture(src)).unwrap();
        let bias = m.final_logits_bias(&Cpu).unwrap();
        let built =
            Model::from_host(&Cpu, m.config.clone(), m.to_host(&Cpu).unwrap(), &bias).unwrap();
        let dir = temp_dir(&format!("host-{}", src.rsplit('/').next().unwrap()));
        built.save_pretrained(&Cpu, &dir).unwrap();
        let config = json(dir.join("config.json").to_str().unwrap());
        assert_eq!(config["model_type"], "bart");
        assert_eq!(config["architectures"][0], "BartForConditionalGeneration");
        let back = Model::from_folder(&Cpu, &dir).unwrap();
        assert_eq!(back.config, m.config);
        let b = batch();
        assert!(same_step(
            &back.forward_backward(&Cpu, &b).unwrap(),
            &m.forward_backward(&Cpu, &b).unwrap()
        ));
        let names: Vec<String> = tensors(&dir.join("model.safetensors"))
            .into_keys()
            .collect();
        let want: Vec<String> = tensors(&fixture(src).join("model.safetensors"))
            .into_keys()
            .collect();
        assert_eq!(names, want);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn an_unwritable_folder_is_an_io_error() {
    let m = Model::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart")).unwrap();
    let file = temp_dir("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    for dir in [file.clone(), file.join("below")] {
        let e = m.save_pretrained(&Cpu, &dir).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{dir:?}: {e}");
    }
    let _ = std::fs::remove_file(file);
}

/// transformers 5.24 read our saved folders (recorded by `make_fixtures.py --only bart-saved`).
#[test]
fn transformers_reads_our_saved_folders_as_we_do() {
    let record = json("tests/fixtures/tiny-bart-saved-hf.json");
    let all = torch_tensors("tests/fixtures/tiny-bart-saved-hf.safetensors");
    for (_, saved) in SOURCES {
        let name = saved.rsplit('/').next().unwrap();
        let r = &record[name];
        for key in [
            "missing_keys",
            "unexpected_keys",
            "mismatched_keys",
            "error_msgs",
            "warnings",
        ] {
            assert_eq!(r[key], serde_json::json!([]), "{name}: {key}");
        }
        // transformers' own re-save of our folder has our tensor names.
        let ours: Vec<String> = tensors(&fixture(saved).join("model.safetensors"))
            .into_keys()
            .collect();
        let mut resaved: Vec<String> = r["resaved_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        resaved.sort();
        assert_eq!(ours, resaved, "{name}");
        assert_logits(
            &fixture(saved),
            &torch(&all, &format!("{name}.logits")),
            1e-4,
        );
    }
}

/// Loading a committed saved folder and saving it again writes the same folder: every tensor
/// bit for bit and the same config.json.
#[test]
fn resaving_a_saved_folder_writes_it_again() {
    for (_, saved) in SOURCES {
        let m = Model::from_folder(&Cpu, &fixture(saved)).unwrap();
        let dir = temp_dir(&format!("resave-{}", saved.rsplit('/').next().unwrap()));
        m.save_pretrained(&Cpu, &dir).unwrap();
        let (a, b) = (
            tensors(&dir.join("model.safetensors")),
            tensors(&fixture(saved).join("model.safetensors")),
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (n, (shape, v)) in &a {
            assert_eq!(shape, &b[n].0, "{n}");
            assert_eq!(bits(v), bits(&b[n].1), "{n}");
        }
        assert_eq!(
            json(dir.join("config.json").to_str().unwrap()),
            json(&format!("{saved}/config.json"))
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Writes the committed saved folders (run by hand: `cargo test --release --test
/// train_bart_save -- --ignored`, then `scripts/make_fixtures.py --only bart-saved`).
#[test]
#[ignore = "rewrites tests/fixtures/tiny-bart-saved and tiny-bart-untied-saved"]
fn write_the_saved_fixtures() {
    for (src, saved) in SOURCES {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(saved);
        trained(src).save_pretrained(&Cpu, &dir).unwrap();
    }
}

/// A tied config whose model has an `lm_head.weight` of its own (a checkpoint that stored a
/// head different from `model.shared`) saves that head and reads it back as its own.
#[test]
fn a_tied_model_with_its_own_head_saves_the_head() {
    let m = Model::from_folder(&Cpu, &fixture("tests/fixtures/tiny-bart")).unwrap();
    let mut host = m.to_host(&Cpu).unwrap();
    let mut head = host[0].1.clone();
    assert_eq!(host[0].0, "model.shared.weight");
    for x in &mut head.values {
        *x = -*x + 0.05;
    }
    host.push(("lm_head.weight".into(), head));
    let bias = m.final_logits_bias(&Cpu).unwrap();
    let own = Model::from_host(&Cpu, m.config.clone(), host, &bias).unwrap();
    let dir = temp_dir("own-head");
    own.save_pretrained(&Cpu, &dir).unwrap();
    let names: Vec<String> = tensors(&dir.join("model.safetensors"))
        .into_keys()
        .collect();
    assert!(names.iter().any(|n| n == "lm_head.weight"));
    let back = Model::from_folder(&Cpu, &dir).unwrap();
    assert_eq!(back.parameter_names(), own.parameter_names());
    let b = batch();
    assert!(same_step(
        &back.forward_backward(&Cpu, &b).unwrap(),
        &own.forward_backward(&Cpu, &b).unwrap()
    ));
    let _ = std::fs::remove_dir_all(dir);
}
