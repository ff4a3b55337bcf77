#!/usr/bin/env python3
"""Text-generation throughput side by side: `cuattn generate` against Hugging Face transformers'
`generate`, greedy, the same prompt ids, at batch 1 and 8, on two random GPT-2 checkpoints:

- tiny: tests/fixtures/tiny-gpt2 (n_embd 16, 2 layers, GPT-2's 50257-token vocabulary);
- 124m: a GPT-2-124M-shaped random model (n_embd 768, 12 layers, 12 heads, 1024 positions),
  written by this script into --work (default /tmp/cuattn-gpt2-124m, ~500 MB, never committed).

CPU (this machine; needs torch + transformers, e.g. the fixtures venv, and a release build):

    cargo build --release --bin cuattn
    /work/venv-fixtures/bin/python scripts/bench-generate.py

GPU (the device machine, from the bundle; scripts/gpu-check.sh runs it):

    python3 scripts/bench-generate.py --device cuda --dtype f16 --bin gpu-bundle/bin/cuattn

On the GPU both sides store weights and activations in --dtype, and Hugging Face runs twice:
with its default attention (`sdpa`) and with `attn_implementation="eager"` (the issue's "HF
eager" baseline). Our side also runs once without its KV cache (`--recompute`), to show what
the cache buys.

Each side is timed on the generation call only (model loading and tokenization excluded; our
side reads the time `cuattn generate --timing` prints, after a `--warmup` call that loads the
kernels); the sides alternate and each keeps its best of --repeats runs. tokens/s = generated
tokens (all sequences) / seconds. The prompt ids come from our tokenizer (`--json` prints them)
and are fed to both sides, so Hugging Face needs no tokenizer files. HF pads the batch on the
left with the attention mask; cuattn pads on the right and keeps per-sequence positions (the
same arithmetic). The greedy ids are compared and the count of sequences that agree is printed,
so a fast wrong answer shows (on the 124M-shaped random model, whose logits have tiny margins,
a rounding difference may legitimately flip a late token, more so in f16).
"""
import argparse
import json
import os
import platform
import re
import subprocess
import time

import torch
import transformers
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
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def make_124m(folder):
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def hf_run(model, ids_list, max_new, device):
    n = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), n), 50256, dtype=torch.long)
    mask = torch.zeros((len(ids_list), n), dtype=torch.long)
    for b, x in enumerate(ids_list):
        ids[b, n - len(x):] = torch.tensor(x)
        mask[b, n - len(x):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, pad_token_id=50256)
    sync(device)
    dt = time.perf_counter() - t0
    return dt, out[:, n:].tolist()


def ours(binary, folder, prompts, max_new, device, dtype, extra=()):
    cmd = [binary, "generate", "--device", device, "--dtype", dtype, "--model", folder,
           "--max-new-tokens", str(max_new), "--json", "--timing", "--warmup", *extra]
    for p in prompts:
        cmd += ["--prompt", p]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cuattn generate failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    m = re.search(r"in ([0-9.]+) s", r.stderr)
    out = json.loads(r.stdout)
    single = len(prompts) == 1
    gen = [out["generated_ids"]] if single else out["generated_ids"]
    ids = [out["prompt_ids"]] if single else out["prompt_ids"]
    return float(m.group(1)), gen, ids


def best(f, repeats):
    result = None
    for _ in range(repeats):
        r = f()
        if result is None or r[0] < result[0]:
            result = r
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("--work", default="/tmp/cuattn-gpt2-124m")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,124m")
    args = ap.parse_args()
    dev, dt = args.device, args.dtype
    if dev == "cpu" and dt != "f32":
        raise SystemExit("the CPU backend computes in f32: --dtype f32 on the CPU")
    folders = {"tiny": os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2"), "124m": args.work}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "(no git)"
    card = torch.cuda.get_device_name(0) if dev == "cuda" else (platform.processor() or platform.machine())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {dev} {dt}, "
          f"{card}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{args.max_new_tokens} new tokens per sequence, best of {args.repeats}")
    impls = ["sdpa", "eager"] if dev == "cuda" else ["sdpa"]
    print("| model | batch | HF " + " | HF ".join(impls) + " (tokens/s) | cuattn (tokens/s) | "
          "cuattn recompute | ratio vs HF " + impls[-1] + " | greedy ids equal |")
    print("|---|---|" + "---|" * len(impls) + "---|---|---|---|", flush=True)
    for name in args.models.split(","):
        folder = folders[name]
        if name == "124m":
            make_124m(folder)
        models = {}
        for impl in impls:
            m = GPT2LMHeadModel.from_pretrained(folder, attn_implementation=impl)
            models[impl] = m.to(dev, TORCH_DTYPES[dt]).eval()
        for batch in (1, 8):
            prompts = PROMPTS[:batch]
            _, _, ids = ours(args.bin, folder, prompts, 2, dev, dt)
            hf_tps, hf_gen = {}, None
            for impl, m in models.items():
                hf_run(m, ids, 2, dev)  # warm-up
                s, gen = best(lambda: hf_run(m, ids, args.max_new_tokens, dev), args.repeats)
                hf_tps[impl] = batch * args.max_new_tokens / s
                hf_gen = hf_gen or gen
            s, our_gen, _ = best(lambda: ours(args.bin, folder, prompts, args.max_new_tokens, dev, dt),
                                 args.repeats)
            n_ours = sum(len(g) for g in our_gen)
            our_tps = n_ours / s
            s_re, _, _ = ours(args.bin, folder, prompts, args.max_new_tokens, dev, dt, ["--recompute"])
            equal = sum(a == b[: len(a)] for a, b in zip(our_gen, hf_gen))
            cols = " | ".join(f"{hf_tps[i]:.1f}" for i in impls)
            print(f"| {name} | {batch} | {cols} | {our_tps:.1f} | {n_ours / s_re:.1f} | "
                  f"{our_tps / hf_tps[impls[-1]]:.2f} | {equal}/{batch} |", flush=True)


if __name__ == "__main__":
    main()
