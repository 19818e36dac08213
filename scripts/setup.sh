#!/usr/bin/env bash
# Installs what ferry needs on a fresh Debian 12 machine (as root): apt packages,
# npm dependencies, the bundle and the test guest images, and puts `ferry` and
# `ferryd` on PATH (/usr/local/bin). Quick when everything is there.
#   setup.sh [--with-tests]   --with-tests: also what only the tests need (chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
with_tests=()
for a in "$@"; do
  case "$a" in
    --with-tests) with_tests=(--with-tests) ;;
    *) echo "setup: unknown option $a" >&2; exit 2 ;;
  esac
done
bash scripts/node-check.sh
bash scripts/install-packages.sh "${with_tests[@]}"
# npm ci when node_modules is missing or older than the lockfile.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi
# The CLI and ferryd run from a bundle (dist/), rebuilt here so it never lags the sources.
node scripts/build.mjs
bash guest/build-images.sh images
# On PATH: symlinks to this clone's launchers (`npx ferry` works too, about 0.4 s slower a call).
if [ "$(id -u)" = 0 ] && [ -d /usr/local/bin ]; then
  for b in ferry ferryd; do
    want=$(pwd)/bin/$b.mjs
    [ "$(readlink "/usr/local/bin/$b" 2>/dev/null)" = "$want" ] && continue
    if [ -e "/usr/local/bin/$b" ] && [ ! -L "/usr/local/bin/$b" ]; then
      echo "setup: /usr/local/bin/$b exists and is not ferry's symlink; leaving it (use npx ferry)" >&2
      continue
    fi
    ln -sfn "$want" "/usr/local/bin/$b"
    echo "setup: /usr/local/bin/$b -> $want"
  done
fi
