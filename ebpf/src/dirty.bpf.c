// SPDX-License-Identifier: GPL-2.0
//
// edgeshift dirty-rate tracker: counts writes and written bytes per
// (block device, chunk index) for the devices the agent watches.
//
// Hook: the `block:block_bio_queue` tracepoint. It fires once per bio when
// the bio is submitted to a device, before the block layer splits or merges
// it, and it fires for bio-based devices too (device-mapper LVs, which never
// issue requests). `block:block_rq_issue` fires only for request-based
// devices and after merging/splitting (a 1 MiB direct write to a loop device
// shows up as one bio_queue event but two rq_issue events here), so it would
// miss LVs and count what the scheduler did rather than what the guest wrote.
//
// The map layout below must match ebpf/src/lib.rs (checked by its tests).

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define SECTOR_SHIFT 9
// A bio touching more chunks than this counts only its first MAX_SPAN_CHUNKS
// chunks and adds one to `truncated`: a bounded loop keeps the verifier happy.
// 1024 chunks of the smallest chunk size (4 KiB) is 4 MiB, more than the
// largest write bio a loop/nbd/dm device accepts by default.
#define MAX_SPAN_CHUNKS 1024

struct chunk_key {
	__u32 dev; // kernel-internal dev_t: major << 20 | minor
	__u32 pad;
	__u64 chunk; // byte offset >> chunk_shift
};

struct chunk_counts {
	__u64 writes;
	__u64 bytes;
};

struct tracker_stats {
	__u64 events;    // write bios counted on watched devices
	__u64 dropped;   // chunk updates lost because CHUNKS was full
	__u64 truncated; // bios wider than MAX_SPAN_CHUNKS chunks
};

// Set by the loader before load (.rodata): log2 of the chunk size.
const volatile __u32 CHUNK_SHIFT = 20;

// Watched devices: kernel dev_t -> 1. Written by the agent only.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} WATCHED SEC(".maps");

// Per-CPU counters: every CPU adds to its own copy, the agent sums them, so
// concurrent writers on different CPUs never race on one counter.
// max_entries is set by the loader.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct chunk_key);
	__type(value, struct chunk_counts);
} CHUNKS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tracker_stats);
} STATS SEC(".maps");

static __always_inline int is_modifying(const char *rwbs)
{
	// rwbs: optional 'F' (preflush), then the op: 'W' write, 'D' discard or
	// secure erase. Both change the chunk's bytes; reads ('R'), pure
	// flushes ("F") and others do not.
	char op = rwbs[0];
	if (op == 'F')
		op = rwbs[1];
	return op == 'W' || op == 'D';
}

SEC("tracepoint/block/block_bio_queue")
int dirty_bio_queue(struct trace_event_raw_block_bio *ctx)
{
	__u32 dev = BPF_CORE_READ(ctx, dev);
	if (!bpf_map_lookup_elem(&WATCHED, &dev))
		return 0;

	char rwbs[4];
	if (bpf_core_read(rwbs, sizeof(rwbs), &ctx->rwbs))
		return 0;
	if (!is_modifying(rwbs))
		return 0;
	__u32 nr_sector = BPF_CORE_READ(ctx, nr_sector);
	if (nr_sector == 0)
		return 0;

	__u32 zero = 0;
	struct tracker_stats *stats = bpf_map_lookup_elem(&STATS, &zero);
	if (!stats)
		return 0;
	__sync_fetch_and_add(&stats->events, 1);

	__u32 shift = CHUNK_SHIFT;
	__u64 start = BPF_CORE_READ(ctx, sector) << SECTOR_SHIFT;
	__u64 end = start + ((__u64)nr_sector << SECTOR_SHIFT);
	__u64 first = start >> shift;
	__u64 last = (end - 1) >> shift;
	if (last - first >= MAX_SPAN_CHUNKS)
		__sync_fetch_and_add(&stats->truncated, 1);

	struct chunk_key key = { .dev = dev };
	for (__u32 i = 0; i < MAX_SPAN_CHUNKS; i++) {
		__u64 chunk = first + i;
		if (chunk > last)
			break;
		// Bytes of this bio that fall inside this chunk.
		__u64 lo = chunk << shift;
		__u64 hi = lo + (1ULL << shift);
		if (lo < start)
			lo = start;
		if (hi > end)
			hi = end;
		key.chunk = chunk;
		struct chunk_counts *c = bpf_map_lookup_elem(&CHUNKS, &key);
		if (c) {
			// Atomic even though per-CPU: a nested invocation on this CPU
			// must not lose an increment either.
			__sync_fetch_and_add(&c->writes, 1);
			__sync_fetch_and_add(&c->bytes, hi - lo);
			continue;
		}
		struct chunk_counts init = { .writes = 1, .bytes = hi - lo };
		long err = bpf_map_update_elem(&CHUNKS, &key, &init, BPF_NOEXIST);
		if (err == -17 /* EEXIST: another CPU inserted it first */) {
			c = bpf_map_lookup_elem(&CHUNKS, &key);
			if (c) {
				__sync_fetch_and_add(&c->writes, 1);
				__sync_fetch_and_add(&c->bytes, hi - lo);
				continue;
			}
		}
		if (err)
			__sync_fetch_and_add(&stats->dropped, 1);
	}
	return 0;
}
