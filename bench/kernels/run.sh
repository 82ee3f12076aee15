#!/usr/bin/env bash
# Build and run the matmul benchmark with nvcc alone (run from the repository root):
#   bench/kernels/run.sh [--quick] [--sweep] [--no-pdl] [--json PATH]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
src=native/src/cuda
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/matmul-bench.cu $src/matmul.cu $src/gemv.cu $src/gemv-one-token.cu $src/expert-gemv.cu $src/gemm.cu $src/bandwidth.cu \
  $src/cublas-loader.cu $src/device.cc \
  -o "$out/matmul-bench" -ldl 2> "$out/ptxas.txt" || { cat "$out/ptxas.txt"; exit 1; }
[ -n "${BUILD_ONLY:-}" ] || "$out/matmul-bench" "$@"
