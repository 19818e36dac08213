#!/usr/bin/env bash
# ferry needs Node.js 20 or newer (package.json "engines"). Debian 12 ships 18: where
# an apt suite this machine reaches has 20+ (Debian 13 and later), install it from
# there; otherwise stop with the line that installs it.
set -euo pipefail
MIN=20
major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
have=0
command -v node >/dev/null && have=$(major node)
[ "$have" -ge "$MIN" ] && exit 0
cand=$(apt-cache policy nodejs 2>/dev/null | awk '/Candidate:/{print $2}' | sed -E 's/^[0-9]+://; s/[^0-9].*$//')
if [ -n "$cand" ] && [ "$cand" != none ] && [ "$cand" -ge "$MIN" ] && [ "$(id -u)" = 0 ]; then
  echo "node-check: installing Node.js $cand from apt (found ${have/#0/none})"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
  exit 0
fi
cat >&2 <<MSG
ferry needs Node.js $MIN or newer; this machine has $( [ "$have" = 0 ] && echo none || node --version ).
Debian 12's own nodejs is 18. Install Node.js 20 from NodeSource's Debian repository, as root:
  curl -fsSL https://deb.nodesource.com/setup_20.x | bash - && apt-get install -y nodejs
then run this again.
MSG
exit 1
