#!/usr/bin/env bash
# Runs a command with kernel-timeline.cc loaded (every kernel's start and end on the GPU, also inside CUDA graphs, with
# their overlap as it happened) and summarises the decode graph's replays (timeline-summary.py):
#   bash deploy/gpu-host.sh bash bench/kernels/timeline-run.sh [--kernel NAME] -- node --import tsx bench/decode.ts ...
# The library is built here with g++ against the CUDA toolkit's CUPTI; the rows land in ${OUT:-.}/kernel-timeline.csv.
# With it loaded, decode.ts's steps ran within 0.5% of the same runs without it (bench/RESULTS.md, session 17).
set -euo pipefail
summary_args=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do summary_args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ "$#" -gt 0 ] || { echo "timeline-run: usage: timeline-run.sh [--kernel NAME] [--layer N] -- COMMAND..." >&2; exit 2; }
header="$(find /usr/local/cuda*/ -name cupti.h -path '*include*' 2>/dev/null | head -1 || true)"
library="$(find /usr/local/cuda*/ \( -name 'libcupti.so' -o -name 'libcupti.so.[0-9]*' \) 2>/dev/null | head -1 || true)"
[ -n "$header" ] && [ -n "$library" ] || { echo "timeline-run: no CUPTI (cupti.h, libcupti.so) under /usr/local/cuda*" >&2; exit 1; }
injection="$(mktemp -d)/libkernel-timeline.so"
g++ -O2 -std=c++17 -shared -fPIC -I "$(dirname "$header")" "$(dirname "$0")/kernel-timeline.cc" "$library" -o "$injection"
csv="${OUT:-.}/kernel-timeline.csv"
LD_LIBRARY_PATH="$(dirname "$library")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" WEFT_TIMELINE_OUT="$csv" \
  CUDA_INJECTION64_PATH="$injection" "$@"
[ -s "$csv" ] || { echo "timeline-run: $csv was not written (did the command use the GPU?)" >&2; exit 1; }
python3 "$(dirname "$0")/timeline-summary.py" "$csv" ${summary_args[@]+"${summary_args[@]}"}
