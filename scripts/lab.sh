#!/usr/bin/env bash
# A multi-host weft lab on one machine. Each host is a network + mount namespace with
# its own dockerd and weft daemon, on an underlay bridge (192.0.2.0/24) with one etcd
# at 192.0.2.1:2379. Nothing is routed outside the lab's namespaces.
#
#   sudo scripts/lab.sh up N            bring up hosts h1..hN (installs the packages
#                                       and builds weft first)
#   sudo scripts/lab.sh exec HOST CMD…  run a command on a host (e.g. ip route)
#   sudo scripts/lab.sh docker HOST …   the docker CLI against a host's dockerd
#   sudo scripts/lab.sh status HOST     weft status on a host
#   sudo scripts/lab.sh down            remove every trace of the lab
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/lab.sh: run as root" >&2; exit 1; }
export LAB_ROOT=${LAB_ROOT:-/tmp/weft-lab} LAB_PREFIX=${LAB_PREFIX:-weftlab}
# shellcheck source=lib/lab.sh
source scripts/lib/lab.sh

cmd=${1:-}; shift || true
case "$cmd" in
  up)
    n=${1:?usage: lab.sh up N}
    # The packages (dockerd, etcd, the offloaded wireguard-go…), as up.sh does.
    scripts/deps.sh
    [ -x "$WEFT_BIN" ] || cargo build --locked --release
    lab_etcd_up
    for i in $(seq "$n"); do
      if [ -d "$(lab_dir "h$i")" ]; then echo "h$i is already up"; continue; fi
      lab_host_up "h$i" "$i"
      lab_image "h$i"
      echo "h$i up: 192.0.2.$((10 + i)), docker: sudo scripts/lab.sh docker h$i …"
    done
    ;;
  exec) host=${1:?usage: lab.sh exec HOST CMD…}; shift; lab_exec "$host" "$@" ;;
  docker) host=${1:?usage: lab.sh docker HOST ARGS…}; shift; lab_docker "$host" "$@" ;;
  status) host=${1:?usage: lab.sh status HOST}; shift; lab_exec "$host" "$WEFT_BIN" status "$@" ;;
  down) lab_down; echo "lab removed" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
