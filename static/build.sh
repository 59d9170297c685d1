#!/bin/sh
# Build the viewer's third-party assets: OpenSeadragon from the npm registry
# (pinned by package-lock.json) copied into tileserver/static/vendor/, which the
# Python package serves.  Run from anywhere; needs node + npm.
#   static/build.sh          # npm ci, then copy
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
dest="$repo/tileserver/static/vendor/openseadragon"
cd "$here"
npm ci --no-audit --no-fund --loglevel=error
rm -rf "$dest"
mkdir -p "$dest"
cp -R node_modules/openseadragon/build/openseadragon/. "$dest/"
cp node_modules/openseadragon/LICENSE.txt "$dest/" 2>/dev/null || true
echo "OpenSeadragon $(node -p "require('./node_modules/openseadragon/package.json').version") -> $dest"
