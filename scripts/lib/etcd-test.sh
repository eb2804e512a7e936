#!/usr/bin/env bash
# Runs the etcd store tests against a real etcd started here. Meant to run inside a
# private network namespace (scripts/test.sh uses `unshare --net`): etcd listens on
# that namespace's loopback only, and its data lives in a temporary directory.
set -euo pipefail
ip link set lo up
data=$(mktemp -d)
etcd --name weft-test --data-dir "$data" \
  --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
  --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster weft-test=http://127.0.0.1:23800 >"$data/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill "$etcd_pid" 2>/dev/null; wait "$etcd_pid" 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:23790/health >/dev/null 2>&1 && break
  sleep 0.1
done
WEFT_TEST_ETCD=http://127.0.0.1:23790 "$@"
