//! A small transformer runtime on top of the kernels: a model is written once against
//! [`Backend`] and runs on the CPU ([`cpu::Cpu`], f32) or the GPU (`cuda::Cuda`, feature
//! `cuda`: cuBLAS GEMMs, cuattn's attention and LayerNorm kernels, f32/f16/bf16).
//!
//! - [`backend`]: the op interface and its small types (activations, head views, masks).
//! - [`cpu`], `cuda`: the two backends ([`cpu::CpuBf16`]: the CPU one with bf16 weights).
//! - [`layers`]: building blocks (linear, LayerNorm, feed-forward, positional encodings,
//!   attention: basic, single-head, multi-head self/cross/masked, with a KV-cache hook).
//! - [`checkpoint`]: Hugging Face folders (`config.json`, memory-mapped `model.safetensors`);
//!   [`config`]: typed, range-checked config fields; [`folder`]: bounded reads of a folder's
//!   files and paths that stay inside it.
//! - [`tokenizer`]: `tokenizer.json` with sentence-transformers' padding and truncation.
//! - [`bert`]: BERT encoder and pooler.
//! - [`pooling`], [`sentence`]: sentence-transformers pooling/normalize and the embedder.
//! - [`gpt2`], [`gpt2_tokenizer`], [`generate`]: GPT-2 language model, its byte-level BPE, and
//!   text generation (sampling, batches of prompts), [`kv_cache`]: its host and device caches.
//! - [`gpt_neo`]: GPT-Neo (GPT-3's alternating dense and local attention); [`gpt1`],
//!   [`gpt1_tokenizer`]: GPT-1 (post-LayerNorm) and its lower-casing `</w>` BPE;
//!   [`decoder_only`]: the decoder-only stack they share with GPT-2.
//! - [`train`]: gradients (the [`train::TrainBackend`] ops, every layer's backward, a
//!   trainable `BertForSequenceClassification`, AdamW); the CPU side in `cpu_train.rs`, the
//!   CUDA side in `cuda_train/`.

pub mod backend;
pub mod bart;
pub mod beam;
pub mod bert;
pub mod bert_pretraining;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "testing")]
pub mod conformance;
pub mod cpu;
mod cpu_train;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_train;
pub mod decoder_only;
pub mod folder;
pub mod generate;
pub mod generation_config;
pub mod gpt1;
pub mod gpt1_tokenizer;
pub mod gpt2;
pub mod gpt2_tokenizer;
pub mod gpt_neo;
pub mod graph_step;
pub(crate) mod host_memory;
pub mod kv_cache;
pub mod layers;
pub mod pooling;
pub mod sentence;
pub mod seq2seq;
pub mod tokenizer;
pub mod train;

pub use backend::{Activation, AttentionMask, Backend, CausalAlign, Heads, WeightUse};
pub use cpu::{Cpu, CpuBf16, CpuTensor};
