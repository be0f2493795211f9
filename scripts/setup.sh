#!/usr/bin/env bash
# Sets vessel up on a fresh Debian 12 / Ubuntu machine: installs every dependency,
# builds and installs vesseld, builds the guest image into /usr/share/vessel, and
# starts vesseld with the default config: as a systemd service where systemd is
# PID 1 (contrib/systemd/vesseld.service), else in the background, logging to
# /var/log/vessel/vesseld.log (rotated by vesseld at 100 MiB, 5 files kept).
# Runs as root; started by another user it re-runs itself through sudo.
# VESSEL_NO_START=1 skips the start.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "setup.sh: run it as root" >&2; exit 1; }
  # sudo resets PATH (secure_path) and the environment: keep the caller's PATH
  # (it has cargo) and the settings this script reads.
  exec sudo env PATH="$PATH" ${CARGO_TARGET_DIR:+CARGO_TARGET_DIR=$CARGO_TARGET_DIR} \
    ${VESSEL_NO_START:+VESSEL_NO_START=$VESSEL_NO_START} "$0" "$@"
fi
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

report() {
  echo "--- vesseld check ---"
  /usr/local/bin/vesseld check || echo "vesseld check found problems (above); pods may not start until they are fixed"
}

if [ -d /run/systemd/system ] || [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
  install -m 0644 contrib/systemd/vesseld.service /etc/systemd/system/vesseld.service
  systemctl daemon-reload
  systemctl enable vesseld.service
  # restart: picks up a new build; pod VMs survive it (KillMode=process).
  systemctl restart vesseld.service
  echo "vesseld is serving on /run/vessel/vessel.sock (systemctl status vesseld; journalctl -u vesseld)"
  report
  exit 0
fi

# No systemd: start it in the background, logging to a size-capped file.
# The running instance holds a flock on its lock file (other vesselds, such as the
# tests' private ones, use other run_roots and do not count).
lock=/run/vessel/vesseld.lock
if [ -e "$lock" ] && ! flock -n "$lock" true; then
  echo "vesseld is already running (pid $(cat "$lock")); restart it to pick up the new build"
  report
  exit 0
fi
log=/var/log/vessel/vesseld.log
mkdir -p /var/log/vessel
# Only what vesseld prints before its logger starts (a bad config) or a panic lands
# in the .stderr file; the log itself is written and rotated by vesseld.
setsid /usr/local/bin/vesseld --log-file "$log" >/dev/null 2>>"$log.stderr" </dev/null &
for _ in $(seq 1 50); do
  if [ -S /run/vessel/vessel.sock ]; then
    echo "vesseld is serving on /run/vessel/vessel.sock (log: $log)"
    report
    exit 0
  fi
  sleep 0.2
done
echo "vesseld did not create its socket; see $log and $log.stderr" >&2
exit 1
