#!/usr/bin/env bash
# Same-run A/B of decode speed: this tree against one or more baseline trees, alternating rounds on one GPU, because
# the same code varies by up to ~15% between machines (bench/RESULTS.md) and only same-run ratios mean anything.
#
#   bash deploy/gpu-host.sh bash bench/ab-decode.sh BASE[,BASE...] ROUNDS [bench/decode.ts options...]
#   e.g. ... bash bench/ab-decode.sh .ab/main.tgz,.ab/variant.tgz 2 --models llama-2-7b --batches 1,8 --prompts 5 \
#              --new-tokens 100 --quantize int4
#
# A BASE is a directory holding a baseline's sources (`git archive COMMIT | tar -x -C DIR`), or a gzipped tar of the
# paths where it differs from this tree (`git archive COMMIT native worker | gzip > .ab/NAME.tgz`: ~0.3 MB where the
# whole tree is ~35 MB, and a device call carries 64 MiB, .bundle's ~30 MB among them; folders held whole replace this
# tree's), or of the files alone (`tar -czf .ab/NAME.tgz FILE...` in a checkout of it: a few KB, laid over this tree's;
# a file the baseline deletes stays), unpacked over a copy of this tree (its node_modules, native/build, .ab, .anchors
# and .bundle left out) into $AB_DIR/NAME (default /tmp/ab-decode). A tree is named by its directory or archive name
# without .tgz; this tree is "new". The baselines' addons are built in parallel (WEFT_CUDA, default 1: the CUDA addon)
# and share this tree's node_modules; this tree's addon is the one deploy/gpu-host.sh built (or, with AB_BUILD_SELF=1,
# one built beside theirs). Each run's JSON line is kept in $AB_OUT (default ./ab-decode.jsonl), tagged with tree and
# round; the script ends with a table: tok/s per (model, batch, prompt), each tree's runs and median, and new's median
# over each baseline's.
set -euo pipefail
BASES="${1:?baseline directories or archives, comma-separated}"
ROUNDS="${2:?rounds}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ab-decode: ROUNDS must be a whole number >= 1, not '$ROUNDS'" >&2; exit 1; }
shift 2
OUT_FILE="${AB_OUT:-ab-decode.jsonl}"
AB_DIR="${AB_DIR:-/tmp/ab-decode}"
: >"$OUT_FILE"

names=() dirs=()
for base in ${BASES//,/ }; do
  name="$(basename "$base" .tgz)"
  if [ -d "$base" ]; then
    dir="$base"
  elif [ -f "$base" ]; then
    dir="$AB_DIR/$name"
    rm -rf "$dir" && mkdir -p "$dir"
    tar --exclude=./node_modules --exclude=./native/build --exclude=./.ab --exclude=./.anchors --exclude=./.bundle \
      -cf - . | tar -xf - -C "$dir"
    # a top-level folder the archive has an entry for (git archive's `native/`) goes whole; files without their
    # folder's entry (`tar -czf x.tgz native/src/cuda/a.cu`) are laid over this tree's
    for path in $(tar -tzf "$base" | sed 's|^\./||' | grep -E '^[^/]+/$' | cut -d/ -f1 | sort -u); do
      case "$path" in ''|.|..) ;; *) rm -rf "${dir:?}/$path" ;; esac
    done
    tar -xzf "$base" -C "$dir" || { echo "ab-decode: cannot unpack $base" >&2; exit 1; }
  else
    echo "ab-decode: no baseline tree or archive at $base" >&2
    exit 1
  fi
  [ -e "$dir/node_modules" ] || ln -s "$(readlink -f node_modules)" "$dir/node_modules"
  names+=("$name") dirs+=("$dir")
done

# AB_BUILD_SELF=1 builds this tree's addon here too, at the same time as the baselines' (run under `WEFT_SKIP_NATIVE=1
# bash deploy/gpu-host.sh`, which then builds none): on a device call the builds then overlap instead of queueing.
build_names=("${names[@]}") build_dirs=("${dirs[@]}")
if [ "${AB_BUILD_SELF:-0}" = 1 ]; then build_names+=(new) build_dirs+=(.); fi
pids=()
for i in "${!build_dirs[@]}"; do
  log="$AB_DIR-build-${build_names[$i]}.log"
  (cd "${build_dirs[$i]}" && WEFT_CUDA="${WEFT_CUDA:-1}" node native/build.mjs >"$log" 2>&1) &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  log="$AB_DIR-build-${build_names[$i]}.log"
  wait "${pids[$i]}" || { echo "ab-decode: ${build_names[$i]}'s addon did not build (log: $log)" >&2; exit 1; }
done

run() {  # TREE DIR ROUND: one decode.ts run, its JSON line tagged
  (cd "$2" && node --import tsx bench/decode.ts "${@:4}" 2>&1) | tee /dev/stderr | tail -1 |
    sed "s/^/{\"tree\":\"$1\",\"round\":$3,\"result\":/; s/\$/}/" >>"$OUT_FILE"
}
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!dirs[@]}"; do run "${names[$i]}" "${dirs[$i]}" "$round" "$@"; done
  run new . "$round" "$@"
done

node - "$OUT_FILE" "${names[@]}" <<'JS'
const [file, ...bases] = process.argv.slice(2);
const lines = require('node:fs').readFileSync(file, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const cells = new Map();
for (const { tree, result } of lines)
  for (const r of result.rows) {
    const key = `${r.model} batch ${r.batch} prompt ${r.prompt}`;
    const cell = cells.get(key) ?? { runs: {}, floorMs: r.floorMs };
    (cell.runs[tree] ??= []).push(r.tokensPerS);
    cells.set(key, cell);
  }
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const trees = [...bases, 'new'];
const shown = (xs = []) => xs.length ? `${median(xs).toFixed(1)} (${xs.map((x) => x.toFixed(1)).join(', ')})` : '-';
const header = [...trees.map((t) => `${t} tok/s (runs)`), ...bases.map((b) => `new / ${b}`)];
console.log(`\n| shape | ${header.join(' | ')} | floor ms |`);
console.log(`|---|${header.map(() => '---|').join('')}---|`);
for (const [key, c] of cells) {
  const ratio = (b) => (c.runs.new && c.runs[b] ? (median(c.runs.new) / median(c.runs[b])).toFixed(3) : '-');
  const row = [...trees.map((t) => shown(c.runs[t])), ...bases.map(ratio)];
  console.log(`| ${key} | ${row.join(' | ')} | ${c.floorMs?.toFixed(3) ?? '-'} |`);
}
JS
