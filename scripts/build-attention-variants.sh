#!/usr/bin/env bash
# Builds the dev-only tile-shape experiment kernels/dev/attention_tc_variants.cu into
# gpu-bundle/dev/attention_tc_variants (a standalone binary: CUDA runtime linked statically, so
# the device machine needs only its driver). Run after scripts/gpu-bundle.sh, which wipes
# gpu-bundle/. On the device: gpu-bundle/dev/attention_tc_variants [--quick].
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/install-cuda-toolchain.sh >/dev/null
cuda="$root/.toolchain/cuda/nvidia/cu13"
nvcc="${NVCC:-$cuda/bin/nvcc}"
mkdir -p gpu-bundle/dev
"$nvcc" -arch=sm_90 -O3 -std=c++17 -I kernels --expt-relaxed-constexpr -Xptxas -v \
  -cudart static -L "$cuda/lib" -o gpu-bundle/dev/attention_tc_variants \
  kernels/dev/attention_tc_variants.cu 2>gpu-bundle/dev/attention_tc_variants.ptxas.log
strip gpu-bundle/dev/attention_tc_variants
echo "built gpu-bundle/dev/attention_tc_variants ($(stat -c %s gpu-bundle/dev/attention_tc_variants) bytes)"
