#!/usr/bin/env bash
# The pending series (README.md here) decided in one device call. Two steps, because the device's copy of the
# repository has no .git:
#   bash native/pending/check.sh prepare [SERIES...]   here: apply the series (git am -3) onto a scratch worktree of
#                                                      HEAD and pack the files they change into .ab/pending.tar.gz
#   bash native/pending/check.sh run                   on the GPU host (carry .ab/pending.tar.gz): lay those files over
#                                                      a copy of the tree, build weft_ops_check and each series' bench,
#                                                      run them; one line per series at the end
#   BUILD_ONLY=1 bash native/pending/check.sh run      compile everything, run nothing (no GPU needed)
# Output files go to $OUT (the device call's folder) or /tmp/weft-pending.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
pack=$root/.ab/pending.tar.gz
declare -A bench=([attn-b1]="attention-run.sh decode" [bifurc-plan]="bifurcated-run.sh" [gemv-mma-bf16]="quant-run.sh --bf16" [sparq-fast]="sparq-run.sh")

prepare() {
  local series=("$@") s
  [ ${#series[@]} -gt 0 ] || series=(attn-b1 bifurc-plan gemv-mma-bf16 sparq-fast)
  tree=$(mktemp -d /tmp/weft-pending-tree.XXXXXX)
  git worktree add -q --detach "$tree" HEAD || exit 1
  trap 'git -C "$root" worktree remove --force "$tree"' EXIT
  : >"$tree/.pending-series"
  for s in "${series[@]}"; do
    if git -C "$tree" -c user.name=pending -c user.email=pending@localhost am -3 -q "$root/native/pending/$s"/*.patch; then
      echo "$s" >>"$tree/.pending-series"
    else git -C "$tree" am --abort; echo "$s: does not apply" >&2; fi
  done
  git -C "$tree" diff --name-only --diff-filter=D "$(git -C "$root" rev-parse HEAD)" HEAD >"$tree/.pending-deleted"
  git -C "$tree" diff --name-only --diff-filter=d "$(git -C "$root" rev-parse HEAD)" HEAD >"$tree/.pending-changed"
  mkdir -p "$root/.ab"
  (cd "$tree" && tar -czf "$pack" .pending-series .pending-deleted .pending-changed $(cat .pending-changed))
  echo "packed $(wc -l <"$tree/.pending-changed") files of: $(tr '\n' ' ' <"$tree/.pending-series")-> $pack"
}

run() {
  local out=${OUT:-/tmp/weft-pending} tree=/tmp/weft-pending-tree s script ops_rc
  mkdir -p "$out"
  [ -f "$pack" ] || { echo "no $pack: run 'check.sh prepare' here and carry .ab/pending.tar.gz" >&2; exit 1; }
  rm -rf "$tree" && mkdir -p "$tree"
  tar -C "$root" --exclude=./.ab --exclude=./node_modules --exclude=./.bundle --exclude=./native/build -cf - . | tar -C "$tree" -xf -
  tar -C "$tree" -xzf "$pack"
  cd "$tree" && xargs -r rm -f <.pending-deleted
  mapfile -t series <.pending-series
  declare -A status
  rm -rf /tmp/weft-pending-build
  cmake -S native -B /tmp/weft-pending-build -DWEFT_CUDA=ON -DWEFT_ADDON=OFF >"$out/cmake.txt" 2>&1 &&
    cmake --build /tmp/weft-pending-build -j --target weft_ops_check >>"$out/cmake.txt" 2>&1
  ops_rc=$?
  if [ -z "${BUILD_ONLY:-}" ] && [ $ops_rc = 0 ]; then
    timeout 200 /tmp/weft-pending-build/weft_ops_check >"$out/ops-check.txt" 2>&1
    ops_rc=$?
  fi
  for s in "${series[@]}"; do
    set -- ${bench[$s]}
    script=$1; shift
    if [ -n "${BUILD_ONLY:-}" ]; then status[$s]="applied (bench not run)"; continue; fi
    BUILD_DIR=/tmp/weft-pending-bench/$s timeout 240 bash "bench/kernels/$script" "$@" >"$out/bench-$s.txt" 2>&1
    status[$s]="applied, bench rc $? (bench-$s.txt)"
  done
  echo "ops-check: rc $ops_rc; $(grep -E 'checks, ' "$out/ops-check.txt" 2>/dev/null || echo 'not run')"
  grep -E '  FAIL' "$out/ops-check.txt" 2>/dev/null | head -20
  for s in "${series[@]}"; do echo "$s: ${status[$s]}"; tail -4 "$out/bench-$s.txt" 2>/dev/null | sed 's/^/    /'; done
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) echo "usage: check.sh prepare [SERIES...] | run" >&2; exit 2 ;;
esac
