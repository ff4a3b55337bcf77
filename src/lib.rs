//! cuattn: hand-written CUDA kernels for attention and the ops around it, each with a CPU
//! reference it is tested against, and a small transformer runtime on top.
//!
//! Layout of the crate:
//! - [`error`], [`dtype`], [`tensor`]: the one error type, element types, shapes and strides.
//! - [`reference`]: CPU references in f64 for every kernel.
//! - [`rng`]: Philox4x32-10 and the dropout mask, bit-identical on the CPU and the GPU.
//! - [`key_band`]: the keys a query row may see under key length, causal and sliding window.
//! - [`sparse`]: block-sparse attention layouts (which key blocks each query block keeps).
//! - [`tolerance`]: the one rule by which a kernel's output is compared with its reference.
//! - [`training`]: host-side plans of the training-op kernels (chunk tables, token groups).
//! - [`twin`]: CPU twins that run each kernel's own block loop in f32.
//! - `gpu` (feature `cuda`): the device layer: context, stream, modules, device tensors.
//! - `ops` (feature `cuda`): safe wrappers that validate inputs and launch the kernels.
//! - `bench` (feature `cuda`): timing with CUDA events and the benchmark of each kernel family.
//! - `check` (feature `cuda`): each kernel against its reference on random inputs.
//! - [`kernels`]: what the build compiled: kernel names and ptxas' resource report.
//! - [`data`]: training-data transforms (BART's noising).
//! - [`runtime`]: a small transformer runtime (CPU and CUDA backends, Hugging Face
//!   checkpoints, BERT sentence embeddings).
//! - [`finetune`]: fine-tuning BERT for sequence classification (data files, schedules, the
//!   training loop, Hugging Face output folders) and classification inference.

pub mod data;
pub mod dtype;
pub mod error;
pub mod finetune;
pub mod kernels;
pub mod key_band;
pub mod reference;
pub mod rng;
pub mod runtime;
pub mod sparse;
pub mod tensor;
pub mod tolerance;
pub mod training;
pub mod twin;

#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod check;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod ops;

pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::{HostTensor, Layout};
