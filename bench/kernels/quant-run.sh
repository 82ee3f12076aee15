#!/usr/bin/env bash
# Build and run the quantized-GEMV benchmark with nvcc alone (run from the repository root); the sources compile
# in parallel, ptxas's register and spill report lands in $BUILD_DIR/quant-ptxas.txt:
#   bench/kernels/quant-run.sh [--quick] [--sweep] [--only SHAPE FORMAT T] [--one-token] [--split] [--batches]
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
. bench/kernels/build-bench.sh
src=native/src/cuda
build_bench quant-bench quant-ptxas.txt bench/kernels/quant-bench.cu $src/matmul.cu $src/gemv.cu \
  $src/gemv-one-token.cu $src/gemv-one-token-mma.cu $src/gemv-rows-tma.cu $src/gemv-quant.cu $src/gemv-quant-mma.cu $src/expert-gemv.cu $src/gemm.cu $src/quant-tiles.cu \
  $src/bandwidth.cu $src/cublas-loader.cu $src/device.cc -- -ldl
# The tensor-core kernels' registers and spills (ptxas -v), one line each (kernel<int4, scales in the weights, n-tiles, depth, tiles>).
awk '/Compiling entry function .*quant_mma_kernel/ { match($0, /quant_mma_kernelILb[01]ELb[01]ELi[0-9]ELi[0-9]ELb[01]/); k = substr($0, RSTART, RLENGTH) }
     k && /spill stores/ { sp = $5 " bytes spilled" }
     k && /Used [0-9]+ registers/ { print k ": " $5 " registers, " sp; k = "" }' "$out/quant-ptxas.txt"
# The one-token kernels' registers and spills (gemv_one_token_streaming_kernel<format, rows, depth, row scale>).
awk '/Compiling entry function .*gemv_one_token_(streaming|batched)_kernel/ { match($0, /gemv_one_token_[a-z]+_kernelILNS1_6FormatE[0-9](ELi[0-9]+ELi[0-9]+ELb[01])?/); k = substr($0, RSTART, RLENGTH) }
     k && /spill stores/ { sp = $5 " bytes spilled" }
     k && /Used [0-9]+ registers/ { print k ": " $5 " registers, " sp; k = "" }' "$out/quant-ptxas.txt"
[ -n "${BUILD_ONLY:-}" ] || "$out/quant-bench" "$@"
