# shellcheck shell=bash
# Helpers for the suites that drive several lab hosts (multi_host, faults, plugin):
# HOST is a lab host name (h1, p1, …); source after scripts/lib/lab.sh.

D() { local h=$1; shift; lab_docker "$h" "$@"; }
# ip_of HOST CONTAINER NETWORK
ip_of() { D "$1" inspect -f "{{(index .NetworkSettings.Networks \"$3\").IPAddress}}" "$2"; }
# run_bb HOST NAME [docker run options…]: a sleeping busybox container.
run_bb() { local h=$1; shift; D "$h" run -d --name "$@" "$LAB_IMAGE" sleep 3600 >/dev/null; }
# pings HOST CONTAINER ADDRESS [COUNT]
pings() { D "$1" exec "$2" ping -c "${4:-1}" -W 2 "$3" >/dev/null 2>&1; }
# weft_status HOST: `weft status --json` of the weft daemon on HOST.
weft_status() { lab_exec "$1" "$WEFT_BIN" status --json; }
# has_network HOST NAME: HOST's dockerd has a network called NAME.
has_network() { D "$1" network inspect "$2" >/dev/null 2>&1; }
# etcdctl against the lab's etcd; host_id HOST: the weft host id of HOST.
etcdctl_lab() { ip netns exec "$LAB_WAN" etcdctl --endpoints http://192.0.2.1:2379 "$@"; }
host_id() { cat "$(lab_dir "$1")/state/host-id"; }
# lookup HOST CONTAINER NAME: the addresses NAME resolves to in CONTAINER, sorted, on
# one line (busybox nslookup, through dockerd's embedded DNS).
lookup() {
  { D "$1" exec "$2" nslookup "$3" 2>/dev/null || true; } |
    awk '/^Name:/ { found = 1 } found && /^Address/ { print $NF }' | sort | xargs
}
# resolves HOST CONTAINER NAME ADDRESSES: NAME resolves to exactly ADDRESSES there.
resolves() { [ "$(lookup "$1" "$2" "$3")" = "$4" ]; }
