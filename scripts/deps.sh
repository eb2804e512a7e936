#!/usr/bin/env bash
# Installs the Debian 12 packages that building, running and testing weft need.
# The list below is the only one in the project. Every run asks apt for every
# package: apt-get skips what is installed and repairs what is not, so a machine
# that has a command but lacks a package (protoc without its .proto includes) is
# fixed too. Nothing is decided by looking for commands.
#
#   sudo scripts/deps.sh            install (apt-get update once, then install)
#   scripts/deps.sh --list          print the package names, one a line
set -euo pipefail

packages=(
  # building: etcd-client's build script runs protoc, which needs the well-known
  # .proto files (google/protobuf/*.proto) from libprotobuf-dev
  protobuf-compiler libprotobuf-dev gcc libc6-dev pkg-config
  # running: the datapath and the userspace WireGuard fallback
  iproute2 nftables iptables wireguard-go wireguard-tools
  # testing: dockerd and what it runs, etcd, the test image, probes, the registry
  # for the managed-plugin install path, the fresh-machine check, systemd-analyze
  # for the unit, dnsmasq as the lab's DNS server and Debian's docker-compose (names
  # across hosts)
  docker.io containerd runc etcd-server etcd-client busybox-static tcpdump curl
  python3 jq util-linux iperf3 docker-registry mmdebstrap systemd dnsmasq-base
  docker-compose
)

# The userspace WireGuard with TUN and UDP offloads (GSO/GRO) is wireguard-go
# 0.0.20231211 or later. Debian 12 ships 0.0.20220316; its bookworm-backports suite
# (and Debian 13) the newer one. On Debian 12 the suite is added from the mirror the
# system's own bookworm source names, and wireguard-go alone comes from it.
BACKPORTS_LIST=/etc/apt/sources.list.d/weft-bookworm-backports.list

# The URI of the system's bookworm source (one-line or deb822 format).
bookworm_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI SUITE COMPONENTS…
    sed -E 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }'
  done | head -1 | grep . && return 0
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
      {
        uri = ""; bookworm = 0; deb = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { split($i, u, " "); uri = u[2] }
          if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) bookworm = 1
          if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
        }
        if (uri != "" && bookworm && deb) { print uri; exit }
      }' "$f"
  done | head -1 | grep .
}

if [ "${1:-}" = --list ]; then printf '%s\n' "${packages[@]}"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "scripts/deps.sh: run as root (apt-get)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
install=("${packages[@]}")
if [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ]; then
  mirror=$(bookworm_mirror) || { echo "deps: no bookworm source in /etc/apt to add bookworm-backports from" >&2; exit 1; }
  echo "deb $mirror bookworm-backports main" >"$BACKPORTS_LIST"
  install=("${install[@]/#wireguard-go/wireguard-go/bookworm-backports}")
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${install[@]}" >/dev/null
command -v cargo >/dev/null || { echo "deps: cargo (the Rust toolchain) is required" >&2; exit 1; }
