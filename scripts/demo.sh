#!/usr/bin/env bash
# npm run demo: installs what is missing, brings up a 2-host lab, runs a Linux guest
# on host1, shows both hosts and the guest's console, then tears the lab down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ferry() { node bin/ferry.mjs "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ferry lab down >/dev/null 2>&1 || true
trap 'step "ferry lab down"; ferry lab down' EXIT

step "ferry lab up --hosts 2"
ferry lab up --hosts 2

step "ferry -H host1 create web.json   (a Debian-kernel Linux guest from 'ferry lab guest linux web')"
cfg=$(mktemp --suffix=.json)
ferry lab guest linux web > "$cfg"
ferry -H host1 create "$cfg"
ip=$(node -e "console.log(JSON.parse(require('fs').readFileSync('$cfg','utf8')).nics[0].ip.split('/')[0])")
printf 'waiting for the guest to boot'
for _ in $(seq 1 120); do
  grep -q 'ferry-linux ready' /var/lib/ferry-lab/host1/state/run/web/console.log 2>/dev/null && break
  printf '.'; sleep 0.5
done
echo

step "ferry -H host1 list"
ferry -H host1 list
step "ferry -H host2 list"
ferry -H host2 list

step "echo 'uname -a' | ferry -H host1 console web"
sleep 1
echo 'uname -a; cat /proc/uptime' | ferry -H host1 console web --idle 2500

step "from the lab client: HTTP status of web ($ip)"
ip netns exec ferry-client node test/tools/http-get.mjs "$ip"; echo
rm -f "$cfg"
