#!/usr/bin/env bash
# End to end for weft as a managed Docker plugin: the bundle from
# scripts/build-plugin.sh, created and enabled on lab hosts; and installed as a user
# does, pushed to and installed from a registry (Debian's docker-registry) in a lab host.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export LAB_ROOT=${LAB_ROOT:-/tmp/weft-plugin-$$} LAB_PREFIX=${LAB_PREFIX:-wpl$$} LAB_WEFT=plugin
# shellcheck source=../../scripts/lib/lab.sh
source "$REPO/scripts/lib/lab.sh"
# shellcheck source=lib.sh
source "$REPO/tests/e2e/lib.sh"

BUNDLE=$LAB_ROOT/bundle
DRV=weft:latest
# shellcheck source=hosts.sh
source "$REPO/tests/e2e/hosts.sh"

# install_plugin HOST [ENV=VALUE…]: create, point its state at the host's own dir, enable.
install_plugin() {
  local h=$1; shift
  D "$h" plugin create weft "$BUNDLE" >/dev/null
  D "$h" plugin set weft state.source="$(lab_dir "$h")/state" docker.source="$(lab_dir "$h")/docker.sock" "$@"
  D "$h" plugin enable weft >/dev/null
}

cleanup() {
  local d
  for d in "$LAB_ROOT"/*/; do
    [ -f "$d/holder.pid" ] || continue
    lab_docker "$(basename "$d")" ps -aq 2>/dev/null | xargs -r docker -H "unix://$d/docker.sock" rm -f >/dev/null 2>&1
    lab_docker "$(basename "$d")" network ls -q --filter driver=$DRV 2>/dev/null | xargs -r docker -H "unix://$d/docker.sock" network rm >/dev/null 2>&1
    lab_docker "$(basename "$d")" plugin disable -f weft >/dev/null 2>&1
  done
  lab_down
}
trap cleanup EXIT

test_bundle_is_accepted_and_serves_a_network() {
  install_plugin p1
  D p1 plugin inspect weft -f '{{.Enabled}}' | grep -qx true
  D p1 network create -d $DRV --ipam-driver $DRV --subnet 10.42.0.0/16 app >/dev/null
  run_bb p1 pa --network app
  run_bb p1 pb --network app
  pings p1 pa "$(ip_of p1 pb app)" 3
  [ "$(D p1 exec pa cat /sys/class/net/eth0/mtu)" = 1420 ]
  [ -s "$(lab_dir p1)/state/state.json" ] || fail "plugin state is not in the host's state dir"
}

test_disable_is_refused_while_a_network_uses_it() {
  local out
  out=$(D p1 plugin disable weft 2>&1) && fail "disable succeeded with a network in use"
  echo "$out" | grep -qi "in use" || fail "unexpected: $out"
}

test_state_survives_disable_and_enable() {
  D p1 rm -f pa pb >/dev/null
  D p1 plugin disable -f weft >/dev/null
  D p1 plugin enable weft >/dev/null
  run_bb p1 pc --network app
  run_bb p1 pd --network app
  pings p1 pc "$(ip_of p1 pd app)" 2
}

test_restart_always_container_comes_back_after_dockerd_restart() {
  D p1 run -d --name always --restart=always --network app "$LAB_IMAGE" sleep 3600 >/dev/null
  lab_dockerd_stop p1
  lab_dockerd_start p1
  retry 75 sh -c "[ \"\$(docker -H unix://$(lab_dir p1)/docker.sock inspect -f '{{.State.Running}}' always)\" = true ]"
  retry 25 sh -c "docker -H unix://$(lab_dir p1)/docker.sock exec always ping -c 1 -W 1 10.42.0.1 >/dev/null"
  D p1 start pc >/dev/null
  pings p1 always "$(ip_of p1 pc app)" 2
}

test_two_hosts_with_the_managed_plugin_and_etcd() {
  lab_etcd_up
  lab_dns_up
  for h in q1 q2; do
    i=${h#q}; lab_host_up "$h" $((i + 4)) && lab_image "$h"
    install_plugin "$h" WEFT_ETCD_ENDPOINTS=http://192.0.2.1:2379
    D "$h" network create -d $DRV --ipam-driver $DRV --subnet 10.50.0.0/16 mesh >/dev/null
  done
  run_bb q1 qa --network mesh
  run_bb q2 qb --network mesh
  [ "$(ip_of q1 qa mesh)" != "$(ip_of q2 qb mesh)" ]
  retry 25 pings q1 qa "$(ip_of q2 qb mesh)"
  pings q2 qb "$(ip_of q1 qa mesh)" 3
  # A cluster network: the plugin reaches dockerd through its `docker` mount, and the
  # copy on q2 is made under the plugin's driver name.
  D q1 network create -d $DRV --ipam-driver $DRV --subnet 10.51.0.0/24 -o weft.scope=cluster everywhere >/dev/null
  retry 25 has_network q2 everywhere || fail "q2 never got the cluster network"
  [ "$(D q2 network inspect -f '{{.Driver}} {{.IPAM.Driver}}' everywhere)" = "$DRV $DRV" ] ||
    fail "q2's copy: $(D q2 network inspect -f '{{.Driver}} {{.IPAM.Driver}}' everywhere)"
  run_bb q2 qc --network everywhere
  run_bb q1 qd --network everywhere
  retry 25 pings q2 qc "$(ip_of q1 qd everywhere)"
  # Names across hosts: the plugin's resolver answers q1's container by name on q2
  # and passes the rest on.
  retry 25 resolves q2 qc qd "$(ip_of q1 qd everywhere)" || fail "qd on q2: '$(lookup q2 qc qd)'"
  resolves q2 qc upstream.test 192.0.2.99 || fail "upstream.test on q2: '$(lookup q2 qc upstream.test)'"
}

# A user installs from a registry: create + push, rm, then install --alias weft. The
# registry (Debian's docker-registry) listens on 127.0.0.1 inside the lab host r1,
# which dockerd trusts over plain HTTP. Docker registers a managed driver under its
# name and tag: with --alias weft that is weft:latest, and a bare `-d weft` is refused
# (docs/install.md and the README say so).
test_install_from_a_registry_with_an_alias() {
  local ref=127.0.0.1:5000/weft:0.1 reg out
  lab_host_up r1 8 && lab_image r1
  reg=$(lab_dir r1)/registry
  mkdir -p "$reg/data"
  cat >"$reg/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $reg/data
http:
  addr: 127.0.0.1:5000
YML
  lab_spawn r1 "$reg/registry.log" docker-registry serve "$reg/config.yml" >"$reg/pid"
  retry 50 lab_exec r1 curl -sf http://127.0.0.1:5000/v2/ >/dev/null
  D r1 plugin create "$ref" "$BUNDLE" >/dev/null
  D r1 plugin push "$ref" >/dev/null
  D r1 plugin rm "$ref" >/dev/null
  D r1 plugin install --alias weft --grant-all-permissions --disable "$ref" >/dev/null
  D r1 plugin set weft state.source="$(lab_dir r1)/state" docker.source="$(lab_dir r1)/docker.sock"
  D r1 plugin enable weft >/dev/null
  [ "$(D r1 plugin inspect -f '{{.Name}}' weft)" = weft:latest ]
  out=$(D r1 network create -d weft --ipam-driver weft --subnet 10.44.0.0/16 bare 2>&1) &&
    fail "-d weft was accepted: docs/install.md says it is refused; update it"
  echo "$out" | grep -q "could not resolve driver weft" || fail "unexpected: $out"
  D r1 network create -d weft:latest --ipam-driver weft:latest --subnet 10.44.0.0/16 reg >/dev/null
  run_bb r1 ra --network reg
  run_bb r1 rb --network reg
  pings r1 ra "$(ip_of r1 rb reg)" 3
}

main() {
  [ "$(id -u)" = 0 ] || { echo "plugin: needs root"; exit 1; }
  echo "== weft as a managed plugin: $($DOCKERD_BIN --version)"
  "$REPO/scripts/build-plugin.sh" "$BUNDLE" >/dev/null || { echo "plugin: bundle build failed"; exit 1; }
  lab_host_up p1 1 && lab_image p1 || { echo "plugin: lab did not come up"; exit 1; }
  for t in \
    test_bundle_is_accepted_and_serves_a_network \
    test_disable_is_refused_while_a_network_uses_it \
    test_state_survives_disable_and_enable \
    test_restart_always_container_comes_back_after_dockerd_restart \
    test_two_hosts_with_the_managed_plugin_and_etcd \
    test_install_from_a_registry_with_an_alias; do
    run_test "$t"
  done
  summary "managed-plugin e2e"
}

main "$@"
