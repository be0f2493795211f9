#!/usr/bin/env bash
# Builds the pod VM's guest: an uncompressed PVH `vmlinux` compiled from Debian's
# linux-source-6.1 with guest/kernel.config (everything a pod needs built in, no
# modules) and an uncompressed newc `initrd.img` whose only file is /init, a static
# vessel-agent. Output in $VESSEL_GUEST_DIR (default /usr/share/vessel): vmlinux,
# initrd.img, guest.json.
#
# Both files are reproducible byte for byte (fixed build timestamp, user and host for
# the kernel; sorted entries, fixed mtimes and owners for the initrd). The kernel is
# compiled once per (source package, config fragment, patches, kernel build steps) and kept in
# build/cache/kernel-<key>; nothing is rebuilt when the inputs are unchanged.
# Needs: apt-get, dpkg-deb, xz, a C toolchain with bc, bison, flex and libelf (the
# kernel build), cpio, strip, cargo.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${VESSEL_GUEST_DIR:-/usr/share/vessel}
cache="$repo/build/cache"
target_dir=${CARGO_TARGET_DIR:-$repo/target}
triple=x86_64-unknown-linux-gnu
fragment="$repo/guest/kernel.config"
# The kernel source package; its version pins the kernel.
SOURCE_PACKAGE=linux-source-6.1

log() { echo "build-guest: $*" >&2; }
hash() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$cache" "$out"

# --- 1. kernel source package: the candidate version, its .deb cached
src_version=$(apt-cache policy "$SOURCE_PACKAGE" 2>/dev/null | sed -n 's/^ *Candidate: \(.*\)$/\1/p')
if [ -z "$src_version" ] || [ "$src_version" = "(none)" ]; then
  # Offline or no package lists: use a .deb already in the cache.
  deb=$(ls "$cache/${SOURCE_PACKAGE}"_*_all.deb 2>/dev/null | LC_ALL=C sort -V | tail -n1 || true)
  [ -n "$deb" ] || { log "cannot resolve $SOURCE_PACKAGE (run apt-get update?)"; exit 1; }
else
  deb="$cache/${SOURCE_PACKAGE}_${src_version//:/%3a}_all.deb"
  if [ ! -f "$deb" ]; then
    log "downloading $SOURCE_PACKAGE $src_version"
    (cd "$cache" && apt-get download -q "$SOURCE_PACKAGE=$src_version" 2>&1 |
      grep -v '^W: Download is performed unsandboxed' >&2 || true)
    [ -f "$deb" ] || { log "apt-get download $SOURCE_PACKAGE=$src_version failed"; exit 1; }
  fi
fi

# --- 2. the kernel, cached by its inputs. This section of the script is part of the
# key, so changing how the kernel is built rebuilds it; the rest of the script is not.
deb_hash=$(hash "$deb")
fragment_hash=$(hash "$fragment")
# vessel's own kernel changes, applied in name order (guest/patches/*.patch).
shopt -s nullglob
patches=("$repo"/guest/patches/*.patch)
shopt -u nullglob
patches_hash=$(cat /dev/null "${patches[@]}" | sha256sum | cut -d' ' -f1)
kernel_steps_hash=$(sed -n '/^# --- 2\. the kernel/,/^# --- 3\./p' "$0" | sha256sum | cut -d' ' -f1)
kernel_key=$(printf '%s %s %s %s' "$deb_hash" "$fragment_hash" "$patches_hash" "$kernel_steps_hash" |
  sha256sum | cut -c1-16)
kdir="$cache/kernel-$kernel_key"
if [ ! -f "$kdir/vmlinux" ]; then
  log "building the guest kernel from $(basename "$deb") (a few minutes)"
  kwork="$cache/kernel-build"
  rm -rf "$kwork"
  mkdir -p "$kwork/obj"
  dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards './usr/src/linux-source-*.tar.xz' |
    xz -dc | tar -x -C "$kwork"
  ksrc=$(ls -d "$kwork"/linux-source-* | head -n1)
  for p in "${patches[@]}"; do
    patch -s -p1 -d "$ksrc" <"$p" || { log "patch $(basename "$p") does not apply"; exit 1; }
  done
  # Fixed identity and time: the same inputs give the same vmlinux.
  # (the time stamp is the source tarball's, from the package)
  KBUILD_BUILD_TIMESTAMP="$(dpkg-deb -c "$deb" | awk '/linux-source-.*\.tar\.xz$/ { print $4 " " $5 " UTC"; exit }')"
  export KBUILD_BUILD_TIMESTAMP
  export KBUILD_BUILD_USER=vessel KBUILD_BUILD_HOST=vessel KBUILD_BUILD_VERSION=1
  kmake() { make -s -C "$ksrc" O="$kwork/obj" "$@"; }
  kmake tinyconfig >/dev/null
  "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$kwork/obj" "$kwork/obj/.config" "$fragment" >/dev/null
  kmake olddefconfig
  # Every option the fragment sets must survive olddefconfig: a silently dropped one
  # (a missing dependency) would be a feature the pods lack.
  bad=0
  while IFS= read -r line; do
    opt=${line%%=*}
    val=${line#*=}
    if [ "$val" = n ]; then
      ! grep -q "^$opt=" "$kwork/obj/.config" || { log "$opt is set, the fragment says n"; bad=1; }
    else
      grep -qxF "$line" "$kwork/obj/.config" || { log "$line did not take (unmet dependency?)"; bad=1; }
    fi
  done < <(grep -E '^CONFIG_[A-Z0-9_]+=' "$fragment")
  [ "$bad" = 0 ] || exit 1
  kmake -j"$(nproc)" vmlinux
  mkdir -p "$kdir.tmp"
  # The symbol table is not loaded into the guest; dropping it halves the file.
  objcopy --strip-all "$kwork/obj/vmlinux" "$kdir.tmp/vmlinux"
  cp "$kwork/obj/.config" "$kdir.tmp/config"
  kmake -s kernelrelease >"$kdir.tmp/release"
  rm -rf "$kdir" && mv "$kdir.tmp" "$kdir"
  # Sources and objects are 1.5 GB: keep only the result.
  rm -rf "$kwork"
fi
kver=$(cat "$kdir/release")

# --- 3. the agent, static, built for size (the `guest` profile in Cargo.toml)
log "building vessel-agent (static)"
# libseccomp-sys links the shared library unless told otherwise.
(cd "$repo" && CARGO_TARGET_DIR="$target_dir" RUSTFLAGS='-C target-feature=+crt-static' \
  LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
  cargo build -q --profile guest -p vessel-agent --target "$triple")
agent="$target_dir/$triple/guest/vessel-agent"
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

# --- 4. up to date?
agent_hash=$(hash "$agent")
script_hash=$(hash "$0")
stamp="kernel=$kernel_key agent=$agent_hash script=$script_hash"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] &&
  [ -f "$out/vmlinux" ] && [ -f "$out/initrd.img" ] && [ -f "$out/guest.json" ]; then
  log "up to date in $out"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "kernel $kver"
root="$work/root"
mkdir -p "$root"

# --- 5. the root: /init and empty mount points
# Stripped: a smaller initrd unpacks faster at boot.
strip -o "$root/init" "$agent"
chmod 0755 "$root/init"
for d in dev proc sys tmp run etc; do mkdir -p "$root/$d"; done
chmod 1777 "$root/tmp"

# --- 6. reproducible newc cpio (uncompressed: TCG boots it faster than unpacking)
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --reproducible --owner=0:0 --quiet) >"$work/initrd.img"

# --- 7. install atomically
install -m 0644 "$kdir/vmlinux" "$out/vmlinux.tmp" && mv -f "$out/vmlinux.tmp" "$out/vmlinux"
install -m 0644 "$work/initrd.img" "$out/initrd.img.tmp" && mv -f "$out/initrd.img.tmp" "$out/initrd.img"
cat >"$out/guest.json.tmp" <<EOF
{
  "kernel_version": "$kver",
  "kernel_source_package": "$(basename "$deb")",
  "kernel_source_deb_sha256": "$deb_hash",
  "kernel_config_sha256": "$fragment_hash",
  "agent_sha256": "$agent_hash",
  "agent_version": "$agent_version",
  "build_script_sha256": "$script_hash",
  "vmlinux_sha256": "$(hash "$out/vmlinux")",
  "initrd_sha256": "$(hash "$out/initrd.img")"
}
EOF
mv -f "$out/guest.json.tmp" "$out/guest.json"
echo "$stamp" >"$out/.stamp"
log "wrote $out/vmlinux ($(stat -c%s "$out/vmlinux") bytes), $out/initrd.img ($(stat -c%s "$out/initrd.img") bytes)"
