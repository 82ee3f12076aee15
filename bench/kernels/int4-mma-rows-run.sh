#!/usr/bin/env bash
# Build and run bench/kernels/int4-mma-rows-bench.cu (the tensor-core one-token int4 GEMV experiment beside weft's)
# with nvcc alone, from the repository root; BUILD_ONLY=1 compiles without running.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
src=native/src/cuda
build_bench int4-mma-rows-bench int4-mma-rows-ptxas.txt bench/kernels/int4-mma-rows-bench.cu $src/gemv-one-token.cu \
  $src/gemv-rows-tma.cu $src/bandwidth.cu $src/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/int4-mma-rows-bench"
