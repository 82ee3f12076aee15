#!/usr/bin/env bash
# Build and run bench/kernels/read-floor-bench.cu (a bare read of each decode attention case's bytes, one launch a
# layer, timed as the attention bench times its kernel) with nvcc alone, from the repository root; BUILD_ONLY=1
# compiles without running.
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
build_bench read-floor-bench read-floor-ptxas.txt bench/kernels/read-floor-bench.cu native/src/cuda/device.cc
[ -n "${BUILD_ONLY:-}" ] || "$out/read-floor-bench" "$@"
