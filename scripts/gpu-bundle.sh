#!/usr/bin/env bash
# Builds the release test, bench and CLI binaries HERE (no GPU needed) and copies them,
# stripped, into gpu-bundle/ (git-ignored), which the device call carries:
#
#   gpu-bundle/bin/cuattn              the CLI (info, check, bench)
#   gpu-bundle/tests/<target>          the test targets that touch a GPU: tests/gpu/ (every GPU test) and
#                                      each tests/*.rs that reads CUATTN_REQUIRE_GPU (cli_generate); the
#                                      CPU-only targets (twins, references, CPU runtime tests, the lib's
#                                      unit tests) stay out: CI runs them, and together they would put
#                                      the bundle over its limit (67 MB with them, 2026-11-26)
#   gpu-bundle/benches/<bench>         criterion benches (only with GPU_BUNDLE_BENCHES=1: size)
#   gpu-bundle/MANIFEST.txt            commit (+ -dirty), date, rustc, every file with size and sha256
#
# Then, on the device: bash scripts/gpu-check.sh (see docs/gpu-runs/README.md).
# Idempotent: the folder is wiped and rebuilt on every run. Fails if the bundle is over 60 MB.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/gpu-bundle"
limit_bytes=$((60 * 1000 * 1000))

command -v python3 >/dev/null || { echo "gpu-bundle: python3 is required (parses cargo's JSON)" >&2; exit 1; }

bash scripts/install-cuda-toolchain.sh

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "gpu-bundle: cargo test --release --features testing --no-run" >&2
cargo test --release --features testing --no-run --message-format=json >"$work/test.json"
# Criterion benches embed every kernel (~11 MB each) and only feed logs: left out unless asked for.
if [ "${GPU_BUNDLE_BENCHES:-0}" = 1 ]; then
  echo "gpu-bundle: cargo bench --features testing --no-run" >&2
  cargo bench --features testing --no-run --message-format=json >"$work/bench.json"
else
  : >"$work/bench.json"
fi
echo "gpu-bundle: cargo build --release --features testing --bin cuattn" >&2
cargo build --release --features testing --bin cuattn --message-format=json >"$work/bin.json"

# Turn cargo's compiler-artifact messages into "dest<TAB>source" lines.
python3 - "$work" >"$work/plan.tsv" <<'EOF'
import json, sys, os

work = sys.argv[1]

def artifacts(path):
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
                yield msg

plan = {}

def add(dest, src):
    if dest in plan and plan[dest] != src:
        sys.exit(f"gpu-bundle: two artifacts for {dest}: {plan[dest]} and {src}")
    plan[dest] = src

def touches_gpu(target):
    """tests/gpu/ (src_path tests/gpu/main.rs), or a test file that reads CUATTN_REQUIRE_GPU."""
    src = target.get("src_path", "")
    if os.path.basename(os.path.dirname(src)) == "gpu":
        return True
    try:
        with open(src) as f:
            return "CUATTN_REQUIRE_GPU" in f.read()
    except OSError:
        return False

left_out = []
for msg in artifacts(os.path.join(work, "test.json")):
    t = msg["target"]
    if not msg.get("profile", {}).get("test"):
        continue
    kinds = t.get("kind", [])
    if "test" in kinds and touches_gpu(t):
        add(f"tests/{t['name']}", msg["executable"])
    elif "test" in kinds or "lib" in kinds:
        left_out.append(t["name"])
    # unit tests of bins/examples are not bundled
with open(os.path.join(work, "left_out.txt"), "w") as f:
    f.write(" ".join(sorted(set(left_out))))

for msg in artifacts(os.path.join(work, "bench.json")):
    t = msg["target"]
    if "bench" in t.get("kind", []):
        add(f"benches/{t['name']}", msg["executable"])

for msg in artifacts(os.path.join(work, "bin.json")):
    t = msg["target"]
    if "bin" in t.get("kind", []) and t["name"] == "cuattn" and not msg.get("profile", {}).get("test"):
        add("bin/cuattn", msg["executable"])

if "bin/cuattn" not in plan:
    sys.exit("gpu-bundle: cargo built no cuattn binary")
if not any(k.startswith("tests/") for k in plan):
    sys.exit("gpu-bundle: cargo built no test executables")

for dest in sorted(plan):
    print(f"{dest}\t{plan[dest]}")
EOF

rm -rf "$bundle"
mkdir -p "$bundle/bin" "$bundle/tests" "$bundle/benches"
while IFS=$'\t' read -r dest src; do
  cp "$src" "$bundle/$dest"
  strip "$bundle/$dest"
  chmod 755 "$bundle/$dest"
done <"$work/plan.tsv"

commit="$(git rev-parse --verify -q HEAD 2>/dev/null)" || commit=no-commit
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit-dirty"; fi

{
  echo "commit: $commit"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "rustc: $(rustc --version)"
  echo "host: $(uname -m)"
  echo "CPU-only test targets left out (CI runs them): $(cat "$work/left_out.txt")"
  echo "files: (path bytes sha256)"
  (cd "$bundle" && find bin tests benches -type f | sort | while read -r f; do
    printf '%s %s %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
  done)
} >"$bundle/MANIFEST.txt"

total="$(du -sb "$bundle" | cut -f1)"
cat "$bundle/MANIFEST.txt"
echo "gpu-bundle: total $total bytes ($(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1e6 }') MB) in $bundle"
if [ "$total" -gt "$limit_bytes" ]; then
  echo "gpu-bundle: bundle is over the 60 MB limit; the device call carries at most 64 MiB with the tree" >&2
  exit 1
fi
