#!/usr/bin/env python3
"""sentence-transformers on the GPU, the baseline of the runtime's `runtime_minilm_throughput`
GPU test: the same 2048 synthetic sentences of 126 words (128 tokens with [CLS]/[SEP]), batch
256, f16 and f32, same model folder. Prints one line per dtype; run by scripts/gpu-minilm.sh on
the device (needs torch and sentence-transformers there; says so and exits 0 if they are absent).

    python3 scripts/bench-embed-gpu.py [MODEL_DIR]
"""
import os
import sys
import time

VOCAB = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "with", "red",
         "door", "in", "small", "town", "near", "river", "old", "man", "saw", "bird", "fly"]


def synthetic_sentences(n, words):
    """tests/gpu/runtime.rs::synthetic_sentences, word for word."""
    return [" ".join(VOCAB[(i * 7 + w * 3 + w // 5) % len(VOCAB)] for w in range(words)) for i in range(n)]


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else "models/minilm-f16"
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except Exception as e:  # the device image may lack sentence-transformers
        print(f"bench-embed-gpu: sentence-transformers unavailable here: {type(e).__name__}: {e}")
        return 0
    texts = synthetic_sentences(2048, 126)
    for name, dt in (("f16", torch.float16), ("f32", torch.float32)):
        model = SentenceTransformer(os.path.abspath(model_dir), device="cuda")
        model = model.to(dt)
        n_tok = len(model.tokenizer(texts[0])["input_ids"])
        model.encode(texts[:256], batch_size=256)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.encode(texts, batch_size=256)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        print(f"THROUGHPUT sentence-transformers {name} batch 256, {n_tok} tokens: {len(texts) / s:.0f} sentences/s "
              f"({len(texts)} in {s:.3f} s, torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
