#!/usr/bin/env bash
# The product path against its floors and gpt-fast, in one GPU-host call: per preset, a checkpoint of real shape
# written to /tmp, weft in-process (bench/decode.ts, batch 1 and 8), gpt-fast's own generate() on random weights
# of the same shape (bench/anchor/run_gptfast.py), then `weft generate` and `weft serve` (bench/product.ts);
# ends with one table over every preset. Weft and gpt-fast alternate (in-process, gpt-fast, product).
#
#   bash deploy/gpu-host.sh bash bench/product.sh [--presets llama-2-7b,llama-3-8b,mixtral-8x7b:8] [--quick] ...
#
# The device call carries .bundle/weft-gpu-bundle.tar.xz and .anchors/gpt-fast (a snapshot of gpt-fast's
# repository, kept out of git: `git --git-dir=<clone> archive HEAD | tar -x -C .anchors/gpt-fast`).
# Options:
#   --presets LIST      bench/presets.ts names, NAME:LAYERS for a cut model (default llama-2-7b; mixtral-8x7b
#                       alone means 8 of its 32 layers)
#   --new-tokens N      tokens generated per sequence on every path (default 200)
#   --concurrency LIST  concurrent streams against weft serve (default 8,64)
#   --samples N         gpt-fast runs timed after its compile (median; default 3)
#   --quick             defaults of 64 new tokens and concurrency 8; no torch bandwidth probe. gpt-fast still takes
#                       its 3 samples (a sample is under a second; one alone gave 187 tok/s where 3 at 200 tokens
#                       gave 199-205 on the same H200). Its tok/s is its new tokens over its whole generate() (the
#                       5-token prefill and 63 steps), weft's generate row its decode steps alone: under 1% apart
#   --scale             serving at scale: `weft serve` alone (no in-process, generate or gpt-fast rows), 64 and 256
#                       concurrent streams of 512 prompt tokens (a prompt of its own each) + 256 new tokens, under
#                       --gpu-memory-fraction 0.95; TTFT p50/p99 and each batch's decode-step roofline (the bytes of
#                       the weights and of the KV at the mean context over the read bandwidth, the FLOPs over the
#                       tensor-core rate). llama-2-7b on an H200: about 3 to 4 minutes after the addon build (probe,
#                       a 13.5 GB checkpoint in about a minute, serve load, per batch an untimed and a timed round)
#   --serve-prompt-tokens N  with --scale, each stream's prompt length (default 512)
#   --bandwidth GBS     read bandwidth for the floors instead of weft's probe (with --device cpu: floors at that figure)
#   --tensor-tflops N   tensor-core rate for --scale's compute floor (default: bench/product.ts's, an H200's on cuda)
#   --no-anchor         skip gpt-fast
#   --device cpu        a dry run of this script without a GPU: --tiny checkpoints (bench/decode.ts keeps the
#                       preset's shape: name a cut one, e.g. --presets llama-2-7b:1), no floors (unless --bandwidth),
#                       no anchor. The scale path's smoke run, every stage once in a minute:
#                       bash bench/product.sh --scale --device cpu --concurrency 2,4 --new-tokens 24 \
#                         --serve-prompt-tokens 40 --bandwidth 20 --tensor-tflops 1
#   --keep              keep the checkpoints (reused by a later run while the machine stays); default: removed
#   --out FILE          JSON lines appended (default $OUT/bench-product.jsonl on a device run, where $OUT comes back;
#                       else ./bench-product.jsonl); bench/results.jsonl is curated by hand from it
# Environment: WEFT_COMMIT names the commit when the tree has no .git; WEFT_BENCH_DIR (default /tmp/weft-bench).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

presets=llama-2-7b new_tokens='' concurrency='' samples='' quick=0 scale=0 anchor=1 keep=0 device=cuda out="${OUT:-.}/bench-product.jsonl"
serve_prompt_tokens=512 bandwidth='' tensor_tflops=''
while [ "$#" -gt 0 ]; do
  case "$1" in
    --presets) presets="$2"; shift 2 ;;
    --new-tokens) new_tokens="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --samples) samples="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --scale) scale=1; anchor=0; shift ;;
    --serve-prompt-tokens) serve_prompt_tokens="$2"; shift 2 ;;
    --bandwidth) bandwidth="$2"; shift 2 ;;
    --tensor-tflops) tensor_tflops="$2"; shift 2 ;;
    --no-anchor) anchor=0; shift ;;
    --keep) keep=1; shift ;;
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "product.sh: unknown argument $1 (see the header of bench/product.sh)" >&2; exit 2 ;;
  esac
done
# --quick changes the defaults only: a value given on the command line wins
if [ "$quick" = 1 ]; then : "${new_tokens:=64}" "${concurrency:=8}"; fi
if [ "$scale" = 1 ]; then : "${new_tokens:=256}" "${concurrency:=64,256}"; fi
: "${new_tokens:=200}" "${concurrency:=8,64}" "${samples:=3}"
work="${WEFT_BENCH_DIR:-/tmp/weft-bench}"
mkdir -p "$work"
run_rows="$work/run.jsonl"
: >"$run_rows"
export WEFT_COMMIT="${WEFT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
stage() { stage_name="$1"; stage_t0="$(now)"; echo; echo "== $1"; }
done_stage() { echo "-- $stage_name: $(since "$stage_t0")"; }
total_t0="$(now)"
failed=0

. bench/anchor/gptfast-name.sh  # gptfast_name

if [ "$anchor" = 1 ] && [ ! -f .anchors/gpt-fast/generate.py ]; then
  echo "product.sh: no gpt-fast tree at .anchors/gpt-fast (carry it, or pass --no-anchor); going on without the anchor" >&2
  anchor=0
fi

tiny_args=() floor_args=()
if [ "$device" = cpu ]; then
  tiny_args=(--tiny)
  anchor=0
elif [ -z "$bandwidth" ]; then
  stage "read bandwidth"
  bandwidth="$(node --import tsx bench/bandwidth.ts | tail -1 | sed 's/.*"bandwidthGBs":\([0-9.]*\).*/\1/')"
  echo "weft's probe: $bandwidth GB/s"
  if [ "$quick" = 0 ] && [ "$anchor" = 1 ]; then python3 bench/anchor/bw.py || echo "(torch bandwidth probe failed)"; fi
  done_stage
fi
[ -n "$bandwidth" ] && floor_args=(--bandwidth "$bandwidth")
[ -n "$tensor_tflops" ] && floor_args+=(--tensor-tflops "$tensor_tflops")

for entry in ${presets//,/ }; do
  preset="${entry%%:*}"
  layers="${entry#*:}"
  [ "$layers" = "$entry" ] && layers=""
  [ "$preset" = mixtral-8x7b ] && [ -z "$layers" ] && layers=8
  label="$preset${layers:+-l$layers}"
  ckpt="$work/$label"
  layer_args=(${layers:+--layers "$layers"})

  stage "$label: checkpoint"
  made_by="make-checkpoint.py --preset $preset ${layer_args[*]} ${tiny_args[*]}"
  if [ "$(cat "$ckpt/.complete" 2>/dev/null)" = "$made_by" ]; then
    echo "reusing $ckpt ($made_by)"
  else
    rm -rf "$ckpt"
    python3 bench/make-checkpoint.py "$ckpt" --preset "$preset" "${layer_args[@]}" "${tiny_args[@]}"
    echo "$made_by" >"$ckpt/.complete"
  fi
  done_stage

  in_process_args=()
  scale_args=()
  if [ "$scale" = 1 ]; then
    scale_args=(--no-generate --serve-prompt-tokens "$serve_prompt_tokens" --weft-args "--gpu-memory-fraction 0.95")
  else
    stage "$label: weft in-process (bench/decode.ts)"
    if node --import tsx bench/decode.ts --models "$preset" "${layer_args[@]}" --batches 1,8 --prompts 5 --new-tokens "$new_tokens" --device "$device" | tee "$work/$label.decode.log"; then
      in_process_args=(--in-process "$work/$label.decode.log")
    else
      echo "bench/decode.ts failed; the table goes on without the in-process rows" >&2
      failed=1
    fi
    done_stage
  fi

  anchor_args=()
  name="$(gptfast_name "$preset")"
  if [ "$anchor" = 1 ] && [ -n "$name" ]; then
    stage "$label: gpt-fast ($name, compile included)"
    # shellcheck disable=SC2086 # the name carries --moe for Mixtral
    if python3 bench/anchor/run_gptfast.py .anchors/gpt-fast $name "${layer_args[@]}" --new "$new_tokens" --samples "$samples" | tee "$work/$label.gptfast.log"; then
      anchor_args=(--anchor "$work/$label.gptfast.log")
    else
      echo "gpt-fast failed; the table goes on without it" >&2
      failed=1
    fi
    done_stage
  fi

  stage "$label: weft generate and weft serve (bench/product.ts)"
  node --import tsx bench/product.ts --model "$ckpt" --name "$label" --device "$device" --new-tokens "$new_tokens" --concurrency "$concurrency" \
    "${floor_args[@]}" "${in_process_args[@]}" "${anchor_args[@]}" "${scale_args[@]}" --out "$run_rows" || failed=1
  done_stage
  [ "$keep" = 1 ] || rm -rf "$ckpt"
done

cat "$run_rows" >>"$out"
echo
echo "== all: $(wc -l <"$run_rows") rows appended to $out in $(since "$total_t0")"
echo
node --import tsx bench/product-table.ts "$run_rows"
[ "$failed" = 0 ] || { echo "product.sh: a stage failed (see above)" >&2; exit 1; }
