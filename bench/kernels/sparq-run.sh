#!/usr/bin/env bash
# Build and run the SparQ decode attention benchmark with nvcc alone (run from the repository root); the sources
# compile in parallel, ptxas's register and spill report lands in $BUILD_DIR/sparq-ptxas.txt:
#   bench/kernels/sparq-run.sh [--block B]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
build_bench sparq-bench sparq-ptxas.txt bench/kernels/sparq-bench.cu native/src/cuda/attention-sparq.cu \
  native/src/cuda/attention.cu native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu \
  native/src/cuda/attention-prefill.cu native/src/cuda/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/sparq-bench" "$@"
