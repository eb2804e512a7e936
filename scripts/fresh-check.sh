#!/usr/bin/env bash
# The fresh-machine check: does what the README promises a new Debian 12 machine
# with only the Rust toolchain, in a minimal Debian 12 root made by mmdebstrap, so a
# package that this machine has from earlier work cannot hide a missing install step.
#
#   sudo scripts/fresh-check.sh [--ref REF] [--with PKG,PKG…] [--refresh]
#
# In that root, on a clean clone of REF (default HEAD; committed work only), it runs
#   scripts/deps.sh
#   cargo build --release --locked
#   cargo test --release --locked      (the unit and API layer; --release so that it
#                                       reuses the release build's dependencies)
#   target/release/weft --version
# The root holds Debian's minbase plus ca-certificates (which every Debian install
# has, and rustup's own install needs); no compiler, no protoc, nothing of weft's.
# --with adds packages to the root (say, gcc,libc6-dev, a machine where rustup's C
# linker is already there).
# The Rust toolchain is this machine's, mounted read-only (the README's one
# precondition). Cached between runs under /var/cache/weft/fresh: the root's tarball
# (rebuilt after 7 days or with --refresh), downloaded .debs and crates; nothing
# else is kept. The root runs in a mount and PID namespace of its own and is deleted
# at the end, also on failure. It shares the machine's network only to reach the
# package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
ref=HEAD refresh=0 with=ca-certificates
while [ $# -gt 0 ]; do
  case "$1" in
    --ref) ref=${2:?--ref needs a commit}; shift 2 ;;
    --with) with=ca-certificates,${2:?--with needs packages}; shift 2 ;;
    --refresh) refresh=1; shift ;;
    *) sed -n '2,23p' "$0"; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "scripts/fresh-check.sh: run as root" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "fresh-check: mmdebstrap is missing (scripts/deps.sh installs it)" >&2; exit 1; }
commit=$(git -C "$repo" rev-parse --verify "$ref^{commit}")
sysroot=$(rustc --print sysroot)
[ -x "$sysroot/bin/cargo" ] || { echo "fresh-check: no cargo in the toolchain at $sysroot" >&2; exit 1; }

cache=${WEFT_FRESH_CACHE:-/var/cache/weft/fresh}
mkdir -p "$cache/debs" "$cache/cargo-registry"
tarball=$cache/bookworm-minbase-$(printf %s "$with" | md5sum | cut -c1-8).tar
say() { printf '[fresh-check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [ "$refresh" = 1 ] || [ -z "$(find "$tarball" -mtime -7 2>/dev/null)" ]; then
  # The same mirror as this machine's apt, and the suites a Debian 12 install has.
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  security=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -m1 security || true)
  security=${security:-http://deb.debian.org/debian-security}
  say "making a minimal Debian 12 root (mmdebstrap, minbase + $with)"
  mmdebstrap --quiet --variant=minbase --include="$with" \
    bookworm "$tarball.new.tar" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main"
  mv "$tarball.new.tar" "$tarball"
fi

work=$(mktemp -d /var/tmp/weft-fresh.XXXXXX)
root=$work/root
# The mounts live only in the namespace below; once it is gone nothing under $work
# is mounted, and --one-file-system keeps the removal inside $work regardless.
trap 'rm -rf --one-file-system "$work"' EXIT
mkdir -p "$root"
tar -C "$root" -xf "$tarball"
say "clean clone of $commit"
git clone --quiet --no-local --no-checkout "$repo" "$root/src/weft"
git -C "$root/src/weft" checkout --quiet --detach "$commit"
# The network as this machine has it: its resolver, and the certificate authorities
# it trusts locally (a TLS proxy in front of the registries, where there is one).
cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
# A root without init must not start the daemons that packages install (dockerd,
# the registry); a real machine starts them under systemd, which changes nothing here.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
mkdir -p "$root/opt/rust" "$root/root/.cargo/registry" "$root/var/cache/apt/archives" "$root/proc" "$root/dev" "$root/sys"

cat >"$root/fresh-steps.sh" <<'STEPS'
set -euo pipefail
step() { printf '[fresh-check %s] in the fresh root: %s\n' "$(date +%H:%M:%S)" "$*"; }
cd /src/weft
step "scripts/deps.sh"
scripts/deps.sh
step "cargo build --release --locked"
cargo build --release --locked
step "cargo test --release --locked"
cargo test --release --locked
step "target/release/weft --version"
target/release/weft --version
STEPS

say "running the README's steps in the fresh root"
log=$work/steps.log
set +e
unshare --mount --propagation private --pid --fork -- bash -euc '
  root=$1 sysroot=$2 cache=$3
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount --rbind /sys "$root/sys"
  mount --bind "$sysroot" "$root/opt/rust"
  mount -o remount,bind,ro "$root/opt/rust"
  mount --bind "$cache/debs" "$root/var/cache/apt/archives"
  mount --bind "$cache/cargo-registry" "$root/root/.cargo/registry"
  exec chroot "$root" /usr/bin/env -i HOME=/root CARGO_HOME=/root/.cargo TERM=dumb LANG=C.UTF-8 \
    PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    bash /fresh-steps.sh
' fresh "$root" "$sysroot" "$cache" 2>&1 | tee "$log" | grep --line-buffered -E '^\[fresh-check|^test result|weft [0-9]'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" != 0 ]; then
  echo "--- the last lines of the fresh root's output:"
  tail -n 40 "$log"
  say "FAILED on a fresh machine (exit $rc)"
  exit 1
fi
say "passed: a fresh Debian 12 with the Rust toolchain builds, tests and runs weft $commit"
