#!/usr/bin/env bash
# Builds a family of Debian (bookworm) VM disk images with debootstrap, as raw
# ext4 file systems (no partition table), cached under target/images/debian/:
#
#   base.raw        1 GiB: debootstrap --variant=minbase plus a few system
#                   packages; the image every edge is likely to hold
#   nginx.raw       base + nginx
#   postgresql.raw  base + postgresql
#   python3.raw     base + python3
#
# A variant is a copy of base.raw, loop-mounted and changed by apt-get inside a
# chroot, so its files stay where base put them and it shares most chunks with
# base, as a VM disk derived from a common base does. Free blocks are trimmed
# (hole-punched) so deleted temporary files leave zeros, not garbage.
#
# Usage: build-debian-images.sh [base|nginx|postgresql|python3|all]...
#        (default: all). An image that exists is not rebuilt; delete it (or set
#        EDGESHIFT_DEBIAN_REBUILD=1) to rebuild. Prints the output directory on
#        its last line of stdout; progress goes to stderr.
# Needs root (debootstrap, chroot, loop mounts) and network access to the
# Debian mirror (EDGESHIFT_DEBIAN_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${EDGESHIFT_DEBIAN_DIR:-$repo/target/images/debian}
mirror=${EDGESHIFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
size_mib=1024
base_include=systemd-sysv,iproute2,procps,netbase,ifupdown,ca-certificates,less,openssh-server,curl
declare -A variant_pkgs=(
  [nginx]="nginx"
  [postgresql]="postgresql"
  [python3]="python3 python3-venv"
)

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
for tool in debootstrap mkfs.ext4 fstrim losetup; do
  command -v "$tool" >/dev/null || die "$tool missing: run .ci/setup"
done

wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(all)
list=()
for w in "${wanted[@]}"; do
  case "$w" in
    all) list+=(base nginx postgresql python3) ;;
    base|nginx|postgresql|python3) list+=("$w") ;;
    *) die "unknown image '$w' (base, nginx, postgresql, python3, all)" ;;
  esac
done

mkdir -p "$out"
# Parallel callers (tests) wait for one builder and reuse its result.
exec 9>"$out/.lock"
flock 9

mnt=""
loopdev=""
work=""
cleanup() {
  if [ -n "$mnt" ]; then
    for sub in dev/pts dev proc sys; do umount -l "$mnt/$sub" 2>/dev/null || true; done
    umount -l "$mnt" 2>/dev/null || true
    rmdir "$mnt" 2>/dev/null || true
  fi
  [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
  if [ -n "$work" ]; then
    grep -F " $work/" /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r -n1 umount -l || true
    rm -rf --one-file-system "$work"
  fi
  rm -f "$out"/*.raw.tmp
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mount_image FILE : loop-mounts FILE (with discard, for fstrim) at $mnt and
# binds /proc, /sys and /dev so apt and maintainer scripts can run in a chroot.
mount_image() {
  mnt=$(mktemp -d "$out/.mnt.XXXXXX")
  loopdev=$(losetup --find --show "$1")
  mount -o discard "$loopdev" "$mnt"
  mount -t proc proc "$mnt/proc"
  mount -t sysfs sys "$mnt/sys"
  mount --bind /dev "$mnt/dev"
  mount --bind /dev/pts "$mnt/dev/pts"
}

# unmount_image : trims free blocks (holes in the file: zeros) and unmounts.
unmount_image() {
  for sub in dev/pts dev proc sys; do umount "$mnt/$sub"; done
  fstrim "$mnt" >/dev/null
  umount "$mnt"
  rmdir "$mnt"
  mnt=""
  losetup -d "$loopdev"
  loopdev=""
}

# in_chroot CMD... : runs CMD in the mounted image without starting services.
in_chroot() {
  DEBIAN_FRONTEND=noninteractive LC_ALL=C chroot "$mnt" "$@"
}

build_base() {
  local img=$out/base.raw
  work=$(mktemp -d "$out/.work.XXXXXX")
  log "base: debootstrap --variant=minbase $suite from $mirror (a few minutes)"
  local started=$SECONDS
  debootstrap --variant=minbase --include="$base_include" "$suite" "$work/tree" "$mirror" \
    > "$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  log "base: debootstrap done in $((SECONDS - started)) s; $(du -shx "$work/tree" | cut -f1) of files"
  # A usable system: hostname, fstab for the whole-disk root, apt lists dropped
  # (variants fetch their own), no cached .debs.
  echo edgeshift-base > "$work/tree/etc/hostname"
  echo "/dev/vda / ext4 defaults 0 1" > "$work/tree/etc/fstab"
  rm -rf "$work/tree/var/cache/apt/archives/"*.deb "$work/tree/var/lib/apt/lists/"*
  log "base: mkfs.ext4 -d into a ${size_mib} MiB raw image"
  truncate -s "${size_mib}M" "$img.tmp"
  mkfs.ext4 -q -F -L edgeshift-base -E lazy_itable_init=0,lazy_journal_init=0 -d "$work/tree" "$img.tmp"
  rm -rf --one-file-system "$work"; work=""
  mv "$img.tmp" "$img"
}

build_variant() {
  local name=$1 img=$out/$1.raw
  [ -f "$out/base.raw" ] || build_one base
  log "$name: copy of base.raw + apt-get install ${variant_pkgs[$name]}"
  cp --sparse=always "$out/base.raw" "$img.tmp"
  mount_image "$img.tmp"
  # Services must not start inside the chroot.
  printf '#!/bin/sh\nexit 101\n' > "$mnt/usr/sbin/policy-rc.d"
  chmod +x "$mnt/usr/sbin/policy-rc.d"
  in_chroot apt-get -q update > "$out/.$name.log" 2>&1 \
    || { tail -n 20 "$out/.$name.log" >&2; die "$name: apt-get update failed"; }
  # shellcheck disable=SC2086 # package lists are space-separated on purpose
  in_chroot apt-get -q install -y --no-install-recommends ${variant_pkgs[$name]} >> "$out/.$name.log" 2>&1 \
    || { tail -n 20 "$out/.$name.log" >&2; die "$name: apt-get install failed"; }
  in_chroot apt-get clean
  rm -rf "$mnt/var/lib/apt/lists/"* "$mnt/usr/sbin/policy-rc.d"
  echo "edgeshift-$name" > "$mnt/etc/hostname"
  unmount_image
  mv "$img.tmp" "$img"
  rm -f "$out/.$name.log"
}

build_one() {
  local name=$1 img=$out/$1.raw
  if [ -f "$img" ] && [ "${EDGESHIFT_DEBIAN_REBUILD:-0}" != 1 ]; then
    log "$name: cached ($img)"
    return
  fi
  local started=$SECONDS
  case "$name" in
    base) build_base ;;
    *) build_variant "$name" ;;
  esac
  log "$name: built in $((SECONDS - started)) s ($(du -h "$img" | cut -f1) allocated of $(du -h --apparent-size "$img" | cut -f1))"
}

# Left by a builder that was killed: unmount first (a stale mount point may
# still have /dev bound into it), then remove only empty directories.
for stale in "$out"/.mnt.*; do
  [ -d "$stale" ] || continue
  umount -R -l "$stale" 2>/dev/null || true
  rmdir "$stale" 2>/dev/null || die "cannot remove stale mount point $stale; unmount it by hand"
done
for stale in "$out"/.work.*; do
  [ -d "$stale" ] || continue
  # debootstrap may have left proc/sys mounted in its tree.
  grep -F " $stale/" /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$stale"
done
for name in "${list[@]}"; do
  build_one "$name"
  # Rebuild each name at most once per call even with EDGESHIFT_DEBIAN_REBUILD=1.
  [ "$name" = base ] && EDGESHIFT_DEBIAN_REBUILD=0
done
echo "$out"
