#!/usr/bin/env bash
# Installs the Debian packages ferry needs (as root). The engine is QEMU 10 from
# Debian's bookworm-backports suite: QEMU before 9.0 loses dirty pages under TCG in
# live migrations (upstream 03bfc2188f, never backported to Debian 12's 7.2), and
# working around that costs every guest a pause 10-30x longer (README "Engine").
# An apt pin takes only QEMU's own packages (and SeaBIOS) from backports; everything
# else, systemd and mesa included, stays on Debian 12. Idempotent and quick when done.
#   install-packages.sh [--update] [--with-tests]
#     --update: always run apt-get update first
#     --with-tests: also what the tests need (chromium: the dashboard's page tests drive
#                   Debian's headless Chromium; nothing is downloaded at run time)
set -euo pipefail
# util-linux and mount: unshare, setpriv and mount confine each domain's QEMU (src/qemu/confine.ts);
# dropbear-bin: the lab Linux guest's SSH server (guest/build-images.sh), openssh-client: ferry lab ssh.
# etcd-server, etcd-client: cluster mode's shared state (src/cluster/; `ferry lab up --cluster` runs a member per host).
PKGS=(qemu-system-x86 qemu-utils seabios busybox-static iproute2 openssl xz-utils zstd binutils iptables nftables procps util-linux mount dropbear-bin openssh-client etcd-server etcd-client)
update=0
for a in "$@"; do
  case "$a" in
    --update) update=1 ;;
    --with-tests) PKGS+=(chromium) ;;
    *) echo "install-packages: unknown option $a" >&2; exit 2 ;;
  esac
done
MIN_QEMU_MAJOR=10
SRC=/etc/apt/sources.list.d/ferry-bookworm-backports.sources
PIN=/etc/apt/preferences.d/ferry-qemu-backports
want_src='Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'
want_pin='# ferry: QEMU and its firmware from bookworm-backports (and libvirt, the bench peer), nothing else.
Package: qemu-* seabios libvirt*
Pin: release n=bookworm-backports
Pin-Priority: 900'

qemu_major() { dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/[^0-9].*$//'; }
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
major=$(qemu_major || true)
upgrade=0
[ -n "$major" ] && [ "$major" -lt "$MIN_QEMU_MAJOR" ] && upgrade=1
[ ${#missing[@]} -eq 0 ] && [ $upgrade = 0 ] && [ $update = 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then echo "install-packages: need root to install: ${missing[*]} ${upgrade:+(QEMU $MIN_QEMU_MAJOR)}" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
changed=0
# Backports only where it is Debian 12 (bookworm); a newer Debian has QEMU >= 9 itself.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" = bookworm ]; then
  [ "$(cat "$SRC" 2>/dev/null)" = "$want_src" ] || { printf '%s\n' "$want_src" > "$SRC"; changed=1; }
  [ "$(cat "$PIN" 2>/dev/null)" = "$want_pin" ] || { printf '%s\n' "$want_pin" > "$PIN"; changed=1; }
fi
echo "install-packages: apt-get update"
apt-get update -qq
echo "install-packages: installing ${PKGS[*]}"
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
major=$(qemu_major)
if [ "$major" -lt "$MIN_QEMU_MAJOR" ]; then
  echo "install-packages: QEMU $major installed, but ferry's default engine is QEMU $MIN_QEMU_MAJOR+ (bookworm-backports); see README \"Engine\"" >&2
  exit 1
fi
echo "install-packages: $(qemu-system-x86_64 --version | head -1)"
