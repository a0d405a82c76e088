// SPDX-License-Identifier: GPL-2.0
//
// edgeshift dirty-rate tracker: counts writes and written bytes per
// (block device, chunk index) for the devices the agent watches.
//
// Hook: the `block:block_bio_queue` tracepoint (attached as tp_btf). It
// fires once per bio when the bio is submitted to a device, before the block
// layer splits or merges it, and it fires for bio-based devices too (device-mapper LVs, which never
// issue requests). `block:block_rq_issue` fires only for request-based
// devices and after merging/splitting (a 1 MiB direct write to a loop device
// shows up as one bio_queue event but two rq_issue events here), so it would
// miss LVs and count what the scheduler did rather than what the guest wrote.
//
// The map layout below must match ebpf/src/lib.rs (checked by its tests).

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define SECTOR_SHIFT 9
// A bio touching more chunks than this counts only its first MAX_SPAN_CHUNKS
// chunks and adds one to `truncated`: a bounded loop keeps the verifier happy.
// 1024 chunks of the smallest chunk size (4 KiB) is 4 MiB, more than the
// largest write bio a loop/nbd/dm device accepts by default.
#define MAX_SPAN_CHUNKS 1024

// Watched devices. The agent watches one or a few devices (a VM's disks),
// while the hook fires for every bio of every device on the host, so the
// lookup "is this device watched?" is on everyone's path. It is a table of
// INLINE_WATCHED entries scanned inline (one array lookup, inlined by the
// verifier into an address computation, then a few compares), not a hash
// lookup: a hash lookup cost ~47 ns per bio here, the scan a few ns.
// Devices past INLINE_WATCHED go to the WATCHED_MORE hash, which the program
// consults only once `overflow` is set.
#define INLINE_WATCHED 8

// Where a device's counters start in CHUNKS and how many chunks the device
// has (its size when the agent started watching).
struct chunk_range {
	__u32 base;
	__u32 chunks;
};

// One inline entry. `base` and `chunks` are written once, before `dev` is
// published; afterwards only `dev` changes (0 while unwatched: no block
// device is 0:0), so the program never sees a half-written entry.
struct watched_dev {
	__u32 dev;
	__u32 base;
	__u32 chunks;
};

// The array holding it is mmapable, so its value starts on a page: the
// header and the first entries share one cache line, the only line of the
// table a bio of a watched device touches.
struct watch_table {
	__u32 used;        // entries [0, used) have been published
	__u32 overflow;    // nonzero once a device lives in WATCHED_MORE
	__u32 chunk_shift; // log2 of the chunk size, set before any entry
	__u32 reserved;
	struct watched_dev devs[INLINE_WATCHED];
};

struct chunk_counts {
	__u64 writes;
	__u64 bytes;
};

// Touched only off the common path (a counted one-chunk write never reads
// or writes it: one cache line less per event). The agent derives the
// number of write bios from it and the counters: every bio adds one chunk
// update (counted in CHUNKS or in `dropped`) plus `extra_chunks` more.
struct tracker_stats {
	__u64 dropped;      // chunk updates with no counter (past the device's range)
	__u64 truncated;    // bios wider than MAX_SPAN_CHUNKS chunks
	__u64 extra_chunks; // chunk updates beyond the first of multi-chunk bios
};

// The inline table: one element, mapped read-write by the agent, which
// publishes entries with release stores.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct watch_table);
} WATCH_TABLE SEC(".maps");

// Watched devices that did not fit in the inline table: kernel dev_t -> range.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct chunk_range);
} WATCHED_MORE SEC(".maps");

// One counter pair per chunk of every watched device, at its range base +
// chunk index: a dense array, so an update is an inlined address
// computation and two atomic adds, not a hash lookup (a per-CPU hash cost
// ~3x more per event here, measured with the kernel's BPF run-time stats).
// Atomic adds lose no increment under concurrent writers; the agent reads
// the array through mmap without a syscall per chunk. max_entries is set
// by the loader to the watched devices' chunk count.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct chunk_counts);
} CHUNKS SEC(".maps");

// Plain adds on this CPU's copy of the stats: the kernel never runs a
// tracing program nested on one CPU (per-CPU recursion guard) and the
// program cannot migrate while it runs.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tracker_stats);
} STATS SEC(".maps");

// Operations that change a chunk's bytes (enum req_op in
// include/linux/blk_types.h; the op is the low REQ_OP_BITS = 8 bits of
// bi_opf). The ftrace fallback reads the same as rwbs 'W' and 'D'.
#define REQ_OP_MASK_BITS 0xff
#define OP_WRITE 1
#define OP_DISCARD 3
#define OP_SECURE_ERASE 5

// Counts a bio over bytes [start, end) that spans several chunks: the rare
// case, kept out of the common path. BPF passes at most 5 arguments: the
// device's range comes packed as chunks << 32 | base, first and last are
// recomputed here.
static __noinline void count_span(__u64 range, __u64 start, __u64 end, __u32 shift)
{
	__u32 zero = 0;
	struct tracker_stats *stats = bpf_map_lookup_elem(&STATS, &zero);
	if (!stats)
		return;
	__u32 base = (__u32)range;
	__u32 dev_chunks = (__u32)(range >> 32);
	__u64 first = start >> shift;
	__u64 last = (end - 1) >> shift;
	__u64 updates = last - first + 1;
	if (updates > MAX_SPAN_CHUNKS) {
		stats->truncated += 1;
		updates = MAX_SPAN_CHUNKS;
	}
	// Before the chunk updates: a reading taken meanwhile under-counts the
	// bios for a moment rather than over-counting them.
	stats->extra_chunks += updates - 1;
	for (__u32 i = 0; i < MAX_SPAN_CHUNKS; i++) {
		__u64 chunk = first + i;
		if (chunk > last)
			break;
		if (chunk >= dev_chunks) {
			// The device grew after it was watched: no counter for this chunk.
			stats->dropped += 1;
			continue;
		}
		// Bytes of this bio that fall inside this chunk.
		__u64 lo = chunk << shift;
		__u64 hi = lo + (1ULL << shift);
		if (lo < start)
			lo = start;
		if (hi > end)
			hi = end;
		__u32 slot = base + (__u32)chunk;
		struct chunk_counts *c = bpf_map_lookup_elem(&CHUNKS, &slot);
		if (!c) {
			stats->dropped += 1; // slot past the array: a loader bug, still counted
			continue;
		}
		__sync_fetch_and_add(&c->writes, 1);
		__sync_fetch_and_add(&c->bytes, hi - lo);
	}
}

// A BTF-typed raw tracepoint (tp_btf) on block_bio_queue: the program gets
// the struct bio itself, so the kernel formats no trace record and goes
// through no perf event per bio, as a classic tracepoint program would.
// Fields are read directly (BTF pointers), relocated by CO-RE.
//
// Order of the tests: the op first (reads, flushes: out at the first
// branch), then the watched-device scan (writes to other devices: out after
// a few compares), then the counting.
SEC("tp_btf/block_bio_queue")
int BPF_PROG(dirty_bio_queue, struct bio *bio)
{
	__u32 op = bio->bi_opf & REQ_OP_MASK_BITS;
	if (op != OP_WRITE && op != OP_DISCARD && op != OP_SECURE_ERASE)
		return 0;

	__u32 zero = 0;
	struct watch_table *table = bpf_map_lookup_elem(&WATCH_TABLE, &zero);
	if (!table)
		return 0;
	__u32 used = *(volatile __u32 *)&table->used;
	__u32 dev = bio->bi_bdev->bd_dev;
	__u32 base, dev_chunks;
#pragma unroll
	for (__u32 i = 0; i < INLINE_WATCHED; i++) {
		if (i >= used)
			break;
		struct watched_dev *w = &table->devs[i];
		if (*(volatile __u32 *)&w->dev == dev) {
			base = w->base;
			dev_chunks = w->chunks;
			goto watched;
		}
	}
	if (!*(volatile __u32 *)&table->overflow)
		return 0;
	struct chunk_range *r = bpf_map_lookup_elem(&WATCHED_MORE, &dev);
	if (!r)
		return 0;
	base = r->base;
	dev_chunks = r->chunks;

watched:;
	__u32 size = bio->bi_iter.bi_size;
	if (size == 0)
		return 0; // an empty preflush carries no data

	__u32 shift = table->chunk_shift;
	__u64 start = bio->bi_iter.bi_sector << SECTOR_SHIFT;
	__u64 end = start + size;
	__u64 first = start >> shift;
	__u64 last = (end - 1) >> shift;
	if (first != last) {
		count_span((__u64)dev_chunks << 32 | base, start, end, shift);
		return 0;
	}
	// The common case: the whole bio inside one chunk. A slot past the
	// device's range (it grew after it was watched) or past the array (a
	// loader bug) has no counter: counted as dropped.
	__u32 slot = base + (__u32)first;
	struct chunk_counts *c = first < dev_chunks ? bpf_map_lookup_elem(&CHUNKS, &slot) : NULL;
	if (!c) {
		struct tracker_stats *stats = bpf_map_lookup_elem(&STATS, &zero);
		if (stats)
			stats->dropped += 1;
		return 0;
	}
	__sync_fetch_and_add(&c->writes, 1);
	__sync_fetch_and_add(&c->bytes, size);
	return 0;
}
