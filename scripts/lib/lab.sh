# shellcheck shell=bash
# Simulated Docker hosts on one machine, for weft's tests and for trying it out.
#
# A host is a network namespace plus a private mount namespace (so /run/docker, and
# with it /run/docker/plugins, is its own) held open by a sleeping process; weft and
# dockerd run inside it. Hosts sit on an underlay bridge in a "wan" namespace that
# answers as 192.0.2.1 (TEST-NET-1): nothing is ever routed out of the lab.
#
# Every process is recorded by PID and stopped by PID. Source this file; set LAB_ROOT.

: "${LAB_ROOT:=/tmp/weft-lab}"
: "${LAB_PREFIX:=weftlab}"
: "${WEFT_BIN:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release/weft}"
: "${DOCKERD_BIN:=/usr/sbin/dockerd}"
LAB_WAN="${LAB_PREFIX}-wan"
LAB_IMAGE="weft-test/busybox:latest"

lab_log() { printf '[lab %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

lab_dir() { echo "$LAB_ROOT/$1"; }
lab_ns() { echo "${LAB_PREFIX}-$1"; }
lab_holder() { cat "$(lab_dir "$1")/holder.pid"; }

# Runs a command inside host $1 (its network and mount namespaces).
lab_exec() {
  local host=$1; shift
  nsenter -t "$(lab_holder "$host")" -m -n -- "$@"
}

# Starts a long-running command inside host $1, logging to $2; prints its PID
# (nsenter execs the command, so the PID is the command's own).
lab_spawn() {
  local host=$1 log=$2; shift 2
  nsenter -t "$(lab_holder "$host")" -m -n -- "$@" </dev/null >>"$log" 2>&1 &
  echo $!
  disown $! 2>/dev/null || true
}

lab_docker() {
  local host=$1; shift
  docker -H "unix://$(lab_dir "$host")/docker.sock" "$@"
}

# The wan namespace: a bridge that every host's underlay link plugs into.
lab_wan_up() {
  ip netns list | grep -qw "$LAB_WAN" && return 0
  ip netns add "$LAB_WAN"
  ip -n "$LAB_WAN" link set lo up
  ip -n "$LAB_WAN" link add br0 type bridge
  ip -n "$LAB_WAN" addr add 192.0.2.1/24 dev br0
  ip -n "$LAB_WAN" link set br0 up
}

# etcd for the lab, in the wan namespace at 192.0.2.1:2379 (reachable from every host).
lab_etcd_up() {
  lab_wan_up
  [ -f "$LAB_ROOT/etcd.pid" ] && return 0
  mkdir -p "$LAB_ROOT/etcd"
  ip netns exec "$LAB_WAN" etcd --name lab --data-dir "$LAB_ROOT/etcd/data" \
    --listen-client-urls http://192.0.2.1:2379 --advertise-client-urls http://192.0.2.1:2379 \
    --listen-peer-urls http://192.0.2.1:2380 --initial-advertise-peer-urls http://192.0.2.1:2380 \
    --initial-cluster lab=http://192.0.2.1:2380 </dev/null >"$LAB_ROOT/etcd/etcd.log" 2>&1 &
  echo $! >"$LAB_ROOT/etcd.pid"
  disown $! 2>/dev/null || true
  for _ in $(seq 100); do
    ip netns exec "$LAB_WAN" curl -sf http://192.0.2.1:2379/health >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  lab_log "etcd did not come up"; tail -20 "$LAB_ROOT/etcd/etcd.log" >&2; return 1
}

# The lab's DNS server, the one every lab dockerd names as its external server
# (192.0.2.1:53 in the wan namespace): it knows upstream.test (192.0.2.99) and says
# NXDOMAIN to everything else, so containers' outside lookups stay in the lab.
lab_dns_up() {
  lab_wan_up
  [ -f "$LAB_ROOT/dns.pid" ] && return 0
  mkdir -p "$LAB_ROOT"
  ip netns exec "$LAB_WAN" dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll \
    --listen-address=192.0.2.1 --bind-interfaces --port=53 --user=root \
    --address=/upstream.test/192.0.2.99 --address=/#/ --log-facility="$LAB_ROOT/dns.log" \
    --pid-file= </dev/null >>"$LAB_ROOT/dns.log" 2>&1 &
  echo $! >"$LAB_ROOT/dns.pid"
  disown $! 2>/dev/null || true
}

# Stops the process whose PID the file holds: TERM, KILL if it is still there after 5 s.
lab_stop_pid_file() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

lab_dns_stop() { lab_stop_pid_file "$LAB_ROOT/dns.pid"; }

lab_etcd_stop() { lab_stop_pid_file "$LAB_ROOT/etcd.pid"; }

# lab_host_up NAME INDEX: a host with underlay address 192.0.2.(10+INDEX).
lab_host_up() {
  local host=$1 index=$2 dir ns
  dir=$(lab_dir "$host"); ns=$(lab_ns "$host")
  mkdir -p "$dir"/{data,exec,state}
  lab_wan_up
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$LAB_WAN" link add "u$index" type veth peer name eth0 netns "$ns"
  ip -n "$LAB_WAN" link set "u$index" master br0 up
  ip -n "$ns" addr add "192.0.2.$((10 + index))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 192.0.2.1
  # Real hosts run with FORWARD policy DROP (dockerd sets it); so do the tests.
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "$ns" iptables -P FORWARD DROP
  mkdir -p /run/docker /run/wireguard
  nsenter --net="/run/netns/$ns" unshare -m --propagation private \
    sh -c 'mount -t tmpfs -o mode=755 weft-lab /run/docker && mkdir -p /run/docker/plugins &&
           mount -t tmpfs -o mode=755 weft-lab /run/wireguard && exec sleep infinity' \
    </dev/null >/dev/null 2>&1 &
  # unshare forks nothing without --fork: $! is the holder itself.
  disown $! 2>/dev/null || true
  echo $! >"$dir/holder.pid"
  for _ in $(seq 50); do
    lab_exec "$host" test -d /run/docker/plugins 2>/dev/null && break
    sleep 0.1
  done
  # LAB_WEFT=plugin: weft comes as a managed plugin installed later, not as a daemon.
  [ "${LAB_WEFT:-daemon}" = plugin ] || lab_weft_start "$host"
  # LAB_DOCKERD=0: a host with weft only (for large control-plane labs).
  [ "${LAB_DOCKERD:-1}" = 0 ] || lab_dockerd_start "$host"
}

lab_weft_start() {
  local host=$1 dir
  dir=$(lab_dir "$host")
  local cluster=()
  [ -f "$LAB_ROOT/etcd.pid" ] && cluster=(--etcd-endpoints http://192.0.2.1:2379 --host-ttl "${WEFT_HOST_TTL:-4}")
  lab_spawn "$host" "$dir/weft.log" env WEFT_LOG="${WEFT_LOG:-info,weft=debug}" "$WEFT_BIN" daemon \
    --state-dir "$dir/state" --docker-host "unix://$dir/docker.sock" --reconcile-interval "${WEFT_RECONCILE_INTERVAL:-2}" "${cluster[@]}" >"$dir/weft.pid"
  for _ in $(seq 100); do
    # Ready means answering, not just a socket file (a stale one may be there).
    lab_exec "$host" curl -sf --max-time 1 --unix-socket /run/docker/plugins/weft.sock \
      -X POST http://weft/Plugin.Activate >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  lab_log "weft did not come up on $host"; tail -20 "$dir/weft.log" >&2; return 1
}

# Stops weft on a host: signal KILL (crash) or TERM (clean).
lab_weft_stop() {
  local host=$1 sig=${2:-TERM} dir pid
  dir=$(lab_dir "$host"); pid=$(cat "$dir/weft.pid" 2>/dev/null) || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$dir/weft.pid"
}

lab_dockerd_start() {
  local host=$1 dir
  dir=$(lab_dir "$host")
  # The lab's DNS server (lab_dns_up), never the machine's own resolver.
  echo '{"dns": ["192.0.2.1"]}' >"$dir/daemon.json"
  lab_spawn "$host" "$dir/dockerd.log" "$DOCKERD_BIN" --config-file "$dir/daemon.json" \
    --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
    -H "unix://$dir/docker.sock" --storage-driver vfs --userland-proxy=false >"$dir/dockerd.launcher.pid"
  for _ in $(seq 300); do
    lab_docker "$host" info >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  lab_log "dockerd did not come up on $host"; tail -30 "$dir/dockerd.log" >&2; return 1
}

lab_dockerd_stop() {
  local host=$1 dir pid
  dir=$(lab_dir "$host"); pid=$(cat "$dir/dockerd.launcher.pid" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/dockerd.launcher.pid"
}

# A tiny image: busybox-static and its applet links.
lab_image() {
  local host=$1 root
  lab_docker "$host" image inspect "$LAB_IMAGE" >/dev/null 2>&1 && return 0
  root=$(mktemp -d)
  mkdir -p "$root/bin" "$root/etc" "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  echo 'root:x:0:0:root:/:/bin/sh' >"$root/etc/passwd"
  # iperf3, when the machine has it, for the benchmarks (with its libraries).
  if command -v iperf3 >/dev/null; then
    cp "$(command -v iperf3)" "$root/bin/iperf3"
    ldd "$(command -v iperf3)" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
      [ -e "$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
  fi
  tar -C "$root" -c . | lab_docker "$host" import --change 'CMD ["sh"]' - "$LAB_IMAGE" >/dev/null
  rm -rf "$root"
}

lab_host_down() {
  local host=$1 dir ns
  dir=$(lab_dir "$host"); ns=$(lab_ns "$host")
  [ -d "$dir" ] || return 0
  if [ -f "$dir/dockerd.launcher.pid" ]; then
    lab_docker "$host" ps -aq 2>/dev/null | xargs -r timeout 60 docker -H "unix://$dir/docker.sock" rm -f >/dev/null 2>&1 || true
    lab_dockerd_stop "$host"
  fi
  lab_weft_stop "$host" TERM
  # Whatever still runs in the host's namespace (containerd shims) was started by us.
  if ip netns list | grep -qw "$ns"; then
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      [ "$pid" = "$(cat "$dir/holder.pid" 2>/dev/null)" ] || kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  kill -KILL "$(cat "$dir/holder.pid" 2>/dev/null)" 2>/dev/null || true
  sleep 0.2
  ip netns del "$ns" 2>/dev/null || true
  # vfs layers and dockerd's own mounts live under data/exec.
  grep -o " $dir[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir"
}

lab_down() {
  local d
  for d in "$LAB_ROOT"/*/; do
    [ -f "$d/holder.pid" ] && lab_host_down "$(basename "$d")"
  done
  lab_etcd_stop
  lab_dns_stop
  ip netns del "$LAB_WAN" 2>/dev/null || true
  rm -rf "$LAB_ROOT"
}
