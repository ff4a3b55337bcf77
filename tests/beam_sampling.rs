//! Beam sampling (`num_beams > 1` with a temperature > 0; Hugging Face's `do_sample` beam
//! search: the 2·num_beams continuations drawn from the softmax of the warped scores). Hugging
//! Face's torch RNG cannot be reproduced, so these are invariants, on the tiny BART fixture:
//! valid ids and finite, ordered scores; the same seed gives the same output and different
//! seeds differ; as the temperature goes to 0 the draws follow the scores and the tokens are
//! beam search's; with one beam the call is plain sampling.

use cuattn::runtime::bart::Bart;
use cuattn::runtime::generate::{generate, GenerateOptions, Generation, Sampling};
use cuattn::runtime::generation_config::GenerationConfig;
use cuattn::runtime::Cpu;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn inputs() -> Vec<Vec<u32>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-bart-outputs.json")).unwrap())
            .unwrap();
    v["variants"]["tiny-bart"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// The folder's beam options (4 beams, no_repeat_ngram_size 3, forced BOS/EOS), two returned
/// sequences per input, sampling as given.
fn options(sampling: Sampling) -> GenerateOptions {
    let base = GenerationConfig::from_folder(&fixture("tiny-bart"))
        .unwrap()
        .apply(GenerateOptions::default(), 1);
    GenerateOptions {
        num_return_sequences: 2,
        max_new_tokens: 16,
        sampling,
        ..base
    }
}

fn run(m: &Bart<Cpu>, opts: &GenerateOptions) -> Generation {
    generate(&Cpu, m, &inputs(), opts, &mut |_, _| {}).unwrap()
}

fn sampling(temperature: f32, seed: u64) -> Sampling {
    Sampling {
        temperature,
        top_k: 0,
        top_p: 1.0,
        seed,
    }
}

#[test]
fn beam_sampling_gives_valid_ordered_hypotheses_and_is_a_function_of_the_seed() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let opts = options(sampling(1.0, 7));
    assert_eq!(opts.num_beams, 4);
    let a = run(&m, &opts);
    let n = inputs().len();
    assert_eq!(a.generated.len(), 2 * n);
    for (i, g) in a.generated.iter().enumerate() {
        assert!(!g.is_empty());
        assert!(
            g.iter().all(|&t| (t as usize) < m.config.vocab_size),
            "{g:?}"
        );
        // The folder forces BOS first.
        assert_eq!(g[0], m.config.forced_bos_token_id.unwrap_or(0));
        assert!(a.scores[i].is_finite() && a.scores[i] <= 0.0);
    }
    for pair in a.scores.chunks(2) {
        assert!(pair[0] >= pair[1], "best first: {pair:?}");
    }
    assert_eq!(a, run(&m, &opts), "same seed, same output");
    let differing = (8..14)
        .filter(|&seed| run(&m, &options(sampling(1.0, seed))).generated != a.generated)
        .count();
    assert!(
        differing >= 3,
        "only {differing} of 6 other seeds changed the output"
    );
    // Top-k and top-p keep the call valid (at least two tokens per beam survive).
    let narrow = run(
        &m,
        &options(Sampling {
            temperature: 0.8,
            top_k: 3,
            top_p: 0.5,
            seed: 2,
        }),
    );
    assert!(narrow.scores.iter().all(|s| s.is_finite()));
}

#[test]
fn beam_sampling_at_a_vanishing_temperature_is_beam_search() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let search = run(&m, &options(Sampling::default()));
    for seed in [1, 2, 3] {
        let cold = run(&m, &options(sampling(1e-4, seed)));
        assert_eq!(cold.generated, search.generated, "seed {seed}");
        assert_eq!(cold.stop, search.stop);
        // Scores accumulate the warped log-probabilities: 1/T times beam search's.
        for (c, s) in cold.scores.iter().zip(&search.scores) {
            assert!(
                (c * 1e-4 - s).abs() <= 1e-3 * s.abs().max(1.0),
                "{c} vs {s}"
            );
        }
    }
}

#[test]
fn one_beam_with_a_temperature_is_plain_sampling() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let plain = GenerateOptions {
        max_new_tokens: 12,
        sampling: sampling(1.0, 4),
        ..GenerateOptions::default()
    };
    let one_beam = GenerateOptions {
        num_beams: 1,
        length_penalty: 2.0,
        ..plain
    };
    let a = run(&m, &plain);
    let b = run(&m, &one_beam);
    assert_eq!(a.generated, b.generated);
    assert!(b.scores.is_empty(), "no beam scores without beams");
}
