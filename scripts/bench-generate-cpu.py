#!/usr/bin/env python3
"""CPU text-generation throughput, side by side on this machine: `cuattn generate --device cpu`
against Hugging Face transformers' `generate` on PyTorch CPU, greedy, the same prompts, at
batch 1 and 8, on two random GPT-2 checkpoints:

- tiny: tests/fixtures/tiny-gpt2 (n_embd 16, 2 layers, GPT-2's 50257-token vocabulary);
- 124m: a GPT-2-124M-shaped random model (n_embd 768, 12 layers, 12 heads, 1024 positions),
  written by this script into --work (default /tmp/cuattn-gpt2-124m, ~500 MB, never committed).

Needs torch + transformers + tokenizers (the fixtures venv) and a release build:

    cargo build --release --bin cuattn
    /work/venv-fixtures/bin/python scripts/bench-generate-cpu.py

Each side is timed on the generation call only (model loading and tokenization excluded; our
side reads the time `cuattn generate --timing` prints); the sides alternate and each keeps its
best of --repeats runs. tokens/s = generated tokens (all sequences) / seconds. HF pads the
batch on the left with the attention mask; cuattn pads on the right and keeps per-sequence
positions (the same arithmetic). The greedy ids are compared and the count of sequences that
agree is printed, so a fast wrong answer shows (on the 124M-shaped random model, whose logits
have tiny margins, an f32 rounding difference may legitimately flip a late token).
"""
import argparse
import glob
import json
import os
import platform
import re
import subprocess
import time

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, my dog is cute",
    "In 1905, Albert Einstein published four papers that",
    "Attention is all you need",
    "Once upon a time, in a small village by the sea, there lived",
    "The capital of France is",
    "def fibonacci(n):",
    "Rust and CUDA",
]


def gpt2_tokenizer():
    hits = sorted(glob.glob(os.path.expanduser(
        "~/.cargo/registry/src/*/tiktoken-rs-*/assets/encoder.json")))
    if not hits:
        raise SystemExit("no tiktoken-rs assets in ~/.cargo/registry (run cargo fetch)")
    d = os.path.dirname(hits[-1])
    tok = Tokenizer(models.BPE.from_file(os.path.join(d, "encoder.json"),
                                         os.path.join(d, "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def make_124m(folder):
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)


def hf_run(model, ids_list, max_new):
    n = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), n), 50256, dtype=torch.long)
    mask = torch.zeros((len(ids_list), n), dtype=torch.long)
    for b, x in enumerate(ids_list):
        ids[b, n - len(x):] = torch.tensor(x)
        mask[b, n - len(x):] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             pad_token_id=50256)
    dt = time.perf_counter() - t0
    gen = []
    for row in out[:, n:].tolist():
        if 50256 in row:  # a finished sequence is padded with eos after its eos
            row = row[: row.index(50256) + 1]
        gen.append(row)
    return dt, gen


def ours_run(binary, folder, prompts, max_new):
    cmd = [binary, "generate", "--device", "cpu", "--model", folder, "--max-new-tokens",
           str(max_new), "--json", "--timing"]
    for p in prompts:
        cmd += ["--prompt", p]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"in ([0-9.]+) s", r.stderr)
    out = json.loads(r.stdout)
    gen = out["generated_ids"] if len(prompts) > 1 else [out["generated_ids"]]
    return float(m.group(1)), gen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("--work", default="/tmp/cuattn-gpt2-124m")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,124m")
    args = ap.parse_args()
    tok = gpt2_tokenizer()
    folders = {"tiny": os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2"), "124m": args.work}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print("| model | batch | new tokens/seq | HF tokens/s | cuattn tokens/s | ratio | greedy ids equal |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        folder = folders[name]
        if name == "124m":
            make_124m(folder)
        model = GPT2LMHeadModel.from_pretrained(folder).eval()
        for batch in (1, 8):
            prompts = PROMPTS[:batch]
            ids = [tok.encode(p).ids for p in prompts]
            hf_run(model, ids, 2)  # warm-up
            best_hf, best_ours = float("inf"), float("inf")
            for _ in range(args.repeats):
                dt, hf_gen = hf_run(model, ids, args.max_new_tokens)
                best_hf = min(best_hf, dt)
                dt, our_gen = ours_run(args.bin, folder, prompts, args.max_new_tokens)
                best_ours = min(best_ours, dt)
            n_hf = sum(len(g) for g in hf_gen)
            n_ours = sum(len(g) for g in our_gen)
            equal = sum(a == b for a, b in zip(hf_gen, our_gen))
            hf_tps, our_tps = n_hf / best_hf, n_ours / best_ours
            print(f"| {name} | {batch} | {args.max_new_tokens} | {hf_tps:.1f} | {our_tps:.1f} | "
                  f"{our_tps / hf_tps:.2f} | {equal}/{batch} |", flush=True)


if __name__ == "__main__":
    main()
