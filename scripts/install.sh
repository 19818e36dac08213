#!/usr/bin/env bash
# Installs ferry on a real Debian 12 host (as root): packages, the code under /opt/ferry
# (built), /etc/ferry/ferryd.json, this host's certificate, and ferryd as a systemd
# service. README "Run it on real hosts" walks through a whole cluster.
#
#   scripts/install.sh --name NAME --address MIGRATION_ADDRESS [options]
#     --name NAME              this host's name (its certificate's CN); default: hostname -s
#     --address ADDR           its address on the migration network (relocation.address)
#     --peer NAME=ADDR         another host (repeat); also admitted by hostsAllow @ its address
#     --network NAME=BRIDGE,SUBNET[,ADDRESS]   a guest network (repeat); the bridge must exist
#     --ca DIR                 issue this host's certificate from the CA in DIR (copy the CA
#                              here only for this; keep it offline otherwise)
#     --metrics ADDR:PORT      serve Prometheus metrics there (default: off)
#     --destdir DIR            stage config, certificate and unit under DIR (no packages, no
#                              code copy, no systemctl): for packaging, and the tests
#     --no-start               install the unit but do not enable or start it
# Idempotent: an existing ferryd.json or certificate is kept (remove it to rewrite).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
name=$(hostname -s 2>/dev/null || echo host)
address='' ca='' metrics='' destdir='' start=1
peers=() networks=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --address) address=$2; shift 2 ;;
    --peer) peers+=("$2"); shift 2 ;;
    --network) networks+=("$2"); shift 2 ;;
    --ca) ca=$2; shift 2 ;;
    --metrics) metrics=$2; shift 2 ;;
    --destdir) destdir=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$address" ] || { echo "install: --address (this host's migration-network address) is required" >&2; exit 2; }
[[ "$name" =~ ^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$ ]] || { echo "install: bad --name $name" >&2; exit 2; }
[ -n "$destdir" ] || [ "$(id -u)" = 0 ] || { echo "install: run as root (or stage with --destdir)" >&2; exit 2; }

prefix=$destdir/opt/ferry etc=$destdir/etc/ferry unitdir=$destdir/etc/systemd/system
node=$(command -v node) || { echo "install: Node.js 20 is needed (apt-get install nodejs, or NodeSource)" >&2; exit 2; }

# 1. Packages (QEMU 10 from bookworm-backports, pinned) and the QEMU user.
[ -n "$destdir" ] || bash "$here/scripts/install-packages.sh"

# 2. The code, built, under /opt/ferry (the running checkout is the source), and the
#    state directories. The accelerator probe boots the pattern guest: images are built.
if [ -z "$destdir" ]; then
  mkdir -p "$prefix"
  if [ "$(cd "$prefix" && pwd)" != "$here" ]; then
    tar -C "$here" --exclude=./.git --exclude=./node_modules --exclude=./dist -cf - . | tar -C "$prefix" -xf -
    (cd "$prefix" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  [ -f "$prefix/images/pattern.img" ] || bash "$prefix/guest/build-images.sh" "$prefix/images"
  mkdir -p /var/lib/ferry/images /var/lib/ferry/disks && chmod 0711 /var/lib/ferry
fi
ferry=$here/bin/ferry.mjs

# 3. Config: kept if present.
mkdir -p "$etc" && chmod 0755 "$etc"
if [ ! -f "$etc/ferryd.json" ]; then
  NAME=$name ADDRESS=$address METRICS=$metrics PEERS="${peers[*]:-}" NETWORKS="${networks[*]:-}" "$node" - > "$etc/ferryd.json.new" <<'JS'
const e = process.env;
const peers = {}, allow = [], networks = {};
for (const p of (e.PEERS || '').split(' ').filter(Boolean)) {
  const [n, a] = p.split('=');
  if (!n || !a) throw new Error(`--peer ${p}: use NAME=ADDRESS`);
  peers[n] = a.includes(':') ? a : `${a}:8002`;
  allow.push(`${n.replace(/[.]/g, '\\.')}@${a.split(':')[0]}`);
}
for (const s of (e.NETWORKS || '').split(' ').filter(Boolean)) {
  const [n, rest] = s.split('=');
  const [bridge, subnet, address] = (rest || '').split(',');
  if (!n || !bridge || !subnet) throw new Error(`--network ${s}: use NAME=BRIDGE,SUBNET[,ADDRESS]`);
  networks[n] = { bridge, subnet, ...(address ? { address } : {}) };
}
const cfg = {
  name: e.NAME, stateDir: '/var/lib/ferry', tlsDir: '/etc/ferry/tls', imagesDir: '/opt/ferry/images',
  relocation: { address: e.ADDRESS, port: 8002, hostsAllow: allow, dataPorts: [49152, 49215] },
  networks, peers,
  storage: { pools: ['/var/lib/ferry/images'], localDir: '/var/lib/ferry/disks' },
  ...(e.METRICS ? { metrics: e.METRICS } : {}),
};
process.stdout.write(JSON.stringify(cfg, null, 2) + '\n');
JS
  mv "$etc/ferryd.json.new" "$etc/ferryd.json"
  echo "install: wrote $etc/ferryd.json"
else
  echo "install: kept $etc/ferryd.json"
fi

# 4. This host's certificate from the cluster CA (role host), unless it has one.
if [ -f "$etc/tls/server-cert.pem" ]; then
  echo "install: kept the certificate in $etc/tls"
elif [ -n "$ca" ]; then
  "$node" "$ferry" host cert "$name" --ip "$address" --ca "$ca" --out "$etc/tls" >/dev/null
  echo "install: issued $name's certificate into $etc/tls"
else
  echo "install: no certificate yet: on the CA host run \`ferry host cert $name --ip $address --out DIR\` and copy DIR to $etc/tls"
fi

# 5. The service.
mkdir -p "$unitdir"
sed -e "s#/usr/bin/node #$node #" "$here/deploy/ferryd.service" > "$unitdir/ferryd.service"
echo "install: wrote $unitdir/ferryd.service"
if [ -z "$destdir" ] && [ "$start" = 1 ]; then
  systemctl daemon-reload
  if [ -f "$etc/tls/server-cert.pem" ]; then systemctl enable --now ferryd; echo "install: ferryd enabled and started (systemctl status ferryd)"
  else systemctl enable ferryd; echo "install: ferryd enabled; start it once the certificate is in place (systemctl start ferryd)"; fi
fi
