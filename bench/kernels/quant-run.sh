#!/usr/bin/env bash
# Build and run the quantized-GEMV benchmark with nvcc alone (run from the repository root):
#   bench/kernels/quant-run.sh [--quick] [--sweep]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
src=native/src/cuda
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/quant-bench.cu $src/matmul.cu $src/gemv.cu $src/gemv-one-token.cu $src/gemv-quant.cu $src/expert-gemv.cu $src/gemm.cu \
  $src/bandwidth.cu $src/cublas-loader.cu $src/device.cc \
  -o "$out/quant-bench" -ldl 2> "$out/quant-ptxas.txt" || { cat "$out/quant-ptxas.txt"; exit 1; }
[ -n "${BUILD_ONLY:-}" ] || "$out/quant-bench" "$@"
