#!/usr/bin/env bash
# Build and run the matmul benchmark with nvcc alone (run from the repository root):
#   bench/kernels/run.sh [--quick] [--sweep] [--json PATH]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/matmul-bench.cu native/src/cuda/matmul.cu native/src/cuda/bandwidth.cu native/src/cuda/cublas-loader.cu \
  -o "$out/matmul-bench" -ldl 2> "$out/ptxas.txt" || { cat "$out/ptxas.txt"; exit 1; }
"$out/matmul-bench" "$@"
