//! The eBPF tracker: loads the embedded `dirty.bpf.o` with aya, attaches it
//! to `block:block_bio_queue` (as a BTF-typed raw tracepoint) and reads its
//! counters.
//!
//! Layout: every watched device gets a range of slots in the `CHUNKS` array,
//! one per chunk of the device; the program adds each write into its slot
//! with atomic adds. The agent maps the array read-only into its address
//! space, so a reading costs a memory scan instead of a syscall per chunk.
//!
//! Which devices are watched: the first [`INLINE_WATCHED`] devices go into
//! the `WATCH_TABLE` array, which the agent maps read-write and the program
//! scans inline on every write bio (a few ns, where a hash lookup cost ~47
//! ns on every bio of every device). An entry's range is written before its
//! device number is published with a release store, and never changes
//! afterwards (unwatching zeroes only the device number), so the program
//! never matches a half-written entry. Devices past the table go to the
//! `WATCHED_MORE` hash map, which the program consults only once the
//! table's `overflow` flag is set: more devices cost a hash lookup, never a
//! refusal or a silent miss.
//!
//! Every kernel object (program, tracepoint link, maps, the mapping) is owned
//! by the [`EbpfTracker`]; dropping it unmaps the array and closes the file
//! descriptors, which detaches the program and frees the maps: nothing
//! stays behind, unless [`EbpfTracker::pin`] pinned it (a VM's boot log,
//! `boot_log.rs`) for [`unpin`] to remove.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::BtfTracePoint;
use aya::{Ebpf, EbpfLoader};
use edgeshift_ebpf::{
    ChunkCounts, ChunkRange, TrackerStats, WatchTable, INLINE_WATCHED, MAX_OVERFLOW_WATCHED,
};

use super::{chunk_shift, DeviceId, DirtyError, DirtyTracker, RawChunk, RawCounts, TrackerKind};

/// The object built from `ebpf/src/dirty.bpf.c` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dirty.bpf.o"));

/// Attempts at loading the program while the verifier keeps being
/// interrupted: it gives up with EAGAIN whenever the loading thread has a
/// signal pending, which says nothing about the program (libbpf retries 5
/// times for the same reason; aya does not retry).
const LOAD_ATTEMPTS: u32 = 5;

/// Loads the program into the kernel, again while the verifier reports an
/// interruption, and keeps the errno and the verifier's log when it refuses.
fn load_program(prog: &mut BtfTracePoint, btf: &aya::Btf) -> Result<(), DirtyError> {
    load_retrying_interrupted(LOAD_ATTEMPTS, || {
        prog.load(edgeshift_ebpf::TRACEPOINT.1, btf).map_err(|e| match e {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } => LoadFailure::Refused {
                source: io_error,
                log: verifier_log.to_string(),
            },
            other => LoadFailure::Other(other),
        })
    })
}

/// Why one BPF_PROG_LOAD failed.
enum LoadFailure {
    /// The syscall failed: its errno and the verifier's log.
    Refused { source: std::io::Error, log: String },
    /// aya failed before the syscall.
    Other(aya::programs::ProgramError),
}

fn load_retrying_interrupted(
    max_attempts: u32,
    mut load: impl FnMut() -> Result<(), LoadFailure>,
) -> Result<(), DirtyError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match load() {
            Ok(()) => return Ok(()),
            Err(LoadFailure::Refused { source, log }) => {
                let interrupted = matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EINTR));
                if interrupted && attempts < max_attempts {
                    tracing::debug!(attempts, error = %source, "BPF verifier interrupted; loading again");
                    continue;
                }
                return Err(DirtyError::BpfRefused {
                    attempts,
                    source,
                    log,
                });
            }
            Err(LoadFailure::Other(e)) => return Err(e.into()),
        }
    }
}

/// Most devices one tracker watches: the inline table plus `WATCHED_MORE`.
const MAX_WATCHED: usize = INLINE_WATCHED + MAX_OVERFLOW_WATCHED;

// aya reads and writes map entries as plain bytes of these types; the
// layout types live in the `ebpf` crate, so they are wrapped here.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Range(ChunkRange);
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Stats(TrackerStats);

// SAFETY: `ChunkRange` is #[repr(C)] of two u32: no padding (size 8 is
// asserted in the ebpf crate); every bit pattern is valid.
unsafe impl aya::Pod for Range {}
// SAFETY: `TrackerStats` is #[repr(C)] of three u64: no padding, any bits valid.
unsafe impl aya::Pod for Stats {}

/// An mmapable BPF array mapped into this process: memory shared with the
/// program, accessed only through atomics.
struct SharedMapping {
    base: NonNull<u8>,
    /// Bytes of map values (the usable part of the mapping).
    len: usize,
    mapped_len: usize,
}

// SAFETY: the mapping is shared memory that is only ever accessed through
// atomics; the pointer stays valid until Drop, whichever thread runs it.
unsafe impl Send for SharedMapping {}

impl SharedMapping {
    /// Maps the first `len` bytes of values of `map` (created with
    /// BPF_F_MMAPABLE), read-only or read-write.
    fn map(map: &MapData, len: usize, writable: bool) -> Result<Self, DirtyError> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        // The kernel accepts at most the array's size rounded up to pages.
        let mapped_len = len.max(1).div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of a BPF array created with
        // BPF_F_MMAPABLE; address chosen by the kernel, length within the
        // array's pages; the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), mapped_len, prot, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyError::Mmap(std::io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| DirtyError::Mmap(std::io::Error::other("mmap returned null")))?;
        Ok(SharedMapping {
            base,
            len,
            mapped_len,
        })
    }

    /// The `index`-th u64 of the values, if inside them.
    fn u64_at(&self, index: usize) -> Option<&AtomicU64> {
        if index.checked_add(1)?.checked_mul(8)? > self.len {
            return None;
        }
        // SAFETY: the word lies inside the mapping (checked above), which
        // is page-aligned (so 8-aligned) and lives as long as `self`;
        // AtomicU64 has u64's layout and the kernel writes it atomically.
        Some(unsafe { &*self.base.as_ptr().cast::<AtomicU64>().add(index) })
    }

    /// The `index`-th u32 of the values, if inside them.
    fn u32_at(&self, index: usize) -> Option<&AtomicU32> {
        if index.checked_add(1)?.checked_mul(4)? > self.len {
            return None;
        }
        // SAFETY: as in `u64_at`, with 4-byte words.
        Some(unsafe { &*self.base.as_ptr().cast::<AtomicU32>().add(index) })
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `map` mapped; the references
        // handed out borrow `self`, so none outlives it.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.mapped_len);
        }
    }
}

/// The `CHUNKS` array mapped read-only: `slots` pairs of (writes, bytes)
/// that the BPF program updates with atomic adds.
struct CounterArray(SharedMapping);

impl CounterArray {
    fn map(map: &MapData, slots: usize) -> Result<Self, DirtyError> {
        let bytes = slots * std::mem::size_of::<ChunkCounts>();
        Ok(CounterArray(SharedMapping::map(map, bytes, false)?))
    }

    /// (writes, bytes) of one slot; zeros past the end.
    fn get(&self, slot: usize) -> (u64, u64) {
        let word = |i: usize| self.0.u64_at(i).map_or(0, |w| w.load(Ordering::Relaxed));
        (word(slot * 2), word(slot * 2 + 1))
    }
}

/// The `WATCH_TABLE` element mapped read-write: the agent is its only
/// writer, the program reads it on every write bio.
struct InlineTable(SharedMapping);

// u32 word indices of `struct watch_table`'s fields.
const USED_WORD: usize = 0;
const OVERFLOW_WORD: usize = 1;
const CHUNK_SHIFT_WORD: usize = 2;
fn entry_word(entry: usize, field: usize) -> usize {
    4 + entry * 3 + field
}
const DEV_FIELD: usize = 0;
const BASE_FIELD: usize = 1;
const CHUNKS_FIELD: usize = 2;

impl InlineTable {
    fn map(map: &MapData) -> Result<Self, DirtyError> {
        Ok(InlineTable(SharedMapping::map(
            map,
            std::mem::size_of::<WatchTable>(),
            true,
        )?))
    }

    fn word(&self, index: usize) -> &AtomicU32 {
        // Every index used here lies inside the table: entries < INLINE_WATCHED
        // and size_of::<WatchTable>() is asserted in the ebpf crate.
        match self.0.u32_at(index) {
            Some(w) => w,
            None => unreachable!("word {index} outside struct watch_table"),
        }
    }

    /// Writes entry `i` (never published before) and publishes it.
    fn publish(&self, i: usize, dev: u32, range: ChunkRange) {
        self.word(entry_word(i, BASE_FIELD))
            .store(range.base, Ordering::Relaxed);
        self.word(entry_word(i, CHUNKS_FIELD))
            .store(range.chunks, Ordering::Relaxed);
        // Release: whoever sees the device number sees its range.
        self.word(entry_word(i, DEV_FIELD)).store(dev, Ordering::Release);
        self.word(USED_WORD).store(i as u32 + 1, Ordering::Release);
    }

    /// Sets entry `i`'s device number: the device's own to watch it again,
    /// 0 to stop matching it.
    fn set_dev(&self, i: usize, dev: u32) {
        self.word(entry_word(i, DEV_FIELD)).store(dev, Ordering::Release);
    }

    /// Sets the chunk size (log2); before any entry is published.
    fn set_chunk_shift(&self, shift: u32) {
        self.word(CHUNK_SHIFT_WORD).store(shift, Ordering::Release);
    }

    fn set_overflow(&self) {
        self.word(OVERFLOW_WORD).store(1, Ordering::Release);
    }
}

/// Per-chunk write counters kept by a BPF program in the kernel.
pub struct EbpfTracker {
    chunk_size: u64,
    capacity: u32,
    next_slot: u32,
    ranges: HashMap<DeviceId, ChunkRange>,
    /// Devices of the inline table's entries, by entry.
    inline: Vec<DeviceId>,
    /// Devices now in `WATCHED_MORE`.
    overflowed: HashSet<DeviceId>,
    /// Most write bios any reading derived (see `read_counts`).
    events_seen: u64,
    more: BpfHashMap<MapData, u32, Range>,
    stats: PerCpuArray<MapData, Stats>,
    prog_id: u32,
    map_ids: Vec<u32>,
    /// The tracepoint link, while the program (in `_bpf`) owns it.
    link: Option<aya::programs::tp_btf::BtfTracePointLinkId>,
    // Field order is drop order: unmap, then close the arrays, then the rest.
    table: InlineTable,
    counters: CounterArray,
    _table_map: MapData,
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
            .set_max_entries(edgeshift_ebpf::CHUNKS_MAP, capacity)
            .load(OBJECT)?;
        let btf = aya::Btf::from_sys_fs()?;
        let prog: &mut BtfTracePoint = bpf
            .program_mut(edgeshift_ebpf::PROGRAM)
            .ok_or(DirtyError::BpfObject("the program dirty_bio_queue"))?
            .try_into()?;
        load_program(prog, &btf)?;
        let link = prog.attach()?;
        let info = prog.info()?;
        let prog_id = info.id();
        let map_ids = info.map_ids()?.unwrap_or_default();

        let take = |bpf: &mut Ebpf, name: &'static str| bpf.take_map(name).ok_or(DirtyError::BpfObject(name));
        let more = BpfHashMap::try_from(take(&mut bpf, edgeshift_ebpf::WATCHED_MORE_MAP)?)?;
        let stats = PerCpuArray::try_from(take(&mut bpf, edgeshift_ebpf::STATS_MAP)?)?;
        let chunks = match take(&mut bpf, edgeshift_ebpf::CHUNKS_MAP)? {
            Map::Array(data) => data,
            _ => return Err(DirtyError::BpfObject("CHUNKS as an array map")),
        };
        let table_map = match take(&mut bpf, edgeshift_ebpf::WATCH_TABLE_MAP)? {
            Map::Array(data) => data,
            _ => return Err(DirtyError::BpfObject("WATCH_TABLE as an array map")),
        };
        let counters = CounterArray::map(&chunks, capacity as usize)?;
        let table = InlineTable::map(&table_map)?;
        table.set_chunk_shift(shift);
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
            inline: Vec::with_capacity(INLINE_WATCHED),
            overflowed: HashSet::new(),
            events_seen: 0,
            more,
            stats,
            prog_id,
            map_ids,
            link: Some(link),
            table,
            counters,
            _table_map: table_map,
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

/// Names of the pinned objects in a pin directory.
const PINNED_LINK: &str = "link";
const PINNED_CHUNKS: &str = "chunks";
const PINNED_TABLE: &str = "table";
const PINNED_STATS: &str = "stats";

impl EbpfTracker {
    /// Leaves the program counting after this tracker is gone: its link and
    /// the maps a reader needs are pinned in `dir` (on a bpffs, created
    /// here), which then holds them until [`unpin`] removes the files. On
    /// error nothing stays pinned.
    pub fn pin(mut self, dir: &std::path::Path) -> Result<(), DirtyError> {
        let pin_err = |e: aya::pin::PinError| DirtyError::Pin(e.to_string());
        std::fs::create_dir_all(dir).map_err(|source| DirtyError::Device {
            path: dir.display().to_string(),
            source,
        })?;
        let pinned = (|| -> Result<(), DirtyError> {
            let link_id = self
                .link
                .take()
                .ok_or(DirtyError::BpfObject("an attached link"))?;
            let prog: &mut BtfTracePoint = self
                ._bpf
                .program_mut(edgeshift_ebpf::PROGRAM)
                .ok_or(DirtyError::BpfObject("the program dirty_bio_queue"))?
                .try_into()?;
            let link: FdLink = prog.take_link(link_id)?.into();
            // The pin holds the link; this fd closes as the PinnedLink drops.
            link.pin(dir.join(PINNED_LINK)).map_err(pin_err)?;
            self._chunks.pin(dir.join(PINNED_CHUNKS)).map_err(pin_err)?;
            self._table_map.pin(dir.join(PINNED_TABLE)).map_err(pin_err)?;
            self.stats.pin(dir.join(PINNED_STATS)).map_err(pin_err)?;
            Ok(())
        })();
        if pinned.is_err() {
            let _ = unpin(dir);
        }
        pinned
    }
}

/// Removes a pin directory made by [`EbpfTracker::pin`]: the kernel detaches
/// the program and frees the maps once no file or descriptor holds them.
/// A directory that is not there is fine.
pub fn unpin(dir: &std::path::Path) -> Result<(), DirtyError> {
    for name in [PINNED_LINK, PINNED_CHUNKS, PINNED_TABLE, PINNED_STATS] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DirtyError::Device {
                    path: dir.join(name).display().to_string(),
                    source,
                })
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DirtyError::Device {
            path: dir.display().to_string(),
            source,
        }),
    }
}

/// What a pinned tracker (one device, in the inline table's first entry)
/// has counted so far.
#[derive(Debug, Clone)]
pub struct PinnedReading {
    pub chunk_size: u64,
    pub dev: DeviceId,
    /// Every chunk written at least once.
    pub written: Vec<PinnedChunk>,
    /// Chunk updates the program could not count (a device grown past its
    /// range, a bio wider than it counts): the reading is then incomplete.
    pub lost: u64,
}

/// One chunk of a [`PinnedReading`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedChunk {
    pub index: u64,
    pub writes: u64,
}

/// Reads the counters of the tracker pinned in `dir`.
pub fn read_pinned(dir: &std::path::Path) -> Result<PinnedReading, DirtyError> {
    let chunks = MapData::from_pin(dir.join(PINNED_CHUNKS))?;
    let table_map = MapData::from_pin(dir.join(PINNED_TABLE))?;
    let stats: PerCpuArray<MapData, Stats> =
        PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(dir.join(PINNED_STATS))?))?;
    let slots = chunks.info()?.max_entries() as usize;
    let counters = CounterArray::map(&chunks, slots)?;
    let table = SharedMapping::map(&table_map, std::mem::size_of::<WatchTable>(), false)?;
    let word = |i: usize| table.u32_at(i).map_or(0, |w| w.load(Ordering::Acquire));
    if word(USED_WORD) == 0 {
        return Err(DirtyError::BpfObject("a watched device in the pinned tracker"));
    }
    let dev = DeviceId::from_kernel_dev(word(entry_word(0, DEV_FIELD)));
    let base = word(entry_word(0, BASE_FIELD)) as usize;
    let n = word(entry_word(0, CHUNKS_FIELD)) as usize;
    let shift = word(CHUNK_SHIFT_WORD);
    let written = (0..n)
        .filter_map(|i| {
            let (writes, _) = counters.get(base + i);
            (writes > 0).then_some(PinnedChunk {
                index: i as u64,
                writes,
            })
        })
        .collect();
    let lost = stats
        .get(&0, 0)?
        .iter()
        .map(|Stats(s)| s.dropped + s.truncated)
        .sum();
    Ok(PinnedReading {
        chunk_size: 1u64 << shift.min(63),
        dev,
        written,
        lost,
    })
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
        if let Some(i) = self.inline.iter().position(|&d| d == dev) {
            self.table.set_dev(i, key);
            return Ok(());
        }
        if self.overflowed.contains(&dev) {
            return Ok(());
        }
        let inline = self.inline.len() < INLINE_WATCHED;
        if !inline && self.overflowed.len() >= MAX_OVERFLOW_WATCHED {
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
                let r = ChunkRange {
                    base: self.next_slot,
                    chunks,
                };
                self.next_slot += chunks;
                self.ranges.insert(dev, r);
                r
            }
        };
        if inline {
            self.table.publish(self.inline.len(), key, range);
            self.inline.push(dev);
        } else {
            // Into the hash first, then the flag: the program looks there
            // only once the flag is set.
            self.more.insert(key, Range(range), 0)?;
            self.table.set_overflow();
            self.overflowed.insert(dev);
            tracing::debug!(
                %dev,
                inline = INLINE_WATCHED,
                "watched device past the inline table: the BPF program looks it up in a hash map"
            );
        }
        Ok(())
    }

    fn unwatch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        if let Some(i) = self.inline.iter().position(|&d| d == dev) {
            self.table.set_dev(i, 0);
            return Ok(());
        }
        if !self.overflowed.remove(&dev) {
            return Ok(());
        }
        match self.more.remove(&dev.kernel_dev()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn read_counts(&mut self) -> Result<RawCounts, DirtyError> {
        let mut out = RawCounts::default();
        let mut total_writes = 0u64;
        // Counters first, stats second: a wide bio adds its `extra_chunks`
        // before its chunk updates, so a reading taken in between
        // under-counts bios for a moment and never over-counts them.
        for (&dev, range) in &self.ranges {
            for index in 0..range.chunks {
                let (writes, bytes) = self.counters.get((range.base + index) as usize);
                total_writes += writes;
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
        let mut stats = TrackerStats::default();
        for Stats(s) in per_cpu.iter() {
            stats.dropped += s.dropped;
            stats.truncated += s.truncated;
            stats.extra_chunks += s.extra_chunks;
        }
        // Cumulative counts never go back, even across such a moment.
        self.events_seen = self.events_seen.max(stats.events(total_writes));
        out.events = self.events_seen;
        out.dropped = stats.dropped;
        out.truncated = stats.truncated;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(errno: i32) -> LoadFailure {
        LoadFailure::Refused {
            source: std::io::Error::from_raw_os_error(errno),
            log: format!("log of errno {errno}"),
        }
    }

    #[test]
    fn an_interrupted_verifier_is_tried_again_and_a_refusal_is_not() {
        // Interrupted twice, then loaded.
        let mut calls = 0;
        load_retrying_interrupted(5, || {
            calls += 1;
            if calls < 3 {
                Err(refused(libc::EAGAIN))
            } else {
                Ok(())
            }
        })
        .expect("loads on the third attempt");
        assert_eq!(calls, 3);

        // Interrupted every time: gives up after the attempts, with the errno.
        let mut calls = 0;
        let err = load_retrying_interrupted(5, || {
            calls += 1;
            Err(refused(libc::EINTR))
        })
        .expect_err("never loads");
        assert_eq!(calls, 5);
        assert!(matches!(err, DirtyError::BpfRefused { attempts: 5, .. }), "{err}");

        // A real refusal is reported at once, with its errno and log.
        let mut calls = 0;
        let err = load_retrying_interrupted(5, || {
            calls += 1;
            Err(refused(libc::EACCES))
        })
        .expect_err("refused");
        assert_eq!(calls, 1);
        let text = err.to_string();
        assert!(
            text.contains("Permission denied") && text.contains("log of errno 13"),
            "{text}"
        );
    }
}
