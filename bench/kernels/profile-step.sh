#!/usr/bin/env bash
# Kernel-by-kernel device times of one decode step (its CUDA graph's replay, the profiler range of step-profile.ts),
# with Nsight Compute on the GPU host:
#   bash deploy/gpu-host.sh bash bench/kernels/profile-step.sh [MODEL] [BATCH] [PROMPT]
# ncu serialises kernels (programmatic dependent launch overlaps nothing under it), so the sum is an upper bound
# on the graph's time and the table says where the time goes, not the step time. Leaves ncu-<model>-b<batch>.csv
# in $OUT (or the current directory).
set -euo pipefail
MODEL="${1:-llama-2-7b}" BATCH="${2:-1}" PROMPT="${3:-5}"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
[ -n "$NCU" ] || { echo "profile-step: no ncu on this host" >&2; exit 1; }
CSV="${OUT:-.}/ncu-$MODEL-b$BATCH.csv"
REP="$(mktemp -d)/step"
"$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum,launch__grid_size \
  --profile-from-start off -o "$REP" \
  node --import tsx bench/kernels/step-profile.ts --model "$MODEL" --batch "$BATCH" --prompt "$PROMPT" 2>&1 | tail -3
"$NCU" --import "$REP.ncu-rep" --csv --page raw --metrics gpu__time_duration.sum,launch__grid_size >"$CSV"
python3 bench/kernels/ncu-summary.py "$CSV"
