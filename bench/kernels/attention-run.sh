#!/usr/bin/env bash
# Build and run the prefill attention benchmark with nvcc alone (run from the repository root):
#   bench/kernels/attention-run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/attention-bench.cu native/src/cuda/attention.cu native/src/cuda/attention-decode.cu native/src/cuda/attention-prefill.cu native/src/cuda/device.cc \
  -o "$out/attention-bench" 2> "$out/attention-ptxas.txt" || { cat "$out/attention-ptxas.txt"; exit 1; }
"$out/attention-bench" "$@"
