#!/usr/bin/env bash
# Second device call of the GPU check (docs/gpu-runs/README.md §3): the runtime's GPU tests with the f16
# MiniLM copy carried in models/minilm-f16, over the gpu-bundle/ that the first call left on the
# warm machine, then sentence-transformers on the same sentences (scripts/bench-embed-gpu.py).
# Writes $OUT/minilm.log; exit status that of the test binary.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
OUT="${OUT:-${TMPDIR:-/tmp}/cuattn-gpu-check}"
mkdir -p "$OUT"
libdirs="$(python3 - 2>/dev/null <<'PY'
import glob, os, site
dirs = []
for r in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        d = os.path.realpath(d)
        if d not in dirs:
            dirs.append(d)
dirs.sort(key=lambda d: 0 if d.endswith("cu13/lib") else 1)
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$root/gpu-bundle/tests/gpu"
[ -x "$bin" ] || { echo "gpu-minilm: $bin not found: run the full check first (same warm machine)"; exit 2; }
[ -f models/minilm-f16/model.safetensors ] || { echo "gpu-minilm: carry models/minilm-f16"; exit 2; }
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  CUATTN_MINILM_DIR=models/minilm-f16 CUATTN_REQUIRE_GPU=1 timeout 240 "$bin" runtime --include-ignored --show-output --test-threads=1
} >"$OUT/minilm.log" 2>&1
rc=$?
timeout 120 python3 scripts/bench-embed-gpu.py models/minilm-f16 >>"$OUT/minilm.log" 2>&1
tail -n 40 "$OUT/minilm.log"
exit $rc
