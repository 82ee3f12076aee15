#!/usr/bin/env bash
# Build and run the bifurcated decode attention benchmark with nvcc alone (run from the repository root):
#   bench/kernels/bifurcated-run.sh
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/bifurcated-bench.cu native/src/cuda/attention-bifurcated.cu native/src/cuda/attention-bifurcated-prefix.cu \
  native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu \
  native/src/cuda/bandwidth.cu native/src/cuda/device.cc \
  -o "$out/bifurcated-bench" 2> "$out/bifurcated-ptxas.txt" || { cat "$out/bifurcated-ptxas.txt"; exit 1; }
[ -n "${BUILD_ONLY:-}" ] || "$out/bifurcated-bench" "$@"
