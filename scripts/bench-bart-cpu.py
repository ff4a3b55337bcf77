#!/usr/bin/env python3
"""BART generation throughput on the CPU, side by side: `cuattn generate` against Hugging Face
transformers' `BartForConditionalGeneration.generate`, greedy and 4-beam, the same encoder ids,
at batch 1 and 4, on a BART-base-shaped random model (d_model 768, 6 + 6 layers, 12 heads, FFN
3072, 50265-token vocabulary, 1024 positions) written by this script into --work (default
/tmp/cuattn-bart-base, ~560 MB, never committed). Follows scripts/bench-generate.py (whose
timing and peak-RSS helpers it loads):

    cargo build --release --bin cuattn
    /work/fxvenv/bin/python scripts/bench-bart-cpu.py

The folder's tokenizer is the tiny BART fixture's byte-level BPE, its vocabulary padded with
placeholder tokens to BART-base's 50265 (BART-base's own tokenizer files are not needed for a
speed test): our tokenizer makes the encoder ids (`--json` prints them) and both sides get those ids. The
generation_config.json turns off what would make the two sides' lengths differ (no forced EOS,
no n-gram blocking), and every run asks for exactly --max-new-tokens tokens (`min_new_tokens`
equal to it), so tokens/s = batch·max_new_tokens / seconds, and the generated ids are compared
(a random model's logits have small margins: a rounding difference may flip a late token).
Beam search: both sides return the best hypothesis per input.

Each side is timed on the generation call only (our side: `--timing` after a `--warmup`
call; HF: around `generate`), the sides alternate, and the table gives each side's best and
median of --repeats runs.
"""
import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import transformers
from transformers import BartConfig, BartForConditionalGeneration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no scripts/__pycache__ from loading bench-generate.py
_spec = importlib.util.spec_from_file_location(
    "bench_generate", os.path.join(ROOT, "scripts", "bench-generate.py"))
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)

TEXTS = [
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "BART joins a bidirectional encoder with an autoregressive decoder.",
    "A man is eating food. A man is riding a horse. The girl is carrying a baby.",
    "Hello world!",
]
GENERATION = {"decoder_start_token_id": 2, "bos_token_id": 0, "eos_token_id": 2,
              "pad_token_id": 1, "forced_eos_token_id": None, "forced_bos_token_id": None,
              "no_repeat_ngram_size": 0, "length_penalty": 1.0, "early_stopping": False,
              "num_beams": 1}


def make_bart_base(folder):
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                        encoder_attention_heads=12, decoder_attention_heads=12,
                        encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
                        activation_function="gelu", scale_embedding=False,
                        tie_word_embeddings=True, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    BartForConditionalGeneration(config).eval().save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(GENERATION, f, indent=2)


def write_tokenizer(folder, vocab_size=50265):
    """The tiny fixture's BPE with its vocabulary padded to the model's by tokens `<xN>` (no
    merges make them, but the random model generates their ids and our CLI decodes them)."""
    with open(os.path.join(ROOT, "tests", "fixtures", "tiny-bart", "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    n = len(vocab)
    for i in range(n, vocab_size):
        assert f"<x{i}>" not in vocab
        vocab[f"<x{i}>"] = i
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tok, f)


def hf_run(model, ids_list, max_new, beams):
    n = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), n), 1, dtype=torch.long)
    mask = torch.zeros((len(ids_list), n), dtype=torch.long)
    for b, x in enumerate(ids_list):
        ids[b, :len(x)] = torch.tensor(x)
        mask[b, :len(x)] = 1
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, num_beams=beams,
                             max_new_tokens=max_new, min_new_tokens=max_new)
    dt = time.perf_counter() - t0
    return dt, out[:, 1:].tolist()


def ours(binary, folder, texts, max_new, beams):
    cmd = [binary, "generate", "--device", "cpu", "--model", folder, "--max-new-tokens",
           str(max_new), "--min-new-tokens", str(max_new), "--num-beams", str(beams), "--json",
           "--timing", "--warmup"]
    for t in texts:
        cmd += ["--prompt", t]
    returncode, stdout, stderr, peak = bench_generate.peak_rss_run(cmd)
    if returncode != 0:
        raise SystemExit(f"cuattn generate failed ({returncode}): {stderr.strip()[-2000:]}")
    secs = float(re.search(r"in ([0-9.]+) s", stderr).group(1))
    out = json.loads(stdout)
    single = len(texts) == 1
    gen = [out["generated_ids"]] if single else out["generated_ids"]
    ids = [out["prompt_ids"]] if single else out["prompt_ids"]
    return secs, gen, ids, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("--work", default="/tmp/cuattn-bart-base")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    make_bart_base(args.work)
    write_tokenizer(args.work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "(no git)"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, cpu f32, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, BART-base shape (random), "
          f"{args.max_new_tokens} new tokens per sequence, {args.repeats} alternating runs per side")
    print("| search | batch | HF best/median (tokens/s) | cuattn best/median | ratio best/median "
          "| ids equal to HF | cuattn peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    model = BartForConditionalGeneration.from_pretrained(args.work, attn_implementation="sdpa")
    model = model.eval()
    for beams in (1, 4):
        for batch in (int(b) for b in args.batches.split(",")):
            texts = TEXTS[:batch]
            _, _, ids, _ = ours(args.bin, args.work, texts, 2, beams)
            hf_run(model, ids, 2, beams)  # warm-up
            hf_times, our_times, hf_gen, our_gen, rss = [], [], None, None, 0
            for _ in range(args.repeats):
                s, hf_gen = hf_run(model, ids, args.max_new_tokens, beams)
                hf_times.append(s)
                s, our_gen, _, peak = ours(args.bin, args.work, texts, args.max_new_tokens, beams)
                our_times.append(s)
                rss = max(rss, peak)
            n = batch * args.max_new_tokens
            hf_tps = (n / min(hf_times), n / statistics.median(hf_times))
            our_tps = (sum(map(len, our_gen)) / min(our_times),
                       sum(map(len, our_gen)) / statistics.median(our_times))
            equal = sum(a == b[:len(a)] for a, b in zip(our_gen, hf_gen))
            name = "greedy" if beams == 1 else f"{beams}-beam"
            print(f"| {name} | {batch} | {hf_tps[0]:.1f} / {hf_tps[1]:.1f} | {our_tps[0]:.1f} / "
                  f"{our_tps[1]:.1f} | {our_tps[0] / hf_tps[0]:.2f} / {our_tps[1] / hf_tps[1]:.2f} "
                  f"| {equal}/{batch} | {rss / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
