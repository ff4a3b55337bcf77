//! Every GPU test in one binary (each test binary embeds every kernel's fatbin, and the GPU
//! check carries the binaries to the device under a size limit). Without a GPU each test
//! prints `SKIPPED (no CUDA device)`; with `CUATTN_REQUIRE_GPU=1` that is a failure.

#[path = "../adamw_no_grad/mod.rs"]
mod adamw_no_grad;
mod attention;
mod attention_backward;
mod attention_hopper;
mod decode;
mod embedding;
#[path = "../fixture_files/mod.rs"]
mod fixture_files;
mod foreign_context;
#[path = "../gpt2_cache/mod.rs"]
mod gpt2_cache;
mod graph_decode;
mod graphs;
mod layer_graph;
mod layernorm;
mod runtime;
mod runtime_bart;
mod runtime_gpt1;
mod runtime_gpt2;
mod runtime_gpt_neo;
mod sparse;
mod sparse_backward;
#[path = "../sparse_layouts/mod.rs"]
#[allow(dead_code)] // the CPU tests use the independent element masks too
mod sparse_layouts;
mod train_adamw_no_grad;
mod train_backend;
mod train_models;
mod train_rnn;
mod training_ops;
mod unfused_graph;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Cases of a GPU property test: `PROPTEST_CASES` (the GPU check lowers it under the
/// sanitizers), else `default`.
fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `proptest_cases(default)` values drawn from `strategy` (no failure files:
/// the binary runs on a machine whose tree is thrown away), panicking with proptest's report
/// of the smallest failing case.
fn run_proptest<S: Strategy>(
    name: &str,
    strategy: S,
    default: u32,
    check: impl Fn(S::Value) -> Result<(), String>,
) {
    let mut runner = TestRunner::new(Config {
        cases: proptest_cases(default),
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, |c| check(c).map_err(TestCaseError::fail)) {
        panic!("{name}: {e}");
    }
}
