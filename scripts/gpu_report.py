#!/usr/bin/env python3
"""Writes DIR/report.md from what scripts/gpu-check.sh left in DIR, and prints a compact
summary (under ~6,000 characters, verdict last) to stdout.

    python3 scripts/gpu_report.py --out DIR

Reads (any may be missing; the report then says "missing"):
  DIR/logs/results.tsv      one row per step run: step, name, status, detail, seconds
                            (or logs/results.tsv inside DIR/logs.tar.gz, for a finished run)
  DIR/logs/cli-*.log        cuattn info / check output, quoted in the report
  DIR/bench_<family>.json   `cuattn bench <family> --json`
  DIR/torch_<family>.json   scripts/torch_baseline.py on the same shapes
Standard library only; never needs torch or a GPU.

Families are joined per family: layernorm (and any family without its own code) by
(op, dtype, rows, hidden), times compared as torch/ours; attention by (op, dtype, batch, heads,
len, dim, causal), TFLOP/s compared as ours (tensor_cores kernel) / the best torch SDPA backend.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import tarfile

FAILING = ("fail", "timeout", "missing")
SANITIZERS = ("memcheck", "racecheck", "synccheck", "initcheck")
STDOUT_BUDGET = 6000


# --------------------------------------------------------------------------------- reading
def read_text(out, rel):
    """DIR/rel, else rel inside DIR/logs.tar.gz; None if neither."""
    path = os.path.join(out, rel)
    if os.path.isfile(path):
        with open(path, errors="replace") as f:
            return f.read()
    tgz = os.path.join(out, "logs.tar.gz")
    if os.path.isfile(tgz):
        try:
            with tarfile.open(tgz) as tar:
                f = tar.extractfile(rel)
                if f is not None:
                    return f.read().decode(errors="replace")
        except (KeyError, tarfile.TarError, OSError):
            pass
    return None


def load_results(out):
    text = read_text(out, "logs/results.tsv")
    if text is None:
        return None
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip() or (i == 0 and line.startswith("step\t")):
            continue
        parts = line.split("\t") + [""] * 5
        step, name, status, detail, secs = parts[:5]
        try:
            secs = float(secs)
        except ValueError:
            secs = None
        rows.append({"step": step, "name": name, "status": status, "detail": detail, "seconds": secs})
    return rows


def load_json(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def kv(detail):
    """'passed=3 failed=0 rc=0' -> dict."""
    return dict(re.findall(r"(\w+)=(\S*)", detail or ""))


def num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# -------------------------------------------------------------------------------- formatting
def fmt(v, spec="", missing="missing"):
    if v is None:
        return missing
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


def fmt_secs(s):
    return "" if s is None else f"{s:.1f}"


def md_table(header, rows):
    def cell(c):
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header, rows):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def code_block(text, max_lines, tail=False):
    lines = (text or "").rstrip("\n").splitlines()
    cut = len(lines) > max_lines
    lines = lines[-max_lines:] if tail else lines[:max_lines]
    if cut:
        lines.insert(0, "[...]") if tail else lines.append("[...]")
    return "```\n" + "\n".join(lines) + "\n```"


# ---------------------------------------------------------------------------------- content
def header_info(results):
    info = {r["name"]: r for r in results or [] if r["step"] in ("info", "env") and r["status"] in ("ok", "warn")}
    gpu = info.get("gpu", {}).get("detail", "")
    parts = [p.strip() for p in gpu.split(",")] if gpu else []
    return {
        "card": parts[0] if parts else None,
        "driver": parts[1] if len(parts) > 1 else None,
        "memory": parts[2] if len(parts) > 2 else None,
        "max_sm_clock": parts[3] if len(parts) > 3 else None,
        "date": info.get("date", {}).get("detail") or None,
        "commit": info.get("commit", {}).get("detail") or None,
        "built": info.get("built", {}).get("detail") or None,
        "libs": info.get("libs", {}).get("detail") or None,
    }


def test_rows(results):
    rows = []
    for r in results or []:
        if r["step"] not in ("test", "test-ptx-jit"):
            continue
        d = kv(r["detail"])
        # test-ptx-jit: the backward tests on the compute_80 PTX (gpu-check.sh step b2)
        name = r["name"] + (" (compute_80 PTX, backward)" if r["step"] == "test-ptx-jit" else "")
        rows.append([name, r["status"], d.get("passed", "?"), d.get("failed", "?"), d.get("ignored", "?"),
                     d.get("skipped", "?"), d.get("absent", "-"), fmt_secs(r["seconds"])])
    return rows


def sanitizer_rows(results):
    rows = []
    for r in results or []:
        if r["step"] in SANITIZERS:
            d = kv(r["detail"])
            rows.append([r["step"], r["name"], r["status"], d.get("errors", r["detail"] or "?"), fmt_secs(r["seconds"])])
    return rows


def step_rows(results, steps):
    return [[r["step"], r["name"], r["status"], r["detail"], fmt_secs(r["seconds"])]
            for r in results or [] if r["step"] in steps]


def families(out, results):
    fams = set()
    for pat in ("bench_*.json", "torch_*.json"):
        for p in glob.glob(os.path.join(out, pat)):
            fams.add(os.path.basename(p).split("_", 1)[1][: -len(".json")])
    for r in results or []:
        if r["step"] in ("bench", "torch"):
            fams.add(r["name"])
    return sorted(fams)


def row_key(row):
    return (row.get("op"), row.get("dtype"), row.get("rows"), row.get("hidden"))


def shape_of(row):
    if "rows" in row and "hidden" in row:
        return f"{row['rows']}x{row['hidden']}"
    dims = [f"{k}={row[k]}" for k in ("batch", "heads", "seq_q", "seq_k", "seq", "head_dim") if k in row]
    return " ".join(dims) or "?"


def bench_table(ours, theirs):
    """Rows: op, dtype, shape, ours us, ours GB/s, % copy, torch us, torch GB/s, torch/ours."""
    torch_rows = {row_key(r): r for r in (theirs or {}).get("rows", [])}
    our_copy = num((ours or {}).get("copy_bandwidth_gbs"))
    table, ratios = [], []
    for r in (ours or {}).get("rows", []):
        t = torch_rows.get(row_key(r)) if theirs else None
        us, gbs, pct = num(r.get("time_us")), num(r.get("gbs")), num(r.get("pct_copy"))
        if pct is None and gbs is not None and our_copy:
            pct = 100.0 * gbs / our_copy
        t_us = num(t.get("time_us")) if t else None
        t_gbs = num(t.get("gbs")) if t else None
        ratio = t_us / us if t_us and us else None
        if ratio:
            ratios.append((r.get("op"), r.get("dtype"), ratio))
        torch_missing = "missing" if theirs is None or t is None else ("error" if t.get("error") else "missing")
        table.append([
            r.get("op", "?"), r.get("dtype", "?"), shape_of(r),
            fmt(us, ".2f"), fmt(gbs, ".0f"), fmt(pct, ".1f"),
            fmt(t_us, ".2f", torch_missing), fmt(t_gbs, ".0f", torch_missing),
            fmt(ratio, ".2f", torch_missing),
        ])
    return table, ratios


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


# ---------------------------------------------------------------------------------- attention
ATTN_BACKENDS = ("flash", "efficient", "cudnn", "math")


def attn_key(row):
    """(op, dtype, batch, heads, len, dim, causal), or None if the row lacks one of them."""
    try:
        return (row.get("op") or "forward", str(row["dtype"]), int(row["batch"]), int(row["heads"]),
                int(row["len"]), int(row["dim"]), bool(row.get("causal", False)))
    except (KeyError, TypeError, ValueError):
        return None


def tflops_of(row):
    if row is None:
        return None
    tf = num(row.get("tflops"))
    if tf is None:
        t, f = num(row.get("time_us")), num(row.get("flops"))
        tf = f / (t * 1e-6) / 1e12 if t and f else None
    return tf if tf and tf > 0 else None


def why_none(row, absent="missing", short=False):
    """What to print for a row without a TFLOP/s figure."""
    if row is None:
        return absent
    if row.get("skipped"):
        return "skip" if short else "skipped"
    if row.get("error"):
        return "err" if short else "error"
    return "null" if short else "no time"


def attention_join(ours, theirs):
    """key -> {"ours": {kernel: row}, "torch": {backend: row}}, over both files' rows."""
    joined = {}
    for r in (ours or {}).get("rows", []) or []:
        k = attn_key(r) if isinstance(r, dict) else None
        if k is not None:
            joined.setdefault(k, {"ours": {}, "torch": {}})["ours"][str(r.get("kernel"))] = r
    for r in (theirs or {}).get("rows", []) or []:
        k = attn_key(r) if isinstance(r, dict) else None
        if k is not None:
            joined.setdefault(k, {"ours": {}, "torch": {}})["torch"][str(r.get("backend"))] = r
    return joined


def best_torch(entry):
    best = None
    for name, r in entry["torch"].items():
        tf = tflops_of(r)
        if tf is not None and (best is None or tf > best[1]):
            best = (name, tf)
    return best


def attention_section(fam, ours, theirs):
    """(markdown lines, summary head lines, summary table header, summary table rows)."""
    md, head = [], []
    joined = attention_join(ours, theirs)
    mm = num((theirs or {}).get("matmul_tflops"))
    md.append(md_table(["", ""], [
        ["cuattn device", fmt((ours or {}).get("device"))],
        ["torch device", fmt((theirs or {}).get("device"))],
        ["torch", fmt((theirs or {}).get("torch_version"))],
        ["torch timer", fmt((theirs or {}).get("timer"))
         + (f" (warm-up {theirs.get('warmup_ms')} ms, rep {theirs.get('rep_ms')} ms)"
            if theirs and theirs.get("rep_ms") is not None else "")],
        ["torch bf16 matmul 8192³ (TFLOP/s)", fmt(mm, ".1f", fmt((theirs or {}).get("matmul_error")))],
    ]))
    if ours is None:
        md.append(f"\nbench_{fam}.json: missing")
    if theirs is None:
        md.append(f"\ntorch_{fam}.json: missing")

    # order: op, dtype, dim, causal, len, then the rest
    keys = sorted(joined, key=lambda k: (k[0], k[1], k[5], k[6], k[4], k[2], k[3]))
    ratios = {}  # (dtype, causal) -> [tc / best torch]
    per_backend = {}  # (dtype, causal, backend) -> [tc / backend]
    groups = {}  # (op, dtype, dim) -> md rows
    for k in keys:
        op, dtype, b, h, length, d, causal = k
        e = joined[k]
        tc_row, ex_row = e["ours"].get("tensor_cores"), e["ours"].get("exact")
        un_row = e["ours"].get("unfused_cublas")
        tc, ex, un = tflops_of(tc_row), tflops_of(ex_row), tflops_of(un_row)
        best = best_torch(e)
        ratio = tc / best[1] if tc is not None and best else None
        if ratio is not None:
            ratios.setdefault((dtype, causal), []).append(ratio)
        for name in ATTN_BACKENDS:
            tf = tflops_of(e["torch"].get(name))
            if tc is not None and tf is not None:
                per_backend.setdefault((dtype, causal, name), []).append(tc / tf)
        tc_us = num(tc_row.get("time_us")) if tc_row else None
        no_best = "missing" if theirs is None or not e["torch"] else "none ran"
        row = [f"{b}×{h}×{length}", "yes" if causal else "no",
               fmt(tc_us, ".1f", why_none(tc_row)), fmt(tc, ".1f", why_none(tc_row)),
               fmt(ex, ".1f", "–" if ex_row is None else why_none(ex_row)),
               fmt(un, ".1f", "–" if un_row is None else why_none(un_row)),
               fmt(best[1] if best else None, ".1f", no_best), best[0] if best else "",
               fmt(ratio, ".2f", "–")]
        if mm:
            row.append(fmt(100.0 * tc / mm if tc is not None else None, ".0f", "–"))
        row += [fmt(tflops_of(e["torch"].get(n)), ".1f", why_none(e["torch"].get(n)))
                for n in ATTN_BACKENDS]
        groups.setdefault((op, dtype, d), []).append(row)

    hdr = ["B×H×L", "causal", "ours tc µs", "ours tc", "ours exact", "ours unfused", "best torch", "backend",
           "tc/best"]
    if mm:
        hdr.append("tc % matmul")
    hdr += list(ATTN_BACKENDS)
    for (op, dtype, d), rows in groups.items():
        md.append(f"\n### {op} {dtype}, head dim {d}\n")
        md.append(md_table(hdr, rows))
    if groups:
        md.append("\nTFLOP/s with FLOPs = 4·B·H·L²·D, halved when causal (both sides). ours tc: the "
                  "tensor_cores kernel; ours exact: the exact kernel (run at L ≤ 1024 only); ours unfused: cuBLAS QKᵀ, our softmax kernel, cuBLAS PV. best torch: "
                  "the fastest SDPA backend that ran; tc/best > 1: we are faster. "
                  + ("tc % matmul: our tc TFLOP/s over torch's bf16 8192³ matmul. " if mm else "")
                  + "flash/efficient/cudnn/math: each SDPA backend's TFLOP/s (skipped: math at L > 4096).")

    gm_rows = []
    for (dtype, causal), v in sorted(ratios.items()):
        gm_rows.append([dtype, "yes" if causal else "no", f"{geomean(v):.2f}", len(v)]
                       + [fmt(geomean(per_backend.get((dtype, causal, n), [])), ".2f", "–") for n in ATTN_BACKENDS])
    if gm_rows:
        md.append("\nGeometric mean of ours tc / torch per dtype and causal:\n")
        md.append(md_table(["dtype", "causal", "tc/best", "shapes"] + [f"tc/{n}" for n in ATTN_BACKENDS], gm_rows))

    trows = [r for r in (theirs or {}).get("rows", []) or [] if isinstance(r, dict)]
    errs = [r for r in trows if r.get("error")]
    if errs:
        md.append("\ntorch rows with errors:\n")
        md.append(md_table(["backend", "dtype", "B×H×L", "dim", "causal", "error"],
                           [[r.get("backend"), r.get("dtype"), f"{r.get('batch')}×{r.get('heads')}×{r.get('len')}",
                             r.get("dim"), "yes" if r.get("causal") else "no", r["error"]] for r in errs]))
    skips = {}
    for r in trows:
        if r.get("skipped") and not r.get("error"):
            skips.setdefault((str(r.get("backend")), str(r["skipped"])), []).append(r)
    if skips:
        md.append("\ntorch rows skipped:\n")
        md.append(md_table(["backend", "reason", "rows"], [[b, why, len(v)] for (b, why), v in sorted(skips.items())]))
    our_errs = [r for e in joined.values() for r in e["ours"].values() if tflops_of(r) is None]
    if our_errs:
        md.append("\ncuattn rows without a time:\n")
        md.append(md_table(["kernel", "dtype", "B×H×L", "dim", "causal", "error"],
                           [[r.get("kernel"), r.get("dtype"), f"{r.get('batch')}×{r.get('heads')}×{r.get('len')}",
                             r.get("dim"), "yes" if r.get("causal") else "no", r.get("error") or "no time"]
                            for r in our_errs]))

    # summary: one pivot block per (op, dtype, dim, causal, heads, tokens), columns = L
    head.append(f"\n-- bench {fam}: ours {fmt((ours or {}).get('device'))}; torch {fmt((theirs or {}).get('torch_version'))}"
                + (f"; bf16 matmul {mm:.0f} TFLOP/s" if mm else "; bf16 matmul: missing")
                + ("" if ours else f" (bench_{fam}.json missing)") + ("" if theirs else f" (torch_{fam}.json missing)"))
    if ratios:
        head.append("  ours tc / best torch TFLOP/s geomean (> 1: we are faster): " + ", ".join(
            f"{dt} {'causal' if c else 'full'} {geomean(v):.2f} ({len(v)})" for (dt, c), v in sorted(ratios.items())))
    if errs or skips:
        head.append(f"  torch rows: {len(errs)} with errors, {sum(len(v) for v in skips.values())} skipped (see report.md)")
    if our_errs:
        head.append(f"  cuattn rows without a time: {len(our_errs)} (see report.md)")
    lens = sorted({k[4] for k in keys})
    pivot = {}
    for k in keys:
        op, dtype, b, h, length, d, causal = k
        pivot.setdefault((op, dtype, d, causal, h, b * length), {})[length] = joined[k]
    short = {}
    for g in pivot:
        short.setdefault(g[:4], []).append(g)
    letter = {"flash": "f", "efficient": "e", "cudnn": "c", "math": "m"}
    rows = []
    for g, by_len in pivot.items():
        op, dtype, d, causal, h, tokens = g
        label = (f"{'' if op == 'forward' else op + ' '}{dtype} d{d} {'causal' if causal else 'full'}"
                 + (f" H{h} BL{tokens}" if len(short[g[:4]]) > 1 else ""))
        tc_cells, best_cells, ratio_cells = [], [], []
        for length in lens:
            e = by_len.get(length)
            if e is None:
                for c in (tc_cells, best_cells, ratio_cells):
                    c.append("")
                continue
            tc_row = e["ours"].get("tensor_cores")
            tc, best = tflops_of(tc_row), best_torch(e)
            tc_cells.append(fmt(tc, ".0f", why_none(tc_row, "-", short=True)))
            best_cells.append(f"{best[1]:.0f}{letter.get(best[0], '?')}" if best else "-")
            ratio_cells.append(fmt(tc / best[1] if tc is not None and best else None, ".2f", "-"))
        rows.append([label, "ours tc", *tc_cells])
        rows.append(["", "best torch", *best_cells])
        rows.append(["", "tc/torch", *ratio_cells])
    exact = [(k, tflops_of(e["ours"]["exact"])) for k, e in joined.items() if "exact" in e["ours"]]
    ex_tf = [tf for _, tf in exact if tf is not None]
    if exact:
        head.append(f"  ours exact kernel: {min(ex_tf):.0f}-{max(ex_tf):.0f} TFLOP/s on {len(ex_tf)} of {len(exact)} shapes"
                    f" (L <= {max(k[4] for k, _ in exact)}; per shape in report.md)" if ex_tf else
                    f"  ours exact kernel: no time on {len(exact)} shapes (see report.md)")
    unf = [(tflops_of(e["ours"].get("tensor_cores")), tflops_of(e["ours"]["unfused_cublas"]))
           for e in joined.values() if "unfused_cublas" in e["ours"]]
    unf = [(a, b) for a, b in unf if a is not None and b]
    if unf:
        head.append(f"  ours tc / our unfused cuBLAS baseline: geomean {geomean([a / b for a, b in unf]):.2f} "
                    f"over {len(unf)} rows")
    if rows:
        head.append("  ours tc / best torch SDPA backend, TFLOP/s by L (f=flash e=efficient c=cudnn m=math):")
    return md, head, ["attention", "L:", *[str(x) for x in lens]], rows


# -------------------------------------------------------------------------------------- main
def sparse_section(ours, theirs):
    """Block-sparse: per length, our time at each density, the speedup over our dense kernel, and
    FlexAttention's time with the same blocks (torch_sparse.json)."""
    rows = (ours or {}).get("rows", [])
    flex = {(r.get("len"), r.get("density"), r.get("seed")): r for r in (theirs or {}).get("rows", [])}
    md, table, txt_rows, ratios = [], [], [], []
    for r in rows:
        if r.get("kernel") != "sparse":
            continue
        f = flex.get((r.get("len"), r.get("density"), r.get("seed")))
        f_us = num(f.get("time_us")) if f else None
        us = num(r.get("time_us"))
        ratio = f_us / us if f_us and us else None
        if ratio:
            ratios.append(ratio)
        why = "missing" if f is None else (f.get("error") or f.get("skipped") or "none")[:60]
        cells = [f"1×{r.get('heads')}×{r.get('len')}", fmt(num(r.get("density")), ".2f"),
                 fmt(num(r.get("kept_fraction")), ".3f"), fmt(us, ".1f"), fmt(num(r.get("tflops")), ".1f"),
                 fmt(num(r.get("speedup_vs_dense")), ".2f"), fmt(f_us, ".1f", why), fmt(ratio, ".2f", "–")]
        table.append(cells)
        txt_rows.append([cells[0], cells[1], cells[3], cells[5], cells[6], cells[7]])
    dense = [r for r in rows if r.get("kernel") == "dense"]
    md.append(md_table(["", ""], [
        ["cuattn device", fmt((ours or {}).get("device"))],
        ["torch", fmt((theirs or {}).get("torch_version"))],
        ["our dense kernel (µs by L)", ", ".join(f"{r.get('len')}: {fmt(num(r.get('time_us')), '.0f')}" for r in dense) or "missing"],
    ]))
    md.append("")
    hdr = ["B×H×L", "density", "kept", "ours µs", "ours TFLOP/s", "dense/ours", "flex µs", "flex/ours"]
    md.append(md_table(hdr, table) if table else "bench_sparse.json: missing or empty")
    md.append("\nbf16, D = 128, blocks of 128, random block masks (all kept blocks full). TFLOP/s count kept "
              "blocks only. dense/ours: our dense kernel's time over the sparse one's (target ≥8× at 10% kept, "
              "L = 16k); flex/ours > 1: we are faster than torch.compile'd FlexAttention with the same blocks.")
    head = [f"\n-- bench sparse: torch {fmt((theirs or {}).get('torch_version'))}"
            + (f"; flex/ours geomean {geomean(ratios):.2f} over {len(ratios)} rows" if ratios else "")]
    return md, head, ["B×H×L", "density", "us", "dense/us", "flex_us", "flex/ours"], txt_rows


def decode_section(ours, theirs):
    """Decode: per (dtype, batch, cache length), our time, GB/s and % of copy bandwidth, and the
    fastest torch SDPA backend on the same one-query-vs-cache shape (torch_decode.json)."""
    key = lambda r: (r.get("dtype"), r.get("batch"), r.get("len"), r.get("heads_q"), r.get("heads_kv"), r.get("dim"))
    best = {}
    for r in (theirs or {}).get("rows", []):
        us = num(r.get("time_us"))
        if us and (key(r) not in best or us < num(best[key(r)].get("time_us"))):
            best[key(r)] = r
    table, txt_rows, ratios, pcts = [], [], [], []
    for r in (ours or {}).get("rows", []):
        us, b = num(r.get("time_us")), best.get(key(r))
        t_us = num(b.get("time_us")) if b else None
        ratio = t_us / us if t_us and us else None
        if ratio:
            ratios.append(ratio)
        if r.get("len", 0) >= 32768 and num(r.get("pct_copy")) is not None:
            pcts.append(num(r.get("pct_copy")))
        cells = [r.get("dtype"), f"{r.get('batch')}×{r.get('heads_q')}/{r.get('heads_kv')}×{r.get('len')}",
                 str(r.get("splits")), fmt(us, ".1f"), fmt(num(r.get("gbs")), ".0f"), fmt(num(r.get("pct_copy")), ".0f"),
                 fmt(t_us, ".1f", "missing"), b.get("backend") if b else "", fmt(ratio, ".2f", "–")]
        table.append(cells)
        txt_rows.append([cells[0], cells[1], cells[3], cells[5], cells[6], cells[8]])
    md = [md_table(["", ""], [
        ["cuattn device", fmt((ours or {}).get("device"))],
        ["cuattn copy bandwidth (GB/s)", fmt(num((ours or {}).get("copy_bandwidth_gbs")), ".0f")],
        ["torch", fmt((theirs or {}).get("torch_version"))],
    ]), ""]
    hdr = ["dtype", "B×Hq/Hkv×L", "splits", "ours µs", "GB/s", "% copy", "best torch µs", "backend", "torch/ours"]
    md.append(md_table(hdr, table) if table else "bench_decode.json: missing or empty")
    md.append("\nOne query token per (batch, q-head) against a KV cache of L tokens, D = 128. Bytes = K + V + q + O; "
              "% copy: of our measured device-to-device copy bandwidth (target ≥80% at L ≥ 32k). "
              "torch/ours > 1: we are faster than the fastest SDPA backend on the same shape.")
    head = [f"\n-- bench decode: torch {fmt((theirs or {}).get('torch_version'))}"
            + (f"; torch/ours geomean {geomean(ratios):.2f} over {len(ratios)} rows" if ratios else "")
            + (f"; % copy at L >= 32k: {min(pcts):.0f}-{max(pcts):.0f}" if pcts else "")]
    return md, head, ["dtype", "shape", "us", "%copy", "torch_us", "t/ours"], txt_rows


def build(out):
    results = load_results(out)
    h = header_info(results)
    failing = [r for r in results or [] if r["status"] in FAILING]
    verdict = ("FAIL" if failing else "PASS") if results is not None else "UNKNOWN (results.tsv missing)"
    md, txt = [], []

    # header
    card = h["card"] or "missing"
    md.append(f"# GPU check: {card}\n")
    md.append(md_table(["", ""], [
        ["card", card], ["driver", fmt(h["driver"])], ["memory", fmt(h["memory"])],
        ["max SM clock", fmt(h["max_sm_clock"])], ["date (UTC)", fmt(h["date"])],
        ["commit", fmt(h["commit"])], ["bundle built", fmt(h["built"])], ["libraries", fmt(h["libs"])],
        ["verdict", f"**{verdict}**" + (f" ({len(failing)} failing rows)" if failing else "")],
    ]))
    txt.append(f"== GPU report: {card} | driver {fmt(h['driver'])} | {fmt(h['date'])} | commit {fmt(h['commit'])}")
    if results is None:
        md.append("\nlogs/results.tsv is missing: gpu-check.sh did not get far enough to write it.")
        txt.append("results.tsv: missing")

    # tests
    trows = test_rows(results)
    hdr = ["binary", "status", "passed", "failed", "ignored", "skipped", "absent", "s"]
    md.append("\n## Tests (CUATTN_REQUIRE_GPU=1)\n")
    md.append(md_table(hdr, trows) if trows else "missing: no test binary was run")
    md.append("\nskipped (a failure): a GPU test binary's SKIPPED lines, or no CUDA device anywhere; "
              "absent: CPU tests skipped for a model folder this call did not carry (listed only).")
    fails = [r for r in results or [] if r["step"] == "test-failure"]
    if fails:
        md.append("\nFailing tests:\n")
        md.append(md_table(["test", "message"], [[r["name"], r["detail"]] for r in fails]))
    txt.append("\n-- tests")
    txt.append(text_table(hdr, trows) if trows else "missing")
    for r in fails[:15]:
        txt.append(f"  FAILED {r['name']}: {r['detail'][:150]}")
    if len(fails) > 15:
        txt.append(f"  ... {len(fails) - 15} more failing tests in report.md")

    # sanitizer
    srows = sanitizer_rows(results)
    hdr = ["tool", "binary", "status", "errors", "s"]
    md.append("\n## compute-sanitizer (PROPTEST_CASES=3)\n")
    md.append(md_table(hdr, srows) if srows else "missing: no sanitizer run")
    if any(r[2] == "unsupported" for r in srows):
        md.append("\n`unsupported`: compute-sanitizer refused this device (seen on gVisor machines); not counted as a failure.")
    txt.append("\n-- compute-sanitizer")
    txt.append(text_table(hdr, srows) if srows else "missing")

    # cli + bench steps
    crows = step_rows(results, ("cli", "bench", "torch", "criterion", "env"))
    hdr = ["step", "name", "status", "detail", "s"]
    md.append("\n## CLI and benchmark steps\n")
    md.append(md_table(hdr, crows) if crows else "missing")
    txt.append("\n-- cli / bench steps")
    txt.append(text_table(hdr, [[*r[:3], r[3][:70], r[4]] for r in crows if r[0] != "env"]) if crows else "missing")
    info_log = read_text(out, "logs/cli-info.log")
    check_log = read_text(out, "logs/cli-check.log")
    md.append("\n### `cuattn info`\n")
    md.append(code_block(info_log, 40) if info_log is not None else "missing")
    md.append("\n### `cuattn check`\n")
    md.append(code_block(check_log, 80, tail=True) if check_log is not None else "missing")

    # benchmarks
    bench_txt = []  # (head lines, table header, table rows, head lines kept when even 0 rows do not fit)
    for fam in families(out, results):
        ours = load_json(os.path.join(out, f"bench_{fam}.json"))
        theirs = load_json(os.path.join(out, f"torch_{fam}.json"))
        if fam == "decode":
            fam_md, fam_head, fam_hdr, fam_rows = decode_section(ours, theirs)
            md.append(f"\n## Benchmark: {fam}\n")
            md.extend(fam_md)
            bench_txt.append((fam_head, fam_hdr, fam_rows, 1))
            continue
        if fam == "sparse":
            fam_md, fam_head, fam_hdr, fam_rows = sparse_section(ours, theirs)
            md.append(f"\n## Benchmark: {fam}\n")
            md.extend(fam_md)
            bench_txt.append((fam_head, fam_hdr, fam_rows, 1))
            continue
        if fam in ("attention", "attention-backward"):  # backward: tensor_cores = deterministic mode
            fam_md, fam_head, fam_hdr, fam_rows = attention_section(fam, ours, theirs)
            md.append(f"\n## Benchmark: {fam}\n")
            md.extend(fam_md)
            bench_txt.append((fam_head, fam_hdr, fam_rows, 2))  # title and geomean line
            continue
        table, ratios = bench_table(ours, theirs)
        md.append(f"\n## Benchmark: {fam}\n")
        md.append(md_table(["", ""], [
            ["cuattn device", fmt((ours or {}).get("device"))],
            ["cuattn copy bandwidth (GB/s)", fmt(num((ours or {}).get("copy_bandwidth_gbs")), ".0f")],
            ["torch", fmt((theirs or {}).get("torch_version"))],
            ["torch copy bandwidth (GB/s)", fmt(num((theirs or {}).get("copy_bandwidth_gbs")), ".0f")],
            ["torch timer", fmt((theirs or {}).get("timer"))],
        ]))
        hdr = ["op", "dtype", "shape", "ours us", "ours GB/s", "% copy", "torch us", "torch GB/s", "torch/ours"]
        md.append("")
        if ours is None:
            md.append(f"bench_{fam}.json: missing")
        else:
            md.append(md_table(hdr, table))
            md.append("\n% copy: our GB/s over our own measured device-to-device copy bandwidth. "
                      "torch/ours > 1: we are faster.")
        by_op = {}
        for op, dtype, ratio in ratios:
            by_op.setdefault((op, dtype), []).append(ratio)
        gm = [[op, dt, f"{geomean(v):.2f}", len(v)] for (op, dt), v in sorted(by_op.items())]
        if gm:
            md.append("\nGeometric mean of torch/ours per op and dtype:\n")
            md.append(md_table(["op", "dtype", "torch/ours", "shapes"], gm))
        errs = [r for r in (theirs or {}).get("rows", []) if r.get("error")]
        if errs:
            md.append("\ntorch rows with errors:\n")
            md.append(md_table(["op", "dtype", "shape", "error"],
                               [[r.get("op"), r.get("dtype"), shape_of(r), r["error"]] for r in errs]))
        copy = num((ours or {}).get("copy_bandwidth_gbs"))
        head = [f"\n-- bench {fam}: our copy {fmt(copy, '.0f')} GB/s; torch {fmt((theirs or {}).get('torch_version'))}"
                + ("" if theirs else f" (torch_{fam}.json missing)")]
        ops = {}
        for op, dt, v, _n in gm:
            ops.setdefault(op, []).append(f"{dt} {v}")
        for op, parts in ops.items():
            head.append(f"  torch/ours geomean {op}: " + ", ".join(parts))
        if ours is None:
            head.append(f"bench_{fam}.json: missing")
        bench_txt.append((head, ["op", "dtype", "shape", "us", "GB/s", "%copy", "torch_us", "t/ours"],
                          [r[:6] + [r[6], r[8]] for r in table], None))

    gen = read_text(out, "generate.md")
    if gen is not None:
        md.append("\n## Benchmark: GPT-2 generation (scripts/bench-generate.py)\n")
        # The script's first line ("# date, commit, card, versions") is a note, not a heading.
        md.append("\n".join(l[2:] if l.startswith("# ") else l for l in gen.strip().splitlines()))
        txt.append("\n-- generate (tokens/s)")
        txt.extend(line for line in gen.splitlines() if line.startswith("| ") and "---" not in line)

    # failing rows: listed last, just above the verdict
    if failing:
        md.append("\n## Failing steps\n")
        md.append(md_table(["step", "name", "status", "detail"], [[r["step"], r["name"], r["status"], r["detail"]] for r in failing]))
    md.append("")

    # stdout: fit the budget by trimming bench rows first
    tail = []
    if failing:
        tail.append("\n-- failing steps")
        for r in failing[:20]:
            tail.append(f"  {r['step']} {r['name']}: {r['status']} {r['detail'][:120]}")
        if len(failing) > 20:
            tail.append(f"  ... {len(failing) - 20} more in report.md")
    tail.append(f"\nRESULT: {verdict}" + (f" ({len(failing)} failing rows)" if failing else "") + f"; full report: {os.path.join(out, 'report.md')}")
    head = "\n".join(txt)
    end = "\n".join(tail)
    room = STDOUT_BUDGET - len(head) - len(end) - 2

    def render(limits, short=False):
        parts = []
        for (fam_head, fam_hdr, rows, keep), limit in zip(bench_txt, limits):
            parts.extend(fam_head[:keep] if short and keep else fam_head)
            if rows and limit > 0:
                parts.append(text_table(fam_hdr, rows[:limit]))
            if len(rows) > limit:
                parts.append(f"[... {len(rows) - max(limit, 0)} more rows in report.md]")
        return "\n".join(parts)

    # one row limit per family; over budget, cut the family whose table is now the longest
    limits = [len(rows) for _, _, rows, _ in bench_txt]
    bench = render(limits)
    while len(bench) > room and any(n > 0 for n in limits):
        sizes = [len(text_table(hdr, rows[:n])) if rows and n > 0 else -1
                 for (_, hdr, rows, _), n in zip(bench_txt, limits)]
        i = sizes.index(max(sizes))
        limits[i] = limits[i] - max(1, limits[i] // 8)
        bench = render(limits)
    if len(bench) > room:  # still over with no rows left: families that can say less do
        bench = render(limits, short=True)
    return "\n".join(md), "\n".join(x for x in (head, bench, end) if x)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write DIR/report.md from a gpu-check.sh run and print a summary.")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder gpu-check.sh wrote ($OUT)")
    args = p.parse_args(argv)
    report, summary = build(args.out)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
