#!/usr/bin/env python3
"""One-off check (not run by CI): Hugging Face loads the GPT-Neo folder that
`examples/seq2seq.rs --task text` saves, and its logits equal ours.

    cargo run --release --example seq2seq -- --arch gpt3-sparse --task text --steps N
    /path/to/python scripts/check_gpt_neo_export.py target/seq2seq/gpt3-sparse-text \
        target/seq2seq/gpt3-sparse-text-logits.json

Loads the folder with `GPTNeoForCausalLM.from_pretrained` and its tokenizer with
`AutoTokenizer.from_pretrained`, runs the ids of the JSON file (the trained model's own logits
on the first context of the validation text, written by the example) and prints the largest
absolute difference of the logits, relative to their largest magnitude. Also checks that the
tokenizer encodes text as its UTF-8 bytes, as our byte-level vocabulary defines, and that
making every layer global changes the logits (the window is in use).
"""
import json
import sys

import torch
from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM


def main():
    folder, logits_path = sys.argv[1], sys.argv[2]
    ref = json.load(open(logits_path))
    ids = torch.tensor([ref["ids"]])
    ours = torch.tensor(ref["logits"], dtype=torch.float64)
    model = GPTNeoForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(ids).logits[0].double()
    diff = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    print(f"logits {tuple(theirs.shape)}: max |HF - ours| = {diff:.3e} (largest |logit| {scale:.3f}, relative {diff / scale:.3e})")
    print(f"argmax agreement: {(theirs.argmax(-1) == ours.argmax(-1)).double().mean().item():.4f}")

    tok = AutoTokenizer.from_pretrained(folder)
    text = "In the beginning God created the heaven and the earth. \u00e9"
    enc = tok(text)["input_ids"]
    print(f"tokenizer {type(tok).__name__}: encodes as UTF-8 bytes: {enc == list(text.encode())}")
    print(f"tokenizer round trip: {tok.decode(enc) == text}")

    window = model.config.window_size
    layers = model.config.num_layers
    config = GPTNeoConfig.from_pretrained(folder)
    config.attention_types = [[["global"], layers]]
    config.attention_layers = ["global"] * layers
    dense_model = GPTNeoForCausalLM.from_pretrained(
        folder, config=config, torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        dense = dense_model(ids).logits[0].double()
    print(f"all-global logits differ by {(dense - theirs).abs().max().item():.3e} (sequence of {ids.shape[1]} > window {window})")
    ok = diff <= 1e-4 * max(scale, 1.0)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
