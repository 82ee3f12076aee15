#!/usr/bin/env bash
# One device call for the pending series (README.md here): apply them onto a scratch worktree of HEAD, build
# weft_ops_check and the kernel benches there, run them, and end with one line per series.
#   bash native/pending/check.sh [SERIES...]          (default: every folder here, in the order below)
#   BUILD_ONLY=1 bash native/pending/check.sh         (compile everything, run nothing: no GPU needed)
# Output files go to $OUT (the device call's folder) or /tmp/weft-pending.
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${OUT:-/tmp/weft-pending}
mkdir -p "$out"
series=("$@")
[ ${#series[@]} -gt 0 ] || series=(attn-b1 bifurc-plan gemv-mma-bf16 sparq-fast)
tree=$(mktemp -d /tmp/weft-pending-tree.XXXXXX)
git worktree add -q --detach "$tree" HEAD || exit 1
trap 'git -C "$root" worktree remove --force "$tree"' EXIT
declare -A status
for s in "${series[@]}"; do
  if git -C "$tree" -c user.name=pending -c user.email=pending@localhost am -3 -q "$root/native/pending/$s"/*.patch \
      >"$out/apply-$s.txt" 2>&1; then status[$s]="applied"
  else git -C "$tree" am --abort; status[$s]="does not apply (apply-$s.txt)"; fi
done
cd "$tree"
# The kernel benches each series names (bench/kernels/*-run.sh build with nvcc alone).
declare -A bench=([attn-b1]="attention-run.sh decode" [bifurc-plan]="bifurcated-run.sh" [gemv-mma-bf16]="quant-run.sh --bf16" [sparq-fast]="sparq-run.sh")
cmake -S native -B /tmp/weft-pending-build -DWEFT_CUDA=ON -DWEFT_ADDON=OFF >"$out/cmake.txt" 2>&1 &&
  cmake --build /tmp/weft-pending-build -j --target weft_ops_check >>"$out/cmake.txt" 2>&1
ops_rc=$?
if [ -z "${BUILD_ONLY:-}" ] && [ $ops_rc = 0 ]; then
  timeout 200 /tmp/weft-pending-build/weft_ops_check >"$out/ops-check.txt" 2>&1
  ops_rc=$?
fi
for s in "${series[@]}"; do
  [ "${status[$s]}" = applied ] || continue
  set -- ${bench[$s]}
  script=$1; shift
  BUILD_DIR=/tmp/weft-pending-bench/$s timeout 240 bash "bench/kernels/$script" "$@" >"$out/bench-$s.txt" 2>&1
  status[$s]="applied, bench rc $? (bench-$s.txt)"
done
echo "ops-check: rc $ops_rc; $(grep -E 'checks, ' "$out/ops-check.txt" 2>/dev/null || echo 'not run')"
grep -E '  FAIL' "$out/ops-check.txt" 2>/dev/null | head -20
for s in "${series[@]}"; do echo "$s: ${status[$s]}"; tail -4 "$out/bench-$s.txt" 2>/dev/null | sed 's/^/    /'; done
