#!/usr/bin/env bash
# Build and run the bifurcated decode attention benchmark with nvcc alone (run from the repository root); the
# sources compile in parallel, ptxas's register and spill report lands in $BUILD_DIR/bifurcated-ptxas.txt:
#   bench/kernels/bifurcated-run.sh
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
build_bench bifurcated-bench bifurcated-ptxas.txt bench/kernels/bifurcated-bench.cu \
  native/src/cuda/attention-bifurcated.cu native/src/cuda/attention-bifurcated-mma.cu \
  native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu \
  native/src/cuda/bandwidth.cu native/src/cuda/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/bifurcated-bench" "$@"
