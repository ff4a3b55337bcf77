#!/usr/bin/env bash
# Installs what the kernel build needs on a machine with no system CUDA:
#   * a coherent CUDA 13.0 nvcc from PyPI wheels into .toolchain/cuda (ignored by git),
#   * cuobjdump/nvdisasm for reading SASS (disassembly only, version need not match),
#   * libclang for bindgen, via apt, when no libclang is found.
# Idempotent: a second run with everything present returns in well under a second.
#
# Why these exact pins: nvidia-cuda-nvcc names its dependencies without versions, so an
# unpinned install mixes 13.x parts and ptxas fails with "Unsupported .version". The GPU
# machines run driver 580 (CUDA 13.0); newer PTX would not load there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$root/.toolchain/cuda"
stamp="$prefix/.installed-13.0"

pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
sass_tools=(nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)

have_libclang() {
  # clang-sys (bindgen) loads libclang.so, libclang-N.so or libclang.so.N; libclang-cpp is another library.
  local pat='libclang(-[0-9.]+)?\.so'
  [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH" 2>/dev/null | grep -Eq "^$pat" && return 0
  ldconfig -p 2>/dev/null | grep -Eq "[[:space:]]$pat" && return 0
  ls /usr/lib/llvm-*/lib/ 2>/dev/null | grep -Eq "^$pat"
}

if ! have_libclang; then
  echo "install-cuda-toolchain: libclang missing; installing libclang1-14 with apt" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends libclang1-14
fi

if [ -f "$stamp" ] && [ -x "$prefix/nvidia/cu13/bin/nvcc" ]; then
  echo "install-cuda-toolchain: CUDA 13.0 nvcc already at $prefix/nvidia/cu13/bin/nvcc"
  exit 0
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "install-cuda-toolchain: python3 with pip is required" >&2; exit 1; }

echo "install-cuda-toolchain: downloading and installing the CUDA 13.0 nvcc wheels (about 280 MB once installed) into $prefix; pip names each file as it downloads" >&2
rm -rf "$prefix"
mkdir -p "$prefix"
"$python" -m pip install --progress-bar on --disable-pip-version-check --root-user-action=ignore --no-deps --target "$prefix" "${pins[@]}"
# Disassemblers are a separate, unpinned install so they never pull parts into the nvcc set.
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$prefix/sass-tools" "${sass_tools[@]}" ||
  echo "install-cuda-toolchain: cuobjdump/nvdisasm not installed (optional)" >&2

"$prefix/nvidia/cu13/bin/nvcc" --version | tail -n 2
touch "$stamp"
echo "install-cuda-toolchain: done; build.rs finds nvcc at $prefix/nvidia/cu13/bin/nvcc"
