#!/usr/bin/env bash
# Build and run the attention benchmarks with nvcc alone (run from the repository root); the sources compile in
# parallel, ptxas's register and spill report lands in $BUILD_DIR/attention-ptxas.txt:
#   bench/kernels/attention-run.sh              # prefill: tensor cores against the fp32 kernel
#   bench/kernels/attention-run.sh decode       # decode: KV bf16 / fp8 / int8, batch 1 and 8, contexts 2K-32K
#   bench/kernels/attention-run.sh decode 8192  # the same up to 8K positions
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
srcs=(bench/kernels/attention-bench.cu native/src/cuda/attention.cu native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu
      native/src/cuda/attention-prefill.cu native/src/cuda/device.cc)
pids=() objs=()
for src in "${srcs[@]}"; do
  objs+=("$out/$(basename "$src").o")
  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v -c "$src" \
    -o "$out/$(basename "$src").o" 2> "$out/$(basename "$src").ptxas" &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do wait "${pids[$i]}" || { cat "$out/$(basename "${srcs[$i]}").ptxas"; failed=1; }; done
cat "$out"/*.ptxas > "$out/attention-ptxas.txt"
[ "$failed" = 0 ] || exit 1
nvcc -gencode arch=compute_90a,code=sm_90a "${objs[@]}" -o "$out/attention-bench"
[ -n "${BUILD_ONLY:-}" ] || "$out/attention-bench" "$@"
