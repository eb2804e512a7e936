#!/usr/bin/env bash
# Runs every test of weft. As root, from a fresh clone, on Debian 12 with the Rust
# toolchain: installs what it needs, then runs, in order:
#   lint (fmt, clippy) -> unit and API tests -> the fresh-machine check (deps.sh,
#   build and unit tests in a minimal Debian 12 root) -> datapath tests as root in a throwaway
#   network namespace -> the etcd store against a real etcd -> end-to-end against a
#   real dockerd 20.10 and 26.1 on one host, and across three hosts with etcd and
#   WireGuard, under faults (tests/e2e/faults.sh), and as a managed plugin, each in namespaces of its own (never the
#   machine's Docker or default namespace) -> the host-service installer.
# Set WEFT_SKIP_DOCKER26=1 to test against dockerd 20.10 only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (namespaces, dockerd)" >&2; exit 1; }

step() { printf '\n=== %s\n' "$*"; }

step "dependencies"
scripts/deps.sh

step "lint"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings

step "unit, store contract and API tests"
cargo test --locked

step "fresh machine: the README's build steps in a minimal Debian 12 root (scripts/fresh-check.sh)"
scripts/fresh-check.sh

step "datapath tests in a throwaway network namespace"
cargo build --locked --release
outer=$(readlink /proc/self/ns/net)
unshare --net --mount --propagation private -- \
  env WEFT_PRIVATE_NETNS=1 WEFT_OUTER_NETNS="$outer" \
  cargo test --locked --offline --test datapath_root -- --ignored --test-threads=1

step "etcd store contract against a real etcd (private network namespace)"
unshare --net -- scripts/lib/etcd-test.sh cargo test --locked --offline --test store_etcd -- --ignored

step "end to end, dockerd 20.10"
DOCKERD_BIN=/usr/sbin/dockerd tests/e2e/single_host.sh

step "end to end across hosts (etcd, WireGuard), dockerd 20.10"
DOCKERD_BIN=/usr/sbin/dockerd tests/e2e/multi_host.sh

step "faults across hosts (stale endpoints, leaks, partitions from etcd), dockerd 20.10"
DOCKERD_BIN=/usr/sbin/dockerd tests/e2e/faults.sh

step "managed plugin (bundle, create/enable, disable refusal, dockerd restart, two hosts with etcd, install from a registry)"
DOCKERD_BIN=/usr/sbin/dockerd tests/e2e/plugin.sh

step "host service install"
tmp=$(mktemp -d)
scripts/install.sh --root "$tmp" >/dev/null
unit=$tmp/etc/systemd/system/weft.service
grep -qx 'Before=docker.service' "$unit"
# Wanted by docker.service, never required: restarting weft must not restart dockerd.
grep -qx 'WantedBy=docker.service' "$unit"
if grep -q '^RequiredBy=' "$unit"; then echo "weft.service must not be RequiredBy= anything" >&2; exit 1; fi
# systemd's own check, with ExecStart pointed at the built binary (the unit's path is
# not installed on this machine); any warning fails.
sed "s#^ExecStart=/usr/local/bin/weft#ExecStart=$PWD/target/release/weft#" "$unit" >"$tmp/weft.service"
verify_out=$(systemd-analyze verify "$tmp/weft.service" 2>&1)
[ -z "$verify_out" ] || { echo "systemd-analyze verify: $verify_out" >&2; exit 1; }
"$tmp/usr/local/bin/weft" --version
scripts/install.sh --root "$tmp" --uninstall >/dev/null
[ ! -e "$tmp/usr/local/bin/weft" ] && [ ! -e "$tmp/etc/systemd/system/weft.service" ]
rm -rf "$tmp"

step "benchmarks run (--quick: they measure, they do not pass or fail on numbers)"
bench_out=$(mktemp -d)
scripts/bench.sh --quick --out "$bench_out/results.json"
python3 - "$bench_out/results.json" <<'PY'
import json, sys
names = [r["name"] for r in json.load(open(sys.argv[1]))["records"]]
assert len(names) >= 20, len(names)
# The simulated mesh ran at every size and saw every join converge.
for n in (10, 100):
    assert any(x.startswith(f"mesh: join convergence, {n} hosts") for x in names), (n, names)
PY
rm -rf "$bench_out"

if [ "${WEFT_SKIP_DOCKER26:-0}" != 1 ]; then
  step "end to end, dockerd 26.1"
  DOCKERD_BIN=$(scripts/dockerd-26.sh) tests/e2e/single_host.sh
  step "cluster networks and names across hosts, dockerd 26.1 (those tests of the multi-host suite)"
  DOCKERD_BIN=$(scripts/dockerd-26.sh) E2E_ONLY='^test_(cluster_network_(is_created|name_clash|removed)|names_|compose_)' \
    tests/e2e/multi_host.sh
fi

echo
echo "scripts/test.sh: all suites passed"
