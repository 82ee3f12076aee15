#!/usr/bin/env bash
# Build and run bench/kernels/gemv-layer-bench.cu (one decode step's one-token GEMVs in a graph) with nvcc alone, from
# the repository root: bench/kernels/gemv-layer-run.sh [bf16|int8|int4[@llama-3-8b]]... (default bf16); BUILD_ONLY=1 compiles
# without running.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
src=native/src/cuda
build_bench gemv-layer-bench gemv-layer-ptxas.txt bench/kernels/gemv-layer-bench.cu $src/gemv-one-token.cu $src/gemv-one-token-mma.cu $src/gemv-rows-tma.cu $src/quant-tiles.cu \
  $src/bandwidth.cu $src/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/gemv-layer-bench" "$@"
