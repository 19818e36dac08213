#!/usr/bin/env bash
# Installs what ferry needs on a fresh Debian 12 machine (as root): apt packages,
# npm dependencies and the test guest images. Quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-packages.sh --with-tests
# npm ci when node_modules is missing or older than the lockfile.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi
# The CLI and ferryd run from a bundle (dist/), rebuilt here so it never lags the sources.
node scripts/build.mjs
bash guest/build-images.sh images
