#!/usr/bin/env bash
# Builds the pod VM's guest: an uncompressed PVH `vmlinux` taken from Debian's
# linux-image-cloud-amd64 and an uncompressed newc `initrd.img` whose /init is a static
# vessel-agent, plus the kernel modules the guest needs. Output in $VESSEL_GUEST_DIR
# (default /usr/share/vessel): vmlinux, initrd.img, guest.json.
#
# The initrd is reproducible byte for byte (sorted entries, fixed mtimes and owners).
# Nothing is rebuilt when the inputs (kernel .deb, agent binary, this script) are
# unchanged. Needs: apt-get, dpkg-deb, depmod (kmod), cpio, lz4/xz/zstd/gzip, strip, cargo.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${VESSEL_GUEST_DIR:-/usr/share/vessel}
cache="$repo/build/cache"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
triple=x86_64-unknown-linux-gnu

# Kernel modules the guest needs (their dependencies are added from modules.dep).
MODULES=(
  virtio_mmio virtio_blk virtio_net virtio_console virtio_balloon
  vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
  fuse virtiofs overlay erofs ext4
)
# Shipped but loaded only on demand (the kernel's request_module runs /sbin/modprobe,
# which is the agent): what a node's kernel offers a privileged container (bridges,
# veths, iptables legacy and nft with nat, conntrack, REDIRECT and TPROXY). One not in
# this kernel is skipped.
ONDEMAND_MODULES=(
  bridge veth br_netfilter
  nfnetlink nf_tables nft_chain_nat nft_nat nft_ct nft_masq nft_redir nft_tproxy
  nft_compat nft_reject_inet nft_fib_inet nf_conntrack nf_nat nf_tproxy_ipv4
  nf_tproxy_ipv6 x_tables ip_tables ip6_tables iptable_nat iptable_filter
  iptable_mangle iptable_raw ip6table_nat ip6table_filter ip6table_mangle ip6table_raw
  xt_REDIRECT xt_TPROXY xt_conntrack xt_MASQUERADE xt_nat xt_mark xt_comment
  xt_socket xt_addrtype xt_multiport xt_tcpudp xt_owner ipt_REJECT ip6t_REJECT
)

log() { echo "build-guest: $*" >&2; }

mkdir -p "$cache" "$out"

# --- 1. kernel package: resolve the metapackage to its versioned package, cache the .deb
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
if [ -z "$kpkg" ]; then
  log "cannot resolve linux-image-cloud-amd64 (run apt-get update?)"
  exit 1
fi
deb=$(ls "$cache/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  log "downloading $kpkg"
  (cd "$cache" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  deb=$(ls "$cache/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
  [ -n "$deb" ] || { log "apt-get download $kpkg failed"; exit 1; }
fi

# --- 2. the agent, static
log "building vessel-agent (static)"
# libseccomp-sys links the shared library unless told otherwise.
(cd "$repo" && CARGO_TARGET_DIR="$target_dir" RUSTFLAGS='-C target-feature=+crt-static' \
  LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
  cargo build -q --release -p vessel-agent --target "$triple")
agent="$target_dir/$triple/release/vessel-agent"
[ -x "$agent" ] || { log "agent binary missing: $agent"; exit 1; }
# The guest has no dynamic loader or libraries: the agent must be fully static.
if LC_ALL=C readelf -dW "$agent" | grep -q '(NEEDED)'; then
  log "agent is not static: $(LC_ALL=C readelf -dW "$agent" | grep '(NEEDED)' | tr -s ' ')"
  exit 1
fi

# The agent's crate version (the workspace's, so vesseld's too): `vesseld check`
# compares it with its own.
agent_version=$(cd "$repo" && cargo pkgid -q -p vessel-agent)
agent_version=${agent_version##*[#@]}

# --- 3. up to date?
hash() { sha256sum "$1" | cut -d' ' -f1; }
deb_hash=$(hash "$deb")
agent_hash=$(hash "$agent")
script_hash=$(hash "$0")
stamp="deb=$deb_hash agent=$agent_hash script=$script_hash"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] &&
  [ -f "$out/vmlinux" ] && [ -f "$out/initrd.img" ] && [ -f "$out/guest.json" ]; then
  log "up to date in $out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$deb" "$work/pkg"
kver=$(ls "$work/pkg/lib/modules" | head -n1)
vmlinuz="$work/pkg/boot/vmlinuz-$kver"
log "kernel $kver"

# --- 4. vmlinux: find the compressed payload inside the bzImage and decompress it.
# Try each known compressor's magic at each offset where it occurs; the payload is the
# first one that decompresses into an ELF image.
extract_vmlinux() {
  local img=$1 dst=$2 magic tool off
  for spec in \
    '\x02\x21\x4c\x18|lz4 -dc' \
    '\x1f\x8b\x08|gzip -dc' \
    '\xfd\x37\x7a\x58\x5a\x00|xz -dc' \
    '\x28\xb5\x2f\xfd|zstd -dc' \
    '\x5d\x00\x00\x00|xz -dc --format=lzma'; do
    magic=${spec%%|*}
    tool=${spec#*|}
    for off in $(LC_ALL=C grep -aboP "$magic" "$img" | cut -d: -f1); do
      tail -c +"$((off + 1))" "$img" | $tool >"$dst" 2>/dev/null || true
      if [ "$(head -c4 "$dst" | od -An -tx1 | tr -d ' ')" = "7f454c46" ]; then
        return 0
      fi
    done
  done
  return 1
}
extract_vmlinux "$vmlinuz" "$work/vmlinux" || { log "no vmlinux payload found in $vmlinuz"; exit 1; }

# --- 5. modules: the wanted ones plus their dependencies, minus built-ins
mods="$work/pkg/lib/modules/$kver"
depmod -b "$work/pkg" "$kver"
root="$work/root"
mkdir -p "$root/lib/modules/$kver"
declare -A picked=()
for m in "${MODULES[@]}"; do
  if grep -qE "/$m\.ko(\.[a-z]+)?$" "$mods/modules.builtin"; then
    continue
  fi
  line=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$mods/modules.dep" || true)
  [ -n "$line" ] || { log "module $m not found"; exit 1; }
  for f in ${line/:/}; do picked[$f]=1; done
done
declare -A boot=()
for f in "${!picked[@]}"; do boot[$f]=1; done
for m in "${ONDEMAND_MODULES[@]}"; do
  if grep -qE "/$m\.ko(\.[a-z]+)?$" "$mods/modules.builtin"; then
    continue
  fi
  line=$(grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$mods/modules.dep" || true)
  [ -n "$line" ] || { log "on-demand module $m not in this kernel; skipped"; continue; }
  for f in ${line/:/}; do picked[$f]=1; done
done
for f in "${!picked[@]}"; do
  dst="$root/lib/modules/$kver/${f%.xz}"
  dst=${dst%.zst}
  mkdir -p "$(dirname "$dst")"
  case $f in
  *.ko.xz) xz -dc "$mods/$f" >"$dst" ;;
  *.ko.zst) zstd -qdc "$mods/$f" >"$dst" ;;
  *) cp "$mods/$f" "$dst" ;;
  esac
done
cp "$mods/modules.builtin" "$mods/modules.builtin.modinfo" "$mods/modules.order" "$root/lib/modules/$kver/"
depmod -b "$root" "$kver"
# What is not needed at boot is loaded on demand only.
for f in "${!picked[@]}"; do
  [ -n "${boot[$f]:-}" ] && continue
  f=${f%.xz}
  echo "${f%.zst}"
done | LC_ALL=C sort >"$root/lib/modules/$kver/modules.ondemand"
# Keep only what the agent reads: modules.dep, modules.alias (text) and the .ko files.
find "$root/lib/modules/$kver" -maxdepth 1 -type f ! -name modules.dep ! -name modules.builtin \
  ! -name modules.alias ! -name modules.ondemand -delete

# --- 6. the rest of the root: /init and empty mount points
# Stripped: a smaller initrd unpacks faster at boot.
strip -o "$root/init" "$agent"
chmod 0755 "$root/init"
for d in dev proc sys tmp run etc sbin; do mkdir -p "$root/$d"; done
ln -s /init "$root/sbin/modprobe"
chmod 1777 "$root/tmp"

# --- 7. reproducible newc cpio (uncompressed: TCG boots it faster than unpacking)
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) >"$work/initrd.img"

# --- 8. install atomically
install -m 0644 "$work/vmlinux" "$out/vmlinux.tmp" && mv -f "$out/vmlinux.tmp" "$out/vmlinux"
install -m 0644 "$work/initrd.img" "$out/initrd.img.tmp" && mv -f "$out/initrd.img.tmp" "$out/initrd.img"
cat >"$out/guest.json.tmp" <<EOF
{
  "kernel_version": "$kver",
  "kernel_package": "$(basename "$deb")",
  "kernel_deb_sha256": "$deb_hash",
  "agent_sha256": "$agent_hash",
  "agent_version": "$agent_version",
  "build_script_sha256": "$script_hash",
  "vmlinux_sha256": "$(hash "$out/vmlinux")",
  "initrd_sha256": "$(hash "$out/initrd.img")",
  "modules": [$(for f in "${!picked[@]}"; do f=${f##*/}; echo "${f%%.ko*}"; done | LC_ALL=C sort | sed 's/.*/"&"/' | paste -sd,)]
}
EOF
mv -f "$out/guest.json.tmp" "$out/guest.json"
echo "$stamp" >"$out/.stamp"
log "wrote $out/vmlinux ($(stat -c%s "$out/vmlinux") bytes), $out/initrd.img ($(stat -c%s "$out/initrd.img") bytes)"
