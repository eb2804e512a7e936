#!/usr/bin/env bash
# Installs weft as a host service: the binary, a systemd unit ordered before
# docker.service, and /etc/default/weft for its settings (WEFT_* variables).
#
#   sudo scripts/install.sh               install (or upgrade) and start
#   sudo scripts/install.sh --uninstall   stop and remove binary and unit (keeps state and settings)
#   scripts/install.sh --root DIR         install into DIR instead of / (packaging, tests)
set -euo pipefail
cd "$(dirname "$0")/.."
root=/ action=install
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --uninstall) action=uninstall; shift ;;
    *) sed -n '2,9p' "$0"; exit 2 ;;
  esac
done
bin="$root/usr/local/bin/weft" unit="$root/etc/systemd/system/weft.service" defaults="$root/etc/default/weft"
live() { [ "$root" = / ] && [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
  if live; then systemctl disable --now weft.service || true; fi
  rm -f "$bin" "$unit"
  if live; then systemctl daemon-reload; fi
  echo "weft removed (state in /var/lib/weft and settings in /etc/default/weft are kept)"
  exit 0
fi

[ -x target/release/weft ] || cargo build --locked --release
install -D -m 0755 target/release/weft "$bin.new" && mv -f "$bin.new" "$bin"
install -D -m 0644 plugin/systemd/weft.service "$unit"
if [ ! -e "$defaults" ]; then
  install -D -m 0600 /dev/null "$defaults"
  cat >"$defaults" <<'DEFAULTS'
# Settings of weft daemon (see docs/configuration.md). For several hosts, for example:
# WEFT_ETCD_ENDPOINTS=https://etcd1:2379,https://etcd2:2379
# WEFT_ETCD_CA=/etc/weft/ca.pem
# WEFT_ADVERTISE_ADDR=192.0.2.11
DEFAULTS
fi
install -d -m 0700 "$root/var/lib/weft"
if live; then
  systemctl daemon-reload
  systemctl enable weft.service
  systemctl restart weft.service
  echo "weft installed and running (systemctl status weft)"
else
  echo "weft installed under $root; enable it with: systemctl enable --now weft.service"
fi
