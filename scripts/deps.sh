#!/usr/bin/env bash
# Installs what building and testing weft needs on Debian 12, if it is missing.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have dockerd || need+=(docker.io)
have containerd || need+=(containerd)
have runc || need+=(runc)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx httpd || need+=(busybox-static)
have nft || need+=(nftables)
have iptables || need+=(iptables)
have ip || need+=(iproute2)
have tcpdump || need+=(tcpdump)
have curl || need+=(curl)
have python3 || need+=(python3)
have unshare || need+=(util-linux)
have gcc || need+=(gcc)
have protoc || need+=(protobuf-compiler)
have etcd || need+=(etcd-server)
have wireguard-go || need+=(wireguard-go)
have wg || need+=(wireguard-tools)
have iperf3 || need+=(iperf3)
if [ "${#need[@]}" -gt 0 ]; then
  echo "deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
have cargo || { echo "deps: cargo (the Rust toolchain) is required" >&2; exit 1; }
