#!/usr/bin/env bash
# Build and run the SparQ decode attention benchmark (sparq-bench.cu: seed 002's grid against the dense decode
# kernel, and the issue-20 bar lines at the end) with nvcc alone (run from the repository root); the sources
# compile in parallel, ptxas's register and spill report lands in $BUILD_DIR/sparq-ptxas.txt:
#   BUILD_DIR=/tmp/bb/sp bash bench/kernels/sparq-run.sh [--block B]
# BUILD_ONLY=1 compiles without running (no GPU needed). The kernel's time by step: NVCC_FLAGS=-lineinfo, then
# Nsight Compute's source page through bench/kernels/ncu-phases.py (its header has the commands).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
build_bench sparq-bench sparq-ptxas.txt bench/kernels/sparq-bench.cu native/src/cuda/attention-sparq.cu \
  native/src/cuda/attention.cu native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu \
  native/src/cuda/attention-prefill.cu native/src/cuda/device.cc native/src/cpu/attention-sparq.cc \
  native/src/cpu/thread-pool.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/sparq-bench" "$@"
