//! `cuattn fill-mask --model DIR [--top-k K] [--json] "text with [MASK]"`: the most likely
//! tokens at each `[MASK]` with a `BertForMaskedLM` / `BertForPreTraining` folder
//! (config.json, model.safetensors, tokenizer.json), as Hugging Face's fill-mask pipeline
//! gives them. Runs on the CPU.

use super::CliResult;
use cuattn::runtime::bert_pretraining::{fill_mask, BertPretraining};
use cuattn::runtime::Cpu;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct FillMaskArgs {
    #[arg(long)]
    model: std::path::PathBuf,
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Print the pipeline's JSON: a list of {score, token, token_str, sequence} (a list of
    /// such lists when the text has several masks).
    #[arg(long)]
    json: bool,
    text: String,
}

pub fn run(args: FillMaskArgs) -> CliResult {
    if args.top_k == 0 {
        return Err(cuattn::Error::invalid("top_k", "must be ≥ 1").into());
    }
    let path = args.model.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| cuattn::Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
    let model = BertPretraining::from_folder(&Cpu, &args.model)?;
    let result = fill_mask(&Cpu, &model, &tokenizer, &args.text, args.top_k)?;
    if args.json {
        let lists: Vec<serde_json::Value> = result
            .iter()
            .map(|per_mask| {
                serde_json::Value::Array(
                    per_mask
                        .iter()
                        .map(|p| {
                            serde_json::json!({
                                "score": p.score,
                                "token": p.token,
                                "token_str": p.token_str,
                                "sequence": p.sequence,
                            })
                        })
                        .collect(),
                )
            })
            .collect();
        let v = if lists.len() == 1 {
            lists.into_iter().next().unwrap_or_default()
        } else {
            serde_json::Value::Array(lists)
        };
        println!("{}", serde_json::to_string(&v)?);
    } else {
        for (i, per_mask) in result.iter().enumerate() {
            if result.len() > 1 {
                println!("mask {}:", i + 1);
            }
            for p in per_mask {
                println!("{:.4}  {:<12} {}", p.score, p.token_str, p.sequence);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
