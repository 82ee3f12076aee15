#!/usr/bin/env bash
# The H200 bars still open, in one device call (the host lends an H200 seldom, and a call is limited to 600 s):
# issue 17's record for Llama-2-7B (bench/quant-anchor.sh: weft's bf16, int8 and int4, each also with its LM head
# quantized, at batch 1 and 8, gpt-fast's int4 in the same call) and issue 20's SparQ grid (bench/kernels/sparq-run.sh:
# Llama-2-7B and Llama-3-8B at 4K-32K against the dense split-K kernel). The grid's benchmark compiles while the
# record runs. The device call carries .bundle and .anchors/gpt-fast (bench/product.sh's header):
#   bash deploy/gpu-host.sh bash bench/h200-bars.sh [--fallback 'COMMAND']
# On a GPU other than an H200 it runs nothing of its own (the bars are set on H200), and with --fallback it runs
# COMMAND instead, so that a call which asked for an H200 and got another GPU is not spent on its start alone.
# Output: $OUT/quant-anchor.jsonl and qa.txt (the record), sparq.txt (the grid).
set -uo pipefail
cd "$(dirname "$0")/.."
fallback=""
while [ $# -gt 0 ]; do
  case "$1" in
    --fallback) fallback="$2"; shift 2 ;;
    *) echo "h200-bars.sh: unknown argument $1 (see the header of bench/h200-bars.sh)" >&2; exit 2 ;;
  esac
done
out="${OUT:-.}"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
echo "h200-bars.sh: $gpu"
if [[ $gpu != *H200* ]]; then
  [ -n "$fallback" ] || { echo "h200-bars.sh: not an H200, nothing run (the bars are H200's)"; exit 0; }
  echo "h200-bars.sh: not an H200, running the fallback: $fallback"
  exec bash -c "$fallback"
fi
build_dir=/tmp/bb/sp
(BUILD_DIR=$build_dir BUILD_ONLY=1 bash bench/kernels/sparq-run.sh >/tmp/h200-bars-sparq-build.log 2>&1) &
build=$!
# Limits chosen so that both parts fit one 600 s call after the addon's build (~100 s)
timeout 340 bash bench/quant-anchor.sh --presets llama-2-7b --head --anchor-quants int4 \
  --out "$out/quant-anchor.jsonl" >"$out/qa.txt" 2>&1
echo "h200-bars.sh: record rc=$?"
tail -14 "$out/qa.txt"
if ! wait "$build"; then
  echo "h200-bars.sh: the SparQ benchmark did not build:"
  tail -20 /tmp/h200-bars-sparq-build.log
  exit 1
fi
timeout 110 "$build_dir/sparq-bench" >"$out/sparq.txt" 2>&1
echo "h200-bars.sh: grid rc=$?"
tail -25 "$out/sparq.txt"
