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
  # for the managed-plugin install path, the fresh-machine check, and systemd-analyze
  # for the unit
  docker.io containerd runc etcd-server etcd-client busybox-static tcpdump curl
  python3 jq util-linux iperf3 docker-registry mmdebstrap systemd
)

if [ "${1:-}" = --list ]; then printf '%s\n' "${packages[@]}"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "scripts/deps.sh: run as root (apt-get)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
command -v cargo >/dev/null || { echo "deps: cargo (the Rust toolchain) is required" >&2; exit 1; }
