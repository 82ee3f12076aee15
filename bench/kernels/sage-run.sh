#!/usr/bin/env bash
# Build and run the quantized prefill attention benchmark (sage-bench.cu) with nvcc alone, from the repository
# root; the sources compile in parallel, ptxas's register and spill report lands in $BUILD_DIR/sage-ptxas.txt:
#   bench/kernels/sage-run.sh    # exact vs int8 vs fp8, Llama-2-7B and Llama-3-8B layers, T = 4K..32K
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
build_bench sage-bench sage-ptxas.txt bench/kernels/sage-bench.cu native/src/cuda/attention.cu \
  native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu native/src/cuda/attention-prefill.cu \
  native/src/cuda/attention-sage.cu native/src/cuda/attention-sage-prepass.cu native/src/cuda/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/sage-bench" "$@"
