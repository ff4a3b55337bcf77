#!/usr/bin/env python3
"""Times PyTorch's own kernels on the shapes, dtypes and ops of a `cuattn bench <family> --json`
file, and prints the same JSON format, so that the report of docs/gpu-runs/README.md can put both side by side.

    python3 scripts/torch_baseline.py layernorm --shapes-from bench_layernorm.json --json
    python3 scripts/torch_baseline.py attention --shapes-from bench_attention.json --json

Input and output are one JSON object.

layernorm:
    {"family": "layernorm", "device": "...", "copy_bandwidth_gbs": 4300.0,
     "rows": [{"op": "forward", "dtype": "bf16", "rows": 32768, "hidden": 4096, "eps": 1e-5,
               "bytes": 536870912, "time_us": 130.5, "gbs": 4114.0, "pct_copy": 95.6}, ...]}
The output adds "torch_version" and "timer". "bytes" is copied from the input row, so both
sides' GB/s count the same traffic. "copy_bandwidth_gbs" is torch's own device-to-device copy
of a 1 GiB buffer (bytes read + written / time); "pct_copy" is relative to that.

attention: input rows {"op": "forward", "kernel": ..., "dtype", "batch", "heads", "len", "dim",
"causal", ...}; "kernel" is ignored and rows with the same (op, dtype, batch, heads, len, dim,
causal) are timed once. Each is timed with F.scaled_dot_product_attention(q, k, v,
is_causal=causal) (q, k, v randn [B, H, L, D], contiguous) once per SDPA backend, forced with
torch.nn.attention.sdpa_kernel([backend]). Output:
    {"family": "attention", "device": "...", "matmul_tflops": 700.0, "torch_version", "timer",
     "warmup_ms", "rep_ms", "rows": [{"op": "forward", "backend": "flash", "dtype": "bf16",
       "batch": 8, "heads": 16, "len": 2048, "dim": 128, "causal": false, "flops": 1.1e12,
       "time_us": 1234.5, "tflops": 350.1}, ...]}
backend is flash | efficient | cudnn | math. flops = 4*B*H*L*L*D, halved when causal
(FlashAttention's convention, as cuattn's). A backend that refuses a shape gets "time_us": null,
"tflops": null and "error"; math is not run for L > 4096 (O(L^2) memory) and gets "skipped";
so does every measurement left when --time-budget-s is spent.

attention-backward: the same, op "backward": one forward under the forced backend, then
torch.autograd.grad(o, (q, k, v), dO) timed (retain_graph=True); flops are 2.5 times the
forward's (cuattn bench attention-backward counts the same). "matmul_tflops" is torch.matmul
of two 8192x8192 bf16 matrices (2*8192^3 FLOPs), median time.

decode: input rows {"op": "decode", "dtype", "batch", "heads_q", "heads_kv", "len", "dim",
"bytes", ...} (cuattn bench decode --json). Each is timed with F.scaled_dot_product_attention(q,
k, v, enable_gqa=True), q randn [B, Hq, 1, D], k/v randn [B, Hkv, L, D] (one query token against
the cache), once per SDPA backend (flash, efficient, math; a backend that refuses the shape or
GQA gets "error"). Output rows add "backend", "time_us", "gbs" and "pct_copy", with "bytes"
copied from the input (K + V + q + O) and the copy bandwidth measured as for layernorm.

Timer: triton.testing.do_bench (median; it flushes the L2 cache before every call) when triton
imports, else CUDA events around batches of calls after a warm-up (median of the batches);
--timer picks one. Warm-up/measured time default to 25/100 ms for layernorm and 5/20 ms for
attention (~48 shapes x 4 backends in well under a minute on an H100). A layernorm row whose op
this script does not know gets "time_us": null and "error".

torch is imported lazily, so --help works without it. New families: write a function
`bench_<family>(rows, args, timer, ctx) -> list of rows` (ctx: what the family's prelude
returned) and add it to FAMILIES.
"""
import argparse
import json
import statistics
import sys
import time
from collections import namedtuple

T0 = time.monotonic()  # --time-budget-s counts from here (torch's import and CUDA start-up included)
DTYPES = ("f32", "f16", "bf16")


def log(msg):
    print(f"torch_baseline: {msg}", file=sys.stderr, flush=True)


def torch_dtype(name):
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def elem_size(name):
    return {"f32": 4, "f16": 2, "bf16": 2}[name]


# ------------------------------------------------------------------------------------- timing
class Timer:
    """Median GPU time of fn() in microseconds."""

    def __init__(self, kind, warmup_ms, rep_ms):
        self.kind = kind
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.do_bench = None
        if kind in ("auto", "triton"):
            try:
                from triton.testing import do_bench

                self.do_bench = do_bench
            except Exception as e:  # no triton, or a broken one
                if kind == "triton":
                    raise SystemExit(f"torch_baseline: --timer triton but triton does not import: {e}")
                log(f"triton does not import ({e}); timing with CUDA events")
        self.name = (
            "triton.testing.do_bench median (L2 flushed before each call)"
            if self.do_bench
            else "CUDA events, median of batches after warm-up (L2 not flushed)"
        )

    def __call__(self, fn):
        if self.do_bench is not None:
            ms = self.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
            return float(ms) * 1000.0
        return self._events(fn)

    def _events(self, fn):
        import torch

        fn()
        torch.cuda.synchronize()
        # estimate one call, then warm up for ~warmup_ms
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        est_ms = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / est_ms))):
            fn()
        # batches of ~1 ms (at least 1 call), enough batches to fill ~rep_ms, 10..200 of them
        inner = max(1, int(1.0 / est_ms))
        batches = min(200, max(10, int(self.rep_ms / (inner * est_ms))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batches)]
        torch.cuda.synchronize()
        for s, e in events:
            s.record()
            for _ in range(inner):
                fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) / inner for s, e in events) * 1000.0


def copy_bandwidth_gbs(timer):
    """Device-to-device copy of a 1 GiB buffer: bytes read + written per second, in GB/s."""
    import torch

    n = (1 << 30) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    gbs = 2 * src.numel() * src.element_size() / (us * 1e-6) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return gbs


def finish_row(row, time_us, copy_gbs):
    row = dict(row)
    row["time_us"] = round(time_us, 3)
    row["gbs"] = round(row["bytes"] / (time_us * 1e-6) / 1e9, 1) if row.get("bytes") else None
    row["pct_copy"] = round(100.0 * row["gbs"] / copy_gbs, 1) if row["gbs"] and copy_gbs else None
    return row


def failed_row(row, msg):
    row = dict(row)
    row.update(time_us=None, gbs=None, pct_copy=None, error=msg)
    return row


# ---------------------------------------------------------------------------------- layernorm
LAYERNORM_OPS = ("forward", "residual_forward", "backward")


def layernorm_default_rows():
    """Shapes used without --shapes-from. 'bytes' is the minimal traffic: forward reads x and
    writes y; residual_forward also reads r; backward reads dy, x, mean, rstd and writes dx."""
    rows = []
    for op in LAYERNORM_OPS:
        for dtype in DTYPES:
            for r, h in ((32768, 4096), (8192, 1024), (4096, 8192)):
                es = elem_size(dtype)
                n = r * h * es
                b = {"forward": 2 * n, "residual_forward": 3 * n, "backward": 3 * n + 8 * r}[op]
                rows.append({"op": op, "dtype": dtype, "rows": r, "hidden": h, "eps": 1e-5, "bytes": b})
    return rows


def bench_layernorm(rows, args, timer, copy_gbs):
    import torch
    import torch.nn.functional as F

    out = []
    for row in rows:
        op, dtype, r, h = row.get("op"), row.get("dtype"), int(row["rows"]), int(row["hidden"])
        eps = float(row.get("eps", 1e-5))
        if op not in LAYERNORM_OPS or dtype not in DTYPES:
            out.append(failed_row(row, f"torch_baseline knows no layernorm op {op!r} / dtype {dtype!r}"))
            continue
        dt = torch_dtype(dtype)
        g = torch.Generator(device="cuda").manual_seed(1234)

        def randn(*shape):
            # random normal inputs, never zeros (zeros make some kernels faster than real data)
            return torch.randn(*shape, dtype=dt, device="cuda", generator=g)

        t = {}  # this row's tensors, freed before the next row
        try:
            t["x"], t["w"], t["b"] = randn(r, h), randn(h), randn(h)
            if op == "forward":

                def fn():
                    return F.layer_norm(t["x"], (h,), t["w"], t["b"], eps)

            elif op == "residual_forward":
                t["r"] = randn(r, h)

                def fn():  # what a user writes unfused
                    s = t["x"] + t["r"]
                    return F.layer_norm(s, (h,), t["w"], t["b"], eps)

            else:
                t["dy"] = randn(r, h)
                _, t["mean"], t["rstd"] = torch.ops.aten.native_layer_norm(t["x"], [h], t["w"], t["b"], eps)

                def fn():
                    return torch.ops.aten.native_layer_norm_backward(
                        t["dy"], t["x"], [h], t["mean"], t["rstd"], t["w"], t["b"], [True, True, True]
                    )

            with torch.no_grad():
                us = timer(fn)
            out.append(finish_row(row, us, copy_gbs))
            log(f"{op:17s} {dtype:4s} {r}x{h}: {us:9.2f} us")
        except Exception as e:  # e.g. out of memory: report the row, keep going
            out.append(failed_row(row, f"{type(e).__name__}: {e}"[:300]))
            log(f"{op} {dtype} {r}x{h}: {type(e).__name__}: {e}")
        finally:
            t.clear()
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------- attention
ATTENTION_OPS = ("forward", "backward")
# (name in our rows, torch.nn.attention.SDPBackend member), in the order rows are written
SDPA_BACKENDS = (
    ("flash", "FLASH_ATTENTION"),
    ("efficient", "EFFICIENT_ATTENTION"),
    ("cudnn", "CUDNN_ATTENTION"),
    ("math", "MATH"),
)
MATH_MAX_LEN = 4096  # the math backend materialises [B, H, L, L] scores (in f32): skip above this
ATTENTION_KEY = ("op", "dtype", "batch", "heads", "len", "dim", "causal")


def attention_flops(b, h, length, d, causal, op="forward"):
    """FlashAttention's convention: 4*B*H*L*L*D (QK^T and PV), halved when causal; the backward
    (five GEMMs of the forward's two) counts 2.5 times that."""
    f = 4.0 * b * h * length * length * d
    f = f / 2 if causal else f
    return 2.5 * f if op == "backward" else f


def attention_default_rows():
    """Shapes used without --shapes-from: cuattn's attention bench shapes (B*L = 16384 tokens,
    hidden 2048 = heads * dim)."""
    rows = []
    for dtype in ("f16", "bf16"):
        for d in (64, 128):
            for length in (512, 1024, 2048, 4096, 8192, 16384):
                for causal in (False, True):
                    rows.append({"op": "forward", "dtype": dtype, "batch": 16384 // length, "heads": 2048 // d,
                                 "len": length, "dim": d, "causal": causal})
    return rows


def attention_backward_default_rows():
    """cuattn's attention-backward bench shapes (the forward's, op "backward", plus head dim 256
    at lengths 1024 and 4096)."""
    rows = [dict(r, op="backward") for r in attention_default_rows()]
    for dtype in ("f16", "bf16"):
        for length in (1024, 4096):
            for causal in (False, True):
                rows.append({"op": "backward", "dtype": dtype, "batch": 16384 // length, "heads": 2048 // 256,
                             "len": length, "dim": 256, "causal": causal})
    return rows


def attention_shapes(rows):
    """Distinct (op, dtype, batch, heads, len, dim, causal) of the input rows, first-seen order;
    our "kernel" field and timings are dropped. Rows that do not parse are returned apart."""
    shapes, bad, seen = [], [], set()
    for row in rows:
        try:
            shape = {
                "op": row.get("op", "forward"), "dtype": row["dtype"], "batch": int(row["batch"]),
                "heads": int(row["heads"]), "len": int(row["len"]), "dim": int(row["dim"]),
                "causal": bool(row.get("causal", False)),
            }
        except (KeyError, TypeError, ValueError) as e:
            bad.append((row, f"torch_baseline cannot read this attention row: {type(e).__name__}: {e}"))
            continue
        key = tuple(shape[k] for k in ATTENTION_KEY)
        if key not in seen:
            seen.add(key)
            shapes.append(shape)
    return shapes, bad


def attention_row(shape, backend, time_us=None, **extra):
    row = dict(shape)
    row["backend"] = backend
    flops = attention_flops(shape["batch"], shape["heads"], shape["len"], shape["dim"], shape["causal"],
                            shape.get("op", "forward"))
    row["flops"] = flops
    row["time_us"] = round(time_us, 3) if time_us is not None else None
    row["tflops"] = round(flops / (time_us * 1e-6) / 1e12, 2) if time_us else None
    row.update(extra)
    return row


def matmul_tflops(timer):
    """bf16 torch.matmul of two 8192x8192 randn matrices: 2*8192^3 FLOPs over the median time."""
    import torch

    n = 8192
    g = torch.Generator(device="cuda").manual_seed(4321)
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda", generator=g)
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda", generator=g)
    with torch.no_grad():
        us = timer(lambda: torch.matmul(a, b))
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n**3 / (us * 1e-6) / 1e12


def attention_prelude(timer):
    try:
        tf = matmul_tflops(timer)
        log(f"bf16 matmul 8192^3: {tf:.1f} TFLOP/s")
        return None, {"matmul_tflops": round(tf, 1)}
    except Exception as e:  # report it, keep going: the attention rows matter more
        log(f"bf16 matmul: {type(e).__name__}: {e}")
        return None, {"matmul_tflops": None, "matmul_error": f"{type(e).__name__}: {e}"[:200]}


def bench_attention(rows, args, timer, _ctx):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t_start = time.monotonic()
    budget = args.time_budget_s  # seconds since the script started
    shapes, bad = attention_shapes(rows)
    log(f"attention: {len(shapes)} distinct shapes x {len(SDPA_BACKENDS)} backends"
        + (f", time budget {budget:.0f}s" if budget else ""))
    results = {}  # (shape index, backend) -> row

    def label(shape):
        return (f"{shape['dtype']:4s} B{shape['batch']}xH{shape['heads']}xL{shape['len']} d{shape['dim']}"
                + (" causal" if shape["causal"] else ""))

    def run_shape(i, shape, backends):
        dt = torch_dtype(shape["dtype"]) if shape["dtype"] in DTYPES else None
        if shape["op"] not in ATTENTION_OPS or dt is None:
            for name, _ in backends:
                results[i, name] = attention_row(
                    shape, name, error=f"torch_baseline knows no attention op {shape['op']!r} / dtype {shape['dtype']!r}")
            return
        t = {}  # this shape's tensors, freed before the next shape
        try:
            g = torch.Generator(device="cuda").manual_seed(1234)
            dims = (shape["batch"], shape["heads"], shape["len"], shape["dim"])
            for k in ("q", "k", "v"):
                t[k] = torch.randn(*dims, dtype=dt, device="cuda", generator=g)
            causal = shape["causal"]
            backward = shape["op"] == "backward"
            if backward:  # time dQ, dK, dV of one forward (the backend is fixed by the forward)
                for k in ("q", "k", "v"):
                    t[k].requires_grad_(True)
                t["do"] = torch.randn(*dims, dtype=dt, device="cuda", generator=g)

            def fn():
                return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal)

            def timed():
                if not backward:
                    with torch.no_grad():
                        return timer(fn)
                o = fn()
                try:
                    return timer(lambda: torch.autograd.grad(o, (t["q"], t["k"], t["v"]), t["do"],
                                                             retain_graph=True))
                finally:
                    del o

            for name, member in backends:
                if budget and time.monotonic() - T0 > budget:
                    results[i, name] = attention_row(shape, name, skipped=f"time budget of {budget:.0f}s spent")
                    continue
                if name == "math" and shape["len"] > MATH_MAX_LEN:
                    results[i, name] = attention_row(
                        shape, name, skipped=f"L > {MATH_MAX_LEN}: math materialises [B,H,L,L] scores")
                    continue
                backend = getattr(SDPBackend, member, None)
                if backend is None:
                    results[i, name] = attention_row(shape, name, error=f"this torch has no SDPBackend.{member}")
                    continue
                try:
                    with sdpa_kernel([backend]):
                        us = timed()
                    results[i, name] = attention_row(shape, name, us)
                    log(f"{name:9s} {label(shape)}: {us:10.1f} us {results[i, name]['tflops'] or 0:7.1f} TFLOP/s")
                except Exception as e:  # the backend refuses this shape, or out of memory: record, go on
                    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
                    results[i, name] = attention_row(shape, name, error=msg[:200])
                    log(f"{name:9s} {label(shape)}: {msg[:200]}")
                    torch.cuda.empty_cache()
        except Exception as e:  # could not even make the inputs
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
            for name, _ in backends:
                results.setdefault((i, name), attention_row(shape, name, error=msg))
            log(f"{label(shape)}: {msg}")
        finally:
            t.clear()
            torch.cuda.empty_cache()

    # Two passes, so that if the time budget runs out it is the math backend's rows that go.
    fast = [b for b in SDPA_BACKENDS if b[0] != "math"]
    slow = [b for b in SDPA_BACKENDS if b[0] == "math"]
    for i, shape in enumerate(shapes):
        run_shape(i, shape, fast)
    for i, shape in enumerate(shapes):
        run_shape(i, shape, slow)
    out = [results[i, name] for i in range(len(shapes)) for name, _ in SDPA_BACKENDS]
    for row, msg in bad:
        row = {k: v for k, v in row.items() if k not in ("kernel", "time_us", "tflops")}
        row.update(backend=None, time_us=None, tflops=None, error=msg[:200])
        out.append(row)
    log(f"attention: {len(out)} rows in {time.monotonic() - t_start:.1f}s")
    return out


M64 = (1 << 64) - 1


def splitmix64(x):
    """cuattn::bench::sparse::splitmix64, bit for bit."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def sparse_block_mask(n, seed, density):
    """cuattn::bench::sparse::keeps_block for every (qb, kb) of an n x n block grid, as a list of rows."""
    return [[(splitmix64(((qb << 32) | kb) ^ seed) >> 11) / float(1 << 53) < density for kb in range(n)]
            for qb in range(n)]


def sparse_default_rows():
    rows = []
    for length in (4096, 16384, 32768):
        for i, density in enumerate((0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)):
            rows.append({"op": "sparse_forward", "kernel": "sparse", "dtype": "bf16", "batch": 1, "heads": 16,
                         "len": length, "dim": 128, "block": 128, "density": density, "seed": 0x5EED0000 + i})
    return rows


def bench_sparse(rows, args, timer, _ctx):
    """FlexAttention (torch.compile'd flex_attention with a BlockMask of the same kept blocks, all
    full: no mask_mod work inside blocks) on every "sparse" row; FLOPs count kept blocks, as ours."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    budget = args.time_budget_s
    flex = torch.compile(flex_attention, dynamic=False)
    out = []
    for row in rows:
        if row.get("kernel") != "sparse":
            continue
        r = {k: row[k] for k in ("op", "dtype", "batch", "heads", "len", "dim", "block", "density", "seed")}
        r["backend"] = "flex"
        if budget and time.monotonic() - T0 > budget:
            r.update(time_us=None, tflops=None, skipped=f"time budget of {budget:.0f}s spent")
            out.append(r)
            continue
        try:
            b, h, length, d, bs = r["batch"], r["heads"], r["len"], r["dim"], r["block"]
            n = (length + bs - 1) // bs
            mask = torch.tensor(sparse_block_mask(n, r["seed"], r["density"]), dtype=torch.bool, device="cuda")
            counts = mask.sum(dim=1, dtype=torch.int32)  # kept blocks per query block
            # kept column indices first (ascending), then the rest: argsort of (not kept, index)
            order = torch.argsort((~mask).to(torch.int32) * n + torch.arange(n, device="cuda"), dim=1)
            kv_num = counts.view(1, 1, n).expand(b, h, n).contiguous()
            kv_idx = order.to(torch.int32).view(1, 1, n, n).expand(b, h, n, n).contiguous()
            zeros = torch.zeros_like(kv_num)
            bm = BlockMask.from_kv_blocks(zeros, kv_idx, kv_num, kv_idx, BLOCK_SIZE=bs, mask_mod=None,
                                          seq_lengths=(length, length))
            g = torch.Generator(device="cuda").manual_seed(1234)
            dt = torch_dtype(r["dtype"])
            q, k, v = (torch.randn(b, h, length, d, dtype=dt, device="cuda", generator=g) for _ in range(3))
            with torch.no_grad():
                us = timer(lambda: flex(q, k, v, block_mask=bm))
            kept = int(counts.sum().item())
            flops = 4.0 * b * h * kept * bs * bs * d
            r.update(kept_blocks=kept, flops=flops, time_us=round(us, 3), tflops=round(flops / (us * 1e-6) / 1e12, 2))
            log(f"flex L{length} density {r['density']}: {us:10.1f} us {r['tflops']:7.1f} TFLOP/s")
            del q, k, v, bm, mask
        except Exception as e:  # record and go on
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            r.update(time_us=None, tflops=None, error=msg)
            log(f"flex L{r['len']} density {r['density']}: {msg}")
        torch.cuda.empty_cache()
        out.append(r)
    return out


def no_prelude(_timer):
    return None, {}


def layernorm_prelude(timer):
    copy_gbs = copy_bandwidth_gbs(timer)
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    return copy_gbs, {"copy_bandwidth_gbs": round(copy_gbs, 1)}


# ------------------------------------------------------------------------------------- decode
DECODE_BACKENDS = (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("math", "MATH"))


def decode_default_rows():
    """Shapes used without --shapes-from: cuattn's decode bench (Hq 32, Hkv 8, D 128)."""
    rows = []
    for dtype in ("f16", "bf16"):
        for batch in (1, 8):
            for length in (4096, 8192, 16384, 32768, 65536, 131072):
                e = elem_size(dtype)
                rows.append({"op": "decode", "dtype": dtype, "batch": batch, "heads_q": 32, "heads_kv": 8,
                             "len": length, "dim": 128,
                             "bytes": 2 * batch * 8 * length * 128 * e + 2 * batch * 32 * 128 * e})
    return rows


def bench_decode(rows, args, timer, copy_gbs):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    for row in rows:
        base = {k: v for k, v in row.items() if k not in ("splits",)}
        try:
            dt = torch_dtype(row["dtype"])
            b, hq, hkv = int(row["batch"]), int(row["heads_q"]), int(row["heads_kv"])
            length, d = int(row["len"]), int(row["dim"])
        except (KeyError, TypeError, ValueError) as e:
            out.append(failed_row(base, f"torch_baseline cannot read this decode row: {type(e).__name__}: {e}"))
            continue
        t = {}
        try:
            g = torch.Generator(device="cuda").manual_seed(1234)
            t["q"] = torch.randn(b, hq, 1, d, dtype=dt, device="cuda", generator=g)
            t["k"] = torch.randn(b, hkv, length, d, dtype=dt, device="cuda", generator=g)
            t["v"] = torch.randn(b, hkv, length, d, dtype=dt, device="cuda", generator=g)

            def fn():
                return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], enable_gqa=hq != hkv)

            for name, member in DECODE_BACKENDS:
                r = dict(base, backend=name)
                if args.time_budget_s and time.monotonic() - T0 > args.time_budget_s:
                    out.append(failed_row(r, f"time budget of {args.time_budget_s:.0f}s spent"))
                    continue
                try:
                    with sdpa_kernel([getattr(SDPBackend, member)]), torch.no_grad():
                        us = timer(fn)
                    out.append(finish_row(r, us, copy_gbs))
                    log(f"decode {name:9s} {row['dtype']} B{b} L{length}: {us:9.1f} us")
                except Exception as e:  # the backend refuses the shape (or GQA): record, go on
                    msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
                    out.append(failed_row(r, msg))
                    log(f"decode {name:9s} {row['dtype']} B{b} L{length}: {msg}")
                    torch.cuda.empty_cache()
        except Exception as e:  # could not make the inputs (out of memory)
            out.append(failed_row(dict(base, backend=None), f"{type(e).__name__}: {e}"[:200]))
        finally:
            t.clear()
            torch.cuda.empty_cache()
    return out


# bench(rows, args, timer, ctx) -> rows; default_rows() -> rows without --shapes-from;
# prelude(timer) -> (ctx for bench, top-level fields of the output); default warm-up/rep in ms.
Family = namedtuple("Family", "bench default_rows prelude warmup_ms rep_ms time_budget_s")
FAMILIES = {
    "layernorm": Family(bench_layernorm, layernorm_default_rows, layernorm_prelude, 25.0, 100.0, None),
    "attention": Family(bench_attention, attention_default_rows, attention_prelude, 5.0, 20.0, 100.0),
    "attention-backward": Family(bench_attention, attention_backward_default_rows, attention_prelude, 5.0, 20.0, 100.0),
    "sparse": Family(bench_sparse, sparse_default_rows, no_prelude, 5.0, 20.0, 100.0),
    "decode": Family(bench_decode, decode_default_rows, layernorm_prelude, 5.0, 20.0, 200.0),
}


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time PyTorch on the shapes of a `cuattn bench <family> --json` file.",
        epilog="Families: " + ", ".join(sorted(FAMILIES)),
    )
    p.add_argument("family", choices=sorted(FAMILIES), help="kernel family")
    p.add_argument("--shapes-from", metavar="FILE", help="cuattn bench JSON to take ops/dtypes/shapes/bytes from")
    p.add_argument("--json", action="store_true", help="print the JSON object (else a table)")
    p.add_argument("--timer", choices=("auto", "triton", "events"), default="auto",
                   help="auto: triton's do_bench if it imports, else CUDA events")
    p.add_argument("--warmup-ms", type=float, default=None,
                   help="warm-up per measurement (ms; default: layernorm 25, attention 5)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="measured time per measurement (ms; default: layernorm 100, attention 20)")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="attention: once this many seconds since the start are spent, the measurements left "
                        "are written as skipped (default 100; 0: no limit)")
    args = p.parse_args(argv)
    fam = FAMILIES[args.family]
    if args.warmup_ms is None:
        args.warmup_ms = fam.warmup_ms
    if args.rep_ms is None:
        args.rep_ms = fam.rep_ms
    if args.time_budget_s is None:
        args.time_budget_s = fam.time_budget_s
    return args


def load_rows(args):
    if not args.shapes_from:
        return FAMILIES[args.family].default_rows(), None
    with open(args.shapes_from) as f:
        src = json.load(f)
    if src.get("family") not in (None, args.family):
        raise SystemExit(f"torch_baseline: {args.shapes_from} is family {src.get('family')!r}, not {args.family!r}")
    # keep every field but our timings (op, dtype, rows, hidden, eps, bytes and any extra key)
    rows = [{k: v for k, v in row.items() if k not in ("time_us", "gbs", "pct_copy")} for row in src.get("rows", [])]
    return rows, src


def print_table(result):
    print(f"{result['family']} on {result['device']}, torch {result['torch_version']}, timer: {result['timer']}")
    if result["family"] in ("attention", "attention-backward"):
        mm = result.get("matmul_tflops")
        print(f"bf16 matmul 8192^3: {'-' if mm is None else f'{mm:.1f}'} TFLOP/s")
        print(f"{'backend':9s} {'dtype':5s} {'BxHxL':>14s} {'dim':>4s} {'causal':6s} {'time_us':>10s} {'TFLOP/s':>8s}")
        for r in result["rows"]:
            t = "-" if r.get("time_us") is None else f"{r['time_us']:.1f}"
            tf = "-" if r.get("tflops") is None else f"{r['tflops']:.1f}"
            shape = f"{r.get('batch')}x{r.get('heads')}x{r.get('len')}"
            note = r.get("error") or r.get("skipped")
            print(f"{str(r.get('backend')):9s} {str(r.get('dtype')):5s} {shape:>14s} {str(r.get('dim')):>4s} "
                  f"{'yes' if r.get('causal') else 'no':6s} {t:>10s} {tf:>8s}" + (f"  {note}" if note else ""))
        return
    if result["family"] == "decode":
        print(f"copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s")
        print(f"{'backend':9s} {'dtype':5s} {'batch':>5s} {'len':>7s} {'time_us':>10s} {'GB/s':>8s} {'%copy':>6s}")
        for r in result["rows"]:
            t = "-" if r.get("time_us") is None else f"{r['time_us']:.1f}"
            gbs = "-" if r.get("gbs") is None else f"{r['gbs']:.0f}"
            pct = "-" if r.get("pct_copy") is None else f"{r['pct_copy']:.1f}"
            print(f"{str(r.get('backend')):9s} {str(r.get('dtype')):5s} {str(r.get('batch')):>5s} "
                  f"{str(r.get('len')):>7s} {t:>10s} {gbs:>8s} {pct:>6s}" + (f"  {r['error']}" if r.get("error") else ""))
        return
    print(f"copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s")
    print(f"{'op':17s} {'dtype':5s} {'shape':>12s} {'time_us':>10s} {'GB/s':>8s} {'%copy':>6s}")
    for r in result["rows"]:
        t = "-" if r.get("time_us") is None else f"{r['time_us']:.2f}"
        gbs = "-" if r.get("gbs") is None else f"{r['gbs']:.0f}"
        pct = "-" if r.get("pct_copy") is None else f"{r['pct_copy']:.1f}"
        shape = f"{r.get('rows')}x{r.get('hidden')}"
        print(f"{r.get('op', '?'):17s} {r.get('dtype', '?'):5s} {shape:>12s} {t:>10s} {gbs:>8s} {pct:>6s}"
              + (f"  {r['error']}" if r.get("error") else ""))


def main(argv=None):
    args = parse_args(argv)
    rows, _ = load_rows(args)
    import torch  # lazy: --help works without torch

    if not torch.cuda.is_available():
        raise SystemExit("torch_baseline: torch sees no CUDA device")
    fam = FAMILIES[args.family]
    timer = Timer(args.timer, args.warmup_ms, args.rep_ms)
    log(f"timer: {timer.name}, warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms; {len(rows)} rows")
    ctx, top = fam.prelude(timer)
    out_rows = fam.bench(rows, args, timer, ctx)
    result = {"family": args.family, "device": torch.cuda.get_device_name()}
    result.update(top)
    result.update(torch_version=torch.__version__, timer=timer.name)
    if args.family != "layernorm":  # layernorm's output stays as it was
        result.update(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    result["rows"] = out_rows
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
