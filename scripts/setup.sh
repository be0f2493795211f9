#!/usr/bin/env bash
# Sets vessel up on a fresh Debian 12 / Ubuntu machine (root): installs every
# dependency, builds and installs vesseld, builds the guest image into
# /usr/share/vessel, and starts vesseld with the default config.
# VESSEL_NO_START=1 skips the start.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release -p vessel-cri
install -m 0755 "${CARGO_TARGET_DIR:-target}/release/vesseld" /usr/local/bin/vesseld
VESSEL_GUEST_DIR=/usr/share/vessel scripts/build-guest.sh

# Pod networking is on only when a CNI config exists: install the default bridge +
# host-local + portmap + loopback network unless one is already configured.
mkdir -p /etc/cni/net.d
if ! compgen -G '/etc/cni/net.d/*.conflist' >/dev/null && ! compgen -G '/etc/cni/net.d/*.conf' >/dev/null; then
  install -m 0644 docs/examples/10-vessel.conflist /etc/cni/net.d/10-vessel.conflist
  echo "installed the default pod network config /etc/cni/net.d/10-vessel.conflist (10.88.0.0/16)"
fi

if [ "${VESSEL_NO_START:-0}" = 1 ]; then
  exit 0
fi
if pgrep -x vesseld >/dev/null; then
  echo "vesseld is already running (pid $(pgrep -x vesseld)); restart it to pick up the new build"
  exit 0
fi
mkdir -p /var/log/vessel
setsid /usr/local/bin/vesseld >>/var/log/vessel/vesseld.log 2>&1 </dev/null &
for _ in $(seq 1 50); do
  [ -S /run/vessel/vessel.sock ] && { echo "vesseld is serving on /run/vessel/vessel.sock (log: /var/log/vessel/vesseld.log)"; exit 0; }
  sleep 0.2
done
echo "vesseld did not create its socket; see /var/log/vessel/vesseld.log" >&2
exit 1
