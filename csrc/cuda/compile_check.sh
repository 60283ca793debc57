#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU or a CUDA build of torch: each csrc/cuda/*.cu
# (CUDA toolkit headers only, by design) is compiled with
#   nvcc -c -gencode arch=compute_90,code=sm_90 -O3
# into a temporary directory, so a broken kernel fails CI on CPU-only machines.
# Exits non-zero on the first failure; prints each file's compile time.
# Usage: bash csrc/cuda/compile_check.sh   (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
    echo "compile_check: nvcc not found" >&2
    exit 2
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
files=("$here"/*.cu)
if [ ${#files[@]} -eq 0 ]; then
    echo "compile_check: no .cu files in $here" >&2
    exit 2
fi
for cu in "${files[@]}"; do
    name="$(basename "$cu" .cu)"
    start=$(date +%s)
    "$nvcc" -c -gencode arch=compute_90,code=sm_90 -O3 -std=c++17 -I"$here/.." "$cu" -o "$tmp/$name.o"
    echo "compile_check: $(basename "$cu") ok ($(( $(date +%s) - start )) s)"
done
