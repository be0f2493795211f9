#!/usr/bin/env bash
# Installs every host dependency of vessel on Debian 12 / Ubuntu (root). Idempotent:
# a second run installs nothing new.
set -euo pipefail

APT_PACKAGES=(
  build-essential pkg-config protobuf-compiler  # Rust crates: k8s-cri/proto codegen
  libseccomp-dev libcap-ng-dev                  # virtiofsd, vessel-agent (seccomp)
  qemu-system-x86                               # the pod VM
  e2fsprogs                                     # mkfs.ext4: pods' scratch disks (writable layers)
  busybox-static cpio zstd lz4 xz-utils         # guest image + test images
  bc bison flex libelf-dev                      # the guest kernel (scripts/build-guest.sh)
  docker-registry openssl                       # test registry (distribution v2), its TLS certs
  containernetworking-plugins iproute2 iptables # CNI
  nftables                                      # CNI bridge macspoofchk runs `nft`
)
VIRTIOFSD_VERSION=1.14.0
VHOST_DEVICE_VSOCK_VERSION=0.3.0

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (rustup) first" >&2
  exit 1
fi

# Helper daemons of the pod VM, pinned. `cargo install` skips an installed equal version.
cargo_bin=$(dirname "$(command -v cargo)")
install_crate() {
  local crate=$1 version=$2 bin=$3
  if [ -x "$cargo_bin/$bin" ] && cargo install --list | grep -q "^$crate v$version:"; then
    return
  fi
  cargo install --locked "$crate@$version"
}
install_crate virtiofsd "$VIRTIOFSD_VERSION" virtiofsd
install_crate vhost-device-vsock "$VHOST_DEVICE_VSOCK_VERSION" vhost-device-vsock
for bin in virtiofsd vhost-device-vsock; do
  ln -sf "$cargo_bin/$bin" "/usr/local/bin/$bin"
done
