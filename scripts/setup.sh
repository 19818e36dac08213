#!/usr/bin/env bash
# Installs what ferry needs on a fresh Debian 12 machine (as root): apt packages,
# npm dependencies and the test guest images. Quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-system-x86 qemu-utils busybox-static iproute2 openssl xz-utils zstd binutils iptables nftables procps)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "setup: need root to install: ${missing[*]}" >&2; exit 1; fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# npm ci when node_modules is missing or older than the lockfile.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi
bash guest/build-images.sh images
