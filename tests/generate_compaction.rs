//! Finished rows stop costing compute: with `compact_finished` (the default) a sequence that
//! has ended — or, in beam search, an input whose search is done — leaves the batch with its
//! KV-cache rows and encoder memory. The tokens and stop reasons are those of the uncompacted
//! run (and of full recomputation; beam scores to f32 rounding), while
//! `Generation::rows_per_step` shows the batch shrinking. On the tiny BART fixture (greedy, sampling and its generation_config's
//! 4-beam search over a batch of three inputs) and the tiny GPT-2 (sampling).

use cuattn::runtime::bart::Bart;
use cuattn::runtime::generate::{generate, GenerateOptions, Generation, Sampling};
use cuattn::runtime::generation_config::GenerationConfig;
use cuattn::runtime::gpt2::Gpt2;
use cuattn::runtime::Cpu;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The fixture's three encoder inputs (different lengths, so they end at different steps).
fn bart_inputs() -> Vec<Vec<u32>> {
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

fn run<M: cuattn::runtime::generate::TokenModel<Cpu>>(
    m: &M,
    inputs: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Generation {
    generate(&Cpu, m, inputs, opts, &mut |_, _| {}).unwrap()
}

/// Compacted, uncompacted and recomputed runs agree token for token; the compacted batch
/// never grows, starts full and (`must_shrink`) ends smaller; the uncompacted one stays full.
fn check<M: cuattn::runtime::generate::TokenModel<Cpu>>(
    what: &str,
    m: &M,
    inputs: &[Vec<u32>],
    opts: GenerateOptions,
    rows: usize,
    must_shrink: bool,
) {
    let compact = run(m, inputs, &opts);
    let full = run(
        m,
        inputs,
        &GenerateOptions {
            compact_finished: false,
            ..opts
        },
    );
    let recomputed = run(
        m,
        inputs,
        &GenerateOptions {
            use_kv_cache: false,
            ..opts
        },
    );
    for other in [&full, &recomputed] {
        assert_eq!(compact.generated, other.generated, "{what}: tokens");
        assert_eq!(compact.stop, other.stop, "{what}: stop reasons");
        assert_eq!(compact.steps, other.steps, "{what}: steps");
        // A model call over fewer rows may round its GEMMs differently (the CPU GEMM picks
        // its blocking by the row count), so a beam score — a sum of f32 log-probabilities —
        // may differ in its last bits; the tokens above are what must not change.
        assert_eq!(compact.scores.len(), other.scores.len());
        for (a, b) in compact.scores.iter().zip(&other.scores) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{what}: score {a} vs {b}"
            );
        }
    }
    let r = &compact.rows_per_step;
    assert_eq!(r.len(), compact.steps);
    assert_eq!(r[0], rows, "{what}: the prefill runs every row");
    assert!(r.windows(2).all(|w| w[1] <= w[0]), "{what}: {r:?}");
    assert!(full.rows_per_step.iter().all(|&n| n == rows), "{what}");
    // Recomputation drops finished rows as well.
    assert_eq!(&recomputed.rows_per_step, r, "{what}");
    if must_shrink {
        assert!(*r.last().unwrap() < rows, "{what}: rows per step {r:?}");
    }
    eprintln!("{what}: rows per step {r:?}");
}

#[test]
fn bart_greedy_and_sampling_run_only_unfinished_rows_with_identical_tokens() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let inputs = bart_inputs();
    let greedy = GenerateOptions {
        max_new_tokens: 24,
        ..GenerateOptions::default()
    };
    // The fixture's greedy continuations do not reach end-of-text in 24 tokens: all rows
    // run to the end, and the check is that nothing changes.
    check("BART greedy", &m, &inputs, greedy, inputs.len(), false);
    // Sampled rows end at different steps (the tied fixture's end-of-text bias is +2.5):
    // every seed gives the uncompacted tokens, and some seeds end a row early.
    let mut shrunk = 0;
    for seed in 0..8 {
        let sampled = GenerateOptions {
            sampling: Sampling {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed,
            },
            ..greedy
        };
        check(
            &format!("BART sampling seed {seed}"),
            &m,
            &inputs,
            sampled,
            inputs.len(),
            false,
        );
        let g = run(&m, &inputs, &sampled);
        if *g.rows_per_step.last().unwrap() < inputs.len() {
            shrunk += 1;
        }
    }
    // Seed 5 ends a row at step 4 (the other seven run every row to the end).
    assert!(shrunk >= 1, "no seed ended a row early");
}

#[test]
fn bart_beam_search_drops_finished_inputs_beam_groups() {
    let m = Bart::from_folder(&Cpu, &fixture("tiny-bart")).unwrap();
    let inputs = bart_inputs();
    let opts = GenerationConfig::from_folder(&fixture("tiny-bart"))
        .unwrap()
        .apply(GenerateOptions::default(), 1);
    assert_eq!(opts.num_beams, 4);
    let opts = GenerateOptions {
        max_new_tokens: 24,
        num_return_sequences: 2,
        ..opts
    };
    let beams = opts.num_beams;
    // The fixture's searches all run to the maximum length (no group leaves early here; the
    // GPT-2 test below has groups that do).
    check("BART beams", &m, &inputs, opts, inputs.len() * beams, false);
}

/// Tiny GPT-2 (128 positions) with prompts of 2, 5 and 1 tokens and room for more than the
/// context: each row stops when it fills the context, the longest prompt first, so rows leave
/// one by one (greedy) and beam groups leave when their search reaches its own maximum length.
#[test]
fn gpt2_rows_that_fill_the_context_leave_the_batch() {
    let m = Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap();
    let prompts = vec![vec![464, 3290], vec![40, 716, 257, 1310, 11], vec![15496]];
    let greedy = GenerateOptions {
        max_new_tokens: 200,
        ..GenerateOptions::default()
    };
    check("GPT-2 greedy", &m, &prompts, greedy, 3, true);
    let g = run(&m, &prompts, &greedy);
    assert_eq!(g.rows_per_step.iter().filter(|&&n| n == 3).count(), 1 + 122);
    let beams = GenerateOptions {
        num_beams: 2,
        num_return_sequences: 2,
        ..greedy
    };
    check("GPT-2 beams", &m, &prompts, beams, 6, true);
    // Whole groups leave: the row count is always a multiple of num_beams.
    let g = run(&m, &prompts, &beams);
    assert!(
        g.rows_per_step.iter().all(|n| n % 2 == 0),
        "{:?}",
        g.rows_per_step
    );
}

#[test]
fn gpt2_sampling_with_compaction_is_the_uncompacted_sampling() {
    let m = Gpt2::from_folder(&Cpu, &fixture("tiny-gpt2")).unwrap();
    let prompts = vec![vec![464, 3290], vec![40, 716, 257, 1310, 11], vec![15496]];
    let opts = GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            seed: 3,
        },
        ..GenerateOptions::default()
    };
    check("GPT-2 sampling", &m, &prompts, opts, prompts.len(), false);
}
