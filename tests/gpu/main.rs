//! Every GPU test in one binary (each test binary embeds every kernel's fatbin, and the GPU
//! check carries the binaries to the device under a size limit). Without a GPU each test
//! prints `SKIPPED (no CUDA device)`; with `CUATTN_REQUIRE_GPU=1` that is a failure.

mod attention;
mod decode;
mod layernorm;
mod runtime;
mod runtime_gpt2;
mod sparse;
#[path = "../sparse_layouts/mod.rs"]
#[allow(dead_code)] // the CPU tests use the independent element masks too
mod sparse_layouts;
