#!/usr/bin/env bash
# Build and run bench/kernels/quant-mma-rows-bench.cu (the tensor-core one-token int4/int8 GEMV experiment beside weft's)
# with nvcc alone, from the repository root; BUILD_ONLY=1 compiles without running.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
src=native/src/cuda
# the fragment mapping first, on the host (quant-mma-rows-layout.cc)
g++ -O1 -std=c++17 -o "$out/quant-mma-rows-layout" bench/kernels/quant-mma-rows-layout.cc && "$out/quant-mma-rows-layout"
build_bench quant-mma-rows-bench quant-mma-rows-ptxas.txt bench/kernels/quant-mma-rows-bench.cu $src/gemv-one-token.cu \
  $src/gemv-rows-tma.cu $src/bandwidth.cu $src/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/quant-mma-rows-bench"
