#!/usr/bin/env bash
# End to end on one simulated host: a real dockerd in its own network and mount
# namespaces talks to weft over its plugin socket. Run as root; see scripts/test.sh.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export LAB_ROOT=${LAB_ROOT:-/tmp/weft-e2e-$$} LAB_PREFIX=${LAB_PREFIX:-wfe$$}
# shellcheck source=../../scripts/lib/lab.sh
source "$REPO/scripts/lib/lab.sh"
# shellcheck source=lib.sh
source "$REPO/tests/e2e/lib.sh"

H=h1
NS=$(lab_ns $H)
D() { lab_docker "$H" "$@"; }
HX() { lab_exec "$H" "$@"; }
ip_of() { D inspect -f "{{(index .NetworkSettings.Networks \"$2\").IPAddress}}" "$1"; }
run_bb() { D run -d --name "$@" "$LAB_IMAGE" sleep 3600 >/dev/null; }
pings() { D exec "$1" ping -c "${3:-1}" -W 2 "$2" >/dev/null 2>&1; }
weft_links() { HX ip -o link show | awk -F': ' '{print $2}' | grep -E '^(wfh|wfc)' || true; }

cleanup() { lab_down; }
trap cleanup EXIT

test_socket_and_protocol_basics() {
  local sock=/run/docker/plugins/weft.sock
  HX test -S $sock
  HX curl -sf --unix-socket $sock -X POST http://p/Plugin.Activate | grep -q '"NetworkDriver","IpamDriver"'
  # dockerd sends no Content-Type and empty bodies for argument-less calls.
  HX curl -sf --unix-socket $sock -X POST -H 'Content-Type:' --data-binary '' http://p/IpamDriver.GetDefaultAddressSpaces | grep -q weft-local
  [ "$(HX curl -s -o /dev/null -w '%{http_code}' --unix-socket $sock -X POST http://p/NetworkDriver.FutureMethod)" = 404 ]
  local body
  body=$(HX curl -s --unix-socket $sock -X POST --data-binary '' http://p/IpamDriver.RequestAddress)
  echo "$body" | grep -q '"Err":"empty request body' || fail "empty body: $body"
}

test_network_create_with_every_ipam_option() {
  D network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 --ip-range 10.42.1.0/24 \
    --gateway 10.42.0.1 --aux-address router=10.42.0.5 --ipam-opt weft.block-size=26 app >/dev/null
  D network inspect app -f '{{.Driver}} {{.IPAM.Driver}}' | grep -qx 'weft weft'
  HX ip route show proto 87 | grep -q 'unreachable 10.42.0.0/16'
  HX ip -o addr show dev weft-gw | grep -q '10.42.0.1/32'
  HX nft list table inet weft >/dev/null
  # Overlapping subnets are refused with a clear message.
  local out
  out=$(D network create -d weft --ipam-driver weft --subnet 10.42.128.0/17 clash 2>&1) && fail "overlap accepted"
  echo "$out" | grep -q overlaps || fail "unclear error: $out"
}

test_two_containers_ping_and_move_10mb_intact() {
  run_bb ca --network app
  run_bb cb --network app
  local a b
  a=$(ip_of ca app); b=$(ip_of cb app)
  case $a in 10.42.1.*) ;; *) fail "address $a is outside --ip-range" ;; esac
  [ "$a" != "$b" ]
  # MTU is the underlay's 1500 minus 80, on the container side too.
  D exec ca cat /sys/class/net/eth0/mtu | grep -qx 1420
  pings ca "$b" 3
  pings ca 10.42.0.1
  # 10 MB of random bytes served by busybox httpd in cb, fetched by ca.
  D exec cb sh -c 'mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=10 2>/dev/null && httpd -p 8080 -h /www'
  D exec ca wget -q -O /tmp/blob "http://$b:8080/blob"
  [ "$(D exec ca md5sum /tmp/blob | cut -d' ' -f1)" = "$(D exec cb md5sum /www/blob | cut -d' ' -f1)" ]
  [ "$(D exec ca stat -c %s /tmp/blob)" = 10485760 ]
}

test_static_ip() {
  run_bb cs --network app --ip 10.42.1.77
  [ "$(ip_of cs app)" = 10.42.1.77 ]
  D exec cs ip -o addr show eth0 | grep -q '10.42.1.77/16'
  local out
  out=$(D run -d --name cdup --network app --ip 10.42.1.77 "$LAB_IMAGE" sleep 1 2>&1) && fail "duplicate --ip accepted"
  echo "$out" | grep -q 'already in use' || fail "unclear error: $out"
  D rm -f cdup >/dev/null 2>&1 || true
}

test_outbound_masquerade_and_internal_has_no_way_out() {
  pings ca 192.0.2.1
  D network create -d weft --ipam-driver weft --internal --subnet 10.44.0.0/16 sealed >/dev/null
  run_bb ci --network sealed
  D exec ci ip route | grep -q default && fail "internal network got a default route"
  pings ci 192.0.2.1 && fail "internal network reached the outside"
  pings ci "$(ip_of ca app)" && fail "internal network reached another network"
  D rm -f ci >/dev/null
  D network rm sealed >/dev/null
}

test_networks_are_isolated() {
  D network create -d weft --ipam-driver weft --subnet 10.43.0.0/16 other >/dev/null
  run_bb cc --network other
  pings cc "$(ip_of cc other)"
  pings cc "$(ip_of ca app)" && fail "other -> app"
  pings ca "$(ip_of cc other)" && fail "app -> other"
  pings ca 10.43.0.1 && fail "app reached other's gateway"
  return 0
}

test_a_container_cannot_spoof_its_source() {
  run_bb cspoof --network app --cap-add NET_ADMIN
  local a b dev
  a=$(ip_of ca app); b=$(ip_of cb app)
  pings cspoof "$b"
  # Pretend to be ca. Watch cb's host-side link: nothing from "ca" may come out of it.
  dev=$(HX ip -o route get "$b" | sed -n 's/.* dev \([^ ]*\).*/\1/p')
  HX timeout 4 tcpdump -lni "$dev" -c 1 "icmp and src $a" >"$(lab_dir $H)/spoof.pcap.txt" 2>/dev/null &
  sleep 1
  D exec cspoof ip addr add "$a/32" dev eth0
  D exec cspoof ping -c 2 -W 1 -I "$a" "$b" >/dev/null 2>&1 && fail "spoofed ping answered"
  wait || true
  ! grep -q ICMP "$(lab_dir $H)/spoof.pcap.txt" || fail "spoofed packet reached cb: $(cat "$(lab_dir $H)/spoof.pcap.txt")"
  # The check itself works: ca's genuine packets are seen.
  HX timeout 4 tcpdump -lni "$dev" -c 1 "icmp and src $a" >"$(lab_dir $H)/real.pcap.txt" 2>/dev/null &
  sleep 1
  pings ca "$b"
  wait || true
  grep -q ICMP "$(lab_dir $H)/real.pcap.txt" || fail "capture saw nothing at all"
  D rm -f cspoof >/dev/null
}

test_connect_and_disconnect() {
  D network connect other cb
  D exec cb ip -o addr show eth1 | grep -q 'inet 10.43.'
  pings cb "$(ip_of cc other)"
  local links_before
  links_before=$(weft_links | wc -l)
  D network disconnect other cb
  D exec cb ip link show eth1 >/dev/null 2>&1 && fail "eth1 still in container"
  [ "$(weft_links | wc -l)" -lt "$links_before" ] || fail "host link of the disconnected endpoint left behind"
  pings cb "$(ip_of ca app)"
}

test_weft_kill_9_loses_no_packet() {
  local b
  b=$(ip_of cb app)
  D exec -d ca sh -c "ping -i 0.1 -c 60 $b > /tmp/ping.log 2>&1"
  sleep 1
  lab_weft_stop $H KILL
  sleep 1
  lab_weft_start $H
  retry 50 sh -c "docker -H unix://$(lab_dir $H)/docker.sock exec ca grep -q 'packet loss' /tmp/ping.log"
  D exec ca cat /tmp/ping.log | grep -q ' 0% packet loss' || fail "$(D exec ca tail -3 /tmp/ping.log)"
  # New containers join the existing network after the restart.
  run_bb cnew --network app
  pings cnew "$(ip_of ca app)"
  D rm -f cnew >/dev/null
}

test_reconcile_repairs_removed_routes_and_rules() {
  local a
  a=$(ip_of ca app)
  HX ip route del "$a/32"
  HX nft delete table inet weft
  retry 50 sh -c "nsenter -t $(lab_holder $H) -n ip route show $a/32 proto 87 | grep -q ." 
  retry 50 nsenter -t "$(lab_holder $H)" -n nft list table inet weft >/dev/null
  pings cb "$a"
}

test_dockerd_restart() {
  run_bb calways --network app --restart=always
  lab_dockerd_stop $H
  lab_dockerd_start $H
  retry 50 sh -c "[ \"\$(docker -H unix://$(lab_dir $H)/docker.sock inspect -f '{{.State.Running}}' calways)\" = true ]"
  retry 25 sh -c "docker -H unix://$(lab_dir $H)/docker.sock exec calways ping -c 1 -W 1 10.42.0.1 >/dev/null"
  D start ca cb >/dev/null
  pings ca "$(ip_of calways app)"
  pings calways "$(ip_of cb app)"
}

test_removal_leaves_nothing_behind() {
  D ps -aq | xargs -r docker -H "unix://$(lab_dir $H)/docker.sock" rm -f >/dev/null
  for n in app other; do D network rm "$n" >/dev/null; done
  [ -z "$(weft_links)" ] || fail "links left: $(weft_links)"
  HX ip link show weft-gw >/dev/null 2>&1 && fail "weft-gw left"
  [ -z "$(HX ip route show proto 87)" ] || fail "routes left: $(HX ip route show proto 87)"
  HX nft list table inet weft >/dev/null 2>&1 && fail "nft table left"
  HX iptables -S FORWARD | grep -q WEFT && fail "iptables jump left"
  python3 - "$(lab_dir $H)/state/state.json" <<'PY' || fail "store entries left"
import json, sys
entries = json.load(open(sys.argv[1]))["entries"]
sys.exit(1 if entries else 0)
PY
}

test_automatic_subnet() {
  D network create -d weft --ipam-driver weft auto >/dev/null
  local subnet
  subnet=$(D network inspect auto -f '{{(index .IPAM.Config 0).Subnet}}')
  case $subnet in 10.200.*.0/24) ;; *) fail "automatic subnet $subnet" ;; esac
  run_bb cauto --network auto
  run_bb cauto2 --network auto
  pings cauto "$(ip_of cauto2 auto)"
  D rm -f cauto cauto2 >/dev/null
  D network rm auto >/dev/null
}

# The host boundary, item 4: a subnet that overlaps a route weft did not add is refused
# with a clear error; forced with -o weft.allow-route-overlap=true, weft neither replaces
# nor deletes that route.
test_a_subnet_over_a_host_route_is_refused_and_the_route_is_never_touched() {
  trap 'HX ip route del 10.99.0.0/24 via 192.0.2.1 2>/dev/null || true; D network rm over >/dev/null 2>&1 || true' EXIT
  HX ip route add 10.99.0.0/24 via 192.0.2.1
  local out
  out=$(D network create -d weft --ipam-driver weft --subnet 10.99.0.0/24 over 2>&1) &&
    fail "a subnet over the host's route 10.99.0.0/24 was accepted"
  echo "$out" | grep -q "overlaps the host's route 10.99.0.0/24" || fail "unclear error: $out"
  D network create -d weft --ipam-driver weft --subnet 10.99.0.0/24 -o weft.allow-route-overlap=true over >/dev/null
  [ "$(HX ip -o route show 10.99.0.0/24)" = "10.99.0.0/24 via 192.0.2.1 dev eth0 " ] ||
    fail "the host's route was replaced: $(HX ip -o route show 10.99.0.0/24)"
  D network rm over >/dev/null
  [ "$(HX ip -o route show 10.99.0.0/24)" = "10.99.0.0/24 via 192.0.2.1 dev eth0 " ] ||
    fail "network rm took the host's route: '$(HX ip -o route show 10.99.0.0/24)'"
}

# serve NAME [docker run options…]: a container whose httpd on :8080 serves "marker".
serve() {
  local name=$1; shift
  run_bb "$name" "$@"
  D exec "$name" sh -c 'mkdir -p /www && echo marker >/www/index.html && httpd -p 8080 -h /www'
}
# fetches FROM_CONTAINER URL: the container fetched the page within 3 s (busybox wget -T crashes when static, hence timeout).
fetches() { D exec "$1" timeout 3 wget -q -O - "$2" 2>/dev/null | grep -q marker; }

# Host boundary, inbound: a machine on the underlay (the wan namespace, routing the
# weft subnet through the host) reaches no weft container, in plaintext or at all,
# whatever iptables' FORWARD policy is (every host has ACCEPT after a reboot until
# dockerd sets DROP); the host itself and the network's own containers still do.
test_the_underlay_reaches_no_container_whatever_the_forward_policy() {
  trap 'HX iptables -P FORWARD DROP; ip -n "$LAB_WAN" route del 10.47.0.0/24 2>/dev/null; D rm -f ce ce2 >/dev/null 2>&1; D network rm edge >/dev/null 2>&1; true' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.47.0.0/24 edge >/dev/null
  serve ce --network edge
  run_bb ce2 --network edge
  local ip policy
  ip=$(ip_of ce edge)
  ip -n "$LAB_WAN" route add 10.47.0.0/24 via 192.0.2.11
  fetches ce2 "http://$ip:8080/" || fail "control: the network's own container cannot fetch the page"
  HX curl -s --max-time 3 "http://$ip:8080/" | grep -q marker || fail "control: the host cannot fetch the page"
  ip netns exec "$LAB_WAN" busybox ping -c 1 -W 2 192.0.2.11 >/dev/null || fail "control: the underlay cannot ping the host"
  for policy in ACCEPT DROP; do
    HX iptables -P FORWARD "$policy"
    ! ip netns exec "$LAB_WAN" curl -s --max-time 3 "http://$ip:8080/" | grep -q marker ||
      fail "FORWARD policy $policy: a machine on the underlay fetched a page from $ip in plaintext"
    ! ip netns exec "$LAB_WAN" busybox ping -c 1 -W 2 "$ip" >/dev/null 2>&1 ||
      fail "FORWARD policy $policy: a machine on the underlay pinged $ip"
  done
}

# Host boundary, Docker's networks: weft networks and Docker bridge networks (the
# default bridge and a user-defined one) cannot reach each other either way, as two
# Docker bridge networks cannot (the control); and a rule in DOCKER-USER applies to
# weft traffic, also after weft has put its own FORWARD jump back.
test_docker_bridge_networks_and_weft_networks_cannot_reach_each_other() {
  trap 'HX iptables -D DOCKER-USER -s 10.48.0.0/24 -d 192.0.2.1 -j DROP 2>/dev/null; D rm -f sw s0 s1 s2 >/dev/null 2>&1; for n in wn b1 b2; do D network rm $n >/dev/null 2>&1; done; true' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.48.0.0/24 wn >/dev/null
  D network create --subnet 172.30.1.0/24 b1 >/dev/null
  D network create --subnet 172.30.2.0/24 b2 >/dev/null
  serve sw --network wn; serve s0; serve s1 --network b1; serve s2 --network b2
  local w a0 a1 errs=()
  w=$(ip_of sw wn); a0=$(D inspect -f '{{.NetworkSettings.IPAddress}}' s0); a1=$(ip_of s1 b1)
  fetches s2 "http://$a1:8080/" && fail "control: Docker bridge b2 reached bridge b1; Docker does not isolate them here"
  fetches s1 "http://$a1:8080/" || fail "control: s1 cannot fetch its own page"
  fetches sw "http://$a1:8080/" && errs+=("weft -> user-defined bridge b1 ($a1)")
  fetches sw "http://$a0:8080/" && errs+=("weft -> default bridge ($a0)")
  fetches s1 "http://$w:8080/" && errs+=("user-defined bridge b1 -> weft ($w)")
  fetches s0 "http://$w:8080/" && errs+=("default bridge -> weft ($w)")
  # DOCKER-USER comes first, also after weft repairs its jump (as after a restart).
  pings sw 192.0.2.1 || fail "control: the weft container cannot reach the underlay"
  HX iptables -D FORWARD -j WEFT-FORWARD
  retry 50 nsenter -t "$(lab_holder $H)" -n iptables -C FORWARD -j WEFT-FORWARD 2>/dev/null
  HX iptables -I DOCKER-USER -s 10.48.0.0/24 -d 192.0.2.1 -j DROP
  pings sw 192.0.2.1 && errs+=("a DROP rule in DOCKER-USER did not apply to weft traffic (FORWARD: $(HX iptables -S FORWARD | grep -E 'DOCKER-USER|WEFT' | tr '\n' ' '))")
  [ "${#errs[@]}" = 0 ] || { for e in "${errs[@]}"; do echo "    FAIL: $e" >&2; done; return 1; }
}

# Host boundary, containers to the host: by default a container reaches, on its host,
# only its own gateway and only for ICMP; a host service (here an httpd on :8099) is
# out of reach on the gateway address and on the host's underlay address, and so is a
# ping to the latter. -o weft.host-access=true lets a network's containers in.
test_containers_reach_only_their_gateway_on_the_host() {
  local dir pid errs=()
  dir=$(lab_dir $H)/hostwww
  mkdir -p "$dir"; echo marker >"$dir/index.html"
  pid=$(lab_spawn $H "$dir.log" busybox httpd -f -p 8099 -h "$dir")
  trap 'kill '"$pid"' 2>/dev/null; D rm -f ch cha >/dev/null 2>&1; D network rm hn ha >/dev/null 2>&1; true' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.49.0.0/24 hn >/dev/null
  D network create -d weft --ipam-driver weft --subnet 10.50.0.0/24 -o weft.host-access=true ha >/dev/null
  run_bb ch --network hn; run_bb cha --network ha
  retry 20 sh -c "nsenter -t $(lab_holder $H) -n curl -s --max-time 1 http://192.0.2.11:8099/ | grep -q marker" ||
    fail "control: the host's httpd does not answer"
  pings ch 10.49.0.1 || errs+=("a container cannot ping its own gateway")
  fetches ch "http://10.49.0.1:8099/" && errs+=("a container reached a host service on its gateway address")
  fetches ch "http://192.0.2.11:8099/" && errs+=("a container reached a host service on the host's underlay address")
  pings ch 192.0.2.11 && errs+=("a container pinged the host's underlay address")
  fetches cha "http://192.0.2.11:8099/" || errs+=("with -o weft.host-access=true a container cannot reach the host's service")
  [ "${#errs[@]}" = 0 ] || { for e in "${errs[@]}"; do echo "    FAIL: $e" >&2; done; return 1; }
}

# Port publishing (-p): pages fetched from the underlay, from the host itself and by
# other containers through the host's address (the host is 192.0.2.11 on the underlay).
wan_fetches() { ip netns exec "$LAB_WAN" curl -s --max-time 3 "$1" | grep -q marker; }
host_fetches() { HX curl -s --max-time 3 "$1" | grep -q marker; }
weft_published() {
  local st
  st=$(HX "$WEFT_BIN" status --json) || { echo "    weft status failed" >&2; return 1; }
  jq -r '.endpoints[].published[]?' <<<"$st"
}
nft_table() { HX nft list table inet weft 2>/dev/null || true; }
# A UDP echo server (it answers "echo <sender>") on port $2 in container $1's network
# namespace; prints its PID.
udp_echo() {
  nsenter -t "$(D inspect -f '{{.State.Pid}}' "$1")" -n python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(512); s.sendto(b"echo " + a[0].encode(), a)' "$2" </dev/null >/dev/null 2>&1 &
  echo $!
}
# udp_asks CMD-PREFIX ADDR PORT: the reply to one datagram, within 2 s.
udp_asks() {
  $1 python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
try: print(s.recvfrom(512)[0].decode())
except OSError: pass' "$2" "$3"
}

# -p with a fixed port, a range, any port (-p 8080), 127.0.0.1 only and UDP: reached
# from the underlay, the host (its address and 127.0.0.1), and by hairpin from a
# container on the same network, one on another network and the container itself;
# the 127.0.0.1 port only from the host; weft status lists them.
test_published_ports_are_reached_from_the_underlay_the_host_and_by_hairpin() {
  local any errs=()
  udp_pid=""  # global: the EXIT trap runs after the function's locals are gone
  trap 'trap - ERR; set +e; kill $udp_pid 2>/dev/null; D rm -f pw pc pc2 >/dev/null 2>&1; D network rm pub pub2 >/dev/null 2>&1' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.51.0.0/24 pub >/dev/null
  D network create -d weft --ipam-driver weft --subnet 10.52.0.0/24 pub2 >/dev/null
  serve pw --network pub -p 18080:8080 -p 18081-18089:8080 -p 8080 -p 127.0.0.1:18070:8080 -p 15353:5353/udp
  run_bb pc --network pub; run_bb pc2 --network pub2
  udp_pid=$(udp_echo pw 5353)
  weft_published | sed 's/^/    published /'
  any=$(weft_published | sed -n 's/^0\.0\.0\.0:\([0-9]*\)->8080\/tcp$/\1/p' | awk '$1 >= 49153')
  [ -n "$any" ] || fail "-p 8080 got no port from 49153-60999: $(weft_published | tr '\n' ' ')"
  weft_published | grep -qx '0.0.0.0:18081->8080/tcp' || errs+=("the range 18081-18089 did not give its first port")
  weft_published | grep -qx '127.0.0.1:18070->8080/tcp' || errs+=("status does not list the 127.0.0.1 port")
  weft_published | grep -qx '0.0.0.0:15353->5353/udp' || errs+=("status does not list the UDP port")
  for port in 18080 18081 "$any"; do
    wan_fetches "http://192.0.2.11:$port/" || errs+=("the underlay cannot fetch :$port")
  done
  host_fetches "http://192.0.2.11:18080/" || errs+=("the host cannot fetch its own address :18080")
  host_fetches "http://127.0.0.1:18080/" || errs+=("the host cannot fetch 127.0.0.1:18080")
  host_fetches "http://127.0.0.1:18070/" || errs+=("the host cannot fetch the 127.0.0.1-only port")
  wan_fetches "http://192.0.2.11:18070/" && errs+=("the underlay fetched the 127.0.0.1-only port")
  fetches pc "http://192.0.2.11:18080/" || errs+=("hairpin: a container of the same network cannot fetch :18080")
  fetches pc2 "http://192.0.2.11:18080/" || errs+=("hairpin: a container of another network cannot fetch :18080")
  fetches pw "http://192.0.2.11:18080/" || errs+=("hairpin: the container cannot fetch its own published port")
  for _ in $(seq 10); do [ -n "$(udp_asks "ip netns exec $LAB_WAN" 192.0.2.11 15353)" ] && break; done
  [ "$(udp_asks "ip netns exec $LAB_WAN" 192.0.2.11 15353)" = "echo 192.0.2.1" ] || errs+=("UDP :15353 from the underlay: no answer from the container, or not with the sender's address")
  [ -n "$(udp_asks HX 127.0.0.1 15353)" ] || errs+=("UDP :15353 from the host over 127.0.0.1: no answer")
  # Nothing else of the container is reachable from outside.
  ip -n "$LAB_WAN" route add 10.51.0.0/24 via 192.0.2.11
  ip netns exec "$LAB_WAN" curl -s --max-time 3 "http://$(ip_of pw pub):8080/" | grep -q marker && errs+=("the underlay reached the container's address directly")
  ip -n "$LAB_WAN" route del 10.51.0.0/24
  [ "${#errs[@]}" = 0 ] || { for e in "${errs[@]}"; do echo "    FAIL: $e" >&2; done; return 1; }
}

# A host port weft published for another container, or one a host process holds, fails
# docker run naming the port, and publishes none of that container's ports; docker rm
# -f and docker network rm leave no rule behind.
test_a_port_conflict_is_refused_and_removal_leaves_no_rule() {
  local dir holder out left
  dir=$(lab_dir $H)
  holder=$(lab_spawn $H "$dir/holder.log" python3 -c 'import socket, time; s=socket.socket(); s.bind(("0.0.0.0", 18182)); s.listen(1); time.sleep(600)')
  trap 'trap - ERR; set +e; kill '"$holder"' 2>/dev/null; D rm -f p1 p2 p3 >/dev/null 2>&1; D network rm pubc >/dev/null 2>&1' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.53.0.0/24 pubc >/dev/null
  serve p1 --network pubc -p 18180:8080
  out=$(D run -d --name p2 --network pubc -p 18181:8080 -p 18180:8080 "$LAB_IMAGE" sleep 3600 2>&1) &&
    fail "a second container got the published port 18180"
  echo "    refused: $(echo "$out" | grep -o 'host port 18180[^"]*' | head -1)"
  echo "$out" | grep -q '18180/tcp is already published' || fail "the error does not name the port: $out"
  nft_table | grep -q 'dport 18181' && fail "the refused container's other port 18181 was published"
  retry 20 sh -c "nsenter -t $(lab_holder $H) -m -n ss -ltn | grep -q ':18182 '"
  out=$(D run -d --name p3 --network pubc -p 18182:8080 "$LAB_IMAGE" sleep 3600 2>&1) &&
    fail "a container got port 18182, which a host process holds"
  echo "$out" | grep -q '18182/tcp is in use by a process' || fail "the error does not name the port: $out"
  wan_fetches "http://192.0.2.11:18180/" || fail "the first container's port stopped working"
  D rm -f p1 >/dev/null
  nft_table | grep -q 'dnat ip to' && fail "docker rm -f left a DNAT rule: $(nft_table | grep 'dnat ip to')"
  serve p1 --network pubc -p 18180:8080
  nft_table | grep -q 'dport 18180' || fail "the port was not published again"
  D rm -f p1 p2 p3 >/dev/null 2>&1 || true
  D network rm pubc >/dev/null
  nft_table | grep -q 'dnat ip to' && fail "docker network rm left a DNAT rule"
  left=$(weft_published) || fail "weft status failed"
  [ -z "$left" ] || fail "status still lists published ports: $left"
}

# kill -9 of weft with a published port in use: the open connection keeps working,
# new ones too while weft is down, and after the restart the port is still published;
# the reconciler repairs a removed rule.
test_kill_9_keeps_published_ports() {
  local fifo=$LAB_ROOT/kill9.fifo out=$LAB_ROOT/kill9.out
  conn=""  # global: the EXIT trap runs after the function's locals are gone
  trap 'trap - ERR; set +e; kill $conn 2>/dev/null; rm -f '"$fifo"'; D rm -f pk >/dev/null 2>&1; D network rm pubk >/dev/null 2>&1' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.54.0.0/24 pubk >/dev/null
  run_bb pk --network pubk -p 18280:8080
  # A TCP echo (busybox nc, a cat per connection) in the container.
  D exec -d pk nc -ll -p 8080 -e cat
  new_connection_echoes() {
    ip netns exec "$LAB_WAN" python3 -c 'import socket; s=socket.create_connection(("192.0.2.11", 18280), timeout=3); s.sendall(b"new\n"); print(s.recv(64).decode().strip())' 2>/dev/null | grep -qx new
  }
  retry 25 new_connection_echoes || fail "control: the published echo does not answer"
  # One connection from the underlay is held across the kill and the restart: it sends
  # a word each time a line comes on the fifo and prints the echo.
  mkfifo "$fifo"
  ip netns exec "$LAB_WAN" python3 -c '
import socket, sys
s = socket.create_connection(("192.0.2.11", 18280), timeout=3)
for word in ("before", "during", "after"):
    s.sendall(word.encode() + b"\n"); print(s.recv(64).decode().strip(), flush=True)
    sys.stdin.readline()' <"$fifo" >"$out" 2>&1 &
  conn=$!
  exec 7>"$fifo"
  retry 25 grep -qx before "$out" || fail "no echo before the kill: $(cat "$out")"
  lab_weft_stop $H KILL
  echo >&7
  retry 25 grep -qx during "$out" || fail "the open connection stopped with weft: $(cat "$out")"
  new_connection_echoes || fail "a new connection fails while weft is down"
  lab_weft_start $H
  echo >&7
  retry 25 grep -qx after "$out" || fail "the open connection stopped after the restart: $(cat "$out")"
  exec 7>&-
  new_connection_echoes || fail "a new connection fails after the restart"
  weft_published | grep -qx '0.0.0.0:18280->8080/tcp' || fail "the restarted weft does not list the port"
  # The reconciler puts the rules back when they are removed behind weft's back.
  HX nft delete table inet weft
  retry 50 new_connection_echoes || fail "the reconciler did not publish the port again"
}

test_sigterm_removes_the_socket_and_a_stale_one_is_replaced() {
  lab_weft_stop $H TERM
  HX test -e /run/docker/plugins/weft.sock && fail "socket left after SIGTERM"
  HX python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.bind("/run/docker/plugins/weft.sock")'
  HX test -S /run/docker/plugins/weft.sock
  lab_weft_start $H
  HX curl -sf --unix-socket /run/docker/plugins/weft.sock -X POST http://p/Plugin.Activate >/dev/null
}

cluster_status() { HX "$WEFT_BIN" status --json | jq -c .cluster_networks; }
cluster_status_has() { cluster_status | jq -e "$1" >/dev/null; }

# The Engine API side of cluster networks on this engine: weft reads the network's
# name and settings from dockerd and records it; docker network rm forgets it.
test_a_cluster_network_is_recorded_from_dockerd_and_forgotten_on_rm() {
  trap 'trap - ERR; set +e; D network rm everywhere >/dev/null 2>&1' EXIT
  D network create -d weft --ipam-driver weft --subnet 10.93.0.0/24 --ip-range 10.93.0.64/26 \
    -o weft.scope=cluster everywhere >/dev/null
  retry 10 cluster_status_has '.networks | any(.name == "everywhere" and .subnet == "10.93.0.0/24" and .here == "present")' ||
    fail "not recorded within 2 s: $(cluster_status)"
  cluster_status | jq -e '.problems == []' >/dev/null || fail "problems: $(cluster_status)"
  HX "$WEFT_BIN" status --json | jq -e '.networks | any(.subnet == "10.93.0.0/24" and .scope == "cluster")' >/dev/null
  D network rm everywhere >/dev/null
  retry 10 cluster_status_has '.networks | all(.name != "everywhere")' || fail "still recorded after rm: $(cluster_status)"
}

main() {
  [ "$(id -u)" = 0 ] || { echo "single_host: needs root"; exit 1; }
  [ -x "$WEFT_BIN" ] || { echo "single_host: build $WEFT_BIN first"; exit 1; }
  echo "== weft end-to-end, one host: $($DOCKERD_BIN --version)"
  lab_host_up $H 1 || { echo "single_host: lab did not come up"; exit 1; }
  lab_image $H
  for t in \
    test_socket_and_protocol_basics \
    test_network_create_with_every_ipam_option \
    test_two_containers_ping_and_move_10mb_intact \
    test_static_ip \
    test_outbound_masquerade_and_internal_has_no_way_out \
    test_networks_are_isolated \
    test_a_container_cannot_spoof_its_source \
    test_connect_and_disconnect \
    test_weft_kill_9_loses_no_packet \
    test_reconcile_repairs_removed_routes_and_rules \
    test_dockerd_restart \
    test_automatic_subnet \
    test_a_subnet_over_a_host_route_is_refused_and_the_route_is_never_touched \
    test_the_underlay_reaches_no_container_whatever_the_forward_policy \
    test_docker_bridge_networks_and_weft_networks_cannot_reach_each_other \
    test_containers_reach_only_their_gateway_on_the_host \
    test_published_ports_are_reached_from_the_underlay_the_host_and_by_hairpin \
    test_a_port_conflict_is_refused_and_removal_leaves_no_rule \
    test_kill_9_keeps_published_ports \
    test_a_cluster_network_is_recorded_from_dockerd_and_forgotten_on_rm \
    test_sigterm_removes_the_socket_and_a_stale_one_is_replaced \
    test_removal_leaves_nothing_behind; do
    run_test "$t"
  done
  summary "single-host e2e"
}

main "$@"
