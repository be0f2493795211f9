#!/usr/bin/env bash
# Runs vessel's whole test suite (root): installs what is missing, builds the guest
# image into build/guest, then runs every crate's unit and integration tests.
# Started by another user it re-runs itself through sudo.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "test.sh: run it as root" >&2; exit 1; }
  # sudo resets PATH (secure_path) and the environment: keep the caller's PATH
  # (it has cargo) and the settings this script reads.
  exec sudo env PATH="$PATH" ${CARGO_TARGET_DIR:+CARGO_TARGET_DIR=$CARGO_TARGET_DIR} \
    ${VESSEL_GUEST_DIR:+VESSEL_GUEST_DIR=$VESSEL_GUEST_DIR} "$0" "$@"
fi
cd "$(dirname "$0")/.."

scripts/install-deps.sh
VESSEL_GUEST_DIR="$PWD/build/guest" scripts/build-guest.sh
export VESSEL_GUEST_DIR="$PWD/build/guest"
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
