#!/usr/bin/env bash
# Build and run the quantized prefill attention benchmark (sage-bench.cu) with nvcc alone, from the repository
# root; the sources compile in parallel, ptxas's register and spill report lands in $BUILD_DIR/sage-ptxas.txt:
#   bench/kernels/sage-run.sh    # exact vs int8 vs fp8, Llama-2-7B and Llama-3-8B layers, T = 4K..32K
# BUILD_ONLY=1 compiles without running (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-/tmp/weft-bench}
mkdir -p "$out"
srcs=(bench/kernels/sage-bench.cu native/src/cuda/attention.cu native/src/cuda/attention-decode.cu native/src/cuda/attention-decode-mma.cu
      native/src/cuda/attention-prefill.cu native/src/cuda/attention-sage.cu
      native/src/cuda/attention-sage-prepass.cu native/src/cuda/device.cc)
pids=() objs=()
for src in "${srcs[@]}"; do
  objs+=("$out/$(basename "$src").o")
  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -I native/src -Xptxas -v -c "$src" \
    -o "$out/$(basename "$src").o" 2> "$out/$(basename "$src").ptxas" &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do wait "${pids[$i]}" || { cat "$out/$(basename "${srcs[$i]}").ptxas"; failed=1; }; done
cat "$out"/*.ptxas > "$out/sage-ptxas.txt"
[ "$failed" = 0 ] || exit 1
nvcc -gencode arch=compute_90a,code=sm_90a "${objs[@]}" -o "$out/sage-bench"
[ -n "${BUILD_ONLY:-}" ] || "$out/sage-bench" "$@"
