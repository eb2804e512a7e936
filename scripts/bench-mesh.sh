#!/usr/bin/env bash
# The mesh at N hosts, simulated: one real weft (and dockerd) on a lab host, a real
# etcd, and N-1 simulated hosts written into it with their blocks (bench/mesh_sim.py).
# Measures and reports; never passes or fails on a number. scripts/bench.sh runs it.
#
#   sudo scripts/bench-mesh.sh [--sizes 10,100,1000] [--joins 5] [--records FILE]
#
# Appends JSON records (one a line) to FILE (default: printed on standard output).
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=10,100,1000 joins=5 records=/dev/stdout
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=${2:?}; shift 2 ;;
    --joins) joins=${2:?}; shift 2 ;;
    --records) records=${2:?}; shift 2 ;;
    *) sed -n '2,8p' "$0"; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "scripts/bench-mesh.sh: run as root" >&2; exit 1; }

# The mesh pass's time is read from weft's own debug log.
export LAB_ROOT=/tmp/weft-mesh-$$ LAB_PREFIX=wms$$ WEFT_LOG=info,weft::mesh=debug WEFT_HOST_TTL=5
# shellcheck source=lib/lab.sh
source scripts/lib/lab.sh
trap 'lab_down >/dev/null 2>&1 || true' EXIT
mkdir -p "$LAB_ROOT"
POOL=10.128.0.0/14 BLOCK=26

printf '[bench-mesh %s] one real host, simulated hosts up to %s\n' "$(date +%H:%M:%S)" "${sizes##*,}" >&2
lab_etcd_up
lab_host_up h1 1 >/dev/null
# A network in the pool on the real host: the simulated hosts' blocks are routed here.
lab_docker h1 network create -d weft --ipam-driver weft --subnet "$POOL" \
  --ipam-opt weft.block-size="$BLOCK" mesh >/dev/null
ip netns exec "$LAB_WAN" python3 bench/mesh_sim.py http://192.0.2.1:2379 /weft/v1/ "$POOL" "$BLOCK" \
  "$(lab_holder h1)" "$(cat "$(lab_dir h1)/weft.pid")" "$(lab_dir h1)/weft.log" "$sizes" "$joins" >>"$records"
