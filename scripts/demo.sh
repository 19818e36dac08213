#!/usr/bin/env bash
# npm run demo: installs what is missing, brings up a 2-host lab, runs a Linux guest
# on host1, shows both hosts and the guest's console, live-migrates it to host2 while
# a lab client holds a TCP connection to it, then moves it back while an SSH session
# prints a counter, and tears the lab down.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ferry() { node bin/ferry.mjs "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ferry lab down >/dev/null 2>&1 || true
echo_pid=""
ssh_pid=""
cleanup() {
  [ -n "$echo_pid" ] && kill "$echo_pid" 2>/dev/null || true
  [ -n "$ssh_pid" ] && kill "$ssh_pid" 2>/dev/null || true
  step "ferry lab down"
  ferry lab down
}
trap cleanup EXIT

step "ferry lab up --hosts 2"
ferry lab up --hosts 2

step "ferry -H host1 host info   (the engine: QEMU 10 from bookworm-backports)"
ferry -H host1 host info | grep -E '^(host|version|engine|accelerator|machine) '

step "ferry -H host1 create web.json   (a Debian-kernel Linux guest from 'ferry lab guest linux web')"
cfg=$(mktemp --suffix=.json)
ferry lab guest linux web > "$cfg"
ferry -H host1 create "$cfg"
ip=$(node -e "console.log(JSON.parse(require('fs').readFileSync('$cfg','utf8')).nics[0].ip.split('/')[0])")
rm -f "$cfg"
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

step "the lab client opens a TCP connection to web's echo service ($ip:7) and keeps it busy"
stats=$(mktemp)
fifo=$(mktemp -u); mkfifo "$fifo"
ip netns exec ferry-client node test/tools/echo-client.mjs "$ip" 10 < "$fifo" > "$stats" &
echo_pid=$!
exec 3>"$fifo"
sleep 1
before=$(ip netns exec ferry-client node test/tools/http-get.mjs "$ip")
echo "status before: $before"

step "ferry -H host1 migrate web host2 --plan   (the autopilot measures and predicts; nothing moves)"
ferry -H host1 migrate web host2 --plan

step "ferry -H host1 migrate web host2 --live"
ferry -H host1 migrate web host2 --live

step "ferry -H host1 list; ferry -H host2 list"
ferry -H host1 list
ferry -H host2 list

step "the client's connection after the move"
sleep 1
exec 3>&-
wait "$echo_pid" || true
echo_pid=""
node -e "
const r = JSON.parse(require('fs').readFileSync('$stats','utf8').trim().split('\n').pop());
console.log('sent ' + r.sent + ' lines, ' + r.echoed + ' echoed back in order on the same connection; longest gap ' + r.maxGapMs + ' ms; connection ' + (r.closed ? 'CLOSED' : 'still open'));
"
after=$(ip netns exec ferry-client node test/tools/http-get.mjs "$ip")
echo "status after:  $after   (same bootId: the guest kept running)"
rm -f "$stats" "$fifo"

step "echo 'hostname; cat /proc/uptime' | ferry -H host2 console web"
echo 'hostname; cat /proc/uptime' | ferry -H host2 console web --idle 2500

step "an SSH session (ferry lab ssh web) prints a counter while web moves back to host1 and over again"
ticks=$(mktemp); rcfile=$(mktemp)
( ferry lab ssh web -- 'rm -f /tmp/stop; i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo "tick $i on $(hostname), up $(cut -d" " -f1 /proc/uptime) s"; sleep 0.5; done; echo "end after $i ticks"'
  echo $? > "$rcfile" ) | tee "$ticks" | sed 's/^/  ssh| /' &
ssh_pid=$!
sleep 2
ferry -H host2 migrate web host1 --live
sleep 1
ferry -H host1 migrate web host2 --live
sleep 2
ferry lab ssh web -- touch /tmp/stop
wait "$ssh_pid" || true
ssh_pid=""
ssh_rc=$(cat "$rcfile")
node -e "
const lines = require('fs').readFileSync('$ticks', 'utf8').trim().split('\n');
const n = lines.filter((l) => l.startsWith('tick ')).map((l) => Number(l.split(' ')[1]));
const whole = n.every((v, i) => v === i + 1);
console.log('ssh session: ' + n.length + ' ticks, ' + (whole ? 'none missing, in order' : 'LINES MISSING') + '; it ended with exit status $ssh_rc: ' + lines[lines.length - 1]);
"
rm -f "$ticks" "$rcfile"
[ "$ssh_rc" = 0 ]
