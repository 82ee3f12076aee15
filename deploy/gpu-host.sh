#!/usr/bin/env bash
# Runs a command on the GPU host with the bundled Node.js runtime, after building the CUDA addon.
#   bash deploy/gpu-host.sh [COMMAND [ARGS...]]
#   e.g. bash deploy/gpu-host.sh npm run test:gpu
#        bash deploy/gpu-host.sh node --import tsx --test test/gpu/*.test.ts
# Needs .bundle/weft-gpu-bundle.tar.xz (made by deploy/bundle.sh on the development machine; a device run must
# name it in `carry`). Steps: unpack the bundle into /tmp/weft-runtime (once per bundle), put its bin/ first on
# PATH, link node_modules into the repository root if there is none, print the toolchain's versions, build the
# addon (WEFT_CUDA=1 node native/build.mjs), then exec the command from the repository root.
# There is no real npm on the GPU host: bin/npm here is a small stand-in that runs package.json scripts only
# (`npm run NAME [-- ARGS]`, `npm test`, `npm run` to list them).
#
# Environment:
#   WEFT_CUDA=0          build the CPU-only addon instead (default 1)
#   WEFT_SKIP_NATIVE=1   do not build the addon
#   WEFT_RUNTIME_DIR     where to unpack (default /tmp/weft-runtime)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLE="$ROOT/.bundle/weft-gpu-bundle.tar.xz"
RUNTIME="${WEFT_RUNTIME_DIR:-/tmp/weft-runtime}"

say() { echo "gpu-host: $*"; }
die() { echo "gpu-host: error: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

[ -f "$BUNDLE" ] || die "${BUNDLE#"$ROOT"/} not found: run deploy/bundle.sh on the development machine first (and carry .bundle/weft-gpu-bundle.tar.xz to the GPU host)"

# 1. Unpack (skipped when $RUNTIME already holds this very bundle) ----------------------------------------------------
sum="$(sha256sum "$BUNDLE" | cut -d' ' -f1)"
if [ -x "$RUNTIME/bin/node" ] && [ -f "$RUNTIME/.bundle-sha256" ] && [ "$(cat "$RUNTIME/.bundle-sha256")" = "$sum" ]; then
  say "runtime: $RUNTIME (already unpacked from this bundle)"
else
  t0="$(now)"
  rm -rf "$RUNTIME.tmp"
  mkdir -p "$RUNTIME.tmp"
  tar -xJf "$BUNDLE" -C "$RUNTIME.tmp" || die "cannot unpack ${BUNDLE#"$ROOT"/} (truncated copy? run deploy/bundle.sh again)"
  echo "$sum" >"$RUNTIME.tmp/.bundle-sha256"
  rm -rf "$RUNTIME"
  mv "$RUNTIME.tmp" "$RUNTIME"
  say "runtime: unpacked ${BUNDLE#"$ROOT"/} ($(du -sm "$BUNDLE" | cut -f1) MiB) into $RUNTIME in $(since "$t0")"
fi

# npm stand-in: runs package.json scripts the way `npm run` does (sh -c, node_modules/.bin on PATH, args after --).
cat >"$RUNTIME/bin/npm-shim.mjs" <<'EOF'
import { existsSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import path from 'node:path';

const fail = (msg) => { console.error(`npm (weft GPU-host stand-in): ${msg}`); process.exit(1); };
let dir = process.cwd();
while (!existsSync(path.join(dir, 'package.json'))) {
  if (path.dirname(dir) === dir) fail('no package.json in this directory or above');
  dir = path.dirname(dir);
}
const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8'));
const scripts = pkg.scripts ?? {};
let [cmd, ...rest] = process.argv.slice(2);
if (['test', 't', 'tst', 'start', 'stop', 'restart'].includes(cmd)) { rest = [cmd.startsWith('t') ? 'test' : cmd, ...rest]; cmd = 'run'; }
if (cmd !== 'run' && cmd !== 'run-script') {
  fail(`only "npm run SCRIPT [-- ARGS]" and "npm test" work on the GPU host (there is no npm there); ` +
       `or run node directly, e.g. node --import tsx --test test/gpu/*.test.ts`);
}
const name = rest.shift();
if (!name) {
  for (const [k, v] of Object.entries(scripts)) console.log(`  ${k}\n    ${v}`);
  process.exit(0);
}
if (!(name in scripts)) fail(`missing script: "${name}" (have: ${Object.keys(scripts).join(', ')})`);
const args = rest[0] === '--' ? rest.slice(1) : rest;
const quote = (a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
const env = {
  ...process.env,
  PATH: [path.join(dir, 'node_modules', '.bin'), path.dirname(process.execPath), process.env.PATH].join(path.delimiter),
  npm_package_name: pkg.name ?? '', npm_package_version: pkg.version ?? '', npm_node_execpath: process.execPath,
};
const run = (script, line) => {
  console.error(`\n> ${pkg.name}@${pkg.version} ${script}\n> ${line}\n`);
  const r = spawnSync('sh', ['-c', line], { cwd: dir, env: { ...env, npm_lifecycle_event: script }, stdio: 'inherit' });
  if (r.error) fail(`cannot start sh: ${r.error.message}`);
  if (r.status !== 0) process.exit(r.status ?? 1);
};
if (scripts[`pre${name}`]) run(`pre${name}`, scripts[`pre${name}`]);
run(name, [scripts[name], ...args.map(quote)].join(' '));
if (scripts[`post${name}`]) run(`post${name}`, scripts[`post${name}`]);
EOF
printf '#!/bin/sh\nexec "$(dirname "$0")/node" "$(dirname "$0")/npm-shim.mjs" "$@"\n' >"$RUNTIME/bin/npm"
chmod 755 "$RUNTIME/bin/npm"

export PATH="$RUNTIME/bin:$PATH"
hash -r
[ "$(command -v node)" = "$RUNTIME/bin/node" ] || die "node on PATH is $(command -v node), not $RUNTIME/bin/node"

# 2. node_modules -------------------------------------------------------------------------------------------------
if [ -L node_modules ]; then
  [ "$(readlink node_modules)" = "$RUNTIME/node_modules" ] || ln -sfn "$RUNTIME/node_modules" node_modules
  say "node_modules -> $RUNTIME/node_modules"
elif [ -e node_modules ]; then
  say "node_modules: using the one already in the repository root (not the bundle's)"
else
  ln -s "$RUNTIME/node_modules" node_modules
  say "node_modules -> $RUNTIME/node_modules (linked)"
fi
if [ -f "$RUNTIME/weft-bundle.json" ]; then
  lock_sum="$(sha256sum package-lock.json | cut -d' ' -f1)"
  grep -q "\"packageLockSha256\": \"$lock_sum\"" "$RUNTIME/weft-bundle.json" \
    || say "warning: package-lock.json changed since the bundle was made; run deploy/bundle.sh again if a dependency changed"
fi

# 3. Toolchain ----------------------------------------------------------------------------------------------------
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi
first_line() { "$@" 2>/dev/null | grep -v '^\s*$' | head -1 || true; }
say "node:  $(node --version) ($(node -p process.execPath))"
say "nvcc:  $( (nvcc --version 2>/dev/null | grep -m1 -i 'release') || echo 'not found')"
say "cmake: $( (first_line cmake --version | grep .) || echo 'not found')"
say "c++:   $( (first_line "${CXX:-c++}" --version | grep .) || echo 'not found')"
nccl_h="$(ls /usr/include/nccl.h /usr/local/cuda/include/nccl.h 2>/dev/null | head -1 || true)"
if [ -n "$nccl_h" ]; then
  say "nccl:  $(awk '/#define NCCL_(MAJOR|MINOR|PATCH)[ \t]/ { v = v (v ? "." : "") $3 } END { print v }' "$nccl_h") ($nccl_h)"
else
  say "nccl:  nccl.h not found"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  say "gpus:  $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | awk '{ n++; s = $0 } END { print n " x " s }')"
fi

# 4. Addon --------------------------------------------------------------------------------------------------------
if [ "${WEFT_SKIP_NATIVE:-0}" = 1 ]; then
  say "addon: not built (WEFT_SKIP_NATIVE=1)"
else
  export WEFT_CUDA="${WEFT_CUDA:-1}"
  say "addon: WEFT_CUDA=$WEFT_CUDA node native/build.mjs"
  t0="$(now)"
  set +e
  node native/build.mjs
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "gpu-host: error: the addon build failed (WEFT_CUDA=$WEFT_CUDA node native/build.mjs exited $rc; see above)${1:+; not running: $*}" >&2
    exit "$rc"
  fi
  say "addon: built in $(since "$t0")"
fi

# 5. The command --------------------------------------------------------------------------------------------------
if [ "$#" -eq 0 ]; then
  say "runtime ready; no command given"
  exit 0
fi
say "running: $*"
exec "$@"
