#!/bin/sh
# Usage: scripts/mkl-any-cpu.sh COMMAND [ARGS...]
#
# Runs COMMAND (a benchmark script) with MKL free to use its AVX-512 kernels on a non-Intel
# CPU, as it does on Intel. Without this, PyTorch's GEMMs on an AMD CPU with AVX-512 run MKL's
# AVX2 code at about half the speed they would reach on an Intel CPU with AVX-512, and a
# benchmark against that baseline flatters us. See mkl-any-cpu.c; BENCHMARKS.md ("An Intel-like
# baseline: PyTorch with MKL's AVX-512 kernels") records what it changed. Needs a C compiler (cc).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../target/mkl-any-cpu"
mkdir -p "$out"
if [ ! -f "$out/libmkl-any-cpu.so" ] || [ "$here/mkl-any-cpu.c" -nt "$out/libmkl-any-cpu.so" ]; then
    cc -shared -fPIC -O2 -o "$out/libmkl-any-cpu.so" "$here/mkl-any-cpu.c"
fi
LD_PRELOAD="$out/libmkl-any-cpu.so${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"
