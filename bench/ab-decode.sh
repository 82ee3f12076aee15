#!/usr/bin/env bash
# Same-run A/B of decode speed: this tree against a baseline tree, alternating rounds on one GPU, because the
# same code varies by up to ~15% between machines (bench/RESULTS.md) and only same-run ratios mean anything.
#
#   bash deploy/gpu-host.sh bash bench/ab-decode.sh BASE_DIR ROUNDS [bench/decode.ts options...]
#   e.g. ... bash bench/ab-decode.sh .ab/base 2 --models llama-2-7b --batches 1,8 --prompts 5 --new-tokens 100
#
# BASE_DIR holds the baseline's sources (`git archive COMMIT | tar -x -C BASE_DIR`, carried to the GPU host); its
# addon is built there with WEFT_CUDA=1 and it shares this tree's node_modules. This tree's addon is the one
# deploy/gpu-host.sh built. Each run's JSON line is kept in $AB_OUT (default ./ab-decode.jsonl), tagged with
# tree and round; the script ends with a table: tok/s per (model, batch, prompt), the median of each tree, the ratio.
set -euo pipefail
BASE="${1:?baseline directory}"
ROUNDS="${2:?rounds}"
shift 2
OUT_FILE="${AB_OUT:-ab-decode.jsonl}"
: >"$OUT_FILE"
[ -d "$BASE" ] || { echo "ab-decode: no baseline tree at $BASE" >&2; exit 1; }
[ -e "$BASE/node_modules" ] || ln -s "$(readlink -f node_modules)" "$BASE/node_modules"
(cd "$BASE" && WEFT_CUDA=1 node native/build.mjs >/dev/null) || { echo "ab-decode: the baseline addon did not build" >&2; exit 1; }

for round in $(seq 1 "$ROUNDS"); do
  (cd "$BASE" && node --import tsx bench/decode.ts "$@" 2>&1) | tee /dev/stderr | tail -1 | sed "s/^/{\"tree\":\"base\",\"round\":$round,\"result\":/; s/\$/}/" >>"$OUT_FILE"
  node --import tsx bench/decode.ts "$@" 2>&1 | tee /dev/stderr | tail -1 | sed "s/^/{\"tree\":\"new\",\"round\":$round,\"result\":/; s/\$/}/" >>"$OUT_FILE"
done

node - "$OUT_FILE" <<'JS'
const lines = require('node:fs').readFileSync(process.argv[2], 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const cells = new Map();
for (const { tree, result } of lines)
  for (const r of result.rows) {
    const key = `${r.model} batch ${r.batch} prompt ${r.prompt}`;
    const cell = cells.get(key) ?? { base: [], new: [], floorMs: r.floorMs };
    cell[tree].push(r.tokensPerS);
    cells.set(key, cell);
  }
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
console.log('\n| shape | base tok/s (runs) | new tok/s (runs) | new / base | floor ms |');
console.log('|---|---|---|---|---|');
for (const [key, c] of cells)
  console.log(`| ${key} | ${median(c.base).toFixed(1)} (${c.base.map((x) => x.toFixed(1)).join(', ')}) | ${median(c.new).toFixed(1)} (${c.new.map((x) => x.toFixed(1)).join(', ')}) | ${(median(c.new) / median(c.base)).toFixed(3)} | ${c.floorMs.toFixed(3)} |`);
JS
