#!/usr/bin/env python3
"""Writes an f16 copy of a model folder (default models/all-MiniLM-L6-v2 -> models/minilm-f16):
model.safetensors with every F32 tensor rounded to F16, plus the folder's JSON and tokenizer
files. Half the bytes (MiniLM: 87 -> 44 MB), so it fits a device call's carry limit; the
runtime's loader converts F16 weights. Python standard library only. Idempotent.

    python3 scripts/minilm-f16.py [SRC] [DST]
"""
import json
import os
import shutil
import struct
import sys
from array import array

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "models", "all-MiniLM-L6-v2")
dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "models", "minilm-f16")

with open(os.path.join(src, "model.safetensors"), "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()

meta = header.pop("__metadata__", None)
out_header, chunks, offset = {}, [], 0
for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    begin, end = info["data_offsets"]
    raw = data[begin:end]
    dtype = info["dtype"]
    if dtype == "F32":
        values = array("f")
        values.frombytes(raw)
        if sys.byteorder != "little":
            values.byteswap()
        raw = struct.pack(f"<{len(values)}e", *values)
        dtype = "F16"
    out_header[name] = {"dtype": dtype, "shape": info["shape"], "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
if meta is not None:
    out_header["__metadata__"] = meta
text = json.dumps(out_header, separators=(",", ":")).encode()
text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned

os.makedirs(dst, exist_ok=True)
with open(os.path.join(dst, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for c in chunks:
        f.write(c)
for rel in ["config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json",
            os.path.join("1_Pooling", "config.json")]:
    p = os.path.join(src, rel)
    if os.path.exists(p):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy(p, os.path.join(dst, rel))
print(f"f16 copy of {src} in {dst}")
