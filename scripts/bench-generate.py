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
the cache buys, and on the GPU also with `--no-cuda-graph` (every decoding step launched op by
op instead of replayed from its CUDA graph), alternating with the graph runs, with a
"graph / eager" ratio of the best tokens/s and a note when the two give different ids.

CPU with `--dtype bf16`: our side stores its weight matrices in bf16 (f32 arithmetic); Hugging
Face runs in f32 (the baseline the CPU target names), and our f32 run's greedy ids are compared
with our bf16 ones ("ids equal to our f32" column).

Each side is timed on the generation call only (model loading and tokenization excluded; our
side reads the time `cuattn generate --timing` prints, after a `--warmup` call that loads the
kernels); the sides alternate, run after run, and the table gives each side's best and median
of --repeats runs, and our process's peak resident memory (model loading included; see
`peak_rss_run`). tokens/s = generated tokens (all sequences) / seconds. The prompt ids come from our tokenizer (`--json` prints them)
and are fed to both sides, so Hugging Face needs no tokenizer files. HF pads the batch on the
left with the attention mask; cuattn pads on the right and keeps per-sequence positions (the
same arithmetic). The greedy ids are compared and the count of sequences that agree is printed,
so a fast wrong answer shows (on the 124M-shaped random model, whose logits have tiny margins,
a rounding difference may legitimately flip a late token, more so in f16).

On the CPU the script also measures the machine's read bandwidth (examples/read_bandwidth.rs:
a 1 GiB f32 buffer summed with 1 thread and with every thread, best of 5, from 4 KiB pages and
from huge pages, the better of the two taken, since our weights sit in huge pages where the
kernel allows; build it with
`cargo build --release --example read_bandwidth`), before the first model and after the last,
and gives each of our rows the weight bytes it streams per decoding step (every parameter of
the model once, the tied token table once as the LM head, the position table not: one row of
it), times steps/s, as GB/s and as a share of the best all-thread read bandwidth. At batch 1
that share is what the decode loop makes of the memory system (the rest is the prefill, the
attention over the cache and per-step overhead). It means that only for weights far larger
than the caches (the 124M-shaped model's ~500 MB); the tiny model's 3 MB stay in cache and can
read faster than memory (over 100%).
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
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


# Peak RSS of a child process. Not this process's wait4()/getrusage(RUSAGE_CHILDREN): Linux
# starts a child's ru_maxrss at the RSS of the process it was forked from (the high-water mark
# of the address space it had before exec is kept), so every child of this script reported at
# least this script's own peak (torch and the Hugging Face models loaded), whatever it used.
# The command is started from a small process instead: GNU time (`/usr/bin/time -f %M`), or
# where that is missing a fresh Python interpreter that reaps it with wait4 (its own ~10 MB
# is then the floor of what can be reported).
GNU_TIME = next((t for t in ("/usr/bin/time", shutil.which("gtime")) if t and os.access(t, os.X_OK)), None)
RSS_HELPER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_run(cmd):
    """Runs cmd; returns (exit status, stdout, stderr, peak RSS of cmd in KiB)."""
    with tempfile.NamedTemporaryFile("r") as rss, tempfile.TemporaryFile("w+") as out, \
            tempfile.TemporaryFile("w+") as err:
        if GNU_TIME:
            wrapped = [GNU_TIME, "-f", "%M", "-o", rss.name, *cmd]
        else:
            wrapped = [sys.executable, "-c", RSS_HELPER, rss.name, *cmd]
        returncode = subprocess.run(wrapped, stdout=out, stderr=err, text=True).returncode
        out.seek(0)
        err.seek(0)
        # GNU time writes "Command exited with non-zero status N" before %M on a failure.
        lines = rss.read().split()
        peak = int(lines[-1]) if lines and lines[-1].isdigit() else 0
        return returncode, out.read(), err.read(), peak


def ours(binary, folder, prompts, max_new, device, dtype, extra=()):
    cmd = [binary, "generate", "--device", device, "--dtype", dtype, "--model", folder,
           "--max-new-tokens", str(max_new), "--json", "--timing", "--warmup", *extra]
    for p in prompts:
        cmd += ["--prompt", p]
    returncode, stdout, stderr, peak_kib = peak_rss_run(cmd)
    if returncode != 0:
        raise SystemExit(f"cuattn generate failed ({returncode}): {stderr.strip()[-2000:]}")
    m = re.search(r"in ([0-9.]+) s", stderr)
    out = json.loads(stdout)
    single = len(prompts) == 1
    gen = [out["generated_ids"]] if single else out["generated_ids"]
    ids = [out["prompt_ids"]] if single else out["prompt_ids"]
    return float(m.group(1)), gen, ids, peak_kib


def read_bandwidth(binary):
    """The read_bandwidth example's JSON, or None when it is not built."""
    if not binary or not os.access(binary, os.X_OK):
        return None
    r = subprocess.run([binary, "--json"], check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


def pages(b):
    """The read_bandwidth figures by page size, when it reports them (the plain figures are
    the better of the two)."""
    if "gbs_all_threads_4k" not in b:
        return ""
    return (f"; all threads from 4 KiB pages {b['gbs_all_threads_4k']:.1f}, from huge pages "
            f"{b['gbs_all_threads_huge']:.1f}" + ("" if b.get("huge_advised") else " (refused)"))


def step_bytes(model, storage):
    """Bytes of weights one decoding step reads: every parameter once (the tied wte once, as
    the LM head) except the position table; matrices in `storage`, vectors in f32."""
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("wpe.weight"):
            continue
        total += p.numel() * (2 if p.dim() == 2 and storage == "bf16" else 4)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("--work", default="/tmp/cuattn-gpt2-124m")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="f32", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="tiny,124m")
    ap.add_argument("--bandwidth-bin",
                    default=os.path.join(ROOT, "target", "release", "examples", "read_bandwidth"),
                    help="the read_bandwidth example (CPU runs; skipped when not built)")
    args = ap.parse_args()
    dev, dt = args.device, args.dtype
    if dev == "cpu" and dt == "f16":
        raise SystemExit("the CPU backend stores weights in f32 or bf16")
    # On the CPU, HF's baseline is f32 whatever our storage type.
    hf_dt = "f32" if dev == "cpu" else dt
    folders = {"tiny": os.path.join(ROOT, "tests", "fixtures", "tiny-gpt2"), "124m": args.work}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "(no git)"
    card = torch.cuda.get_device_name(0) if dev == "cuda" else (platform.processor() or platform.machine())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {dev} {dt}, "
          f"{card}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{args.max_new_tokens} new tokens per sequence, {args.repeats} alternating runs per side"
          + (f"; Hugging Face in {hf_dt}" if hf_dt != dt else ""))
    impls = ["sdpa", "eager"] if dev == "cuda" else ["sdpa"]
    bw = [read_bandwidth(args.bandwidth_bin)] if dev == "cpu" else []
    if bw and bw[0]:
        print(f"# read bandwidth before: {bw[0]['gbs_1_thread']:.1f} GB/s on 1 thread, "
              f"{bw[0]['gbs_all_threads']:.1f} GB/s on {bw[0]['threads']} threads "
              f"({bw[0]['mib']} MiB, best of {bw[0]['repeats']}){pages(bw[0])}", flush=True)
    rows = []
    bf16_cpu = dev == "cpu" and dt == "bf16"
    # On the GPU our decoding steps replay a CUDA graph (runtime/graph_step.rs); the eager
    # column runs the same binary with --no-cuda-graph (every step op by op), alternating.
    gpu = dev == "cuda"
    print("| model | batch | HF " + " | HF ".join(impls) + " best/median (tokens/s) | cuattn best/median "
          + ("| cuattn eager (no graph) best/median | graph / eager best " if gpu else "")
          + "| cuattn recompute | ratio vs HF " + impls[-1] + " best/median | greedy ids equal to HF "
          + ("| ids equal to our f32 " if bf16_cpu else "") + "| cuattn peak RSS (MB) |")
    print("|---|---|" + "---|" * len(impls) + "---|---|---|---|" + ("---|" if bf16_cpu else "")
          + ("---|---|" if gpu else "")
          + "---|", flush=True)
    for name in args.models.split(","):
        folder = folders[name]
        if name == "124m":
            make_124m(folder)
        models = {}
        for impl in impls:
            m = GPT2LMHeadModel.from_pretrained(folder, attn_implementation=impl)
            models[impl] = m.to(dev, TORCH_DTYPES[hf_dt]).eval()
        for batch in (1, 8):
            prompts = PROMPTS[:batch]
            _, _, ids, _ = ours(args.bin, folder, prompts, 2, dev, dt)
            for m in models.values():
                hf_run(m, ids, 2, dev)  # warm-up
            hf_times = {impl: [] for impl in impls}
            our_times, our_gen, hf_gen, rss = [], None, None, 0
            eager_times, eager_gen = [], None
            for _ in range(args.repeats):
                for impl, m in models.items():
                    s, gen = hf_run(m, ids, args.max_new_tokens, dev)
                    hf_times[impl].append(s)
                    hf_gen = hf_gen or gen
                s, our_gen, _, peak = ours(args.bin, folder, prompts, args.max_new_tokens, dev, dt)
                our_times.append(s)
                rss = max(rss, peak)
                if gpu:
                    s, eager_gen, _, _ = ours(args.bin, folder, prompts, args.max_new_tokens, dev,
                                              dt, ["--no-cuda-graph"])
                    eager_times.append(s)
            n_tokens = batch * args.max_new_tokens
            n_ours = sum(len(g) for g in our_gen)
            hf_tps = {i: (n_tokens / min(t), n_tokens / statistics.median(t))
                      for i, t in hf_times.items()}
            our_tps = (n_ours / min(our_times), n_ours / statistics.median(our_times))
            s_re, _, _, _ = ours(args.bin, folder, prompts, args.max_new_tokens, dev, dt,
                                 ["--recompute"])
            equal = sum(a == b[: len(a)] for a, b in zip(our_gen, hf_gen))
            cols = " | ".join(f"{hf_tps[i][0]:.1f} / {hf_tps[i][1]:.1f}" for i in impls)
            base = hf_tps[impls[-1]]
            f32_col = ""
            if bf16_cpu:
                _, f32_gen, _, _ = ours(args.bin, folder, prompts, args.max_new_tokens, dev, "f32")
                f32_col = f" {sum(a == b for a, b in zip(our_gen, f32_gen))}/{batch} |"
            eager_col = ""
            if gpu:
                n_eager = sum(len(g) for g in eager_gen)
                eager_tps = (n_eager / min(eager_times), n_eager / statistics.median(eager_times))
                same = "" if eager_gen == our_gen else " (ids differ)"
                eager_col = (f"| {eager_tps[0]:.1f} / {eager_tps[1]:.1f} "
                             f"| {our_tps[0] / eager_tps[0]:.2f}{same} ")
            print(f"| {name} | {batch} | {cols} | {our_tps[0]:.1f} / {our_tps[1]:.1f} "
                  f"{eager_col}| {n_ours / s_re:.1f} | {our_tps[0] / base[0]:.2f} / {our_tps[1] / base[1]:.2f} "
                  f"| {equal}/{batch} |{f32_col} {rss / 1024:.0f} |", flush=True)
            rows.append((name, batch, step_bytes(models[impls[0]], dt),
                         step_bytes(models[impls[0]], "f32"), our_tps[0] / batch,
                         our_tps[1] / batch, base[0] / batch))
    if bw and bw[0]:
        bw.append(read_bandwidth(args.bandwidth_bin))
        best = max(b["gbs_all_threads"] for b in bw)
        print(f"\n# read bandwidth after: {bw[1]['gbs_1_thread']:.1f} GB/s on 1 thread, "
              f"{bw[1]['gbs_all_threads']:.1f} GB/s on {bw[1]['threads']} threads{pages(bw[1])}; "
              f"best all-thread figure {best:.1f} GB/s is the reference below")
        print("| model | batch | weight MB per step | cuattn steps/s best / median "
              "| cuattn weights GB/s best / median | % of read bandwidth best / median "
              "| HF f32 weights GB/s best (% of read bandwidth) |")
        print("|---|---|---|---|---|---|---|")
        for name, batch, nbytes, hf_bytes, sb, sm, hb in rows:
            gb, gm = nbytes * sb / 1e9, nbytes * sm / 1e9
            hf_col = f"{hf_bytes * hb / 1e9:.1f} ({100 * hf_bytes * hb / 1e9 / best:.0f}%)"
            print(f"| {name} | {batch} | {nbytes / 1e6:.1f} | {sb:.2f} / {sm:.2f} "
                  f"| {gb:.1f} / {gm:.1f} | {100 * gb / best:.0f}% / {100 * gm / best:.0f}% "
                  f"| {hf_col} |", flush=True)


if __name__ == "__main__":
    main()
