#!/usr/bin/env bash
# Runs ON THE GPU MACHINE from the repo root, over the binaries that scripts/gpu-bundle.sh
# built into gpu-bundle/ (no cargo needed there). See docs/gpu-runs/README.md.
#
# Steps (each timed, each logged under $OUT/logs/, each one row in $OUT/logs/results.tsv):
#   a. card, date, commit                      d. cuattn info / cuattn check
#   b. every test binary, CUATTN_REQUIRE_GPU=1 e. cuattn bench <family> --json + torch baseline
#   c. compute-sanitizer memcheck + racecheck + initcheck  e2. criterion benches (short), c2. synccheck
#      over the *gpu* test binaries               (both only if the time budget allows)
#   f. scripts/gpu_report.py -> $OUT/report.md and the summary (printed last);
#      $OUT/logs/ is packed into $OUT/logs.tar.gz.
#   e3. GPT-2 generation tokens/s against Hugging Face (scripts/bench-generate.py -> $OUT/generate.md)
#   b2. the backward and forward attention GPU tests once more on the compute_80 PTX (CUDA_FORCE_PTX_JIT=1; optional)
# Order run: a b d e e3 c e2 c2 b2 f, so the benchmark data is taken before the slow sanitizer runs.
#
# results.tsv: header "step name status detail seconds", tab-separated, one row per run;
#   status is ok | fail | timeout | missing | unsupported | skip | warn;
#   fail, timeout and missing make the exit status 1 (unsupported: compute-sanitizer refused the
#   device, as on gVisor machines; skip: optional step left out for time; warn: a library not found).
#   A required step not run because earlier steps spent the budget is a timeout.
#
# Env knobs: OUT (default /tmp/cuattn-gpu-check), GPU_CHECK_BUDGET_S (soft wall-clock budget, default 360),
#   BENCH_FAMILIES (default "layernorm attention attention-backward sparse sparse-backward decode training-ops"), GPU_CHECK_SYNCCHECK=0 to skip synccheck,
#   GPU_CHECK_TORCH=0 to skip the PyTorch baselines (a rerun that only needs our numbers),
#   TORCH_FAMILIES: run the PyTorch baseline only for these families (default: all benched),
#   GPU_CHECK_SANITIZERS=0 to skip memcheck/racecheck/initcheck/synccheck (never for a final report),
#   GPU_CHECK_CRITERION=0 to skip the criterion benches,
#   GPU_CHECK_GENERATE=0 to skip the GPT-2 generation benchmark (e3: scripts/bench-generate.py, 240 s cap: graph and --no-cuda-graph runs),
#   GPU_CHECK_PTX_JIT=0 to skip b2 (the backward and forward attention GPU tests once more on the compute_80 PTX; optional),
#   GPU_TEST_ARGS: extra arguments for every test binary (e.g. "--skip runtime_minilm" when the
#   MiniLM folder is not carried; docs/gpu-runs/README.md runs that test in a second call).
#   Families: layernorm, attention, sparse, decode (cuattn bench decode + torch_baseline.py decode,
#   capped like layernorm), training-ops (ours only: GB/s against the measured copy bandwidth),
#   sparse-backward (ours only: the sparse backward against our dense backward).
# Caps per family (bench_cap / torch_cap below): layernorm 120 s + 120 s, attention 240 s + 120 s.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2

BENCH_FAMILIES="${BENCH_FAMILIES:-layernorm attention attention-backward sparse sparse-backward decode training-ops}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-360}"
OUT="${OUT:-${TMPDIR:-/tmp}/cuattn-gpu-check}"
BUNDLE="$root/gpu-bundle"
LOGS="$OUT/logs"
RESULTS="$LOGS/results.tsv"
export PYTHONUNBUFFERED=1
export CARGO_MANIFEST_DIR="$root" # for tests that look it up at run time
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}" # binaries are stripped: backtraces say <unknown>

mkdir -p "$OUT"
rm -rf "$LOGS" "$OUT/logs.tar.gz" "$OUT/report.md" "$OUT"/bench_*.json "$OUT"/torch_*.json
mkdir -p "$LOGS"
scratch="$(mktemp -d)" # criterion's output folder, not kept
trap 'rm -rf "$scratch"' EXIT
printf 'step\tname\tstatus\tdetail\tseconds\n' >"$RESULTS"

t0="$(date +%s%N)"
now_ms() { echo $((($(date +%s%N) - t0) / 1000000)); }
remaining_s() { echo $((BUDGET_S - $(now_ms) / 1000)); }

# clean FIELD: no tabs or newlines, at most 300 characters
clean() { printf '%s' "$1" | tr '\t\r\n' '   ' | cut -c1-300; }

# record STEP NAME STATUS DETAIL SECONDS
record() {
  set -- "$1" "$2" "$3" "${4//rc=200/not run: time budget spent}" "$5"
  printf '%s\t%s\t%s\t%s\t%s\n' "$(clean "$1")" "$(clean "$2")" "$(clean "$3")" "$(clean "$4")" "$5" >>"$RESULTS"
  printf '[%6.1fs] %-12s %-30s %-11s %s\n' "$(awk -v m="$(now_ms)" 'BEGIN{print m/1000}')" "$1" "$2" "$3" "$(clean "$4" | cut -c1-120)"
}

# time_limit CAP: min(CAP, budget left - 15 s), the timeout run_timed gives a step
time_limit() {
  local left lim="$1"
  left=$(($(remaining_s) - 15))
  [ "$left" -lt "$lim" ] && lim=$left
  echo "$lim"
}

# run_timed CAP LOG CMD... : runs CMD with a timeout of min(CAP, budget left - 15 s), output to LOG.
# Sets RC (124 = timed out, 200 = not run: no time left) and SECS.
run_timed() {
  local cap="$1" log="$2"
  shift 2
  local lim start
  lim="$(time_limit "$cap")"
  if [ "$lim" -lt 5 ]; then
    echo "not run: time budget of ${BUDGET_S}s spent" >"$log"
    RC=200
    SECS=0
    return
  fi
  start="$(date +%s%N)"
  timeout --kill-after=10 "$lim" "$@" >"$log" 2>&1
  RC=$?
  [ "$RC" -eq 137 ] && RC=124
  SECS="$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
}

# ---------------------------------------------------------------- a. card, date, commit
echo "== gpu-check: $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET_S}s"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$LOGS/info-gpu.log"
  gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | head -n1)"
  nvidia-smi >>"$LOGS/info-gpu.log" 2>&1
  record info gpu ok "$gpu" 0
else
  record info gpu missing "nvidia-smi not found" 0
fi
record info date ok "$(date -u +%Y-%m-%dT%H:%M:%SZ)" 0
if [ -f "$BUNDLE/MANIFEST.txt" ]; then
  cp "$BUNDLE/MANIFEST.txt" "$LOGS/MANIFEST.txt"
  record info commit ok "$(sed -n 's/^commit: //p' "$BUNDLE/MANIFEST.txt" | head -n1)" 0
  record info built "ok" "$(sed -n 's/^date: //p' "$BUNDLE/MANIFEST.txt" | head -n1)" 0
else
  record info commit missing "gpu-bundle/MANIFEST.txt not found: run scripts/gpu-bundle.sh and carry gpu-bundle" 0
fi

# Libraries: cuBLAS/NVRTC live in PyTorch's environment under site-packages/nvidia/*/lib.
libdirs="$(python3 - 2>/dev/null <<'EOF'
import glob, os, site, sys
roots = []
try:
    roots += list(site.getsitepackages())
except Exception:
    pass
try:
    import nvidia
    roots += [os.path.dirname(p) for p in nvidia.__path__]
except Exception:
    pass
roots.append(sys.prefix)
seen = []
for r in roots:
    for pat in ("nvidia/cu13/lib", "nvidia/*/lib", "lib/python3*/site-packages/nvidia/*/lib"):
        for d in sorted(glob.glob(os.path.join(r, pat))):
            d = os.path.realpath(d)
            if os.path.isdir(d) and d not in seen:
                seen.append(d)
# cu13 (cuBLAS 13) first
seen.sort(key=lambda d: 0 if d.endswith("cu13/lib") else 1)
print(":".join(seen))
EOF
)"
if [ -z "$libdirs" ]; then
  prefix="$(python3 -c 'import sys; print(sys.prefix)' 2>/dev/null || echo /usr)"
  libdirs="$(find "$prefix" -type d -path '*site-packages/nvidia/*/lib' 2>/dev/null | sort | paste -sd: -)"
fi
[ -d /usr/local/cuda/lib64 ] && libdirs="${libdirs:+$libdirs:}/usr/local/cuda/lib64"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  nvcc --version 2>&1 | tail -n 2
} >"$LOGS/info-env.log" 2>&1
libinfo=""
libstatus=ok
for lib in libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13; do
  found=""
  IFS=: read -ra dirs <<<"$LD_LIBRARY_PATH"
  for d in "${dirs[@]}"; do
    if [ -n "$d" ] && [ -e "$d/$lib" ]; then found="$d"; break; fi
  done
  if [ -z "$found" ] && ldconfig -p 2>/dev/null | grep -q "$lib"; then found="ldconfig"; fi
  [ -z "$found" ] && { found="NOT FOUND"; libstatus=warn; }
  libinfo="$libinfo $lib=$found;"
  echo "$lib: $found" >>"$LOGS/info-env.log"
done
record env libs "$libstatus" "$libinfo" 0

SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
if [ -z "$SANITIZER" ]; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [ -x "$c" ]; then SANITIZER="$c"; break; fi
  done
fi

shopt -s nullglob
test_bins=()
for f in "$BUNDLE"/tests/*; do [ -x "$f" ] && test_bins+=("$f"); done

# ---------------------------------------------------------------- b. test binaries
# parse_test LOG STRICT -> "passed=N failed=M ignored=K skipped=S absent=A results=R", and LOG.failures
# (name<TAB>message). skipped (a failure): SKIPPED lines of a GPU test binary (STRICT=1), or
# "SKIPPED (no CUDA device)" anywhere; absent: other binaries' other SKIPPED lines (a model folder
# this call did not carry), listed only.
parse_test() {
  awk -v failures="$1.failures" -v strict="$2" '
    /^test result: / {
      results++
      for (i = 1; i <= NF; i++) {
        v = $(i - 1) + 0
        if ($i ~ /^passed;?$/) passed += v
        if ($i ~ /^failed;?$/) failed += v
        if ($i ~ /^ignored;?$/) ignored += v
      }
      infail = 0
      next
    }
    /^failures:$/ { infail = 1; no = 0; next }
    /^$/ && infail == 2 { infail = 0 }
    infail && /^    [^ ]+$/ { infail = 2; order[++no] = $1; next }
    /^thread .* panicked at / {
      match($0, /'\''[^'\'']+'\''/)
      pname = substr($0, RSTART + 1, RLENGTH - 2)
      want = pname
      next
    }
    want != "" { if (!(want in msg) || msg[want] == "") msg[want] = $0; want = ""; next }
    /SKIPPED/ && (strict || /SKIPPED \(no CUDA device\)/) { skipped++; skiplines = skiplines " | " $0; next }
    /SKIPPED/ { absent++ }
    END {
      printf "passed=%d failed=%d ignored=%d skipped=%d absent=%d results=%d\n", passed, failed, ignored, skipped, absent, results
      for (i = 1; i <= no; i++) { n = order[i]; if (!(n in done)) { done[n] = 1; printf "%s\t%s\n", n, msg[n] > failures } }
      if (skipped) printf "SKIPPED\t%s\n", substr(skiplines, 4, 250) > failures
    }' "$1"
}

if [ "${#test_bins[@]}" -eq 0 ]; then
  record test "gpu-bundle/tests" missing "no test binaries: run scripts/gpu-bundle.sh and carry gpu-bundle" 0
fi
for bin in "${test_bins[@]}"; do
  name="$(basename "$bin")"
  log="$LOGS/test-$name.log"
  # shellcheck disable=SC2086 # GPU_TEST_ARGS is a list of words
  run_timed 150 "$log" env CUATTN_REQUIRE_GPU=1 "$bin" --show-output ${GPU_TEST_ARGS:-}
  rm -f "$log.failures"
  case "$name" in *gpu*) strict=1 ;; *) strict=0 ;; esac
  counts="$(parse_test "$log" "$strict")"
  status=ok
  case "$RC" in
    0) ;;
    124) status=timeout ;;
    200) status=timeout ;; # not run: budget spent by earlier steps
    *) status=fail ;;
  esac
  if [ "$status" = ok ]; then
    case "$counts" in
      *" failed=0 "*" skipped=0 "*) ;;
      *) status=fail ;;
    esac
    case "$counts" in *" results=0") status=fail ;; esac
  fi
  record test "$name" "$status" "$counts rc=$RC" "$SECS"
  if [ -s "$log.failures" ]; then
    while IFS=$'\t' read -r tname tmsg; do
      record test-failure "$name::$tname" fail "$tmsg" 0
    done <"$log.failures"
  fi
  rm -f "$log.failures"
done

# ---------------------------------------------------------------- d. cuattn info / check
CLI="$BUNDLE/bin/cuattn"
if [ -x "$CLI" ]; then
  run_timed 30 "$LOGS/cli-info.log" "$CLI" info
  case "$RC" in 0) s=ok ;; 124) s=timeout ;; 200) s=timeout ;; *) s=fail ;; esac
  record cli info "$s" "rc=$RC" "$SECS"
  run_timed 90 "$LOGS/cli-check.log" env CUATTN_REQUIRE_GPU=1 "$CLI" check
  case "$RC" in 0) s=ok ;; 124) s=timeout ;; 200) s=timeout ;; *) s=fail ;; esac
  record cli check "$s" "rc=$RC" "$SECS"
else
  record cli cuattn missing "gpu-bundle/bin/cuattn not found" 0
fi

# ---------------------------------------------------------------- e. benchmarks + torch baseline
json_ok() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d.get("rows", [])))' "$1" 2>/dev/null; }
bench_cap() { case "$1" in attention | attention-backward) echo 240 ;; *) echo 120 ;; esac; } # cuattn bench FAMILY
torch_cap() { case "$1" in attention) echo 120 ;; sparse) echo 150 ;; *) echo 120 ;; esac; } # torch_baseline.py FAMILY (sparse: torch.compile)
for fam in $BENCH_FAMILIES; do
  ours="$OUT/bench_$fam.json"
  theirs="$OUT/torch_$fam.json"
  if [ -x "$CLI" ]; then
    # shellcheck disable=SC2016 # expanded by the inner bash
    run_timed "$(bench_cap "$fam")" "$LOGS/bench-$fam.log" bash -c '"$1" bench "$2" --json >"$3.tmp"' _ "$CLI" "$fam" "$ours"
    n="$(json_ok "$ours.tmp")"
    if [ "$RC" -eq 0 ] && [ -n "$n" ]; then
      mv "$ours.tmp" "$ours"
      record bench "$fam" ok "rows=$n" "$SECS"
    else
      [ -f "$ours.tmp" ] && mv "$ours.tmp" "$LOGS/bench-$fam.stdout"
      case "$RC" in 124) s=timeout ;; 200) s=timeout ;; *) s=fail ;; esac
      record bench "$fam" "$s" "rc=$RC; stdout is not bench JSON" "$SECS"
    fi
  else
    record bench "$fam" missing "no cuattn binary" 0
  fi
  if [ "${GPU_CHECK_TORCH:-1}" = 0 ]; then
    record torch "$fam" skip "GPU_CHECK_TORCH=0" 0
  elif [ -n "${TORCH_FAMILIES+x}" ] && ! [[ " $TORCH_FAMILIES " == *" $fam "* ]]; then
    record torch "$fam" skip "not in TORCH_FAMILIES" 0
  elif [ "$fam" = training-ops ]; then
    record torch "$fam" skip "no PyTorch baseline for this family (judged against copy bandwidth)" 0
  elif [ "$fam" = sparse-backward ]; then
    record torch "$fam" skip "no PyTorch baseline for this family (judged against our dense backward)" 0
  elif [ -f "$ours" ]; then
    # torch_baseline.py stops measuring (rows left: "skipped") 15 s before its timeout, so the
    # JSON still comes out (attention only; layernorm ignores --time-budget-s)
    tb=$(($(time_limit "$(torch_cap "$fam")") - 15))
    [ "$tb" -lt 1 ] && tb=1
    # shellcheck disable=SC2016 # expanded by the inner bash
    run_timed "$(torch_cap "$fam")" "$LOGS/torch-$fam.log" bash -c \
      'python3 scripts/torch_baseline.py "$1" --shapes-from "$2" --time-budget-s "$4" --json >"$3.tmp"' _ "$fam" "$ours" "$theirs" "$tb"
    n="$(json_ok "$theirs.tmp")"
    if [ "$RC" -eq 0 ] && [ -n "$n" ]; then
      mv "$theirs.tmp" "$theirs"
      record torch "$fam" ok "rows=$n" "$SECS"
    else
      [ -f "$theirs.tmp" ] && mv "$theirs.tmp" "$LOGS/torch-$fam.stdout"
      case "$RC" in 124) s=timeout ;; 200) s=timeout ;; *) s=fail ;; esac
      record torch "$fam" "$s" "rc=$RC; see logs/torch-$fam.log" "$SECS"
    fi
  else
    record torch "$fam" missing "no bench_$fam.json to take shapes from" 0
  fi
done

# ---------------------------------------------------------------- e3. text generation
# GPT-2 tokens/s, ours (device KV cache; decoding steps replayed from a CUDA graph, and with
# --no-cuda-graph op by op) against Hugging Face (sdpa and eager) on the same card,
# tiny fixture and a 124M-shaped random model the script writes to /tmp. Table in $OUT/generate.md.
if [ "${GPU_CHECK_GENERATE:-1}" = 0 ]; then
  record generate gpt2 skip "GPU_CHECK_GENERATE=0" 0
elif [ ! -x "$CLI" ]; then
  record generate gpt2 missing "no cuattn binary" 0
else
  # shellcheck disable=SC2016 # expanded by the inner bash
  run_timed 240 "$LOGS/generate.log" bash -c \
    'python3 scripts/bench-generate.py --device cuda --dtype f16 --bin "$1" --repeats 2 --max-new-tokens 64 >"$2.tmp"' _ "$CLI" "$OUT/generate.md"
  if [ "$RC" -eq 0 ] && grep -q '^| 124m | 8 ' "$OUT/generate.md.tmp"; then
    mv "$OUT/generate.md.tmp" "$OUT/generate.md"
    record generate gpt2 ok "tiny and 124m, batch 1 and 8" "$SECS"
  else
    [ -f "$OUT/generate.md.tmp" ] && mv "$OUT/generate.md.tmp" "$LOGS/generate.stdout"
    case "$RC" in 124) s=timeout ;; 200) s=timeout ;; *) s=fail ;; esac
    record generate gpt2 "$s" "rc=$RC; see logs/generate.log" "$SECS"
  fi
fi

# ---------------------------------------------------------------- e4. fine-tuning on the GPU
# `cuattn finetune --device cuda` on the tiny fixture in each --dtype (the CUDA training
# backend end to end; its op-level tests are in the gpu test binary): 8 steps, JSON out.
if [ "${GPU_CHECK_FINETUNE:-1}" = 0 ]; then
  record cli finetune-cuda skip "GPU_CHECK_FINETUNE=0" 0
elif [ ! -x "$CLI" ]; then
  record cli finetune-cuda missing "no cuattn binary" 0
else
  for dt in f32 bf16 f16; do
    ft_out="$OUT/finetune-$dt"
    rm -rf "$ft_out"
    # shellcheck disable=SC2016 # expanded by the inner bash
    run_timed 120 "$LOGS/finetune-$dt.log" bash -c \
      '"$1" finetune --device cuda --dtype "$2" --model tests/fixtures/finetune-tiny/model --train tests/fixtures/finetune-tiny/train.tsv --max-steps 8 --json --out "$3" >"$3.json"' _ "$CLI" "$dt" "$ft_out"
    steps="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["steps"])' "$ft_out.json" 2>/dev/null)"
    if [ "$RC" -eq 0 ] && [ "$steps" = 8 ]; then
      record cli "finetune-cuda-$dt" ok "8 steps" "$SECS"
    else
      case "$RC" in 124) s=timeout ;; 200) s=timeout ;; *) s=fail ;; esac
      record cli "finetune-cuda-$dt" "$s" "rc=$RC; see logs/finetune-$dt.log" "$SECS"
    fi
  done
fi

# ---------------------------------------------------------------- c. compute-sanitizer
# Tests that repeat large launches many times add minutes under the sanitizer and no coverage:
# the same kernels run in the other tests.
# One test thread: with 16 test threads racecheck stalled past its 120 s cap on an H200
# (2026-11-26, run 4), while the same binary single-threaded finished in 42 s with 0 hazards.
# fused_matches_unfused_baseline_at_long_sequences runs L = 2048 through cuBLAS and our kernels:
# minutes under racecheck, and the same kernels run in the other (short) tests.
SANITIZER_TEST_ARGS="${SANITIZER_TEST_ARGS:---skip bitwise_deterministic --skip many_rows --skip fused_matches_unfused --skip long_caches --test-threads=1}"
sanitize() { # TOOL BIN CAP
  local tool="$1" bin="$2" cap="$3" name errs s
  name="$(basename "$bin")"
  local log="$LOGS/$tool-$name.log"
  # shellcheck disable=SC2086 # SANITIZER_TEST_ARGS is a list of words
  run_timed "$cap" "$log" env PROPTEST_CASES=3 CUATTN_REQUIRE_GPU=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 99 "$bin" $SANITIZER_TEST_ARGS
  errs="$(sed -n -e 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p' \
    -e 's/.*RACECHECK SUMMARY: [0-9]* hazards displayed (\([0-9][0-9]*\) error.*/\1/p' "$log" | tail -n1)"
  case "$RC" in
    0) s=ok ;;
    124) s=timeout ;;
    200) s=timeout ;;
    *) s=fail ;;
  esac
  [ "$s" = ok ] && [ -n "$errs" ] && [ "$errs" != 0 ] && s=fail
  if [ "$s" = fail ] && grep -qiE 'device not supported|not supported on this (device|platform)' "$log"; then
    s=unsupported
  fi
  record "$tool" "$name" "$s" "errors=${errs:-?} rc=$RC" "$SECS"
}
gpu_bins=()
for bin in "${test_bins[@]}"; do
  case "$(basename "$bin")" in *gpu*) gpu_bins+=("$bin") ;; esac
done
if [ "${GPU_CHECK_SANITIZERS:-1}" = 0 ]; then
  record memcheck "-" skip "GPU_CHECK_SANITIZERS=0" 0
elif [ -z "$SANITIZER" ]; then
  record memcheck "-" missing "compute-sanitizer not found" 0
elif [ "${#gpu_bins[@]}" -eq 0 ]; then
  record memcheck "-" skip "no test binary named *gpu*" 0
else
  for tool in memcheck racecheck initcheck; do
    for bin in "${gpu_bins[@]}"; do sanitize "$tool" "$bin" 120; done
  done
fi

# ---------------------------------------------------------------- e2. criterion benches (optional)
for bin in "$BUNDLE"/benches/*; do
  [ -x "$bin" ] || continue
  name="$(basename "$bin")"
  if [ "${GPU_CHECK_CRITERION:-1}" = 0 ]; then
    record criterion "$name" skip "GPU_CHECK_CRITERION=0" 0
    continue
  fi
  if [ "$(remaining_s)" -lt 60 ]; then
    record criterion "$name" skip "time budget" 0
    continue
  fi
  run_timed 60 "$LOGS/criterion-$name.log" \
    env CARGO_TARGET_DIR="$scratch" "$bin" --bench --warm-up-time 0.5 --measurement-time 1 --noplot
  case "$RC" in 0) s=ok ;; 124) s=timeout ;; 200) s=skip ;; *) s=fail ;; esac
  record criterion "$name" "$s" "rc=$RC; log only" "$SECS"
done

# ---------------------------------------------------------------- c2. synccheck (optional)
if [ -n "$SANITIZER" ] && [ "${GPU_CHECK_SYNCCHECK:-1}" != 0 ] && [ "${GPU_CHECK_SANITIZERS:-1}" != 0 ]; then
  for bin in "${gpu_bins[@]}"; do
    if [ "$(remaining_s)" -lt 90 ]; then
      record synccheck "$(basename "$bin")" skip "time budget" 0
      continue
    fi
    sanitize synccheck "$bin" 60
  done
fi

# ---------------------------------------------------------------- b2. sm_80 code on this card (optional)
# The backward's dK/dV kernels have an sm_80-only form of their Q/dO tile loads (attention_bwd.cu,
# QDO_ROW_STEP), which step b never runs on a newer card (it runs the sm_90 SASS).
# CUDA_FORCE_PTX_JIT=1 makes the driver JIT-compile the fatbins' compute_80 PTX, built with the
# sm_80 forms, for this card instead; the backward GPU tests then run on that code. The forward's
# sm_80 and sm_90 code differ too (attention_tc.cu, KvLoadForm: sm_90's sparse HD 64 K_0 load), so
# its dense and sparse GPU tests (`attention::`, `sparse::`, explicit TensorCore/Exact kernels)
# run as well, less the two that mostly time cuBLAS (the unfused baseline's). Only those tests:
# the Hopper module carries no PTX. The first load of a module JIT-compiles all of it.
if [ "${GPU_CHECK_PTX_JIT:-1}" = 0 ]; then
  record test-ptx-jit "-" skip "GPU_CHECK_PTX_JIT=0" 0
else
  for bin in "${gpu_bins[@]}"; do
    name="$(basename "$bin")"
    if [ "$(remaining_s)" -lt 200 ]; then
      record test-ptx-jit "$name" skip "time budget" 0
      continue
    fi
    log="$LOGS/test-ptx-jit-$name.log"
    run_timed 240 "$log" env CUDA_FORCE_PTX_JIT=1 CUATTN_REQUIRE_GPU=1 "$bin" --show-output \
      attention_backward:: sparse_backward:: attention:: sparse:: --skip fused_matches_unfused --skip unfused_baseline
    rm -f "$log.failures"
    counts="$(parse_test "$log" 1)"
    case "$RC" in 0) status=ok ;; 124 | 200) status=timeout ;; *) status=fail ;; esac
    if [ "$status" = ok ]; then
      case "$counts" in *" failed=0 "*" skipped=0 "*) ;; *) status=fail ;; esac
      case "$counts" in *"passed=0 "* | *" results=0") status=fail ;; esac
    fi
    record test-ptx-jit "$name" "$status" "$counts rc=$RC" "$SECS"
    if [ -s "$log.failures" ]; then
      while IFS=$'\t' read -r tname tmsg; do
        record test-failure "ptx-jit::$name::$tname" fail "$tmsg" 0
      done <"$log.failures"
    fi
    rm -f "$log.failures"
  done
fi

# ---------------------------------------------------------------- f. report (printed last)
failures="$(awk -F'\t' 'NR > 1 && ($3 == "fail" || $3 == "timeout" || $3 == "missing") { n++ } END { print n + 0 }' "$RESULTS")"
echo "== gpu-check: all steps done in $(($(now_ms) / 1000))s; $failures failing rows"
python3 scripts/gpu_report.py --out "$OUT" 2>"$OUT/report.err"
report_rc=$?
if [ -s "$OUT/report.err" ]; then mv "$OUT/report.err" "$LOGS/report.err"; else rm -f "$OUT/report.err"; fi
if [ "$report_rc" -ne 0 ]; then
  echo "gpu-check: gpu_report.py failed (rc=$report_rc); results.tsv:"
  cat "$RESULTS"
  [ -f "$LOGS/report.err" ] && tail -n 20 "$LOGS/report.err"
  failures=$((failures + 1))
fi
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
[ "$failures" -eq 0 ]
