#!/usr/bin/env bash
# Build and run the quantized-GEMV benchmark with nvcc alone (run from the repository root):
#   bench/kernels/quant-run.sh [--quick] [--sweep] [--only SHAPE FORMAT T]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
src=native/src/cuda
nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v \
  bench/kernels/quant-bench.cu $src/matmul.cu $src/gemv.cu $src/gemv-one-token.cu $src/gemv-quant.cu $src/gemv-quant-mma.cu $src/expert-gemv.cu $src/gemm.cu \
  $src/bandwidth.cu $src/cublas-loader.cu $src/device.cc \
  -o "$out/quant-bench" -ldl 2> "$out/quant-ptxas.txt" || { cat "$out/quant-ptxas.txt"; exit 1; }
# The tensor-core kernels' registers and spills (ptxas -v), one line each (kernel<int4, small group, n-tiles, depth>).
awk '/Compiling entry function .*quant_mma_kernel/ { match($0, /quant_mma_kernelILb[01]ELb[01]ELi[0-9]ELi[0-9]/); k = substr($0, RSTART, RLENGTH) }
     k && /spill stores/ { sp = $5 " bytes spilled" }
     k && /Used [0-9]+ registers/ { print k ": " $5 " registers, " sp; k = "" }' "$out/quant-ptxas.txt"
[ -n "${BUILD_ONLY:-}" ] || "$out/quant-bench" "$@"
