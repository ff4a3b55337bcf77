#!/usr/bin/env python3
"""Writes the small committed fixtures the runtime's tests compare against (run by hand, never
in CI; needs torch, transformers, sentence-transformers and safetensors from PyPI, e.g. in a
venv outside the repo):

    python3 scripts/make_fixtures.py [--minilm models/all-MiniLM-L6-v2]

tests/fixtures/tiny-bert/           a random 2-layer BERT (config.json, model.safetensors)
tests/fixtures/tiny-bert-outputs.json
                                    a padded batch of 3 sequences (ids, token types, lengths)
                                    and Hugging Face BertModel's last_hidden_state and
                                    pooler_output for it (eager attention, f32, CPU)
tests/fixtures/minilm-embeddings.json
                                    sentences (one longer than max_seq_length) with
                                    sentence-transformers' token ids and embeddings (CPU, f32)

The tiny model's weights are redrawn with larger spread than BERT's 0.02 initialisation so
every layer changes the hidden states measurably (a near-identity model would hide bugs).
"""
import argparse
import json
import os

import torch
import transformers
import sentence_transformers
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def tiny_bert():
    torch.manual_seed(1234)
    config = BertConfig(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        max_position_embeddings=24,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        attn_implementation="eager",
    )
    model = BertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") or "LayerNorm.bias" in name:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    out_dir = os.path.join(FIXTURES, "tiny-bert")
    model.save_pretrained(out_dir, safe_serialization=True)

    lens = [7, 12, 3]
    length = max(lens)
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(1, config.vocab_size, (len(lens), length), generator=gen)
    types = torch.randint(0, 2, (len(lens), length), generator=gen)
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
        ids[b, n:] = 0
        types[b, n:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    record = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "lens": lens,
        "len": length,
        "ids": ids.flatten().tolist(),
        "type_ids": types.flatten().tolist(),
        "hidden": out.last_hidden_state.flatten().tolist(),
        "pooled": out.pooler_output.flatten().tolist(),
    }
    with open(os.path.join(FIXTURES, "tiny-bert-outputs.json"), "w") as f:
        json.dump(record, f)


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Hi",
    "",
    "Attention is all you need: the Transformer replaces recurrence with self-attention, "
    "and every position attends to every other one in a single step.",
    # Longer than max_seq_length (256 tokens): sentence-transformers truncates it.
    " ".join(["the quick brown fox jumps over the lazy dog"] * 40),
]


def minilm(folder):
    model = SentenceTransformer(folder, device="cpu")
    emb = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True)
    features = model.tokenize(SENTENCES)
    ids = []
    for row, m in zip(features["input_ids"].tolist(), features["attention_mask"].tolist()):
        ids.append(row[: sum(m)])
    record = {
        "generator": f"scripts/make_fixtures.py, sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "token_ids": ids,
        "embeddings": emb.tolist(),
    }
    with open(os.path.join(FIXTURES, "minilm-embeddings.json"), "w") as f:
        json.dump(record, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm", default=os.path.join(ROOT, "models", "all-MiniLM-L6-v2"))
    args = ap.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    torch.set_num_threads(1)
    tiny_bert()
    minilm(args.minilm)
    print("fixtures written to", FIXTURES)


if __name__ == "__main__":
    main()
