#!/usr/bin/env bash
# Build and run the matmul benchmark with nvcc alone (run from the repository root); the sources compile in
# parallel, ptxas's register and spill report lands in $BUILD_DIR/ptxas.txt:
#   bench/kernels/run.sh [--quick] [--sweep] [--no-pdl] [--json PATH]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
src=native/src/cuda
build_bench matmul-bench ptxas.txt bench/kernels/matmul-bench.cu $src/matmul.cu $src/gemv.cu $src/gemv-one-token.cu $src/gemv-one-token-mma.cu $src/gemv-rows-tma.cu \
  $src/expert-gemv.cu $src/gemm.cu $src/bandwidth.cu $src/cublas-loader.cu $src/device.cc -- -ldl
[ -n "${BUILD_ONLY:-}" ] || "$out/matmul-bench" "$@"
