//! Fine-tuning BERT for sequence classification, the library side of `cuattn finetune` and
//! `cuattn classify`:
//! - [`data`]: labelled text files (`.tsv`, `.csv`, `.jsonl`) and label sets;
//! - [`schedule`]: the Hugging Face Trainer's learning-rate schedules;
//! - [`trainer`]: the training loop (batches, gradient accumulation, AdamW, clipping,
//!   evaluation) over the training runtime's `BertForSequenceClassification`;
//! - [`export`]: the Hugging Face folder a run writes;
//! - [`train_log`]: `train_log.csv` and `loss.png`;
//! - [`classify`]: inference with a classification folder on any backend.

pub mod classify;
pub mod data;
pub mod export;
pub mod schedule;
pub mod session;
pub mod train_log;
pub mod trainer;
