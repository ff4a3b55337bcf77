//! `cuattn noise --transform mask|delete|infill|permute|rotate [--seed S] [--json] TEXT`:
//! BART's noising transforms (`cuattn::data::noise`) on a text, with words (split on
//! whitespace) as tokens and sentences split after `.`, `!`, `?`.

use super::CliResult;
use cuattn::data::noise::{
    delete_tokens, infill, mask_tokens, permute_sentences, rotate, split_sentences, NoiseOptions,
    Transform,
};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct NoiseArgs {
    /// mask, delete, infill, permute or rotate.
    #[arg(long)]
    transform: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of words masked, deleted or infilled.
    #[arg(long, default_value_t = 0.3)]
    ratio: f64,
    /// Mean span length (words) of text infilling.
    #[arg(long, default_value_t = 3.0)]
    poisson_lambda: f64,
    /// Print one JSON object (input and output words, and the spans / order / start chosen).
    #[arg(long)]
    json: bool,
    text: String,
}

const MASK: &str = "<mask>";

pub fn run(args: NoiseArgs) -> CliResult {
    let transform: Transform = args.transform.parse()?;
    let opts = NoiseOptions {
        ratio: args.ratio,
        poisson_lambda: args.poisson_lambda,
        seed: args.seed,
    };
    opts.validate()?;
    let words: Vec<String> = args.text.split_whitespace().map(str::to_string).collect();
    let starts = vec![true; words.len()];
    let mask = MASK.to_string();
    let mut detail = serde_json::Value::Null;
    let output: Vec<String> = match transform {
        Transform::Mask => mask_tokens(&words, &starts, &mask, &opts)?,
        Transform::Delete => delete_tokens(&words, &opts)?,
        Transform::Infill => {
            let (out, spans) = infill(&words, &starts, &mask, &opts)?;
            detail = serde_json::json!({
                "spans": spans.iter().map(|s| serde_json::json!({"start": s.start, "len": s.len}))
                    .collect::<Vec<_>>()
            });
            out
        }
        Transform::Permute => {
            let sentences: Vec<Vec<String>> = split_sentences(&args.text)
                .iter()
                .map(|s| s.split_whitespace().map(str::to_string).collect())
                .collect();
            let (out, order) = permute_sentences(&sentences, &opts)?;
            detail = serde_json::json!({ "order": order });
            out.concat()
        }
        Transform::Rotate => {
            let (out, start) = rotate(&words, &starts, &opts)?;
            detail = serde_json::json!({ "start": start });
            out
        }
    };
    let text = output.join(" ");
    if args.json {
        let mut v = serde_json::json!({
            "transform": args.transform,
            "seed": args.seed,
            "input": words,
            "output": output,
            "text": text,
        });
        if let serde_json::Value::Object(extra) = detail {
            for (k, x) in extra {
                v[k] = x;
            }
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}
