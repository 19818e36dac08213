#!/usr/bin/env bash
# Starts a libvirtd as a lab host: inside the host's network namespace, in a private
# mount namespace whose /etc/libvirt, /var/lib/libvirt, /run/libvirt, /var/log/libvirt
# and /var/cache/libvirt are per-host directories under DIR. Used only by the bench.
# TLSDIR is the lab host's own certificate directory (ferry's layout is the one QEMU
# and libvirt expect), for `virsh migrate --tls`.
#   libvirt-host.sh NAMESPACE ADDRESS DIR UUID TLSDIR
set -euo pipefail
ns=$1 addr=$2 dir=$3 uuid=$4 tls=$5
mkdir -p "$dir"/{etc,lib,run,log,cache}
if [ ! -f "$dir/etc/libvirtd.conf.ferry" ]; then
  cp -a /etc/libvirt/. "$dir/etc/"
  rm -f "$dir/etc/qemu/networks/autostart/default.xml"
  cat > "$dir/etc/libvirtd.conf" <<CONF
listen_tls = 0
listen_tcp = 1
auth_tcp = "none"
listen_addr = "$addr"
host_uuid = "$uuid"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
  cat > "$dir/etc/qemu.conf" <<CONF
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
user = "root"
group = "root"
stdio_handler = "file"
cgroup_controllers = [ ]
migration_address = "$addr"
migration_host = "$addr"
migrate_tls_x509_cert_dir = "$tls"
migrate_tls_x509_verify = 1
CONF
  touch "$dir/etc/libvirtd.conf.ferry"
fi
exec ip netns exec "$ns" unshare -m --propagation private sh -c "
  mount --bind '$dir/etc' /etc/libvirt
  mount --bind '$dir/lib' /var/lib/libvirt
  mount --bind '$dir/run' /run/libvirt
  mount --bind '$dir/log' /var/log/libvirt
  mount --bind '$dir/cache' /var/cache/libvirt
  exec libvirtd --listen -p '$dir/run/libvirtd.pid'
"
