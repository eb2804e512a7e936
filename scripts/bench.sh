#!/usr/bin/env bash
# Measures what weft costs, against baselines run in the same invocation, on a lab of
# simulated hosts (scripts/lib/lab.sh). Benchmarks measure and report; they never
# pass or fail on a number.
#
#   sudo scripts/bench.sh [--quick] [--out FILE]     (default FILE: bench/results.json)
#
# Writes JSON records {name, unit, median, min, max[, baseline, ratio]} to FILE and
# renders docs/benchmarks.md (the full run's report; --quick writes its report next to
# FILE instead, so a smoke run never overwrites the committed one).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0 out=bench/results.json
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --out) out=${2:?--out needs a file}; shift 2 ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh: run as root" >&2; exit 1; }
scripts/deps.sh
cargo build --locked --release >/dev/null 2>&1 || cargo build --locked --release

if [ "$quick" = 1 ]; then RUNS=1 SECS=2 PINGS=20 STARTS=3 CHURN=5 ALLOCS=100 BIG=4 BURST=5 BURSTS=1 MESH=10,100 JOINS=2 LOOKUPS=20
else RUNS=5 SECS=8 PINGS=300 STARTS=50 CHURN=100 ALLOCS=400 BIG=10 BURST=20 BURSTS=3 MESH=10,100,1000 JOINS=10 LOOKUPS=100; fi
CLIENTS=20

export LAB_ROOT=/tmp/weft-bench-$$ LAB_PREFIX=wbn$$ WEFT_LOG=info,weft::api=debug WEFT_HOST_TTL=5
# shellcheck source=lib/lab.sh
source scripts/lib/lab.sh
REC=$LAB_ROOT/records.jsonl
cleanup() { lab_down >/dev/null 2>&1 || true; rm -f "$LAB_ROOT.records"; }
trap cleanup EXIT
mkdir -p "$LAB_ROOT"
D() { local h=$1; shift; lab_docker "$h" "$@"; }
ip_of() { D "$1" inspect -f "{{(index .NetworkSettings.Networks \"$3\").IPAddress}}" "$2"; }
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# record NAME UNIT [--baseline NAME] VALUE…: one JSON record from repeated measurements.
record() {
  local name=$1 unit=$2; shift 2
  local base=""
  if [ "${1:-}" = --baseline ]; then base=$2; shift 2; fi
  python3 - "$REC" "$name" "$unit" "$base" "$@" <<'PY'
import json, statistics, sys
path, name, unit, base, *vals = sys.argv[1:]
vals = [float(v) for v in vals]
rec = {"name": name, "unit": unit, "median": statistics.median(vals), "min": min(vals), "max": max(vals), "samples": len(vals)}
if base:
    for line in open(path):
        r = json.loads(line)
        if r["name"] == base and r["median"]:
            rec["baseline"] = base
            rec["ratio"] = round(rec["median"] / r["median"], 4)
with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(f"  {name}: {rec['median']:.4g} {unit}" + (f" (x{rec['ratio']} of {base})" if "ratio" in rec else ""), file=sys.stderr)
PY
}

# percentiles NAME UNIT VALUE…: p50 and p99 records of one distribution.
percentiles() {
  local name=$1 unit=$2; shift 2
  python3 - "$REC" "$name" "$unit" "$@" <<'PY'
import json, sys
path, name, unit, *vals = sys.argv[1:]
v = sorted(float(x) for x in vals)
def pct(p):
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
with open(path, "a") as f:
    for p in (50, 99):
        f.write(json.dumps({"name": f"{name} p{p}", "unit": unit, "median": pct(p), "min": v[0], "max": v[-1], "samples": len(v)}) + "\n")
print(f"  {name}: p50 {pct(50):.4g} p99 {pct(99):.4g} {unit} ({len(v)} samples)", file=sys.stderr)
PY
}

iperf_gbps() { # HOST-EXEC-PREFIX… -- SERVER-IP STREAMS
  python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'
}

log "lab: etcd and two hosts"
lab_etcd_up
lab_dns_up
for i in 1 2; do lab_host_up "h$i" "$i" >/dev/null && lab_image "h$i"; done
for h in h1 h2; do D $h network create -d weft --ipam-driver weft --subnet 10.42.0.0/16 app >/dev/null; done
D h1 run -d --name c1 --network app "$LAB_IMAGE" sleep 36000 >/dev/null
D h2 run -d --name c2 --network app "$LAB_IMAGE" sleep 36000 >/dev/null
C2=$(ip_of h2 c2 app)
until D h1 exec c1 ping -c 1 -W 1 "$C2" >/dev/null 2>&1; do sleep 0.2; done
D h2 exec -d c2 iperf3 -s -p 5201
D h1 run -d --name b1 "$LAB_IMAGE" sleep 36000 >/dev/null
D h1 run -d --name b2 "$LAB_IMAGE" sleep 36000 >/dev/null
B1=$(D h1 inspect -f '{{.NetworkSettings.IPAddress}}' b1)
D h1 exec -d b1 iperf3 -s -p 5201
lab_spawn h2 "$LAB_ROOT/iperf-underlay.log" iperf3 -s -p 5202 >/dev/null

# plain_tunnel BINARY DEV PORT NET: a WireGuard tunnel set up by hand between h1 and
# h2 with BINARY (NET.1 on h1, NET.2 on h2), the ceiling weft is measured against.
plain_tunnel() {
  local bin=$1 dev=$2 port=$3 net=$4 i j
  for i in 1 2; do
    lab_exec "h$i" env -u WG_PROCESS_FOREGROUND "$bin" "$dev" >/dev/null 2>&1
  done
  for i in 1 2; do
    j=$((3 - i))
    lab_exec "h$i" wg set "$dev" listen-port "$port" private-key "$LAB_ROOT/wg$i.key" \
      peer "$(cat "$LAB_ROOT/wg$j.pub")" endpoint "192.0.2.1$j:$port" allowed-ips "$net.$j/32"
    lab_exec "h$i" ip addr add "$net.$i/24" dev "$dev"
    lab_exec "h$i" ip link set "$dev" mtu 1420 up
  done
}
for i in 1 2; do
  lab_exec "h$i" sh -c "umask 077; wg genkey > $LAB_ROOT/wg$i.key && wg pubkey < $LAB_ROOT/wg$i.key > $LAB_ROOT/wg$i.pub"
done
log "plain WireGuard tunnel between the same hosts ($(wireguard-go --version 2>/dev/null | head -1), package $(dpkg-query -W -f '${Version}' wireguard-go))"
plain_tunnel wireguard-go wgb0 51900 10.99.0
lab_spawn h2 "$LAB_ROOT/iperf-wg.log" iperf3 -s -p 5203 >/dev/null
sleep 1

# Debian 12's own wireguard-go (0.0.20220316, no offloads), fetched as a .deb and
# unpacked, never installed: what weft ran before, for the side-by-side figures.
OLD_WG=""
if [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ]; then
  cache=/var/cache/weft/bench/wireguard-go-bookworm
  if [ ! -x "$cache/usr/bin/wireguard-go" ]; then
    mkdir -p "$cache"
    (cd "$cache" && apt-get download -qq wireguard-go/bookworm >/dev/null 2>&1 && dpkg-deb -x wireguard-go_*.deb .) || true
  fi
  [ -x "$cache/usr/bin/wireguard-go" ] && OLD_WG=$cache/usr/bin/wireguard-go
fi

# throughput LABEL TUNNEL-IP: the plain tunnel and weft, 1 and 4 streams (with no
# LABEL also the underlay and Docker's bridge, measured in the same rounds); weft's
# baseline is the plain tunnel with the same wireguard-go, the others' the underlay.
throughput() {
  local label=$1 tunnel=$2 streams u w g b
  for streams in 1 4; do
    u=() w=() g=() b=()
    for _ in $(seq "$RUNS"); do
      if [ -z "$label" ]; then
        u+=("$(lab_exec h1 iperf3 -c 192.0.2.12 -p 5202 -t "$SECS" -P "$streams" -J | iperf_gbps)")
        b+=("$(D h1 exec b2 iperf3 -c "$B1" -p 5201 -t "$SECS" -P "$streams" -J | iperf_gbps)")
      fi
      g+=("$(lab_exec h1 iperf3 -c "$tunnel" -p 5203 -t "$SECS" -P "$streams" -J | iperf_gbps)")
      w+=("$(D h1 exec c1 iperf3 -c "$C2" -p 5201 -t "$SECS" -P "$streams" -J | iperf_gbps)")
    done
    [ -n "$label" ] || record "throughput underlay ${streams} stream(s)" Gbit/s "${u[@]}"
    record "throughput plain WireGuard${label} ${streams} stream(s)" Gbit/s --baseline "throughput underlay ${streams} stream(s)" "${g[@]}"
    record "throughput weft cross-host${label} ${streams} stream(s)" Gbit/s --baseline "throughput plain WireGuard${label} ${streams} stream(s)" "${w[@]}"
    [ -n "$label" ] || record "throughput docker bridge same host ${streams} stream(s)" Gbit/s --baseline "throughput underlay ${streams} stream(s)" "${b[@]}"
  done
}

# weft_with BINARY: weft on h1 and h2 restarted with BINARY as its userspace WireGuard
# (the old process goes with its link), until c1 reaches c2 again.
weft_with() {
  local h
  for h in h1 h2; do
    lab_weft_stop "$h" TERM
    lab_exec "$h" ip link del weft0 2>/dev/null || true
    # wireguard-go exits when its link goes; a new weft must not adopt it.
    for _ in $(seq 50); do lab_exec "$h" test -S /run/wireguard/weft0.sock || break; sleep 0.1; done
  done
  for h in h1 h2; do (export WEFT_WIREGUARD_USERSPACE=$1; lab_weft_start "$h"); done
  grep -q "WireGuard implementation" "$(lab_dir h1)/weft.log"
  until D h1 exec c1 ping -c 1 -W 1 "$C2" >/dev/null 2>&1; do sleep 0.2; done
}

log "1. TCP throughput (${SECS}s x $RUNS runs each)"
throughput "" 10.99.0.2
if [ -n "$OLD_WG" ]; then
  log "1b. the same with Debian 12's wireguard-go ($("$OLD_WG" --version | head -1), no offloads)"
  plain_tunnel "$OLD_WG" wgo0 51901 10.98.0
  weft_with "$OLD_WG"
  lab_exec h1 "$WEFT_BIN" status --json | python3 -c 'import json,sys; w=json.load(sys.stdin)["wireguard"]; assert w["offloads"] is False, w' ||
    { log "weft did not switch to the old wireguard-go"; exit 1; }
  throughput ", wireguard-go 0.0.20220316" 10.98.0.2
  weft_with wireguard-go
else
  log "1b. skipped: Debian 12's own wireguard-go is not at hand"
fi

log "1c. offloads hop by hop: mean bytes per packet on every link of weft's path during one stream c1 -> c2"
# A link that carries large segments counts one packet per segment (tens of KiB);
# one that splits them counts one per MTU-sized packet.
stats_of() { # HOST DEV: "tx_bytes tx_packets rx_bytes rx_packets"
  lab_exec "$1" ip -s -j link show dev "$2" | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["tx"]["bytes"], s["tx"]["packets"], s["rx"]["bytes"], s["rx"]["packets"])'
}
C1=$(ip_of h1 c1 app)
V1=$(lab_exec h1 ip -4 route show "$C1/32" | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}')
V2=$(lab_exec h2 ip -4 route show "$C2/32" | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}')
hops=("h1 $V1 rx container to host (veth)" "h1 weft0 tx host into WireGuard (TUN)" "h1 eth0 tx WireGuard UDP out (underlay)"
      "h2 eth0 rx WireGuard UDP in (underlay)" "h2 weft0 rx out of WireGuard (TUN)" "h2 $V2 tx host to container (veth)")
declare -A before
for hop in "${hops[@]}"; do read -r h dev _ <<<"$hop"; before[$h.$dev]=$(stats_of "$h" "$dev"); done
D h1 exec c1 iperf3 -c "$C2" -p 5201 -t "$SECS" -P 1 -J >/dev/null
for hop in "${hops[@]}"; do
  read -r h dev dir what <<<"$hop"
  read -r tb0 tp0 rb0 rp0 <<<"${before[$h.$dev]}"
  read -r tb1 tp1 rb1 rp1 <<<"$(stats_of "$h" "$dev")"
  if [ "$dir" = tx ]; then b=$((tb1 - tb0)) p=$((tp1 - tp0)); else b=$((rb1 - rb0)) p=$((rp1 - rp0)); fi
  record "bytes per packet, $h $what" bytes "$(( b / (p > 0 ? p : 1) ))"
done

log "2. latency ($PINGS pings each)"
rtts() { grep -o 'time=[0-9.]*' | cut -d= -f2; }
mapfile -t under < <(lab_exec h1 busybox ping -c "$PINGS" -i 0.02 192.0.2.12 | rtts)
mapfile -t over < <(D h1 exec c1 ping -c "$PINGS" -i 0.02 "$C2" | rtts)
percentiles "ping RTT underlay" ms "${under[@]}"
percentiles "ping RTT weft cross-host" ms "${over[@]}"

log "3. container start ($STARTS starts each)"
: >"$LAB_ROOT/handled.before"; wc -l <"$(lab_dir h1)/weft.log" >"$LAB_ROOT/handled.before"
weft_t=() bridge_t=()
for _ in $(seq "$STARTS"); do
  t0=$(date +%s%N); D h1 run --rm --network app "$LAB_IMAGE" ping -c 1 -W 2 "$C2" >/dev/null; t1=$(date +%s%N)
  weft_t+=("$(( (t1 - t0) / 1000000 ))")
  t0=$(date +%s%N); D h1 run --rm "$LAB_IMAGE" ping -c 1 -W 2 "$B1" >/dev/null; t1=$(date +%s%N)
  bridge_t+=("$(( (t1 - t0) / 1000000 ))")
done
percentiles "docker run to reaching a container on another host, weft" ms "${weft_t[@]}"
percentiles "docker run to reaching a container, docker bridge" ms "${bridge_t[@]}"
# handled_since MARK: "METHOD ENDPOINT MS" for each endpoint request weft logged after MARK.
handled_since() {
  tail -n +"$(cat "$1")" "$(lab_dir h1)/weft.log" | python3 -c '
import re, sys
for line in sys.stdin:
    m = re.search(r"method=NetworkDriver\.(CreateEndpoint|Join|ProgramExternalConnectivity)\b.*?endpoint=(\w+).*micros=(\d+)", line)
    if m and "handled" in line:
        print(m.group(1), m.group(2), int(m.group(3)) / 1000)'
}
# handler_times MARK LABEL: p50/p99 of CreateEndpoint, Join and their sum per endpoint.
handler_times() {
  local mark=$1 label=$2
  handled_since "$mark" >"$LAB_ROOT/handled"
  mapfile -t ce < <(awk '$1 == "CreateEndpoint" {print $3}' "$LAB_ROOT/handled")
  mapfile -t jn < <(awk '$1 == "Join" {print $3}' "$LAB_ROOT/handled")
  mapfile -t both < <(awk '$1 != "ProgramExternalConnectivity" {t[$2] += $3; n[$2]++} END {for (e in t) if (n[e] == 2) print t[e]}' "$LAB_ROOT/handled")
  percentiles "CreateEndpoint handler$label" ms "${ce[@]}"
  percentiles "Join handler$label" ms "${jn[@]}"
  percentiles "CreateEndpoint + Join handlers$label" ms "${both[@]}"
}
handler_times "$LAB_ROOT/handled.before" ""

log "3a. container start publishing a port (-p, $STARTS starts)"
wc -l <"$(lab_dir h1)/weft.log" >"$LAB_ROOT/handled.before"
published_t=()
for _ in $(seq "$STARTS"); do
  t0=$(date +%s%N); D h1 run --rm --network app -p 18400:8080 "$LAB_IMAGE" ping -c 1 -W 2 "$C2" >/dev/null; t1=$(date +%s%N)
  published_t+=("$(( (t1 - t0) / 1000000 ))")
done
percentiles "docker run -p 18400:8080 to reaching a container on another host, weft" ms "${published_t[@]}"
handled_since "$LAB_ROOT/handled.before" >"$LAB_ROOT/handled"
mapfile -t pec < <(awk '$1 == "ProgramExternalConnectivity" {print $3}' "$LAB_ROOT/handled")
percentiles "ProgramExternalConnectivity handler, one port published" ms "${pec[@]}"

log "3b. $BURST containers started at once ($BURSTS rounds)"
wc -l <"$(lab_dir h1)/weft.log" >"$LAB_ROOT/handled.before"
burst_t=()
for r in $(seq "$BURSTS"); do
  t0=$(date +%s%N)
  for i in $(seq "$BURST"); do D h1 run -d --name "burst$r-$i" --network app "$LAB_IMAGE" sleep 600 >/dev/null & done
  wait
  t1=$(date +%s%N)
  burst_t+=("$(( (t1 - t0) / 1000000 ))")
  for i in $(seq "$BURST"); do D h1 rm -f "burst$r-$i" >/dev/null & done
  wait
done
record "$BURST docker run at once, until all have started" ms "${burst_t[@]}"
handler_times "$LAB_ROOT/handled.before" ", $BURST concurrent docker run"

# The kernel's own share, for scale: veth pairs created, then deleted, 100 at a time by
# one `ip -batch` each (no process start per pair), in a namespace of their own. Both
# run under the kernel's RTNL lock, which every container start and removal on the host
# (dockerd's own links and namespaces among them) takes in turn.
veth_add=() veth_del=()
for _ in $(seq "$RUNS"); do
  read -r a d < <(unshare --net bash -c '
    for i in $(seq 100); do echo "link add kva$i type veth peer name kvb$i"; done >"$1/veth.add"
    for i in $(seq 100); do echo "link del kva$i"; done >"$1/veth.del"
    t0=$(date +%s%N); ip -batch "$1/veth.add"; t1=$(date +%s%N); ip -batch "$1/veth.del"; t2=$(date +%s%N)
    python3 -c "print(($t1 - $t0) / 1e8, ($t2 - $t1) / 1e8)"' _ "$LAB_ROOT")
  veth_add+=("$a"); veth_del+=("$d")
done
record "kernel: create a veth pair (100 in one ip -batch)" ms "${veth_add[@]}"
record "kernel: delete a veth pair (100 in one ip -batch)" ms "${veth_del[@]}"

log "4. control plane"
cat >"$LAB_ROOT/alloc.py" <<'PY'
# RequestAddress + ReleaseAddress pairs per second in a fresh pool, over weft's socket,
# from argv[3] clients at once (each its own connection), argv[2] pairs in all. Raw
# HTTP/1.1 on the socket: the client must cost less than what it measures.
import json, socket, sys, threading, time
path, n, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class Client:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); self.buf = b""
    def call(self, method, body):
        data = json.dumps(body).encode()
        self.s.sendall(b"POST /%s HTTP/1.1\r\nHost: weft\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (method.encode(), len(data), data))
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(self.buf) < length:
            self.buf += self.s.recv(65536)
        out, self.buf = json.loads(self.buf[:length]), self.buf[length:]
        if not head.startswith(b"HTTP/1.1 200"): raise SystemExit(f"{method}: {out}")
        return out
main = Client()
pool = main.call("IpamDriver.RequestPool", {"AddressSpace": "weft-local", "Pool": "10.77.0.0/16", "Options": {}})["PoolID"]
# One address held throughout, as a running container would: its block stays this host's.
held = main.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": ""})["Address"].split("/")[0]
failed = []
def client(k):
    try:
        c = Client()
        for _ in range(k):
            a = c.call("IpamDriver.RequestAddress", {"PoolID": pool, "Address": ""})["Address"].split("/")[0]
            c.call("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": a})
    except BaseException as e:
        failed.append(e)
threads = [threading.Thread(target=client, args=(n // clients,)) for _ in range(clients)]
start = time.time()
for t in threads: t.start()
for t in threads: t.join()
rate = (n // clients) * clients / (time.time() - start)
if failed: raise SystemExit(f"allocation failed: {failed[0]}")
main.call("IpamDriver.ReleaseAddress", {"PoolID": pool, "Address": held})
main.call("IpamDriver.ReleasePool", {"PoolID": pool})
print(rate)
PY
single=$LAB_ROOT/single; mkdir -p "$single"
# alloc_rates CLIENTS: allocation rates with the embedded store (a weft alone in a
# fresh namespace) and with etcd (h1), RUNS times each, into emb and etc.
alloc_rates() {
  emb=() etc=()
  for _ in $(seq "$RUNS"); do
    rm -rf "$single/state"
    emb+=("$(unshare --net --mount --propagation private sh -c "
        ip link set lo up; $WEFT_BIN daemon --socket $single/weft.sock --state-dir $single/state >$single/weft.log 2>&1 &
        pid=\$!; for i in \$(seq 100); do [ -S $single/weft.sock ] && break; sleep 0.1; done
        python3 $LAB_ROOT/alloc.py $single/weft.sock $ALLOCS $1; kill \$pid; wait \$pid 2>/dev/null" | tail -1)")
    etc+=("$(lab_exec h1 python3 "$LAB_ROOT/alloc.py" /run/docker/plugins/weft.sock "$ALLOCS" "$1" | tail -1)")
  done
}
alloc_rates 1
record "address allocations (request+release), one client, embedded store" "allocations/s" "${emb[@]}"
record "address allocations (request+release), one client, etcd store" "allocations/s" --baseline "address allocations (request+release), one client, embedded store" "${etc[@]}"
alloc_rates "$CLIENTS"
record "address allocations (request+release), $CLIENTS clients, embedded store" "allocations/s" --baseline "address allocations (request+release), one client, embedded store" "${emb[@]}"
record "address allocations (request+release), $CLIENTS clients, etcd store" "allocations/s" --baseline "address allocations (request+release), $CLIENTS clients, embedded store" "${etc[@]}"

peers_of() { lab_exec "$1" wg show weft0 peers 2>/dev/null | grep -c . || true; }
cat >"$LAB_ROOT/peers.py" <<'PY'
# Prints the time at which host (holder PID argv[1]) has argv[2] WireGuard peers.
import subprocess, sys, time
holder, want = sys.argv[1], int(sys.argv[2])
for _ in range(3000):
    out = subprocess.run(["nsenter", "-t", holder, "-m", "-n", "wg", "show", "weft0", "peers"], capture_output=True, text=True).stdout
    if len([l for l in out.splitlines() if l.strip()]) >= want:
        print(time.time()); sys.exit()
    time.sleep(0.005)
print("nan")
PY
# join_lag NEW-HOST INDEX OTHERS…: seconds from NEW's registration until the last of
# OTHERS has it as a peer. Watchers start before the new host does.
join_lag() {
  local new=$1 idx=$2; shift 2
  local h pids=()
  for h in "$@"; do
    python3 "$LAB_ROOT/peers.py" "$(lab_holder "$h")" "$(( $(peers_of "$h") + 1 ))" >"$LAB_ROOT/seen.$h" &
    pids+=($!)
  done
  LAB_DOCKERD=0 lab_host_up "$new" "$idx" >/dev/null
  for p in "${pids[@]}"; do wait "$p"; done
  python3 - "$(lab_dir "$new")/weft.log" "$@" <<PY
import datetime, sys
reg = None
for line in open(sys.argv[1]):
    if "host registered" in line:
        ts = line.split()[0].rstrip("Z")
        reg = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
        break
seen = [float(open(f"$LAB_ROOT/seen.{h}").read()) for h in sys.argv[2:]]
print(max(seen) - reg)
PY
}
small=("$(join_lag h3 3 h1 h2)")
record "join convergence, 3-host lab (registration to programmed on all others)" s "${small[@]}"

# A cluster network (-o weft.scope=cluster) created on h1, until h2's dockerd has it
# (its API polled every 10 ms; h3 runs no dockerd); the baseline is the same
# `docker network create` of a network of h1's alone.
# networks_present NAME SOCKET…: the time at which every SOCKET's dockerd has NAME.
networks_present() {
  python3 - "$@" <<'PY'
import socket, sys, time
name, socks = sys.argv[1], sys.argv[2:]
def has(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(path)
    s.sendall(f"GET /v1.41/networks/{name} HTTP/1.0\r\n\r\n".encode())
    head = s.recv(64); s.close()
    return b" 200 " in head
start = time.time()
while time.time() - start < 30:
    if all(has(p) for p in socks):
        print(f"{time.time():.4f}"); sys.exit(0)
    time.sleep(0.01)
sys.exit(1)
PY
}
local_create=() propagated=()
for i in $(seq "$RUNS"); do
  t0=$(date +%s.%N)
  D h1 network create -d weft --ipam-driver weft --subnet "10.120.$i.0/24" "solo$i" >/dev/null
  t1=$(date +%s.%N)
  local_create+=("$(python3 -c "print(($t1 - $t0) * 1000)")")
  D h1 network rm "solo$i" >/dev/null
  t0=$(date +%s.%N)
  D h1 network create -d weft --ipam-driver weft --subnet "10.121.$i.0/24" -o weft.scope=cluster "every$i" >/dev/null
  t1=$(networks_present "every$i" "$(lab_dir h2)/docker.sock") || { log "every$i never reached h2"; continue; }
  propagated+=("$(python3 -c "print(($t1 - $t0) * 1000)")")
  D h1 network rm "every$i" >/dev/null
done
record "docker network create, a weft network of one host" ms "${local_create[@]}"
[ "${#propagated[@]}" = 0 ] ||
  record "cluster network: docker network create on h1 until h2's dockerd has it" ms --baseline "docker network create, a weft network of one host" "${propagated[@]}"
# Name lookups from c2 on h2: of c1, a container of h1 (answered by weft's resolver on
# h2 from the cluster's names), against c2's own name (answered by dockerd's embedded
# DNS alone). busybox nslookup asks A and AAAA; LOOKUPS of them in one docker exec.
# lookup_ms NAME: milliseconds per lookup.
lookup_ms() {
  local t0 t1
  t0=$(date +%s%N)
  D h2 exec c2 sh -c "for i in \$(seq $LOOKUPS); do nslookup $1 >/dev/null 2>&1 || exit 1; done" || return 1
  t1=$(date +%s%N)
  python3 -c "print(($t1 - $t0) / 1e6 / $LOOKUPS)"
}
C1=$(ip_of h1 c1 app)
resolved=0
for _ in $(seq 50); do
  D h2 exec c2 nslookup c1 2>/dev/null | grep -q "Address: $C1" && { resolved=1; break; }
  sleep 0.2
done
local_lookup=() remote_lookup=()
# (busybox nslookup exits 0 on NXDOMAIN: only once c1 resolves are the times weft's.)
for _ in $(seq "$RUNS"); do
  [ "$resolved" = 1 ] || { log "c1 does not resolve on h2: no name lookup figures"; break; }
  l=$(lookup_ms c2) && r=$(lookup_ms c1) || { log "a name lookup failed"; break; }
  local_lookup+=("$l") remote_lookup+=("$r")
done
if [ "${#remote_lookup[@]}" -gt 0 ]; then
  record "name lookup of a container of this host (dockerd's embedded DNS)" ms "${local_lookup[@]}"
  record "name lookup of a container of another host (weft's resolver)" ms --baseline "name lookup of a container of this host (dockerd's embedded DNS)" "${remote_lookup[@]}"
fi
others=(h1 h2 h3)
for i in $(seq 4 $((BIG - 1))); do LAB_DOCKERD=0 lab_host_up "h$i" "$i" >/dev/null; others+=("h$i"); done
sleep 2
big=("$(join_lag "h$BIG" "$BIG" "${others[@]}")")
record "join convergence, ${BIG}-host lab (registration to programmed on all others)" s "${big[@]}"

log "5. resources of weft on h1"
pid=$(cat "$(lab_dir h1)/weft.pid")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
rss_idle=$(awk '/VmRSS/ {print $2 / 1024}' "/proc/$pid/status")
t0=$(cpu_ticks "$pid"); s0=$(date +%s%N); sleep 10; t1=$(cpu_ticks "$pid"); s1=$(date +%s%N)
record "weft RSS idle" MiB "$rss_idle"
record "weft CPU idle" "% of one core" "$(python3 -c "print(100*($t1-$t0)/$hz/(($s1-$s0)/1e9))")"
now() { date +%s%N; }
ticks_start=$(cpu_ticks "$pid"); ns_start=$(now)
for i in $(seq "$CHURN"); do D h1 run -d --name "churn$i" --network app "$LAB_IMAGE" sleep 600 >/dev/null; done
ticks_started=$(cpu_ticks "$pid"); ns_started=$(now)
# Idle with the containers running: the reconciler passes every 2 s in the lab (the
# default is 10 s), over every endpoint.
sleep 3
t0=$(cpu_ticks "$pid"); s0=$(now); sleep 10; t1=$(cpu_ticks "$pid"); s1=$(now)
record "weft CPU idle with $CHURN more containers (a reconcile pass every 2 s)" "% of one core" --baseline "weft CPU idle" "$(python3 -c "print(100*($t1-$t0)/$hz/(($s1-$s0)/1e9))")"
ticks_rm=$(cpu_ticks "$pid"); ns_rm=$(now)
for i in $(seq "$CHURN"); do D h1 rm -f "churn$i" >/dev/null; done
ticks_end=$(cpu_ticks "$pid"); ns_end=$(now)
busy=$(( ticks_started - ticks_start + ticks_end - ticks_rm ))
record "weft CPU during churn ($CHURN containers started and removed)" "% of one core" "$(python3 -c "print(100*$busy/$hz/(($ns_started-$ns_start+$ns_end-$ns_rm)/1e9))")"
record "weft RSS peak after churn" MiB "$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$pid/status")"

log "5b. Docker's own overlay in swarm mode (VXLAN) between h1 and h2, the peer a user would pick instead"
# swarm_overlay: h1 and h2 in one swarm, an attachable overlay with a container on
# each; returns non-zero (and the section is skipped) when swarm mode does not come up.
swarm_overlay() {
  local token i
  timeout 60 docker -H "unix://$(lab_dir h1)/docker.sock" swarm init --advertise-addr 192.0.2.11 \
    --listen-addr 192.0.2.11:2377 >/dev/null || return 1
  token=$(D h1 swarm join-token -q worker) || return 1
  timeout 60 docker -H "unix://$(lab_dir h2)/docker.sock" swarm join --token "$token" \
    --advertise-addr 192.0.2.12 --listen-addr 192.0.2.12:2377 192.0.2.11:2377 >/dev/null || return 1
  D h1 network create -d overlay --attachable ovl >/dev/null || return 1
  D h2 run -d --name o2 --network ovl "$LAB_IMAGE" sleep 36000 >/dev/null || return 1
  D h1 run -d --name o1 --network ovl "$LAB_IMAGE" sleep 36000 >/dev/null || return 1
  O2=$(ip_of h2 o2 ovl)
  for i in $(seq 150); do
    D h1 exec o1 ping -c 1 -W 1 "$O2" >/dev/null 2>&1 && break
    [ "$i" = 150 ] && return 1
    sleep 0.2
  done
  D h2 exec -d o2 iperf3 -s -p 5201
}
if swarm_overlay; then
  for streams in 1 4; do
    o=()
    for _ in $(seq "$RUNS"); do o+=("$(D h1 exec o1 iperf3 -c "$O2" -p 5201 -t "$SECS" -P "$streams" -J | iperf_gbps)"); done
    record "throughput docker swarm overlay (VXLAN, unencrypted) ${streams} stream(s)" Gbit/s --baseline "throughput underlay ${streams} stream(s)" "${o[@]}"
  done
  weft_t=() overlay_t=()
  for _ in $(seq "$STARTS"); do
    t0=$(date +%s%N); D h1 run --rm --network app "$LAB_IMAGE" ping -c 1 -W 2 "$C2" >/dev/null; t1=$(date +%s%N)
    weft_t+=("$(( (t1 - t0) / 1000000 ))")
    t0=$(date +%s%N); D h1 run --rm --network ovl "$LAB_IMAGE" ping -c 1 -W 2 "$O2" >/dev/null; t1=$(date +%s%N)
    overlay_t+=("$(( (t1 - t0) / 1000000 ))")
  done
  percentiles "docker run to reaching a container on another host, weft (rounds beside swarm overlay)" ms "${weft_t[@]}"
  percentiles "docker run to reaching a container on another host, docker swarm overlay" ms "${overlay_t[@]}"
  # Encrypted overlay (--opt encrypted) needs IPsec ESP in the kernel, which this one lacks.
  if D h1 network create -d overlay --attachable --opt encrypted ovlenc >/dev/null 2>&1 &&
     D h2 run -d --name e2 --network ovlenc "$LAB_IMAGE" sleep 36000 >/dev/null 2>&1 &&
     D h1 run -d --name e1 --network ovlenc "$LAB_IMAGE" sleep 36000 >/dev/null 2>&1 &&
     D h1 exec e1 ping -c 3 -W 2 "$(ip_of h2 e2 ovlenc)" >/dev/null 2>&1; then
    record "docker swarm overlay --opt encrypted: containers reach each other (1 yes, 0 no)" "" 1
  else
    record "docker swarm overlay --opt encrypted: containers reach each other (1 yes, 0 no)" "" 0
  fi
else
  log "5b. skipped: swarm mode did not come up on the lab dockerds"
fi

log "6. the mesh at ${MESH##*,} hosts, simulated (scripts/bench-mesh.sh), the lab above taken down first"
cp "$REC" "$LAB_ROOT.records"
REC=$LAB_ROOT.records
lab_down >/dev/null 2>&1 || true
scripts/bench-mesh.sh --sizes "$MESH" --joins "$JOINS" --records "$REC"

log "writing $out"
mkdir -p "$(dirname "$out")"
report=docs/benchmarks.md
[ "$quick" = 1 ] && report="${out%.json}.md"
python3 - "$REC" "$out" "$report" "$quick" <<'PY'
import json, platform, subprocess, sys
rec_path, out, report, quick = sys.argv[1:]
recs = [json.loads(l) for l in open(rec_path)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
wg = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
wg += " (Debian package " + subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "wireguard-go"], capture_output=True, text=True).stdout.strip() + ")"
machine = {"cpu": cpu, "cores": cores, "kernel": platform.release(), "wireguard": f"userspace: {wg} (this kernel has no WireGuard module)",
           "docker": subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout.strip()}
json.dump({"machine": machine, "quick": quick == "1", "records": recs}, open(out, "w"), indent=1)
def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
lines = ["# weft benchmarks", "",
         "Generated by `sudo scripts/bench.sh` " + ("(--quick: tiny samples, not a report)" if quick == "1" else "") +
         "; every figure is the median of several runs with min and max, and each baseline ran in the same invocation, on the same machine, through the same lab.", "",
         f"Machine: {cpu}, {cores} cores, kernel {machine['kernel']}; {machine['docker']}; WireGuard {machine['wireguard']}.", "",
         "| measurement | unit | median | min | max | ratio to baseline |", "|---|---|---|---|---|---|"]
for r in recs:
    ratio = f"{r['ratio']} × {r['baseline']}" if "ratio" in r else ""
    lines.append(f"| {r['name']} | {r['unit']} | {fmt(r['median'])} | {fmt(r['min'])} | {fmt(r['max'])} | {ratio} |")
if quick != "1":
    lines += ["", "![TCP throughput by path](benchmarks-throughput.svg)", "",
              "![A new host programmed on every other host, by cluster size](benchmarks-convergence.svg)"]
# The hand-written reading of a full run's figures (bench/notes.md) follows the tables.
notes = "bench/notes.md"
import os
extra = ("\n" + open(notes).read()) if quick != "1" and os.path.exists(notes) else ""
open(report, "w").write("\n".join(lines) + "\n" + extra)
print(f"report: {report}", file=sys.stderr)
PY
[ "$quick" = 1 ] || python3 bench/plot.py "$out" docs
