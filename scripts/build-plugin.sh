#!/usr/bin/env bash
# Writes a managed-plugin bundle that `docker plugin create` accepts, with no registry
# and no image pull: DIR/config.json (plugin/config.json) and DIR/rootfs/, a small root
# filesystem holding the weft binary and what it runs (nft, iptables, wireguard-go)
# with exactly the shared libraries they link against, copied from this machine.
#
#   scripts/build-plugin.sh DIR
#   docker plugin create weft DIR && docker plugin enable weft
#
# To publish: docker plugin create REGISTRY/weft:TAG DIR && docker plugin push REGISTRY/weft:TAG
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/build-plugin.sh DIR}
[ -x target/release/weft ] || cargo build --locked --release
for tool in nft xtables-nft-multi wireguard-go; do
  command -v "$tool" >/dev/null || { echo "build-plugin: $tool is missing (scripts/deps.sh installs it)" >&2; exit 1; }
done

rm -rf "$out"
root=$out/rootfs
mkdir -p "$root"/{usr/bin,usr/sbin,etc,tmp,run/docker/plugins,run/wireguard,var/lib/weft,host/proc/sys/net,dev,proc,sys}
chmod 1777 "$root/tmp"

copy_with_libs() { # copies an executable and every library ldd names for it
  local bin=$1 dest=$2
  install -D -m 0755 "$(readlink -f "$bin")" "$root$dest"
  ldd "$bin" 2>/dev/null | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
    [ -n "$lib" ] && [ -e "$lib" ] || continue
    install -D -m 0644 "$(readlink -f "$lib")" "$root$lib"
  done
}

copy_with_libs target/release/weft /usr/bin/weft
strip --strip-debug "$root/usr/bin/weft" 2>/dev/null || true
copy_with_libs "$(command -v nft)" /usr/sbin/nft
copy_with_libs "$(command -v xtables-nft-multi)" /usr/sbin/xtables-nft-multi
copy_with_libs "$(command -v wireguard-go)" /usr/bin/wireguard-go
ln -s xtables-nft-multi "$root/usr/sbin/iptables"
# iptables' match and target extensions are loaded at run time.
xt=$(dirname "$(find /usr/lib -name libxt_conntrack.so -print -quit)")
mkdir -p "$root$xt"
cp -a "$xt"/. "$root$xt/"
for so in "$xt"/*.so; do
  ldd "$so" 2>/dev/null | awk '/=>/ {print $3}' | while read -r lib; do
    [ -e "$lib" ] && install -D -m 0644 "$(readlink -f "$lib")" "$root$lib"
  done
done
# The dynamic loader must be where the binaries expect it.
for ld in /lib64/ld-linux-x86-64.so.2 /lib/ld-linux-aarch64.so.1; do
  [ -e "$ld" ] && install -D -m 0755 "$(readlink -f "$ld")" "$root$ld"
done
# nft and iptables read these.
for f in /etc/protocols /etc/services /etc/nsswitch.conf; do
  [ -e "$f" ] && cp "$f" "$root$f"
done
echo 'root:x:0:0:root:/:/bin/sh' >"$root/etc/passwd"
cp plugin/config.json "$out/config.json"
echo "plugin bundle in $out ($(du -sh "$root" | cut -f1)); next: docker plugin create weft $out"
