#!/usr/bin/env python3
"""Times PyTorch's own kernels on the shapes, dtypes and ops of a `cuattn bench <family> --json`
file, and prints the same JSON format, so that docs/gpu.md's report can put both side by side.

    python3 scripts/torch_baseline.py layernorm --shapes-from bench_layernorm.json --json

Input and output are one JSON object:
    {"family": "layernorm", "device": "...", "copy_bandwidth_gbs": 4300.0,
     "rows": [{"op": "forward", "dtype": "bf16", "rows": 32768, "hidden": 4096, "eps": 1e-5,
               "bytes": 536870912, "time_us": 130.5, "gbs": 4114.0, "pct_copy": 95.6}, ...]}
The output adds "torch_version" and "timer". "bytes" is copied from the input row, so both
sides' GB/s count the same traffic. "copy_bandwidth_gbs" is torch's own device-to-device copy
of a 1 GiB buffer (bytes read + written / time); "pct_copy" is relative to that.

Timer: triton.testing.do_bench (median; it flushes the L2 cache before every call) when triton
imports, else CUDA events around batches of calls after a warm-up (median of the batches);
--timer picks one. A row whose op this script does not know gets "time_us": null and "error".

torch is imported lazily, so --help works without it. New families: write a function
`bench_<family>(rows, args, timer) -> list of rows` and add it to FAMILIES.
"""
import argparse
import json
import statistics
import sys

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


# family -> (benchmark function, default rows). "attention" (SDPA per backend) comes later.
FAMILIES = {
    "layernorm": (bench_layernorm, layernorm_default_rows),
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
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per measurement (ms)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="measured time per measurement (ms)")
    return p.parse_args(argv)


def load_rows(args):
    if not args.shapes_from:
        return FAMILIES[args.family][1](), None
    with open(args.shapes_from) as f:
        src = json.load(f)
    if src.get("family") not in (None, args.family):
        raise SystemExit(f"torch_baseline: {args.shapes_from} is family {src.get('family')!r}, not {args.family!r}")
    # keep every field but our timings (op, dtype, rows, hidden, eps, bytes and any extra key)
    rows = [{k: v for k, v in row.items() if k not in ("time_us", "gbs", "pct_copy")} for row in src.get("rows", [])]
    return rows, src


def print_table(result):
    print(f"{result['family']} on {result['device']}, torch {result['torch_version']}, timer: {result['timer']}")
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
    timer = Timer(args.timer, args.warmup_ms, args.rep_ms)
    log(f"timer: {timer.name}; {len(rows)} rows")
    copy_gbs = copy_bandwidth_gbs(timer)
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    fn = FAMILIES[args.family][0]
    out_rows = fn(rows, args, timer, copy_gbs)
    result = {
        "family": args.family,
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_gbs": round(copy_gbs, 1),
        "torch_version": torch.__version__,
        "timer": timer.name,
        "rows": out_rows,
    }
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
