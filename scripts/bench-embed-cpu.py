#!/usr/bin/env python3
"""CPU sentence-embedding throughput, side by side on this machine: `cuattn embed --device cpu`
against sentence-transformers on PyTorch CPU, all-MiniLM-L6-v2, batch 32, the same sentences.
Needs torch + sentence-transformers (e.g. the fixtures venv) and a release build:

    cargo build --release --bin cuattn && python3 scripts/bench-embed-cpu.py

Sentence sets (deterministic, seeded; words drawn from a list of common English words, a few of
which the tokenizer splits):
- mixed: N sentences of 5-90 words (uniform), the long-tailed mix a batch job sees;
- short: N sentences of 10-20 words.

Thread settings: 0 = each side's default (every core: torch's intra-op pool, rayon's global
pool), 1 = one thread each (torch.set_num_threads(1), RAYON_NUM_THREADS=1).

Each side is timed on the embedding call only (model loading excluded; our side reads the time
`cuattn embed --timing` prints). Every (set, threads) case runs once per round, the two sides
back to back, and the rounds repeat, so load from anything else on the machine hits both sides
alike; the table gives each side's best and median over the rounds, and the ratio of the bests
and of the medians. The outputs are compared (worst cosine over all sentences) so a fast wrong
answer cannot pass; the script exits non-zero when it is below 0.9999.

The header also gives PyTorch's own GEMM speed on a MiniLM feed-forward shape, so the
reader can see which MKL code ran: on an AMD CPU, MKL keeps to AVX2 unless the script runs
under `scripts/mkl-any-cpu.sh`, which lets it use the AVX-512 kernels an Intel CPU gets.

Our process's peak resident memory (model loading included) is measured with GNU time
(`/usr/bin/time -f %M`, when present) and printed beside the size of model.safetensors.
"""
import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which an are "
    "have had not were but been one all would there their has more when who will no if out so "
    "said what up its about into than them can only other new some could time these two may "
    "first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great "
    "old year off come since against go came right used take three himself few house use "
    "during without again place around however home small found thought went say part once "
    "general high upon school every government united keep children interesting photosynthesis "
    "transformer embeddings tokenizer electroencephalography unbelievable"
).split()


def sentences(kind, n):
    rng = random.Random(17 if kind == "mixed" else 23)
    lo, hi = (5, 90) if kind == "mixed" else (10, 20)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
        out.append(" ".join(words).capitalize() + ".")
    return out


GNU_TIME = next((t for t in ("/usr/bin/time", shutil.which("gtime")) if t and os.access(t, os.X_OK)), None)


def torch_gemm_gflops(threads):
    """Best of 10 `F.linear` calls on 3072 tokens, 384 -> 1536 (MiniLM's FFN up-projection)."""
    torch.set_num_threads(threads)
    x, w = torch.randn(3072, 384), torch.randn(1536, 384)
    best = float("inf")
    for i in range(13):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * 3072 * 384 * 1536 / best / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("-n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sets", default="mixed,short")
    ap.add_argument("--threads", default="0,1",
                    help="comma-separated thread settings for both sides; 0 = every core")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    st = SentenceTransformer(args.model, device="cpu")
    cases = [(s, int(t)) for s in args.sets.split(",") for t in args.threads.split(",")]
    texts = {s: sentences(s, args.n) for s in args.sets.split(",")}
    paths = {}
    for s, t in texts.items():
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(t) + "\n")
            paths[s] = f.name
    st.encode(texts[cases[0][0]][: args.batch_size], batch_size=args.batch_size)  # warm-up
    gemm = {t: torch_gemm_gflops(t or default_threads) for t in sorted({c[1] for c in cases})}
    times = {c: ([], []) for c in cases}
    peak_kib = {c: 0 for c in cases}
    worst = {c: 1.0 for c in cases}
    try:
        for _ in range(args.rounds):
            for case in cases:
                kind, threads = case
                torch.set_num_threads(threads or default_threads)
                env = dict(os.environ)
                if threads:
                    env["RAYON_NUM_THREADS"] = str(threads)
                t0 = time.perf_counter()
                st_emb = st.encode(texts[kind], batch_size=args.batch_size, convert_to_numpy=True)
                times[case][1].append(time.perf_counter() - t0)
                cmd = [args.bin, "embed", "--model", args.model, "--device", "cpu", "--batch-size",
                       str(args.batch_size), "--input", paths[kind], "--json", "--timing"]
                with tempfile.NamedTemporaryFile("r") as rss:
                    if GNU_TIME:
                        cmd = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd]
                    r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                    kib = rss.read().split()
                    if kib and kib[-1].isdigit():
                        peak_kib[case] = max(peak_kib[case], int(kib[-1]))
                times[case][0].append(float(re.search(r"in ([0-9.]+) s", r.stderr).group(1)))
                ours = np.array(json.loads(r.stdout)["embeddings"], dtype=np.float64)
                a = ours / np.linalg.norm(ours, axis=1, keepdims=True)
                b = st_emb.astype(np.float64)
                b /= np.linalg.norm(b, axis=1, keepdims=True)
                worst[case] = min(worst[case], float((a * b).sum(axis=1).min()))
    finally:
        for p in paths.values():
            os.unlink(p)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"load {os.getloadavg()[0]:.1f} at end, torch {torch.__version__}, "
          f"{args.n} sentences per set, batch {args.batch_size}, {args.rounds} rounds")
    ckpt = os.path.getsize(os.path.join(args.model, "model.safetensors"))
    print(f"# model.safetensors {ckpt / 2**20:.1f} MiB; our peak RSS is GNU time's maximum "
          "resident set over the rounds" + ("" if GNU_TIME else " (not measured: no GNU time)"))
    shim = "mkl-any-cpu" in os.environ.get("LD_PRELOAD", "")
    print("# PyTorch's F.linear, 3072x384 -> 1536: " + ", ".join(
        f"{g:.0f} GFLOP/s on {t or f'all ({default_threads})'} thread(s)" for t, g in gemm.items())
        + ("; MKL allowed its AVX-512 kernels (scripts/mkl-any-cpu.sh)" if shim else ""))
    print("| set | threads | ours best (sent/s) | ours median | s-t best | s-t median "
          "| ratio (best) | ratio (median) | worst cosine | our peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for case in cases:
        ours_t, st_t = times[case]
        ob, om = args.n / min(ours_t), args.n / statistics.median(ours_t)
        sb, sm = args.n / min(st_t), args.n / statistics.median(st_t)
        ok &= worst[case] >= 0.9999
        print(f"| {case[0]} | {case[1] or f'all ({default_threads})'} | {ob:.1f} | {om:.1f} "
              f"| {sb:.1f} | {sm:.1f} | {ob / sb:.2f} | {om / sm:.2f} | {worst[case]:.7f} "
              f"| {peak_kib[case] / 1024:.1f} |",
              flush=True)
    if not ok:
        raise SystemExit("embeddings disagree with sentence-transformers (cosine < 0.9999)")


if __name__ == "__main__":
    main()
