#!/usr/bin/env python3
"""CPU sentence-embedding throughput, side by side on this machine: `cuattn embed --device cpu`
against sentence-transformers on PyTorch CPU, all-MiniLM-L6-v2, batch 32, the same sentences.
Needs torch + sentence-transformers (e.g. the fixtures venv) and a release build:

    cargo build --release --bin cuattn && python3 scripts/bench-embed-cpu.py

Sentences: N deterministic sentences of 13-41 common one-token words (15-43 tokens). Each
side is timed on the embedding call only (model loading excluded); the sides alternate and
each side's best of REPEATS runs counts; our side reads the time `cuattn embed --timing`
prints. Both use every core (torch's default
intra-op threads; rayon's default pool) unless --threads sets both. The two outputs are compared (worst cosine) so a
fast wrong answer cannot pass unnoticed.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = ("the cat sat on a mat and dog ran to house with red door in small town near river "
         "old man saw bird fly over green hill under blue sky").split()


def sentences(n):
    out = []
    for i in range(n):
        words = 13 + (i * 7) % 29
        out.append(" ".join(VOCAB[(i * 5 + w * 3 + w // 4) % len(VOCAB)] for w in range(words)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("-n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both sides (torch.set_num_threads, RAYON_NUM_THREADS); "
                         "0: each side's default (every core)")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env["RAYON_NUM_THREADS"] = str(args.threads)
    texts = sentences(args.n)

    st = SentenceTransformer(args.model, device="cpu")
    st.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(texts) + "\n")
        path = f.name
    # The two sides alternate, so load from anything else on the machine hits both alike;
    # each side's best run counts.
    st_best = ours_best = float("inf")
    try:
        for _ in range(args.repeats):
            t = time.perf_counter()
            st_emb = st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)
            st_best = min(st_best, time.perf_counter() - t)
            r = subprocess.run(
                [args.bin, "embed", "--model", args.model, "--device", "cpu", "--batch-size",
                 str(args.batch_size), "--input", path, "--json", "--timing"],
                check=True, capture_output=True, text=True, env=env)
            secs = float(re.search(r"in ([0-9.]+) s", r.stderr).group(1))
            ours_best = min(ours_best, secs)
            ours_emb = np.array(json.loads(r.stdout)["embeddings"], dtype=np.float64)
    finally:
        os.unlink(path)

    a = ours_emb / np.linalg.norm(ours_emb, axis=1, keepdims=True)
    b = st_emb.astype(np.float64)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    worst_cos = float((a * b).sum(axis=1).min())
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "our_threads": args.threads or os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "sentences": args.n,
        "batch_size": args.batch_size,
        "ours_sentences_per_s": args.n / ours_best,
        "sentence_transformers_sentences_per_s": args.n / st_best,
        "ratio": st_best / ours_best,
        "worst_cosine": worst_cos,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
