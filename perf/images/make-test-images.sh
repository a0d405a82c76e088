#!/usr/bin/env bash
# Builds the slicer's test and benchmark images under target/images/slice/
# (cached: an image is rebuilt only when this script changes). Each image is
# an ext4 file system filled by mkfs.ext4 -d with real files of this machine,
# taken in path order from a few directories up to a byte budget; its free
# space stays zero, as in a real disk image. A *-derived image is a copy of its
# base changed with debugfs the way an update changes a disk: some files
# removed, some rewritten, new ones added, so the pair shares most chunks.
#
#   small-base.img, small-derived.img   48 MiB + 12345 bytes (not a multiple
#                                       of any chunk size), for the tests
#   aligned.img                         32 MiB exactly (a multiple of every
#                                       chunk size up to 16 MiB), for the tests
#   dedup-base.img, dedup-derived.img   384 MiB, for the chunk-size table
#   bench.img                           1.5 GiB, for slice-bench
#
# Usage: make-test-images.sh [small|dedup|bench|all]   (default: small)
# Prints the output directory on its last line. Needs mkfs.ext4 and debugfs
# (e2fsprogs); no root, no mount.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${EDGESHIFT_SLICE_IMAGES:-$repo/target/images/slice}
what=${1:-small}
mkdir -p "$out"
stamp=$(sha256sum "$0" | cut -c1-16)

# Tests run in parallel: one builder at a time, the others wait and reuse.
exec 9>"$out/.lock"
flock 9
rm -rf "$out"/.work.*  # left by a builder that was killed

# file_list BUDGET_BYTES DIR... : regular files without odd characters, in
# path order, until the budget (in 4 KiB blocks) is spent. Prints "size path" lines.
file_list() {
  local budget=$1; shift
  # One path per inode: hard links (Mesa's dri drivers are one file under
  # many names) would otherwise count many times but be stored once.
  find "$@" -xdev -type f -size +0 -printf '%s %i %p\n' 2>/dev/null \
    | grep -E '^[0-9]+ [0-9]+ [A-Za-z0-9_./+-]+$' | sort -k3 \
    | awk -v b="$budget" '
      stop { next }
      seen[$2]++ { next }
      { s = int(($1 + 4095) / 4096) * 4096 }  # blocks it will take
      t + s > b { stop = 1; next }
      { t += s; print $1, $3 }'
}

# stage LIST DIR : copies (hard links where possible) the listed files into DIR.
stage() {
  local list=$1 dir=$2
  rm -rf "$dir"; mkdir -p "$dir"
  cut -d' ' -f2- "$list" | while read -r f; do
    mkdir -p "$dir$(dirname "$f")"
    ln "$f" "$dir$f" 2>/dev/null || cp "$f" "$dir$f"
  done
}

# make_fs NAME BYTES BUDGET DIR... : an ext4 image of exactly BYTES bytes.
make_fs() {
  local name=$1 bytes=$2 budget=$3; shift 3
  local img=$out/$name
  [ -f "$img" ] && [ "$(cat "$img.stamp" 2>/dev/null)" = "$stamp" ] && return 0
  local work; work=$(mktemp -d "$out/.work.XXXXXX")
  file_list "$budget" "$@" > "$work/list"
  stage "$work/list" "$work/root"
  cp "$work/list" "$out/$name.files"
  truncate -s "$bytes" "$work/img"
  # Fixed UUID and hash seed: the same files give the same image layout.
  mkfs.ext4 -q -F -b 4096 -m 0 -i 8192 -U 6d2d4c3e-0000-4000-8000-00000000e5f1 \
    -E hash_seed=6d2d4c3e-0000-4000-8000-00000000e5f2,root_owner=0:0,nodiscard \
    -d "$work/root" "$work/img"
  mv "$work/img" "$img"
  echo "$stamp" > "$img.stamp"
  rm -rf "$work"
}

# derive BASE NAME ADD_BUDGET ADD_DIR : BASE with every 29th file removed,
# every 41st rewritten (a header line prepended) and new files added.
derive() {
  local base=$out/$1 name=$2 budget=$3 adddir=$4
  local img=$out/$name
  [ -f "$img" ] && [ "$(cat "$img.stamp" 2>/dev/null)" = "$stamp" ] && return 0
  local work; work=$(mktemp -d "$out/.work.XXXXXX")
  cp --sparse=always "$base" "$work/img"
  : > "$work/cmds"
  local n=0
  while read -r _ f; do
    n=$((n + 1))
    if (( n % 29 == 0 )); then
      echo "rm $f" >> "$work/cmds"
    elif (( n % 41 == 0 )); then
      { echo "edgeshift derived image: rewritten $f"; cat "$f"; } > "$work/rw.$n"
      echo "rm $f" >> "$work/cmds"
      echo "write $work/rw.$n $f" >> "$work/cmds"
    fi
  done < "$base.files"
  echo "mkdir /added" >> "$work/cmds"
  local i=0
  file_list "$budget" "$adddir" | while read -r _ f; do
    i=$((i + 1))
    echo "write $f /added/$i.$(basename "$f")"
  done >> "$work/cmds"
  debugfs -w -f "$work/cmds" "$work/img" > "$work/log" 2>&1
  # debugfs echoes each command and reports inodes it allocates; anything
  # else it says is a failure.
  if grep -vE '^(debugfs( [0-9.]+ \(.*\)|: .*)|Allocated inode: [0-9]+|)$' "$work/log" > "$work/errors"; then
    echo "debugfs failed deriving $name:" >&2; head "$work/errors" >&2
    exit 1
  fi
  e2fsck -fn "$work/img" > /dev/null 2>&1 || { echo "derived $name fails e2fsck" >&2; exit 1; }
  mv "$work/img" "$img"
  echo "$stamp" > "$img.stamp"
  rm -rf "$work"
}

MiB=$((1 << 20))
case "$what" in
  small|all)
    make_fs small-base.img $((48 * MiB + 12345)) $((36 * MiB)) /usr/share/doc /usr/share/man
    derive small-base.img small-derived.img $((3 * MiB)) /usr/share/perl
    make_fs aligned.img $((32 * MiB)) $((20 * MiB)) /usr/share/locale
    ;;&
  dedup|all)
    make_fs dedup-base.img $((384 * MiB)) $((300 * MiB)) /usr/lib/x86_64-linux-gnu /usr/share/doc
    derive dedup-base.img dedup-derived.img $((16 * MiB)) /usr/share/perl
    ;;&
  bench|all)
    make_fs bench.img $((1536 * MiB)) $((1200 * MiB)) /usr/lib/x86_64-linux-gnu /usr/lib/llvm-14 /usr/lib/gcc /usr/share
    ;;
  small|dedup) ;;
  *) echo "usage: $0 [small|dedup|bench|all]" >&2; exit 2 ;;
esac
echo "$out"
