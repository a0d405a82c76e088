//! The eBPF tracker: loads the embedded `dirty.bpf.o` with aya, attaches it
//! to `block:block_bio_queue` (as a BTF-typed raw tracepoint) and reads its
//! counters.
//!
//! Layout: every watched device gets a range of slots in the `CHUNKS` array,
//! one per chunk of the device; the program adds each write into its slot
//! with atomic adds. The agent maps the array read-only into its address
//! space, so a reading costs a memory scan instead of a syscall per chunk.
//!
//! Every kernel object (program, tracepoint link, maps, the mapping) is owned
//! by the [`EbpfTracker`]; dropping it unmaps the array and closes the file
//! descriptors, which detaches the program and frees the maps: nothing is
//! pinned, nothing stays behind.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use aya::programs::BtfTracePoint;
use aya::{Ebpf, EbpfLoader};
use edgeshift_ebpf::{ChunkCounts, TrackerStats, WatchedDev};

use super::{chunk_shift, DeviceId, DirtyError, DirtyTracker, RawChunk, RawCounts, TrackerKind};

/// The object built from `ebpf/src/dirty.bpf.c` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dirty.bpf.o"));

/// Most devices one tracker watches (`max_entries` of `WATCHED` in the C source).
const MAX_WATCHED: usize = 64;

// aya reads and writes map entries as plain bytes of these types; the
// layout types live in the `ebpf` crate, so they are wrapped here.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Watched(WatchedDev);
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Stats(TrackerStats);

// SAFETY: `WatchedDev` is #[repr(C)] of two u32: no padding (size 8 is
// asserted in the ebpf crate); every bit pattern is valid.
unsafe impl aya::Pod for Watched {}
// SAFETY: `TrackerStats` is #[repr(C)] of three u64: no padding, any bits valid.
unsafe impl aya::Pod for Stats {}

/// The `CHUNKS` array mapped read-only: `slots` pairs of (writes, bytes)
/// that the BPF program updates with atomic adds.
struct CounterArray {
    base: NonNull<AtomicU64>,
    slots: usize,
    mapped_len: usize,
}

// SAFETY: the mapping is shared memory that is only ever read through
// atomics; the pointer stays valid until Drop, whichever thread runs it.
unsafe impl Send for CounterArray {}

impl CounterArray {
    fn map(map: &MapData, slots: usize) -> Result<Self, DirtyError> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        let bytes = slots * std::mem::size_of::<ChunkCounts>();
        // The kernel accepts exactly the array's size rounded up to pages.
        let mapped_len = bytes.div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh read-only shared mapping of a BPF array created
        // with BPF_F_MMAPABLE; address chosen by the kernel, length within
        // the array's pages; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyError::Mmap(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| DirtyError::Mmap(std::io::Error::other("mmap returned null")))?;
        Ok(CounterArray {
            base,
            slots,
            mapped_len,
        })
    }

    /// (writes, bytes) of one slot; zeros past the end.
    fn get(&self, slot: usize) -> (u64, u64) {
        if slot >= self.slots {
            return (0, 0);
        }
        // SAFETY: slot < slots, so both words lie inside the mapping, which
        // is page-aligned (so 8-aligned) and lives as long as `self`;
        // AtomicU64 has u64's layout and the kernel writes them atomically.
        let words = unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(slot * 2), 2) };
        (words[0].load(Ordering::Relaxed), words[1].load(Ordering::Relaxed))
    }
}

impl Drop for CounterArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `map` mapped; no reference into
        // it outlives `self` (`get` returns copies).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.mapped_len);
        }
    }
}

/// Per-chunk write counters kept by a BPF program in the kernel.
pub struct EbpfTracker {
    chunk_size: u64,
    capacity: u32,
    next_slot: u32,
    ranges: HashMap<DeviceId, WatchedDev>,
    watched: BpfHashMap<MapData, u32, Watched>,
    watched_count: usize,
    stats: PerCpuArray<MapData, Stats>,
    prog_id: u32,
    map_ids: Vec<u32>,
    // Field order is drop order: unmap, then close the array, then the rest.
    counters: CounterArray,
    _chunks: MapData,
    _bpf: Ebpf,
}

impl EbpfTracker {
    /// Loads and attaches the program. `capacity` is the number of chunk
    /// counters, shared by all devices the tracker will watch (a device of
    /// N bytes needs N / chunk_size of them, rounded up).
    pub fn new(chunk_size: u64, capacity: u32) -> Result<Self, DirtyError> {
        let shift = chunk_shift(chunk_size)?;
        let capacity = capacity.max(1);
        let mut bpf = EbpfLoader::new()
            .set_global(edgeshift_ebpf::CHUNK_SHIFT_GLOBAL, &shift, true)
            .set_max_entries(edgeshift_ebpf::CHUNKS_MAP, capacity)
            .load(OBJECT)?;
        let btf = aya::Btf::from_sys_fs()?;
        let prog: &mut BtfTracePoint = bpf
            .program_mut(edgeshift_ebpf::PROGRAM)
            .ok_or(DirtyError::BpfObject("the program dirty_bio_queue"))?
            .try_into()?;
        prog.load(edgeshift_ebpf::TRACEPOINT.1, &btf)?;
        prog.attach()?;
        let info = prog.info()?;
        let prog_id = info.id();
        let map_ids = info.map_ids()?.unwrap_or_default();

        let take = |bpf: &mut Ebpf, name: &'static str| bpf.take_map(name).ok_or(DirtyError::BpfObject(name));
        let watched = BpfHashMap::try_from(take(&mut bpf, edgeshift_ebpf::WATCHED_MAP)?)?;
        let stats = PerCpuArray::try_from(take(&mut bpf, edgeshift_ebpf::STATS_MAP)?)?;
        let chunks = match take(&mut bpf, edgeshift_ebpf::CHUNKS_MAP)? {
            Map::Array(data) => data,
            _ => return Err(DirtyError::BpfObject("CHUNKS as an array map")),
        };
        let counters = CounterArray::map(&chunks, capacity as usize)?;
        tracing::debug!(
            prog_id,
            ?map_ids,
            chunk_size,
            capacity,
            "dirty BPF program attached"
        );
        Ok(EbpfTracker {
            chunk_size,
            capacity,
            next_slot: 0,
            ranges: HashMap::new(),
            watched,
            watched_count: 0,
            stats,
            prog_id,
            map_ids,
            counters,
            _chunks: chunks,
            _bpf: bpf,
        })
    }

    /// The kernel ids of the program and of its maps, to check with
    /// `bpftool prog show id N` that nothing outlives the tracker.
    pub fn kernel_ids(&self) -> (u32, &[u32]) {
        (self.prog_id, &self.map_ids)
    }

    /// Counters not yet given to a device.
    pub fn free_slots(&self) -> u32 {
        self.capacity - self.next_slot
    }
}

/// Chunks of a device of `bytes` bytes, the last one possibly short.
pub(crate) fn chunks_of(bytes: u64, chunk_size: u64) -> u64 {
    bytes.div_ceil(chunk_size)
}

impl DirtyTracker for EbpfTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Ebpf
    }

    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn watch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        let key = dev.kernel_dev();
        if self.watched.get(&key, 0).is_ok() {
            return Ok(());
        }
        if self.watched_count >= MAX_WATCHED {
            return Err(DirtyError::TooManyDevices(MAX_WATCHED));
        }
        // A device watched before keeps its slots (and its counts).
        let range = match self.ranges.get(&dev) {
            Some(r) => *r,
            None => {
                let need = chunks_of(dev.size()?, self.chunk_size);
                let free = self.free_slots();
                let chunks = u32::try_from(need)
                    .ok()
                    .filter(|&n| n <= free)
                    .ok_or(DirtyError::Capacity { dev, need, free })?;
                let r = WatchedDev {
                    base: self.next_slot,
                    chunks,
                };
                self.next_slot += chunks;
                self.ranges.insert(dev, r);
                r
            }
        };
        self.watched.insert(key, Watched(range), 0)?;
        self.watched_count += 1;
        Ok(())
    }

    fn unwatch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        match self.watched.remove(&dev.kernel_dev()) {
            Ok(()) => {
                self.watched_count = self.watched_count.saturating_sub(1);
                Ok(())
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn read_counts(&mut self) -> Result<RawCounts, DirtyError> {
        let mut out = RawCounts::default();
        for (&dev, range) in &self.ranges {
            for index in 0..range.chunks {
                let (writes, bytes) = self.counters.get((range.base + index) as usize);
                if writes > 0 {
                    out.chunks.push(RawChunk {
                        dev,
                        index: u64::from(index),
                        writes,
                        bytes,
                    });
                }
            }
        }
        let per_cpu = self.stats.get(&0, 0)?;
        for Stats(s) in per_cpu.iter() {
            out.events += s.events;
            out.dropped += s.dropped;
            out.truncated += s.truncated;
        }
        Ok(out)
    }
}
