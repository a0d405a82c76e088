#!/usr/bin/env bash
# Builds a Debian (bookworm) VM that boots from its own disk, as cloud images
# do: an MBR disk with one ext4 partition holding debootstrap's system, Debian's
# kernel and initramfs, and GRUB in the MBR (firmware → GRUB → kernel), stored
# as qcow2 under target/images/debian-boot/disk.qcow2 (cached: rebuilt only
# when this script or perf/images/guest/* change).
#
# The guest runs the test VM's workload as a systemd service: es-workload
# keeps writing to /mnt/es, TCP 7000 streams its counter, TCP 7001 checks the
# disk (perf/images/guest/), with a static address (EDGESHIFT_GUEST_IP,
# default 198.19.2.100/24, the migration tests' VM address) on eth0, and
# prints "edgeshift-guest: ready" on the serial console.
#
# Needs root (debootstrap, chroot), debootstrap, qemu-img, and the Debian
# mirror (EDGESHIFT_DEBIAN_MIRROR, default http://deb.debian.org/debian, the
# one perf/images/build-debian-images.sh uses). Prints the output directory on
# its last line of stdout; progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${EDGESHIFT_DEBIAN_BOOT_DIR:-$repo/target/images/debian-boot}
mirror=${EDGESHIFT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
guest_ip=${EDGESHIFT_GUEST_IP:-198.19.2.100/24}
suite=bookworm
size_mib=2048
include=linux-image-amd64,grub-pc,systemd-sysv,udev,iproute2,ifupdown,procps,busybox,kmod

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for tool in debootstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || die "$tool missing: run .ci/setup"
done

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
stamp=$( (cat "$0" "$here"/guest/es-*; echo "$guest_ip $mirror") | sha256sum | cut -d' ' -f1)
if [ -f "$out/disk.qcow2" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$out"
  exit 0
fi

work=$(mktemp -d "$out/.work.XXXXXX")
cleanup() {
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "debootstrap --variant=minbase $suite with a kernel and GRUB from $mirror (a few minutes)"
started=$SECONDS
DEBIAN_FRONTEND=noninteractive debootstrap --variant=minbase --include="$include" \
  "$suite" "$work/tree" "$mirror" > "$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $((SECONDS - started)) s; $(du -shx "$work/tree" | cut -f1) of files"

tree=$work/tree
kver=$(ls "$tree/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -n1)
[ -n "$kver" ] || die "no kernel in the tree"
[ -f "$tree/boot/initrd.img-$kver" ] || die "no initramfs for $kver"
uuid=$(cat /proc/sys/kernel/random/uuid)

echo edgeshift-debian > "$tree/etc/hostname"
echo "UUID=$uuid / ext4 defaults 0 1" > "$tree/etc/fstab"
printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet static\n  address %s\n' \
  "$guest_ip" > "$tree/etc/network/interfaces"
# No password is needed: nothing logs in (the serial console shows the boot).
install -m 0755 "$here"/guest/es-workload "$here"/guest/es-counter "$here"/guest/es-check "$tree/usr/local/bin/"
# The guest scripts use busybox's applets (usleep, nc -ll -e).
cat > "$tree/usr/local/bin/es-guest" <<'EOF'
#!/bin/sh
# The test workload and its two TCP services (perf/images/guest/).
mkdir -p /opt/busybox /run/es /mnt/es
busybox --install -s /opt/busybox
export PATH=/usr/local/bin:/opt/busybox:$PATH
es-workload &
nc -ll -p 7000 -e es-counter &
nc -ll -p 7001 -e es-check &
echo "edgeshift-guest: ready ip=$(ip -4 -o addr show eth0 | awk '{print $4}')" > /dev/console
wait
EOF
chmod 0755 "$tree/usr/local/bin/es-guest"
cat > "$tree/etc/systemd/system/es-guest.service" <<'EOF'
[Unit]
Description=edgeshift test workload
After=networking.service local-fs.target
Wants=networking.service

[Service]
ExecStart=/usr/local/bin/es-guest
Restart=no

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/es-guest.service "$tree/etc/systemd/system/multi-user.target.wants/es-guest.service"
# GRUB's menu, written here (grub-mkconfig would probe the build host's loop devices).
mkdir -p "$tree/boot/grub"
cat > "$tree/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "Debian $kver" {
  insmod part_msdos
  insmod ext2
  search --no-floppy --fs-uuid --set=root $uuid
  linux /boot/vmlinuz-$kver root=UUID=$uuid ro console=ttyS0 net.ifnames=0 quiet
  initrd /boot/initrd.img-$kver
}
EOF
rm -rf "$tree/var/cache/apt/archives/"*.deb "$tree/var/lib/apt/lists/"*

# GRUB's core image, made in the tree (its modules inside, the menu found by
# prefix), and the modules beside the menu for anything it loads later.
# grub-install is not used: it would probe the build host's loop devices.
grub_mods="biosdisk part_msdos ext2 normal linux search search_fs_uuid serial terminal configfile echo test gzio"
# shellcheck disable=SC2086 # the module list is space-separated on purpose
LC_ALL=C chroot "$tree" grub-mkimage -O i386-pc -o /core.img -p "(hd0,msdos1)/boot/grub" $grub_mods \
  > "$work/grub.log" 2>&1 || { cat "$work/grub.log" >&2; die "grub-mkimage failed"; }
mv "$tree/core.img" "$work/core.img"
mkdir -p "$tree/boot/grub/i386-pc"
cp "$tree"/usr/lib/grub/i386-pc/*.mod "$tree"/usr/lib/grub/i386-pc/*.lst "$tree/boot/grub/i386-pc/"
[ "$(stat -c %s "$work/core.img")" -lt $((2047 * 512)) ] || die "GRUB's core image does not fit before the partition"

log "a ${size_mib} MiB disk: MBR with GRUB, one bootable ext4 partition from sector 2048"
raw=$work/disk.raw
truncate -s "${size_mib}M" "$raw"
sectors=$((size_mib * 2048 - 2048))
# MBR: GRUB's boot sector code (440 bytes), then one partition entry:
# bootable, CHS fields unused (0xfe/0xff), type 0x83, LBA start and sector
# count little-endian; then the 0x55aa signature. GRUB's core image goes in
# the gap before the partition (sector 1, where boot.img looks by default).
dd if="$tree/usr/lib/grub/i386-pc/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
entry="\\x80\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff$(le32 2048)$(le32 "$sectors")"
printf "$entry" | dd of="$raw" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$raw" bs=1 seek=510 conv=notrunc status=none
dd if="$work/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none
# The file system straight into the partition's bytes (no loop device).
mkfs.ext4 -q -F -U "$uuid" -L edgeshift-debian -E offset=$((2048 * 512)),lazy_itable_init=0,lazy_journal_init=0 \
  -d "$tree" "$raw" "$((sectors / 2))k"

log "qcow2"
qemu-img convert -q -O qcow2 "$raw" "$out/disk.qcow2.tmp"
mv "$out/disk.qcow2.tmp" "$out/disk.qcow2"
echo "$kver" > "$out/kernel-version"
echo "$stamp" > "$out/stamp"
log "done: $(du -h "$out/disk.qcow2" | cut -f1) qcow2, kernel $kver"
echo "$out"
