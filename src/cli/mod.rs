//! Subcommands that live in their own files (the older ones are still in main.rs).

pub mod classify;
pub mod finetune;
