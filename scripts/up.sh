#!/usr/bin/env bash
# Starts weft with its embedded store.
#
#   sudo scripts/up.sh          a sandboxed try-out: one simulated Docker host (its own
#                               network namespace and dockerd) running weft; prints the
#                               DOCKER_HOST to use. Touches nothing else on the machine.
#   sudo scripts/up.sh down     removes the try-out host and everything it made.
#   sudo scripts/up.sh --host   runs weft in the foreground for this machine's own
#                               Docker (socket /run/docker/plugins/weft.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/up.sh: run as root" >&2; exit 1; }
export LAB_ROOT=${LAB_ROOT:-/tmp/weft-try} LAB_PREFIX=${LAB_PREFIX:-wefttry}
# shellcheck source=lib/lab.sh
source scripts/lib/lab.sh

case "${1:-}" in
  down)
    lab_down
    echo "weft try-out removed"
    ;;
  --host)
    scripts/deps.sh
    cargo build --locked --release
    exec target/release/weft daemon
    ;;
  "")
    scripts/deps.sh
    cargo build --locked --release
    if [ -d "$(lab_dir try)" ]; then
      echo "already up"
    else
      lab_host_up try 1
      lab_image try
    fi
    cat <<TXT

weft is running with a dockerd of its own (logs: $(lab_dir try)/{weft,dockerd}.log).
  export DOCKER_HOST=unix://$(lab_dir try)/docker.sock
  docker network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 app
  docker run -d --name one --network app $LAB_IMAGE sleep 3600
  docker run --rm --network app $LAB_IMAGE ping -c 3 \$(docker inspect -f '{{(index .NetworkSettings.Networks "app").IPAddress}}' one)
Stop it with: sudo scripts/up.sh down
TXT
    ;;
  *)
    sed -n '2,10p' "$0"; exit 2 ;;
esac
