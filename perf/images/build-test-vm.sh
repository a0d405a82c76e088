#!/usr/bin/env bash
# Builds the edgeshift test VM under target/images/vm/ (cached; rebuilt only
# when this script or the guest files change):
#   vmlinuz         Debian's kernel (linux-image-amd64), booted directly by QEMU
#   initramfs.gz    busybox-static + the virtio/ext4 modules + perf/images/guest/*
#   base.raw        a 1 GiB raw ext4 disk holding real files (a debootstrap tree
#                   from perf/images/build-debian-images.sh when present, else
#                   a copy of this host's /usr programs), the base other edges hold
# EDGESHIFT_VM_DISK_MIB=N (default 1024) builds a smaller variant into
# target/images/vm-<N>m/ instead: an N MiB ext4 disk filled by mkfs.ext4 -d
# with the Debian base image's files minus /usr/share (docs, locales), so it
# is still derived from the base the other edges hold (the evaluation's
# live sweep uses 192 MiB so QEMU's whole-disk mirror fits its time budget).
# The guest's init mounts /dev/vda, keeps writing to it and serves TCP 7000
# (counter stream) and 7001 (disk check); see perf/images/guest/.
# Prints the output directory on its last line. Needs root (mount of the disk
# is not needed: mkfs.ext4 -d fills it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
disk_mib=${EDGESHIFT_VM_DISK_MIB:-1024}
case "$disk_mib" in ''|*[!0-9]*) echo "EDGESHIFT_VM_DISK_MIB must be a number of MiB, not '$disk_mib'" >&2; exit 2 ;; esac
[ "$disk_mib" -ge 64 ] || { echo "EDGESHIFT_VM_DISK_MIB must be at least 64" >&2; exit 2; }
if [ "$disk_mib" -eq 1024 ]; then
  out=${EDGESHIFT_VM_DIR:-$repo/target/images/vm}
else
  out=${EDGESHIFT_VM_DIR:-$repo/target/images/vm-${disk_mib}m}
fi
mkdir -p "$out"

kver=$(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V | tail -n1)
[ -n "$kver" ] || { echo "no /boot/vmlinuz-*: install linux-image-amd64 (.ci/setup)" >&2; exit 1; }
stamp=$( (cat "$0" "$here"/guest/*; echo "$kver $disk_mib") | sha256sum | cut -d' ' -f1)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/base.raw" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d)
mnt=""
trap '[ -n "$mnt" ] && { umount "$mnt" 2>/dev/null; rmdir "$mnt"; }; rm -rf "$work"' EXIT

# Kernel and modules (virtio and ext4 are modules in Debian's config).
cp "/boot/vmlinuz-$kver" "$out/vmlinuz"
root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,mnt,lib/modules}
cp /bin/busybox "$root/bin/busybox"
file "$root/bin/busybox" 2>/dev/null | grep -q "static" || ldd /bin/busybox 2>&1 | grep -q "not a dynamic" \
  || { echo "/bin/busybox is not static: install busybox-static" >&2; exit 1; }
for m in virtio_pci virtio_blk virtio_net ext4; do
  modprobe -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}' | while read -r ko; do
    name=$(basename "$ko")
    case "$ko" in
      *.ko.xz) xz -dc "$ko" > "$root/lib/modules/${name%.xz}" ;;
      *.ko.zst) zstd -qdc "$ko" > "$root/lib/modules/${name%.zst}" ;;
      *) cp "$ko" "$root/lib/modules/$name" ;;
    esac
  done
done
cp "$here/guest/init" "$root/init"
for f in es-workload es-counter es-check; do cp "$here/guest/$f" "$root/bin/$f"; done
chmod +x "$root/init" "$root"/bin/es-*
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"

# The base disk: real files, as an edge VM's disk would hold.
tree=$work/tree
mkdir -p "$tree"
debian_base=""
for cand in "$repo/target/images/debian/base.raw" "$repo/target/images/base.raw"; do
  [ -f "$cand" ] && debian_base=$cand && break
done
size=$((disk_mib * 1024 * 1024))
if [ "$disk_mib" -ne 1024 ]; then
  # The small variant: the Debian base's files (read-only loop mount) minus
  # /usr/share, else this host's programs, in a disk of the asked size.
  if [ -n "$debian_base" ]; then
    mnt=$(mktemp -d)
    mount -o ro,loop "$debian_base" "$mnt"
    tar -C "$mnt" --exclude=./usr/share --exclude=./lost+found -cf - . | tar -C "$tree" -xf -
    umount "$mnt" && rmdir "$mnt" && mnt=""
  else
    mkdir -p "$tree/usr"
    for d in bin sbin; do cp -a "/usr/$d" "$tree/usr/$d"; done
  fi
  truncate -s "$size" "$out/base.raw.tmp"
  mkfs.ext4 -q -F -L edgeshift-base -E lazy_itable_init=0,lazy_journal_init=0 -d "$tree" "$out/base.raw.tmp"
elif [ -n "$debian_base" ] && [ "$(stat -c %s "$debian_base")" -ge "$size" ]; then
  cp --sparse=always "$debian_base" "$out/base.raw.tmp"
else
  mkdir -p "$tree/usr"
  for d in bin sbin libexec lib/gcc share/doc share/man share/perl5; do
    [ -d "/usr/$d" ] && mkdir -p "$tree/usr/$(dirname "$d")" && cp -a "/usr/$d" "$tree/usr/$d"
  done
  truncate -s "$size" "$out/base.raw.tmp"
  mkfs.ext4 -q -F -L edgeshift-base -E lazy_itable_init=0,lazy_journal_init=0 -d "$tree" "$out/base.raw.tmp"
fi
mv "$out/base.raw.tmp" "$out/base.raw"
echo "$stamp" > "$out/stamp"
echo "$out"
