#!/usr/bin/env bash
# Runs vessel's whole test suite (root): installs what is missing, builds the guest
# image into build/guest, then runs every crate's unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
VESSEL_GUEST_DIR="$PWD/build/guest" scripts/build-guest.sh
export VESSEL_GUEST_DIR="$PWD/build/guest"
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
