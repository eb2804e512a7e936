#!/usr/bin/env bash
# Fetches Debian 13's dockerd (26.1) into a private directory without touching the
# system's apt state, and prints the path of its dockerd. It runs on Debian 12 with
# the system's containerd and runc. Usage: scripts/dockerd-26.sh [DIR]
set -euo pipefail
dir=${1:-/var/cache/weft/docker26}
bin="$dir/root/usr/sbin/dockerd"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$dir/lists/partial" "$dir/debs" "$dir/root"
uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
uri=${uri:-http://deb.debian.org/debian}
cat >"$dir/sources.list" <<LIST
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main
LIST
apt_opts=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o "Dir::Etc::sourceparts=-"
  -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache::archives=$dir/debs" -o "APT::Get::List-Cleanup=0")
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$dir/debs" && apt-get "${apt_opts[@]}" -qq download docker.io >&2)
dpkg -x "$dir"/debs/docker.io_*.deb "$dir/root"
[ -x "$bin" ] || { echo "dockerd-26: no dockerd in the package" >&2; exit 1; }
echo "$bin"
