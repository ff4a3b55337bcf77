#!/usr/bin/env python3
"""Loads a folder written by `cuattn finetune` with Hugging Face, exactly as a user would
(`BertForSequenceClassification.from_pretrained`, `AutoTokenizer.from_pretrained`), checks that
every weight was read (no missing, unexpected or mis-shaped tensor) and prints the logits of
some texts as JSON. Run by hand in a venv with torch and transformers (never in CI):

    python3 scripts/hf_logits.py OUT_DIR [TEXT ...] [--write FILE]

With --write the JSON also goes to FILE (tests/fixtures/finetune-tiny/hf-logits.json pins what
HF computes for the folder tests/cli_finetune.rs writes; the test compares `cuattn classify`
with it). Without TEXTs the probe texts of that fixture are used.
"""
import argparse
import json
import os

import torch
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("texts", nargs="*")
    ap.add_argument("--write", default=None)
    args = ap.parse_args()
    texts = args.texts
    if not texts:
        with open(os.path.join(ROOT, "tests/fixtures/finetune-tiny/expected.json")) as f:
            texts = json.load(f)["probes"]
    model, info = BertForSequenceClassification.from_pretrained(
        args.folder, output_loading_info=True, attn_implementation="eager")
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"Hugging Face did not load the folder unchanged: {problems}")
    tok = AutoTokenizer.from_pretrained(args.folder)
    model.eval()
    with torch.no_grad():
        enc = tok(texts, padding="longest", return_tensors="pt")
        logits = model(**enc).logits
    record = {
        "generator": f"scripts/hf_logits.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "texts": texts,
        "input_ids": [row[: int(m.sum())] for row, m in
                      zip(enc["input_ids"].tolist(), enc["attention_mask"])],
        "logits": logits.tolist(),
    }
    text = json.dumps(record, indent=1)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
