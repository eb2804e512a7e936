#!/usr/bin/env bash
# Runs the etcd store tests against real etcd servers started here: a plain one and
# one with TLS (client certificates; the test enables user/password auth on it).
# Meant to run inside a private network namespace (scripts/test.sh uses
# `unshare --net`): both listen on that namespace's loopback only, and their data
# and certificates live in a temporary directory.
set -euo pipefail
ip link set lo up
data=$(mktemp -d)
pids=()
# The trap must not change the exit status: etcd's own (killed) status is not ours.
trap 'set +e; for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$data"' EXIT

# A throwaway CA, a server certificate for 127.0.0.1 and a client certificate.
pki=$data/pki
mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=weft-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -subj "/CN=weft-$who" -keyout "$pki/$who.key" -out "$pki/$who.csr" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$pki/$who.ext"
  openssl x509 -req -in "$pki/$who.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/$who.ext" -out "$pki/$who.pem" 2>/dev/null
done

start_etcd() { # name client-port peer-port scheme extra-args…
  local name=$1 cport=$2 pport=$3 scheme=$4; shift 4
  etcd --name "$name" --data-dir "$data/$name" \
    --listen-client-urls "$scheme://127.0.0.1:$cport" --advertise-client-urls "$scheme://127.0.0.1:$cport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "$name=http://127.0.0.1:$pport" "$@" >"$data/$name.log" 2>&1 &
  pids+=($!)
}
start_etcd plain 23790 23800 http
start_etcd secure 23791 23801 https --cert-file "$pki/server.pem" --key-file "$pki/server.key" \
  --trusted-ca-file "$pki/ca.pem" --client-cert-auth
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:23790/health >/dev/null 2>&1 &&
    curl -sf --cacert "$pki/ca.pem" --cert "$pki/client.pem" --key "$pki/client.key" https://127.0.0.1:23791/health >/dev/null 2>&1 &&
    break
  sleep 0.1
done
set +e
WEFT_TEST_ETCD=http://127.0.0.1:23790 WEFT_TEST_ETCD_TLS=https://127.0.0.1:23791 WEFT_TEST_PKI="$pki" "$@"
status=$?
exit "$status"
