#!/usr/bin/env bash
# End to end across hosts: a lab of simulated hosts (own netns, mount ns, dockerd and
# weft each) on one underlay bridge, with one etcd. Run as root; see scripts/test.sh.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export LAB_ROOT=${LAB_ROOT:-/tmp/weft-mh-$$} LAB_PREFIX=${LAB_PREFIX:-wmh$$}
export WEFT_HOST_TTL=${WEFT_HOST_TTL:-4} WEFT_WG_KEEPALIVE=${WEFT_WG_KEEPALIVE:-1}
# shellcheck source=../../scripts/lib/lab.sh
source "$REPO/scripts/lib/lab.sh"
# shellcheck source=lib.sh
source "$REPO/tests/e2e/lib.sh"

# shellcheck source=hosts.sh
source "$REPO/tests/e2e/hosts.sh"

# Number of WireGuard peers on a host, read from its UAPI socket.
peer_count() {
  lab_exec "$1" python3 - <<'PY'
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/wireguard/weft0.sock")
s.sendall(b"get=1\n\n")
data = b""
while not data.endswith(b"\n\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(sum(1 for line in data.decode().splitlines() if line.startswith("public_key=")))
PY
}

# Seconds (float) until peer_count on $1 equals $2, polling every 20 ms; "timeout" after $3 s.
time_until_peers() {
  lab_exec "$1" python3 - "$2" "$3" <<'PY'
import socket, sys, time
want, limit = int(sys.argv[1]), float(sys.argv[2])
def count():
    try:
        s = socket.socket(socket.AF_UNIX); s.connect("/run/wireguard/weft0.sock"); s.sendall(b"get=1\n\n")
        data = b""
        while not data.endswith(b"\n\n"):
            c = s.recv(65536)
            if not c: break
            data += c
        return sum(1 for l in data.decode().splitlines() if l.startswith("public_key="))
    except OSError:
        return -1
start = time.time()
while time.time() - start < limit:
    if count() == want:
        print(f"{time.time():.3f}"); sys.exit(0)
    time.sleep(0.02)
print("timeout"); sys.exit(1)
PY
}

cleanup() { lab_down; }
trap cleanup EXIT

test_network_on_every_host_and_cross_host_traffic() {
  D h1 network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 -o weft.network=app app >/dev/null
  # The same subnet under another weft.network name is refused on the next host.
  local out
  out=$(D h2 network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 -o weft.network=red app 2>&1) &&
    fail "a mismatching weft.network was accepted"
  echo "$out" | grep -q '"app"' || fail "unclear error: $out"
  D h2 network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 -o weft.network=app app >/dev/null
  run_bb h1 c1 --network app
  run_bb h2 c2 --network app
  local a b
  a=$(ip_of h1 c1 app); b=$(ip_of h2 c2 app)
  [ "$a" != "$b" ]
  retry 25 pings h1 c1 "$b"
  pings h2 c2 "$a" 3
  # 10 MB with full-size segments through the tunnel: no PMTU black hole.
  D h2 exec c2 sh -c 'mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=10 2>/dev/null && httpd -p 8080 -h /www'
  D h1 exec c1 wget -q -O /tmp/blob "http://$b:8080/blob"
  [ "$(D h1 exec c1 md5sum /tmp/blob | cut -d' ' -f1)" = "$(D h2 exec c2 md5sum /www/blob | cut -d' ' -f1)" ]
  [ "$(D h1 exec c1 cat /sys/class/net/eth0/mtu)" = 1420 ]
  lab_exec h1 ip -o link show weft0 | grep -q 'mtu 1420 ' || fail "weft0: $(lab_exec h1 ip -o link show weft0)"
  # weft status shows both hosts, the peer with a recent handshake, and the blocks.
  local status
  status=$(lab_exec h1 "$WEFT_BIN" status --json)
  python3 - "$status" <<'PY' || fail "status: $status"
import json, sys
s = json.loads(sys.argv[1])
hosts = s["hosts"]
assert len(hosts) == 2, hosts
peer = [h for h in hosts if not h["this_host"]][0]
assert peer["last_handshake_secs_ago"] is not None and peer["last_handshake_secs_ago"] < 180, peer
assert peer["blocks"] and s["blocks"], s
assert s["endpoints"] and s["networks"][0]["subnet"] == "10.42.0.0/16", s
# The lab runs the userspace WireGuard that scripts/deps.sh installs: the one with
# the offloads (wireguard-go 0.0.20231211 or later, bookworm-backports on Debian 12).
wg = s["wireguard"]
assert wg["kind"] == "userspace" and wg["offloads"] is True, wg
PY
  grep -q '"WireGuard implementation"\|WireGuard implementation' "$(lab_dir h1)/weft.log" || fail "weft's log does not name its WireGuard implementation"
}

test_only_wireguard_crosses_the_underlay() {
  local b marker cap
  b=$(ip_of h2 c2 app)
  marker="WEFT-MARKER-$RANDOM$RANDOM"
  cap="$LAB_ROOT/underlay.pcap"
  D h2 exec c2 sh -c "for i in \$(seq 200); do echo $marker; done > /www/marker.txt"
  ip netns exec "$LAB_WAN" timeout 6 tcpdump -i br0 -U -w "$cap" 'host 192.0.2.11 and host 192.0.2.12' 2>/dev/null &
  sleep 1
  D h1 exec c1 wget -q -O /tmp/marker.txt "http://$b:8080/marker.txt"
  D h1 exec c1 grep -q "$marker" /tmp/marker.txt
  pings h1 c1 "$b" 3
  wait || true
  [ "$(tcpdump -r "$cap" -n 2>/dev/null | wc -l)" -gt 0 ] || fail "capture saw no traffic between the hosts"
  # ARP between the hosts is expected; every IP packet must be WireGuard.
  [ "$(tcpdump -r "$cap" -n 'ip and not udp port 51820' 2>/dev/null | wc -l)" = 0 ] ||
    fail "non-WireGuard traffic between hosts: $(tcpdump -r "$cap" -n 'ip and not udp port 51820' 2>/dev/null | head -3)"
  ! tcpdump -r "$cap" -A 2>/dev/null | grep -q "$marker" || fail "the marker crossed the underlay in clear"
}

test_thirty_containers_at_once_get_distinct_addresses() {
  local pids=() h i
  for i in $(seq 30); do
    h=h$(( (i % 2) + 1 ))
    D $h run -d --name "m$i" --network app "$LAB_IMAGE" sleep 3600 >/dev/null &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  local ips
  ips=$(for i in $(seq 30); do ip_of "h$(( (i % 2) + 1 ))" "m$i" app; done)
  [ "$(echo "$ips" | grep -c .)" = 30 ] || fail "not every container got an address"
  [ "$(echo "$ips" | sort -u | wc -l)" = 30 ] || fail "duplicates: $(echo "$ips" | sort | uniq -d)"
  pings h1 m2 "$(ip_of h2 m1 app)"
  for i in $(seq 30); do D "h$(( (i % 2) + 1 ))" rm -f "m$i" >/dev/null & done
  wait
}

test_networks_stay_isolated_across_hosts() {
  for h in h1 h2; do D $h network create -d weft --ipam-driver weft --subnet 10.43.0.0/16 other >/dev/null; done
  run_bb h2 o2 --network other
  run_bb h1 o1 --network other
  retry 25 pings h1 o1 "$(ip_of h2 o2 other)"
  pings h1 c1 "$(ip_of h2 o2 other)" && fail "app on h1 reached other on h2"
  pings h2 o2 "$(ip_of h1 c1 app)" && fail "other on h2 reached app on h1"
  return 0
}

# Host boundary, routes: a host routes (and allows over WireGuard) only the blocks of
# pools it has a network in. h1 uses 10.99.0.0/24 for a weft network; h2 has no such
# network but a route of its own to 10.99.0.0/24 (a LAN behind 192.0.2.254), which
# h1's block must not take over on h2.
test_remote_blocks_are_routed_only_for_pools_this_host_has_a_network_in() {
  trap 'D h1 rm -f r1 >/dev/null 2>&1; D h1 network rm lan99 >/dev/null 2>&1; lab_exec h2 ip route del 10.99.0.0/24 via 192.0.2.254 2>/dev/null; true' EXIT
  lab_exec h2 ip route add 10.99.0.0/24 via 192.0.2.254
  D h1 network create -d weft --ipam-driver weft --subnet 10.99.0.0/24 lan99 >/dev/null
  run_bb h1 r1 --network lan99
  local a
  a=$(ip_of h1 r1 lan99)
  # h2 hears of h1's new block at once (a mesh pass runs on every etcd change).
  sleep 2
  lab_exec h2 ip route get "$a" | grep -q "via 192.0.2.254" ||
    fail "on h2, $a goes $(lab_exec h2 ip route get "$a" | head -1), not through h2's own route via 192.0.2.254"
  ! lab_exec h2 wg show weft0 allowed-ips 2>/dev/null | grep -q "10\.99\." ||
    fail "h2 allows h1's block of a pool it has no network in: $(lab_exec h2 wg show weft0 allowed-ips | tr '\n' ' ')"
}

test_weft_restart_during_cross_host_ping_loses_nothing() {
  local b
  b=$(ip_of h2 c2 app)
  D h1 exec -d c1 sh -c "ping -i 0.1 -c 60 $b > /tmp/ping.log 2>&1"
  sleep 1
  lab_weft_stop h1 KILL
  sleep 1
  lab_weft_start h1
  retry 50 sh -c "docker -H unix://$(lab_dir h1)/docker.sock exec c1 grep -q 'packet loss' /tmp/ping.log"
  D h1 exec c1 cat /tmp/ping.log | grep -q ' 0% packet loss' || fail "$(D h1 exec c1 tail -2 /tmp/ping.log)"
  grep -q "adopting running userspace WireGuard" "$(lab_dir h1)/weft.log" || fail "userspace WireGuard was not adopted"
}

test_late_host_converges_within_a_second() {
  [ "$(peer_count h1)" = 1 ]
  time_until_peers h1 2 30 >"$LAB_ROOT/h1.seen" &
  local w1=$!
  time_until_peers h2 2 30 >"$LAB_ROOT/h2.seen" &
  local w2=$!
  lab_host_up h3 3
  wait $w1 || fail "h1 never programmed h3"
  wait $w2 || fail "h2 never programmed h3"
  local registered
  registered=$(python3 - "$(lab_dir h3)/weft.log" <<'PY'
import re, sys, datetime
for line in open(sys.argv[1]):
    if "host registered" in line:
        ts = line.split()[0].rstrip("Z")
        print(datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()); break
PY
)
  [ -n "$registered" ] || fail "h3 never registered"
  for h in h1 h2; do
    python3 -c "import sys; lag=float(sys.argv[1])-float(sys.argv[2]); print(f'    {sys.argv[3]}: programmed {lag:.3f}s after registration'); sys.exit(0 if lag <= 1.0 else 1)" \
      "$(cat "$LAB_ROOT/$h.seen")" "$registered" "$h" || fail "$h converged too slowly"
  done
  lab_image h3
  D h3 network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 app >/dev/null
  run_bb h3 c3 --network app
  retry 25 pings h3 c3 "$(ip_of h1 c1 app)"
}

test_a_vanished_host_is_evicted() {
  local killed bound h
  # h3 has published names (the late-host cluster network test), which must go with it.
  etcdctl_lab get --prefix "/weft/v1/names/" --keys-only | grep -q "$(host_id h3)" ||
    fail "h3 has no names published before it vanishes"
  local cache
  cache=$(ip_of h3 s3 shared)
  retry 25 resolves h1 s1 cache "$cache" || fail "h3's alias cache does not resolve on h1: '$(lookup h1 s1 cache)'"
  # Everything of h3 dies at once and its underlay link goes down.
  for pid in $(ip netns pids "$(lab_ns h3)"); do
    [ "$pid" = "$(lab_holder h3)" ] || kill -KILL "$pid" 2>/dev/null || true
  done
  ip -n "$(lab_ns h3)" link set eth0 down
  killed=$(python3 -c 'import time; print(time.time())')
  # Both hosts are watched at once: each evicts on its own timing (its own full passes).
  time_until_peers h1 1 30 >"$LAB_ROOT/h1.evicted" &
  local w1=$!
  time_until_peers h2 1 30 >"$LAB_ROOT/h2.evicted" &
  local w2=$!
  wait $w1 || fail "h3 never evicted from h1"
  wait $w2 || fail "h3 never evicted from h2"
  # A really gone host's last packets are seen by the first counter read after the kill (a
  # full pass at least every mesh interval); it leaves 2 x keepalive + 1 s after that, not
  # before its lease expires (docs/architecture.md). +1.5 s: etcd's lease-expiry lag, the
  # 20 ms polling and a loaded machine.
  bound=$(python3 -c "import sys; t,i,k=map(float,sys.argv[1:]); print(max(t,i+2*k+1)+1.5)" \
    "$WEFT_HOST_TTL" "${WEFT_MESH_INTERVAL:-5}" "$WEFT_WG_KEEPALIVE")
  for h in h1 h2; do
    python3 -c "import sys; lag=float(sys.argv[1])-float(sys.argv[2]); print(f'    {sys.argv[4]}: evicted {lag:.3f}s after the kill (bound {sys.argv[3]}s)'); sys.exit(0 if lag <= float(sys.argv[3]) else 1)" \
      "$(cat "$LAB_ROOT/$h.evicted")" "$killed" "$bound" "$h" || fail "eviction from $h too slow"
  done
  retry 25 sh -c "nsenter -t $(lab_holder h1) -n ip route show proto 88 | grep -q ." || fail "h1 lost its routes to h2"
  # Its published names went with its lease.
  [ -z "$(etcdctl_lab get --prefix "/weft/v1/names/" --keys-only | grep "$(host_id h3)")" ] ||
    fail "h3's names outlived its lease"
  # And no longer resolve (the resolver reads on etcd's watch, else every 2 s).
  retry 10 resolves h1 s1 cache "" || fail "h3's alias still resolves on h1: '$(lookup h1 s1 cache)'"
}

test_traffic_survives_etcd_loss_and_weft_recovers() {
  local b started elapsed out
  b=$(ip_of h2 c2 app)
  lab_etcd_stop
  sleep 1
  pings h1 c1 "$b" 3 || fail "existing traffic stopped with etcd"
  started=$(date +%s%N)
  out=$(D h1 run -d --name during --network app "$LAB_IMAGE" sleep 60 2>&1) && echo "    docker run succeeded without etcd" || echo "    docker run refused without etcd: $(echo "$out" | grep -m1 -i error)"
  elapsed=$(( ($(date +%s%N) - started) / 1000000 ))
  echo "    docker run answered in ${elapsed} ms"
  [ "$elapsed" -lt 5000 ] || fail "docker run took ${elapsed} ms without etcd"
  D h1 rm -f during >/dev/null 2>&1 || true
  rm -f "$LAB_ROOT/etcd.pid"
  lab_etcd_up
  retry 75 sh -c "docker -H unix://$(lab_dir h1)/docker.sock run -d --name after --network app $LAB_IMAGE sleep 60 >/dev/null 2>&1 || { docker -H unix://$(lab_dir h1)/docker.sock rm -f after >/dev/null 2>&1; false; }"
  retry 25 pings h2 c2 "$(ip_of h1 after app)"
}

# -p publishes on the host where the container runs (h2, 192.0.2.12), not on the others;
# a container on another host reaches it there.
test_a_port_is_published_on_the_host_where_its_container_runs() {
  trap 'trap - ERR; set +e; D h2 rm -f pm >/dev/null 2>&1' EXIT
  run_bb h2 pm --network app -p 18380:8080
  D h2 exec pm sh -c 'mkdir -p /www && echo marker >/www/index.html && httpd -p 8080 -h /www'
  retry 25 sh -c "ip netns exec $LAB_WAN curl -s --max-time 2 http://192.0.2.12:18380/ | grep -q marker" ||
    fail "the underlay cannot fetch the port on the container's host"
  ip netns exec "$LAB_WAN" curl -s --max-time 2 http://192.0.2.11:18380/ | grep -q marker &&
    fail "the port is published on a host where the container does not run"
  lab_exec h1 nft list table inet weft | grep -q 'dport 18380' && fail "h1 has a rule for h2's port"
  D h1 exec c1 timeout 3 wget -q -O - http://192.0.2.12:18380/ | grep -q marker ||
    fail "a container on h1 cannot fetch the port published on h2"
}

# Cluster networks (issue 12, create once): created on h1, h2's dockerd has it within
# 2 s with the same settings, and containers on the two copies reach each other.
test_cluster_network_is_created_once_for_every_host() {
  local started lag
  started=$(date +%s%N)
  D h1 network create -d weft --ipam-driver weft --subnet 10.90.0.0/22 --ip-range 10.90.1.0/24 \
    --label team=blue -o weft.scope=cluster shared >/dev/null
  until has_network h2 shared; do
    [ $(( ($(date +%s%N) - started) / 1000000 )) -lt 10000 ] || fail "h2 never got the network"
    sleep 0.05
  done
  lag=$(( ($(date +%s%N) - started) / 1000000 ))
  echo "    on h2 ${lag} ms after docker network create began on h1"
  [ "$lag" -le 2000 ] || fail "propagation took ${lag} ms (bound 2000 ms)"
  [ "$(D h2 network inspect -f '{{.Driver}} {{(index .IPAM.Config 0).Subnet}} {{(index .IPAM.Config 0).IPRange}} {{.Labels.team}}' shared)" = \
    "weft 10.90.0.0/22 10.90.1.0/24 blue" ] || fail "h2's copy differs: $(D h2 network inspect shared)"
  run_bb h1 s1 --network shared
  run_bb h2 s2 --network shared
  case "$(ip_of h2 s2 shared)" in 10.90.1.*) ;; *) fail "address outside the ip-range: $(ip_of h2 s2 shared)" ;; esac
  retry 25 pings h2 s2 "$(ip_of h1 s1 shared)" || fail "no traffic between the copies"
  # Each host's status shows it, present here, on both hosts.
  weft_status h1 | jq -e '.cluster_networks.networks[] | select(.name == "shared") |
    .here == "present" and (.hosts | length) == 2' >/dev/null ||
    fail "h1's status: $(weft_status h1 | jq -c .cluster_networks)"
  weft_status h2 | jq -e '.networks[] | select(.subnet == "10.90.0.0/22") | .scope == "cluster"' >/dev/null ||
    fail "h2's status does not show its copy as a cluster network"
}

# Names across hosts (issue 12): a container on h2 reaches h1's by name (ping, wget);
# an alias resolves to every holder; a name never resolves from another network;
# other names resolve as before, also while weft is down; a removed container's name
# stops resolving within seconds; 20 lookups at once all get their answer; a host
# firewall dropping INPUT and a DNS server of the host's own on port 53 change nothing.
# tcp_asks HOST CONTAINER NAME: the reply, as hex bytes on one line, to a DNS query for
# NAME's A records sent over TCP from CONTAINER straight to the lab's server (as a
# client does after a truncated reply); busybox has no TCP-capable DNS client, so the
# query's bytes are written out here.
tcp_asks() {
  local name=$3 q="" label labels
  IFS=. read -ra labels <<<"$name"
  for label in "${labels[@]}"; do q+=$(printf '\\x%02x' "${#label}")$label; done
  local n=$((12 + ${#name} + 2 + 4))
  local len
  len=$(printf '\\x%02x\\x%02x' $((n / 256)) $((n % 256)))
  D "$1" exec "$2" sh -c "printf '$len\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00$q\\x00\\x00\\x01\\x00\\x01' |
    nc -w 3 192.0.2.1 53 | od -An -tx1" 2>/dev/null | xargs
}
# hex_of ADDRESS: its four bytes as tcp_asks prints them.
hex_of() { local IFS=.; set -- $1; printf '%02x %02x %02x %02x' "$1" "$2" "$3" "$4"; }

# unblock_h2: h2's INPUT open again and its port 53 free (test_names_resolve_across_hosts).
unblock_h2() {
  kill "$(cat "$LAB_ROOT/port53.pid" 2>/dev/null)" 2>/dev/null
  rm -f "$LAB_ROOT/port53.pid"
  lab_exec h2 iptables -P INPUT ACCEPT
  lab_exec h2 iptables -D INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT 2>/dev/null
  lab_exec h2 iptables -D INPUT -i lo -j ACCEPT 2>/dev/null
  lab_exec h2 iptables -D INPUT -p udp --dport 51820 -j ACCEPT 2>/dev/null
  return 0
}

test_names_resolve_across_hosts() {
  trap 'trap - ERR; set +e; unblock_h2; D h1 rm -f web web-b >/dev/null 2>&1; D h2 rm -f stranger >/dev/null 2>&1; D h2 network rm stray >/dev/null 2>&1' EXIT
  run_bb h1 web --network shared --network-alias shop
  run_bb h1 web-b --network shared --network-alias shop
  D h1 exec web sh -c 'mkdir -p /www && echo marker-web >/www/index.html && httpd -p 80 -h /www'
  local web web_b
  web=$(ip_of h1 web shared); web_b=$(ip_of h1 web-b shared)
  retry 25 resolves h2 s2 web "$web" ||
    fail "web does not resolve on h2: '$(lookup h2 s2 web)' (want $web); h1 publishes: $(weft_status h1 | jq -c .names)"
  D h2 exec s2 ping -c 1 -W 2 web >/dev/null || fail "ping web from h2"
  D h2 exec s2 timeout 5 wget -q -O - http://web/ | grep -q marker-web || fail "wget http://web/ from h2"
  retry 25 resolves h2 s2 shop "$(printf '%s\n' "$web" "$web_b" | sort | xargs)" ||
    fail "the alias shop: '$(lookup h2 s2 shop)', want $web and $web_b"
  # Never from another network: a container of another weft network on h2 does not get it.
  D h2 network create -d weft --ipam-driver weft --subnet 10.93.0.0/24 stray >/dev/null
  run_bb h2 stranger --network stray
  [ -z "$(lookup h2 stranger web)" ] || fail "web resolved from network stray: $(lookup h2 stranger web)"
  # … and its query went on to the lab's server, which says there is no such name.
  local said
  said=$(D h2 exec stranger nslookup web 2>&1) || true
  echo "$said" | grep -q "can't find web: NXDOMAIN" || fail "network stray's query for web: $said"
  # Other names as before: the lab's DNS server answers upstream.test, through weft.
  resolves h2 s2 upstream.test 192.0.2.99 || fail "upstream.test: '$(lookup h2 s2 upstream.test)'"
  # Over TCP too: answered for web, relayed to the lab's server for upstream.test.
  tcp_asks h2 s2 web | grep -q "$(hex_of "$web")" || fail "web over TCP: '$(tcp_asks h2 s2 web)'"
  tcp_asks h2 s2 upstream.test | grep -q "$(hex_of 192.0.2.99)" ||
    fail "upstream.test over TCP: '$(tcp_asks h2 s2 upstream.test)'"
  weft_status h2 | jq -e '.resolver.answered > 0 and .resolver.forwarded > 0' >/dev/null ||
    fail "h2's resolver counters: $(weft_status h2 | jq -c .resolver)"
  # 20 lookups at once, every one answered.
  local out
  out=$(D h2 exec s2 sh -c 'for i in $(seq 20); do (nslookup web >/tmp/l$i 2>&1; grep -c "^Address: '"$web"'" /tmp/l$i) & done; wait')
  [ "$(echo "$out" | grep -c '^1$')" = 20 ] || fail "20 lookups at once: $(echo "$out" | xargs)"
  # A host whose firewall drops new connections in INPUT (as ufw and firewalld do)
  # and where a DNS server holds port 53 on every address for itself alone (as
  # docker-proxy for -p 53:53/udp does): answered all the same.
  lab_exec h2 iptables -I INPUT 1 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
  lab_exec h2 iptables -A INPUT -i lo -j ACCEPT
  lab_exec h2 iptables -A INPUT -p udp --dport 51820 -j ACCEPT
  lab_exec h2 iptables -P INPUT DROP
  lab_spawn h2 "$LAB_ROOT/port53.log" python3 -c 'import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53)); time.sleep(600)' >"$LAB_ROOT/port53.pid"
  retry 25 lab_exec h2 sh -c "ss -Hlun 'sport = :53' | grep -q ." || fail "nothing holds port 53 on h2"
  resolves h2 s2 web "$web" || fail "web on h2 behind INPUT DROP with port 53 held: '$(lookup h2 s2 web)'"
  resolves h2 s2 upstream.test 192.0.2.99 || fail "upstream.test on h2 behind INPUT DROP with port 53 held"
  weft_status h2 | jq -e '.resolver.raw_replies > 0' >/dev/null ||
    fail "no raw replies counted: $(weft_status h2 | jq -c .resolver)"
  unblock_h2
  # weft down on h2: other names still resolve (nothing takes the queries); back up,
  # the cluster's names again.
  lab_weft_stop h2 TERM
  resolves h2 s2 upstream.test 192.0.2.99 || fail "upstream.test while weft is down: '$(lookup h2 s2 upstream.test)'"
  lab_weft_start h2 || fail "weft did not come back on h2"
  retry 25 resolves h2 s2 web "$web" || fail "web after weft restarted on h2: '$(lookup h2 s2 web)'"
  # A removed container's name goes within seconds.
  local started gone
  started=$(date +%s%N)
  D h1 rm -f web >/dev/null
  until [ -z "$(lookup h2 s2 web)" ]; do
    [ $(( ($(date +%s%N) - started) / 1000000 )) -lt 10000 ] || fail "web still resolves 10 s after its removal"
    sleep 0.2
  done
  gone=$(( ($(date +%s%N) - started) / 1000000 ))
  echo "    web stopped resolving on h2 ${gone} ms after docker rm began on h1"
  [ "$gone" -le 5000 ] || fail "web resolved for ${gone} ms after its removal (bound 5000 ms)"
  resolves h2 s2 shop "$web_b" || fail "shop after web went: '$(lookup h2 s2 shop)'"
}

# compose HOST PROJECT FILE ARGS…: Debian's docker-compose (1.29) against HOST's dockerd.
compose() {
  local h=$1 project=$2 file=$3; shift 3
  docker-compose -H "unix://$(lab_dir "$h")/docker.sock" -p "$project" -f "$file" "$@"
}

# Compose across hosts (issue 12): compose files whose network is external and is
# the cluster network `shared` run services on two hosts, which find each other by
# service name (the alias compose gives each container).
test_compose_services_on_two_hosts_find_each_other_by_name() {
  local dir=$LAB_ROOT/compose
  mkdir -p "$dir"
  trap 'trap - ERR; set +e; compose h1 back "$LAB_ROOT/compose/back.yml" down >/dev/null 2>&1; compose h2 front "$LAB_ROOT/compose/front.yml" down >/dev/null 2>&1' EXIT
  cat >"$dir/back.yml" <<YML
version: "3.7"
services:
  api:
    image: $LAB_IMAGE
    command: sh -c 'mkdir -p /www && echo marker-api >/www/index.html && exec httpd -f -p 80 -h /www'
networks:
  default:
    external: true
    name: shared
YML
  cat >"$dir/front.yml" <<YML
version: "3.7"
services:
  client:
    image: $LAB_IMAGE
    command: sleep 3600
networks:
  default:
    external: true
    name: shared
YML
  compose h1 back "$dir/back.yml" up -d >/dev/null 2>&1 || fail "compose up on h1: $(compose h1 back "$dir/back.yml" up -d 2>&1 | tail -3)"
  compose h2 front "$dir/front.yml" up -d >/dev/null 2>&1 || fail "compose up on h2: $(compose h2 front "$dir/front.yml" up -d 2>&1 | tail -3)"
  local api
  api=$(ip_of h1 back_api_1 shared)
  retry 25 resolves h2 front_client_1 api "$api" || fail "api on h2: '$(lookup h2 front_client_1 api)' (want $api)"
  compose h2 front "$dir/front.yml" exec -T client wget -q -O - http://api/ | grep -q marker-api ||
    fail "client on h2 cannot fetch http://api/ from h1"
  # And back: the client's service name resolves on h1.
  retry 25 resolves h1 back_api_1 client "$(ip_of h2 front_client_1 shared)" ||
    fail "client on h1: '$(lookup h1 back_api_1 client)'"
}

clash_reported_on_h2() {
  weft_status h2 | jq -e '.cluster_networks.problems | any(contains("taken") and contains("driver bridge"))' >/dev/null
}

# A name clash on a host is reported there (status and log) and never overwrites the
# network that has the name.
test_cluster_network_name_clash_is_reported_never_overwritten() {
  trap 'trap - ERR; set +e; D h1 network rm taken >/dev/null 2>&1; D h2 network rm taken >/dev/null 2>&1' EXIT
  local before
  D h2 network create --subnet 172.29.0.0/24 taken >/dev/null
  before=$(D h2 network inspect -f '{{.Id}}' taken)
  D h1 network create -d weft --ipam-driver weft --subnet 10.91.0.0/24 -o weft.scope=cluster taken >/dev/null
  retry 25 clash_reported_on_h2 ||
    fail "no clash in h2's status: $(weft_status h2 | jq -c .cluster_networks)"
  grep -q 'problem=.*taken.*driver bridge' "$(lab_dir h2)/weft.log" || fail "no clash in h2's log"
  [ "$(D h2 network inspect -f '{{.Id}} {{.Driver}}' taken)" = "$before bridge" ] || fail "h2's network was replaced"
}

# docker network rm on any host removes it from every host, except one where a
# container still uses it, which keeps it until the container is gone.
test_cluster_network_removed_everywhere_but_where_still_used() {
  trap 'trap - ERR; set +e; D h1 rm -f b1 >/dev/null 2>&1; D h1 network rm brief >/dev/null 2>&1; D h2 network rm brief >/dev/null 2>&1' EXIT
  D h1 network create -d weft --ipam-driver weft --subnet 10.92.0.0/24 -o weft.scope=cluster brief >/dev/null
  retry 10 has_network h2 brief || fail "h2 never got the network"
  run_bb h1 b1 --network brief
  # Removed on h2, a host that got a copy: gone there, kept on h1 while b1 runs.
  D h2 network rm brief >/dev/null
  sleep 2
  has_network h2 brief && fail "it came back on h2"
  has_network h1 brief || fail "h1 removed it under a running container"
  weft_status h1 | jq -e '.cluster_networks.kept | any(contains("brief"))' >/dev/null ||
    fail "h1's status does not say it is kept: $(weft_status h1 | jq -c .cluster_networks)"
  D h1 rm -f b1 >/dev/null
  retry 40 sh -c "! docker -H unix://$(lab_dir h1)/docker.sock network inspect brief >/dev/null 2>&1" ||
    fail "h1 kept it after its container was gone"
  sleep 1
  has_network h2 brief && fail "it came back on h2"
  weft_status h1 | jq -e '.cluster_networks.networks | all(.name != "brief")' >/dev/null
}

# A host that joins later gets the cluster networks (h3, from the late-host test).
test_cluster_network_reaches_a_host_that_joins_later() {
  retry 10 has_network h3 shared || fail "h3 never got the network"
  run_bb h3 s3 --network shared --network-alias cache
  retry 25 pings h3 s3 "$(ip_of h1 s1 shared)" || fail "no traffic from h3's copy"
  # Its name and alias are published on h3's lease (names across hosts, first step).
  retry 15 names_published_by h3 '10.90.0.0_22' s3 cache || fail "h3's names: $(etcdctl_lab get --prefix /weft/v1/names/ --print-value-only)"
  local lease
  lease=$(etcdctl_lab get "/weft/v1/hosts/$(host_id h3)" -w json | jq '.kvs[0].lease // 0')
  [ "$lease" != 0 ] && [ "$(etcdctl_lab get "/weft/v1/names/10.90.0.0_22/$(host_id h3)" -w json | jq '.kvs[0].lease // 0')" = "$lease" ] ||
    fail "h3's names are not on its host lease"
}

# names_published_by HOST SUBNET-SEGMENT NAME…: etcd holds HOST's names record of that
# network with every NAME.
names_published_by() {
  local h=$1 subnet=$2; shift 2
  local rec
  rec=$(etcdctl_lab get "/weft/v1/names/$subnet/$(host_id "$h")" --print-value-only)
  for n in "$@"; do
    echo "$rec" | jq -e --arg n "$n" 'any(.entries[].names[]; . == $n)' >/dev/null || return 1
  done
}

main() {
  [ "$(id -u)" = 0 ] || { echo "multi_host: needs root"; exit 1; }
  [ -x "$WEFT_BIN" ] || { echo "multi_host: build $WEFT_BIN first"; exit 1; }
  echo "== weft end-to-end across hosts: $($DOCKERD_BIN --version)"
  lab_etcd_up || exit 1
  lab_dns_up
  for i in 1 2; do lab_host_up "h$i" "$i" && lab_image "h$i" || { echo "multi_host: lab did not come up"; exit 1; }; done
  for t in \
    test_network_on_every_host_and_cross_host_traffic \
    test_only_wireguard_crosses_the_underlay \
    test_thirty_containers_at_once_get_distinct_addresses \
    test_networks_stay_isolated_across_hosts \
    test_remote_blocks_are_routed_only_for_pools_this_host_has_a_network_in \
    test_a_port_is_published_on_the_host_where_its_container_runs \
    test_cluster_network_is_created_once_for_every_host \
    test_names_resolve_across_hosts \
    test_compose_services_on_two_hosts_find_each_other_by_name \
    test_cluster_network_name_clash_is_reported_never_overwritten \
    test_cluster_network_removed_everywhere_but_where_still_used \
    test_weft_restart_during_cross_host_ping_loses_nothing \
    test_late_host_converges_within_a_second \
    test_cluster_network_reaches_a_host_that_joins_later \
    test_a_vanished_host_is_evicted \
    test_traffic_survives_etcd_loss_and_weft_recovers; do
    run_test "$t"
  done
  summary "multi-host e2e"
}

main "$@"
