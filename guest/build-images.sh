#!/usr/bin/env bash
# Builds ferry's test guests from Debian packages into $1 (default: images/).
#   pattern.img    the memory-pattern guest: a 512-byte boot sector in a 1 MiB raw disk
#   vmlinux        the Debian kernel, uncompressed (PVH entry, boots fast with qboot)
#   initrd.img     busybox initramfs with virtio-net, virtio-blk, echo (7), HTTP status (80)
#                  and an SSH server (Dropbear, 22; root, key login only)
#   lab-ssh/       the lab's SSH client key (id_ed25519) and the guests' pinned host key
#                  (known_hosts, under the alias ferry-lab-guest): made once, kept
#   manifest.json  what was built from what, with sha256 sums
# Cached: a second run with the same inputs does nothing. Reproducible: file times and
# order in the initramfs are fixed, so the same packages give the same bytes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../images}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=0

need() { command -v "$1" >/dev/null || { echo "build-images: missing $1 (apt-get install $2)" >&2; exit 1; }; }
need as binutils; need ld binutils; need busybox busybox-static; need xz xz-utils; need dpkg-deb dpkg
need dropbear dropbear-bin; need dropbearkey dropbear-bin; need ssh-keygen openssh-client

# --- SSH keys: the guests' host key and the lab client's key, made once (not downloaded) ---
keys=$out/lab-ssh
if [ ! -f "$keys/host_ed25519" ] || [ ! -f "$keys/id_ed25519" ] || [ ! -f "$keys/known_hosts" ]; then
  rm -rf "$keys"; mkdir -p -m 0700 "$keys"
  dropbearkey -t ed25519 -f "$keys/host_ed25519" >/dev/null 2>&1
  ssh-keygen -q -t ed25519 -N '' -C ferry-lab -f "$keys/id_ed25519"
  echo "ferry-lab-guest $(dropbearkey -y -f "$keys/host_ed25519" | grep '^ssh-ed25519' | cut -d' ' -f1,2)" > "$keys/known_hosts"
  chmod 0600 "$keys"/*
  echo "made the lab's SSH keys in $keys"
fi

# --- pattern guest ---
src_sum=$(cat "$here/pattern.s" "$0" | sha256sum | cut -d' ' -f1)
if [ ! -f "$out/pattern.img" ] || [ "$(cat "$out/pattern.src" 2>/dev/null)" != "$src_sum" ]; then
  as --32 -o "$work/pattern.o" "$here/pattern.s"
  ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$work/pattern.bin" "$work/pattern.o"
  [ "$(stat -c %s "$work/pattern.bin")" = 512 ] || { echo "pattern boot sector is not 512 bytes" >&2; exit 1; }
  # A 1.44 MB floppy: SeaBIOS boots it with ISA DMA and leaves no device rings in
  # guest RAM for QEMU to write into later (its virtio-blk driver does).
  truncate -s 1474560 "$work/pattern.img"
  dd if="$work/pattern.bin" of="$work/pattern.img" conv=notrunc status=none
  mv "$work/pattern.img" "$out/pattern.img"
  echo "$src_sum" > "$out/pattern.src"
  echo "built pattern.img"
fi

# --- Linux guest ---
# Resolve the current kernel through the metapackage: old versions leave the mirror.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq >/dev/null 2>&1 || true
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "build-images: cannot resolve the Debian kernel package" >&2; exit 1; }
guest_sum=$(cat "$here/linux/init" "$here/linux/status" "$here/linux/fill" "$here/linux/fill-check" "$0" "$keys/host_ed25519" "$keys/id_ed25519.pub" "$(command -v dropbear)" | sha256sum | cut -d' ' -f1)
key="$kpkg $guest_sum"
if [ -f "$out/vmlinux" ] && [ -f "$out/initrd.img" ] && [ "$(cat "$out/linux.key" 2>/dev/null)" = "$key" ]; then
  echo "images up to date in $out"
  exit 0
fi
echo "fetching $kpkg"
(cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1) || { echo "build-images: apt-get download $kpkg failed" >&2; exit 1; }
dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
vmlinuz=$(ls "$work"/k/boot/vmlinuz-*)
kver=${vmlinuz##*/vmlinuz-}

# vmlinux: find the compressed payload by its magic and unpack the first that is an ELF.
extract() {
  local magic=$1 cmd=$2
  for off in $(LC_ALL=C grep -abo -P "$magic" "$vmlinuz" | cut -d: -f1); do
    tail -c +$((off + 1)) "$vmlinuz" | $cmd > "$work/vmlinux" 2>/dev/null || true
    if [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then return 0; fi
  done
  return 1
}
extract '\xfd\x37\x7a\x58\x5a\x00' 'xz -dc' || extract '\x28\xb5\x2f\xfd' 'zstd -dc' || extract '\x1f\x8b\x08' 'gzip -dc' \
  || { echo "build-images: cannot extract vmlinux from $vmlinuz" >&2; exit 1; }

# initramfs
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for app in $("$root/bin/busybox" --list); do [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"; done
install -m 0755 "$here/linux/init" "$root/init"
install -m 0755 "$here/linux/status" "$root/bin/status"
install -m 0755 "$here/linux/fill" "$root/bin/fill"
install -m 0755 "$here/linux/fill-check" "$root/bin/fill-check"
# SSH: Dropbear from Debian with the libraries it links, root logs in with the lab key only.
copy_bin() {
  local b=$1 lib
  mkdir -p "$root$(dirname "$b")"; cp "$b" "$root$b"
  for lib in $(ldd "$b" | grep -o '/[^ ]*' ); do mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; done
}
copy_bin "$(command -v dropbear)"
mkdir -p "$root/etc/dropbear" "$root/root/.ssh"
cp "$keys/host_ed25519" "$root/etc/dropbear/dropbear_ed25519_host_key"
cp "$keys/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
chmod 0700 "$root/root" "$root/root/.ssh"; chmod 0600 "$root/root/.ssh/authorized_keys" "$root/etc/dropbear/dropbear_ed25519_host_key"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
printf '/bin/sh\n' > "$root/etc/shells"
mkdir -p "$root/etc/acpi/PWRF"
printf '#!/bin/sh\necho "ferry-linux: ACPI power button, powering off"\nsync\npoweroff -f\n' > "$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"
# Modules for virtio-net and virtio-blk, in dependency order (read from each module's own depends=).
moddir="$work/k/lib/modules/$kver"
declare -A seen=()
order=()
visit() {
  local m=$1 f deps d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  f=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
  [ -n "$f" ] || { echo "build-images: module $m not in $kpkg" >&2; exit 1; }
  case "$f" in *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;; *) cp "$f" "$root/lib/modules/$m.ko" ;; esac
  deps=$(grep -a -o 'depends=[a-z0-9_,-]*' "$root/lib/modules/$m.ko" | head -1 | cut -d= -f2 | tr ',' ' ')
  for d in $deps; do visit "${d//-/_}"; done
  order+=("$m")
}
visit virtio_pci
visit virtio_net
# A data disk (lab guest --data-disk) appears as /dev/vda.
visit virtio_blk
# ACPI power button (ferry shutdown) needs the button driver and evdev for busybox acpid.
visit button
visit evdev
printf '%s\n' "${order[@]}" > "$root/etc/modules.order"
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null | gzip -9n > "$work/initrd.img")

mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initrd.img" "$out/initrd.img"
echo "$key" > "$out/linux.key"
cat > "$out/manifest.json" <<JSON
{
  "kernelPackage": "$kpkg",
  "kernelVersion": "$kver",
  "modules": "$(tr '\n' ' ' < "$root/etc/modules.order" | sed 's/ $//')",
  "sha256": {
    "pattern.img": "$(sha256sum "$out/pattern.img" | cut -d' ' -f1)",
    "vmlinux": "$(sha256sum "$out/vmlinux" | cut -d' ' -f1)",
    "initrd.img": "$(sha256sum "$out/initrd.img" | cut -d' ' -f1)"
  }
}
JSON
echo "built vmlinux and initrd.img ($kpkg) in $out"
