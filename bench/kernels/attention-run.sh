#!/usr/bin/env bash
# Build and run the attention benchmarks with nvcc alone (run from the repository root); the sources compile in
# parallel, ptxas's register and spill report lands in $BUILD_DIR/attention-ptxas.txt:
#   bench/kernels/attention-run.sh              # prefill: tensor cores against the fp32 kernel
#   bench/kernels/attention-run.sh decode       # decode: KV bf16 / fp8 / int8, batch 1 and 8, contexts 2K-32K
#   bench/kernels/attention-run.sh decode 8192  # the same up to 8K positions
#   bench/kernels/attention-run.sh decode 32768 llama3-8b 1 32768  # one shape, batch and context range
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
build_bench attention-bench attention-ptxas.txt bench/kernels/attention-bench.cu native/src/cuda/attention.cu \
  native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu native/src/cuda/attention-prefill.cu \
  native/src/cuda/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/attention-bench" "$@"
