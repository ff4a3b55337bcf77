#!/usr/bin/env bash
# Type-checks the `candle-cuda` feature (src/candle/cuda.rs against candle's CUDA backend)
# without building candle-kernels' CUDA code. Nothing is linked or run; no GPU is needed.
#
# Why: candle-kernels' build script compiles 11 PTX modules and then a static library of 15
# quantized-matmul sources (`libmoe.a`, minutes per file on a small machine). `cargo check`
# needs neither: it reads the crate's Rust, whose only use of the build output is
# `include_str!` of the PTX files (string constants) and `extern "C"` declarations that only a
# link would resolve. So this script
#   1. copies candle-kernels (the version in Cargo.lock) from cargo's registry into a
#      temporary folder and gives the copy a build script that writes the same `ptx.rs`
#      constants over empty PTX files (no nvcc, no static library, no link directives),
#      without its `cudaforge` build-dependency;
#   2. copies this working tree (tracked and untracked files, not target/) into the same
#      temporary folder, so the repository's Cargo.lock and config are never touched;
#   3. runs `cargo check --features candle-cuda,testing --all-targets` there with
#      `--config patch.crates-io.candle-kernels.path=...` (command-line config only), under
#      `nice -n 19`, with the target dir of this tree (dependencies already checked are reused).
# The copy's type signatures are candle-kernels' own (only build.rs and Cargo.toml differ), so
# a type error in our code against candle's CUDA API shows up exactly as with the real crate.
#
# Env knobs: CARGO_TARGET_DIR (default: <repo>/target), CANDLE_CHECK_KEEP=1 keeps the temporary
# folder, CANDLE_CHECK_ARGS (default "--all-targets"): what to check besides the library,
# CANDLE_CHECK_CLIPPY=1: `cargo clippy ... -- -D warnings` instead of `cargo check`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

version="$(awk '/^name = "candle-kernels"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' Cargo.lock)"
if [[ -z "$version" ]]; then
    echo "Cargo.lock names no candle-kernels: run 'cargo fetch --features candle-cuda' once" >&2
    exit 2
fi
registry="${CARGO_HOME:-$HOME/.cargo}/registry/src"
src="$(ls -d "$registry"/*/candle-kernels-"$version" 2>/dev/null | head -n 1 || true)"
if [[ -z "$src" ]]; then
    cargo fetch --quiet
    src="$(ls -d "$registry"/*/candle-kernels-"$version" | head -n 1)"
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/cuattn-candle-check.XXXXXX")"
if [[ "${CANDLE_CHECK_KEEP:-0}" != 1 ]]; then
    trap 'rm -rf "$tmp"' EXIT
fi

# 1. candle-kernels with a PTX-constants-only build script.
kernels="$tmp/candle-kernels"
cp -r "$src" "$kernels"
chmod -R u+w "$kernels"
# Drop the cudaforge build-dependency (the only thing the original build script uses).
awk '/^\[build-dependencies\.cudaforge\]$/ { skip = 1; next } /^\[/ { skip = 0 } !skip' \
    "$src/Cargo.toml" >"$kernels/Cargo.toml"
cat >"$kernels/build.rs" <<'EOF'
// Written by cuattn's scripts/check-candle-cuda.sh for `cargo check` only: the PTX constants
// of src/lib.rs's `ptx` module over empty files, one per top-level src/*.cu (the files the
// original build script compiles to PTX). No CUDA code is compiled and nothing is linked.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let mut names: Vec<String> = fs::read_dir("src")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".cu").map(str::to_owned))
        .filter(|n| !n.starts_with("moe_") && !n.starts_with("mmq_") && n != "mmvq_gguf")
        .collect();
    names.sort();
    let mut consts = String::new();
    for n in &names {
        fs::write(out.join(format!("{n}.ptx")), "").unwrap();
        consts.push_str(&format!(
            "pub const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{n}.ptx\"));\n",
            n.to_uppercase()
        ));
    }
    fs::write(out.join("ptx.rs"), consts).unwrap();
}
EOF

# 2. This working tree (not target/, not .git), with the toolchain link build.rs looks for.
tree="$tmp/cuattn"
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$tree"
if [[ -e .toolchain ]]; then
    ln -s "$(readlink -f .toolchain)" "$tree/.toolchain"
fi

# 3. The check.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
echo "candle-kernels $version (build script replaced) in $kernels"
echo "checking a copy of $root in $tree (target dir $CARGO_TARGET_DIR)"
cd "$tree"
# shellcheck disable=SC2086 # CANDLE_CHECK_ARGS is a list of arguments
tool=(check)
lints=()
if [[ "${CANDLE_CHECK_CLIPPY:-0}" == 1 ]]; then
    tool=(clippy)
    lints=(-- -D warnings)
fi
time nice -n 19 cargo "${tool[@]}" \
    --config "patch.crates-io.candle-kernels.path=\"$kernels\"" \
    --features candle-cuda,testing ${CANDLE_CHECK_ARGS---all-targets} "${lints[@]}"
echo "candle-cuda ${tool[0]}: OK"
