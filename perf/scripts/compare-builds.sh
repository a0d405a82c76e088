#!/usr/bin/env bash
# Measure two builds of edgeshift side by side in one run: the same
# benchmarks, alternating old and new, so both see the same machine.
#
#   perf/scripts/compare-builds.sh OLD_BIN_DIR NEW_BIN_DIR OUT_DIR [REPEATS]
#
# Each BIN_DIR holds one build's release binaries (edgeshift,
# edgeshift-coordinator, migrate-bench, transfer-bench, slice-bench), e.g. a
# copy of target/release taken at each commit:
#   git worktree add /tmp/old OLD_COMMIT && (cd /tmp/old && cargo build --release --workspace)
# Runs, per repeat and build: migrate-bench --only b,c; transfer-bench
# (equal and unequal paths, one unthrottled pair); slice-bench's speed
# comparison. Then prints a table of the figures (needs python3). Root.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); out=$(realpath -m "$3"); repeats=${4:-2}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
for i in $(seq 1 "$repeats"); do
  for label in old new; do
    dir=$old; [ "$label" = new ] && dir=$new
    run="$out/$label-$i"
    mkdir -p "$run"
    echo "== $(date -u +%T) $label repeat $i: migrate-bench --only b,c" >&2
    "$dir/migrate-bench" --only b,c --out "$run/migrate" >"$run/migrate-bench.log" 2>&1 || echo "migrate-bench failed: $run/migrate-bench.log" >&2
    echo "== $(date -u +%T) $label repeat $i: transfer-bench" >&2
    "$dir/transfer-bench" --out "$run/transfer" >"$run/transfer-bench.log" 2>&1 || echo "transfer-bench failed: $run/transfer-bench.log" >&2
    echo "== $(date -u +%T) $label repeat $i: slice-bench" >&2
    "$dir/slice-bench" --no-dedup --rounds 3 --scratch "target/compare-slice-$label" --out "$run/slice" >"$run/slice-bench.log" 2>&1 || echo "slice-bench failed: $run/slice-bench.log" >&2
    rm -rf "target/compare-slice-$label"
  done
done
python3 - "$out" "$repeats" <<'PY'
import json, os, sys
out, repeats = sys.argv[1], int(sys.argv[2])
def load(p):
    try:
        with open(p) as f: return json.load(f)
    except (OSError, ValueError): return None
print("| build | repeat | b total s | b downtime ms | c total s | c downtime ms | transfer 1/2/3 peers Mbit/s | unequal finish s | unthrottled disk/tmpfs Mbit/s | slice empty / full × b3sum |")
print("|---|---:|---:|---:|---:|---:|---|---:|---|---|")
for i in range(1, repeats + 1):
    for label in ("old", "new"):
        run = os.path.join(out, f"{label}-{i}")
        m = load(os.path.join(run, "migrate/migrate-bench.json")) or {"rows": []}
        rows = {r["scenario"]: r for r in m["rows"]}
        def mig(s, k, fmt):
            r = rows.get(s)
            return fmt.format(r[k]) if r and r.get(k) is not None else "–"
        t = load(os.path.join(run, "transfer/transfer-bench.json")) or {}
        eq = "/".join(f'{p["goodput_mbit_per_s"]:.1f}' for p in t.get("equal_paths_100mbit", [])) or "–"
        un = t.get("unequal_paths_100_50_20") or {}
        unf = f'{un["seconds"]:.2f}' if "seconds" in un else "–"
        pair = {r["destination_store"]: r for r in (t.get("unthrottled_pair") or {}).get("chunk_fetch", [])}
        unt = "/".join(f'{pair[k]["goodput_mbit_per_s"]:.0f}' for k in ("disk", "tmpfs") if k in pair) or "–"
        s = load(os.path.join(run, "slice/slice-bench.json")) or {}
        srows = {r["tool"]: r for r in s.get("speed", {}).get("rows", [])}
        def ratio(tool):
            r = srows.get(tool)
            return f'{r["ratio_to_b3sum"]:.2f}' if r else "–"
        sl = f'{ratio("edgeshift slice (empty store)")} / {ratio("edgeshift slice (full store)")}'
        print(f"| {label} | {i} | {mig('b','total_seconds','{:.2f}')} | {mig('b','downtime_ms','{}')} | "
              f"{mig('c','total_seconds','{:.2f}')} | {mig('c','downtime_ms','{}')} | {eq} | {unf} | {unt} | {sl} |")
PY
