#!/usr/bin/env bash
# Build and run the SparQ decode attention benchmark with nvcc alone (run from the repository root):
#   bench/kernels/sparq-run.sh [--block B]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/sparq-bench.cu native/src/cuda/attention-sparq.cu native/src/cuda/attention.cu native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu native/src/cuda/attention-prefill.cu native/src/cuda/device.cc \
  -o "$out/sparq-bench" 2> "$out/sparq-ptxas.txt" || { cat "$out/sparq-ptxas.txt"; exit 1; }
[ -n "${BUILD_ONLY:-}" ] || "$out/sparq-bench" "$@"
