//! cuattn: hand-written CUDA kernels for attention and the ops around it, each with a CPU
//! reference it is tested against, and a small transformer runtime on top.
//!
//! Layout of the crate:
//! - [`error`], [`dtype`], [`tensor`]: the one error type, element types, shapes and strides.
//! - [`attention_types`]: `CausalAlign` and `Shape`, shared by every attention layer below.
//! - [`reference`]: CPU references in f64 for every kernel.
//! - [`rng`]: Philox4x32-10 and the dropout mask, bit-identical on the CPU and the GPU.
//! - [`key_band`]: the keys a query row may see under key length, causal and sliding window.
//! - [`sparse`]: block-sparse attention layouts (which key blocks each query block keeps).
//! - `tolerance` (feature `testing`): the one rule by which a kernel's output is compared
//!   with its reference.
//! - [`training`]: host-side plans of the training-op kernels (chunk tables, token groups).
//! - `twin` (feature `testing`): CPU twins that run each kernel's own block loop in f32.
//! - [`decode_plan`]: the decode kernel's launch geometry and split planner (the op's and the
//!   twin's).
//! - `gpu` (feature `cuda`): the device layer: context, stream, modules, device tensors.
//! - `ops` (feature `cuda`): safe wrappers that validate inputs and launch the kernels.
//! - `bench` (features `cuda` + `testing`): timing with CUDA events and the benchmark of each
//!   kernel family.
//! - `check` (features `cuda` + `testing`): each kernel against its reference on random inputs.
//! - `candle` (feature `candle`): the ops as candle `CustomOp`s (CPU path; kernels with
//!   `candle-cuda`).
//! - [`kernels`]: what the build compiled: kernel names and ptxas' resource report.
//! - [`data`]: training-data transforms (BART's noising).
//! - [`runtime`]: a small transformer runtime (CPU and CUDA backends, Hugging Face
//!   checkpoints, BERT sentence embeddings).
//! - [`plots`]: benchmark records drawn as PNG (bar panels per run, a roofline of the GPU
//!   reports).
//! - [`finetune`]: fine-tuning BERT for sequence classification (data files, schedules, the
//!   training loop, Hugging Face output folders) and classification inference.

mod activation;
pub mod attention_types;
pub mod data;
pub mod decode_plan;
pub mod dtype;
pub mod error;
pub mod finetune;
pub mod kernels;
pub mod key_band;
pub mod plots;
pub mod reference;
pub mod rng;
pub mod runtime;
pub mod sparse;
pub mod tensor;
pub mod training;

#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod ops;

// Test scaffolding (feature `testing`): what the test suites, the benches and the CLI's
// `check`/`bench` commands use; not part of the embedding API.
#[cfg(all(feature = "cuda", feature = "testing"))]
pub mod bench;
#[cfg(all(feature = "cuda", feature = "testing"))]
pub mod check;
#[cfg(feature = "testing")]
pub mod tolerance;
#[cfg(feature = "testing")]
pub mod twin;

pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::{HostTensor, Layout};
