#!/usr/bin/env bash
# Issue 17's record in one GPU-host call: per preset, weft in-process (bench/decode.ts) with bf16, int8 and int4
# weights at batch 1 and 8, and gpt-fast's own generate() with its own int8 and int4 quantization (quantize.py;
# its Mixtral has int8 only) on random weights of the same shape (bench/anchor/run_gptfast.py), alternating; ends
# with one table: tok/s, x weft's bf16 in the same call, x gpt-fast's same format in the same call.
#
#   bash deploy/gpu-host.sh bash bench/quant-anchor.sh [--presets llama-2-7b,llama-3-8b,mixtral-8x7b:8] ...
#
# The device call carries .bundle/weft-gpu-bundle.tar.xz and .anchors/gpt-fast (see bench/product.sh's header).
# Options:
#   --presets LIST     bench/presets.ts names, NAME:LAYERS for a cut model (mixtral-8x7b alone means 8 layers)
#   --new-tokens N     weft's timed decode steps and gpt-fast's new tokens (default 100 and 200: gpt-fast's tok/s
#                      is over its whole generate(), prefill included, so it gets the longer run)
#   --group-size N     int4 columns per scale, both systems (default 128)
#   --no-anchor        weft alone
#   --head             weft's int8 and int4 with the LM head quantized too (int8+head, int4+head), beside the
#                      projections alone: gpt-fast's quantize.py swaps every nn.Linear, its `output` too
#   --anchor-quants L  gpt-fast's formats to run (default int8,int4), each a compiled run of its own: with both,
#                      a 590 s device call ran out during Llama-3-8B's int4 (session 55); --anchor-quants int4
#                      keeps the figure the int4 bar compares with
#   --device cpu       a dry run without a GPU (no anchor): e.g. --presets llama-2-7b:1 --new-tokens 4
#   --out FILE         the JSON lines of every run (default $OUT/quant-anchor.jsonl on a device run, else
#                      ./quant-anchor.jsonl); bench/results.jsonl is curated by hand from it
set -uo pipefail
cd "$(dirname "$0")/.."

presets=llama-2-7b,llama-3-8b,mixtral-8x7b:8 new_tokens="" group_size=128 anchor=1 device=cuda anchor_quants=int8,int4
weft_quants=none,int8,int4
out="${OUT:+$OUT/quant-anchor.jsonl}"
while [ $# -gt 0 ]; do
  case "$1" in
    --presets) presets="$2"; shift 2 ;;
    --new-tokens) new_tokens="$2"; shift 2 ;;
    --group-size) group_size="$2"; shift 2 ;;
    --no-anchor) anchor=0; shift ;;
    --head) weft_quants=none,int8,int8+head,int4,int4+head; shift ;;
    --anchor-quants) anchor_quants="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "quant-anchor.sh: unknown argument $1 (see the header of bench/quant-anchor.sh)" >&2; exit 2 ;;
  esac
done
out="${out:-quant-anchor.jsonl}"
for quant in ${anchor_quants//,/ }; do
  case "$quant" in
    int8|int4) ;;
    *) echo "quant-anchor.sh: --anchor-quants takes int8 and int4 (got $quant)" >&2; exit 2 ;;
  esac
done
: >"$out"
[ "$device" = cpu ] && anchor=0
if [ "$anchor" = 1 ] && [ ! -f .anchors/gpt-fast/generate.py ]; then
  echo "quant-anchor.sh: no gpt-fast tree at .anchors/gpt-fast (carry it, or pass --no-anchor); going on without it" >&2
  anchor=0
fi

. bench/anchor/gptfast-name.sh  # gptfast_name

failed=0
for entry in ${presets//,/ }; do
  preset="${entry%%:*}" layers="${entry#*:}"
  [ "$layers" = "$entry" ] && layers=""
  [ "$preset" = mixtral-8x7b ] && [ -z "$layers" ] && layers=8
  layer_args=(${layers:+--layers "$layers"})
  tag="s/^{/{\"preset\": \"$preset${layers:+:$layers}\", /"  # each JSON line names its preset
  echo "== $preset${layers:+ ($layers layers)}: weft"
  # bench/decode.ts prints its rows as one JSON line last
  if ! node --import tsx bench/decode.ts --models "$preset" "${layer_args[@]}" --batches 1,8 --prompts 5 \
      --new-tokens "${new_tokens:-100}" --quantize "$weft_quants" --group-size "$group_size" --device "$device" \
      | tee /dev/stderr | tail -1 | grep '^{' | sed "$tag" >>"$out"; then
    echo "quant-anchor.sh: bench/decode.ts failed for $preset" >&2
    failed=1
  fi
  [ "$anchor" = 1 ] || continue
  name="$(gptfast_name "$preset")"
  [ -n "$name" ] || { echo "quant-anchor.sh: no gpt-fast config for $preset" >&2; continue; }
  for quant in ${anchor_quants//,/ }; do
    if [ "$quant" = int4 ] && [[ "$name" == *--moe* ]]; then continue; fi  # gpt-fast's mixtral-moe: int8 only
    echo "== $preset: gpt-fast $quant"
    # shellcheck disable=SC2086 # name carries --moe as its own word
    if ! python3 bench/anchor/run_gptfast.py .anchors/gpt-fast $name "${layer_args[@]}" --quant "$quant" \
        --groupsize "$group_size" --new "${new_tokens:-200}" --samples 3 | tee /dev/stderr | tail -1 | grep '^{' | sed "$tag" >>"$out"; then
      echo "quant-anchor.sh: gpt-fast $quant failed for $preset" >&2
      failed=1
    fi
  done
done

python3 - "$out" <<'EOF'
import json, sys
weft, anchor = [], {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get('bench') == 'decode': weft += [dict(row, preset=r['preset']) for row in r['rows']]
    elif r.get('system') == 'gpt-fast': anchor[(r['preset'], r['quant'])] = r['tok_s']
fmt_of = lambda w: 'int8' if w.startswith('int8') else 'int4' if w.startswith('int4') else None
bf16 = {(r['preset'], r['batch']): r['tokensPerS'] for r in weft if fmt_of(r['weights']) is None}
print('\n| preset | weights | batch | weft tok/s | step ms | x weft bf16 | gpt-fast tok/s | x gpt-fast |')
print('|---|---|---|---|---|---|---|---|')
for r in weft:
    base = bf16.get((r['preset'], r['batch']))
    g = anchor.get((r['preset'], fmt_of(r['weights']))) if r['batch'] == 1 else None
    cells = [r['preset'], r['weights'], r['batch'], f"{r['tokensPerS']:.1f}", f"{r['stepMs']:.3f}",
             f"{r['tokensPerS'] / base:.2f}" if base else '-', g or '-', f"{r['tokensPerS'] / g:.2f}" if g else '-']
    print('| ' + ' | '.join(str(c) for c in cells) + ' |')
EOF
exit "$failed"
