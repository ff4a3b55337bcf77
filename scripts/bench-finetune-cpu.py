#!/usr/bin/env python3
"""CPU fine-tuning throughput, side by side on this machine: `cuattn finetune --device cpu`
against a plain PyTorch CPU training loop, all-MiniLM-L6-v2 with a new 2-class head, the same
batches of data/sentiment/train.tsv (file order, padded to the longest in each batch), the same
step: forward with the config's dropout, mean cross-entropy, backward, clip_grad_norm_(1.0),
AdamW (decay / no-decay groups as the HF Trainer), linear schedule.

    cargo build --release --bin cuattn && python3 scripts/bench-finetune-cpu.py

Each side runs STEPS optimizer steps; the first is a warm-up and is not counted; samples/s is
(examples of the counted steps) / (their wall time). Our side's per-step times come from the
train_log.csv it writes (the `samples_per_s` column: forward, backward and optimizer of that
step, tokenization included). The sides alternate and each side's best of REPEATS counts. Both
use every core (torch's default intra-op threads; rayon's default pool) unless --threads sets
both. Needs torch + transformers (e.g. the fixtures venv).
"""
import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time

import torch
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_tsv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def torch_run(model_dir, texts, labels, args):
    names = sorted(set(labels))
    y_all = [names.index(l) for l in labels]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(names), attn_implementation="eager")
    model.train()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        low = n.lower()
        (no_decay if ("bias" in low or "layernorm" in low) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, args.steps)
    times, losses = [], []
    b = args.batch_size
    for s in range(args.steps):
        i = (s * b) % len(texts)
        bt, by = texts[i:i + b], y_all[i:i + b]
        t = time.perf_counter()
        enc = tok(bt, padding="longest", truncation=True, max_length=args.max_len,
                  return_tensors="pt")
        out = model(**enc)
        loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor(by))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    return times, losses


def ours_run(args, env):
    out = tempfile.mkdtemp(prefix="cuattn-bench-ft-")
    try:
        cmd = [args.bin, "finetune", "--model", args.model, "--train", args.train,
               "--out", os.path.join(out, "m"), "--device", "cpu", "--no-shuffle",
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--max-len", str(args.max_len), "--json"]
        r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        losses = json.loads(r.stdout)["losses"]
        with open(os.path.join(out, "m", "train_log.csv")) as f:
            rows = list(csv.DictReader(f))
        times = [args.batch_size / float(row["samples_per_s"]) for row in rows]
        return times, losses
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    ap.add_argument("--train", default=os.path.join(ROOT, "data", "sentiment", "train.tsv"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cuattn"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both sides (torch.set_num_threads, RAYON_NUM_THREADS); "
                         "0: each side's default (every core)")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env["RAYON_NUM_THREADS"] = str(args.threads)
    torch.manual_seed(0)
    texts, labels = read_tsv(args.train)
    counted = args.batch_size * (args.steps - 1)
    best_torch = best_ours = float("inf")
    for _ in range(args.repeats):
        t_times, t_losses = torch_run(args.model, texts, labels, args)
        best_torch = min(best_torch, sum(t_times[1:]))
        o_times, o_losses = ours_run(args, env)
        best_ours = min(best_ours, sum(o_times[1:]))
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "our_threads": args.threads or os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "batch_size": args.batch_size,
        "steps_counted": args.steps - 1,
        "ours_samples_per_s": counted / best_ours,
        "torch_samples_per_s": counted / best_torch,
        "ratio": best_torch / best_ours,
        # Different random heads on the two sides: the losses agree only roughly (both start
        # near ln 2 and fall).
        "ours_losses": [round(l, 4) for l in o_losses],
        "torch_losses": [round(l, 4) for l in t_losses],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
