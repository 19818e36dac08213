#!/usr/bin/env bash
# Unpacks Debian 12's own QEMU 7.2 (qemu-system-x86, -common, -data from the bookworm
# suite) under a prefix, without installing it: the second engine of the mixed-engine
# test (test/e2e/engines.test.ts), where one lab host runs 7.2 and another QEMU 10.
# It runs with Debian 12's libraries, which QEMU 10 from backports needs too.
# Cached: nothing is downloaded when the prefix already holds the current version.
#   old-engine.sh [PREFIX]    (default images/qemu-7.2; prints the binary's path)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${1:-$here/images/qemu-7.2}
ver=$(apt-cache show qemu-system-x86/bookworm 2>/dev/null | awk '/^Version:/{print $2; exit}' || true)
if [ -z "$ver" ]; then apt-get update -qq >/dev/null 2>&1 || true; ver=$(apt-cache show qemu-system-x86/bookworm | awk '/^Version:/{print $2; exit}'); fi
if [ ! -x "$prefix/usr/bin/qemu-system-x86_64" ] || [ "$(cat "$prefix/VERSION" 2>/dev/null)" != "$ver" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  chmod 755 "$work"
  (cd "$work" && apt-get download -qq qemu-system-x86/bookworm qemu-system-common/bookworm qemu-system-data/bookworm >/dev/null 2>&1)
  rm -rf "$prefix.new" && mkdir -p "$prefix.new"
  for d in "$work"/*.deb; do dpkg -x "$d" "$prefix.new"; done
  echo "$ver" > "$prefix.new/VERSION"
  rm -rf "$prefix" && mv "$prefix.new" "$prefix"
  echo "old-engine: unpacked QEMU $ver under $prefix" >&2
fi
echo "$prefix/usr/bin/qemu-system-x86_64"
