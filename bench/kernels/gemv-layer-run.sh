#!/usr/bin/env bash
# Build and run bench/kernels/gemv-layer-bench.cu (one decode step's bf16 GEMVs in a graph) with nvcc alone, from the
# repository root; BUILD_ONLY=1 compiles without running.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
src=native/src/cuda
build_bench gemv-layer-bench gemv-layer-ptxas.txt bench/kernels/gemv-layer-bench.cu $src/gemv-one-token.cu $src/gemv-rows-tma.cu \
  $src/bandwidth.cu $src/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/gemv-layer-bench"
