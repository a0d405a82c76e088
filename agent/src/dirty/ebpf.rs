//! The eBPF tracker: loads the embedded `dirty.bpf.o` with aya, attaches it
//! to `block:block_bio_queue` and sums its per-CPU counters.
//!
//! Every kernel object (program, tracepoint link, maps) is owned by the
//! [`EbpfTracker`]; dropping it closes their file descriptors, which detaches
//! the program and frees the maps: nothing is pinned, nothing stays behind.

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use edgeshift_ebpf::{ChunkCounts, ChunkKey, TrackerStats};

use super::{chunk_shift, DeviceId, DirtyError, DirtyTracker, RawChunk, RawCounts, TrackerKind};

/// The object built from `ebpf/src/dirty.bpf.c` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dirty.bpf.o"));

/// Most devices one tracker watches (`max_entries` of `WATCHED` in the C source).
const MAX_WATCHED: usize = 64;

// aya reads and writes map entries as plain bytes of these types; the
// layout types live in the `ebpf` crate, so they are wrapped here.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Key(ChunkKey);
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Counts(ChunkCounts);
#[repr(transparent)]
#[derive(Clone, Copy)]
struct Stats(TrackerStats);

// SAFETY: `ChunkKey` is #[repr(C)] of two u32 and one u64 with no padding
// (size 16 is asserted in the ebpf crate); every bit pattern is valid.
unsafe impl aya::Pod for Key {}
// SAFETY: `ChunkCounts` is #[repr(C)] of two u64: no padding, any bits valid.
unsafe impl aya::Pod for Counts {}
// SAFETY: `TrackerStats` is #[repr(C)] of three u64: no padding, any bits valid.
unsafe impl aya::Pod for Stats {}

/// Per-chunk write counters kept by a BPF program in the kernel.
pub struct EbpfTracker {
    chunk_size: u64,
    watched: BpfHashMap<MapData, u32, u8>,
    watched_count: usize,
    chunks: PerCpuHashMap<MapData, Key, Counts>,
    stats: PerCpuArray<MapData, Stats>,
    prog_id: u32,
    map_ids: Vec<u32>,
    // Declared last so the maps above are closed first; dropping it
    // detaches the tracepoint link and unloads the program.
    _bpf: Ebpf,
}

impl EbpfTracker {
    /// Loads and attaches the program; `capacity` is the number of distinct
    /// (device, chunk) pairs the map holds before updates are dropped.
    pub fn new(chunk_size: u64, capacity: u32) -> Result<Self, DirtyError> {
        let shift = chunk_shift(chunk_size)?;
        let mut bpf = EbpfLoader::new()
            .set_global(edgeshift_ebpf::CHUNK_SHIFT_GLOBAL, &shift, true)
            .set_max_entries(edgeshift_ebpf::CHUNKS_MAP, capacity.max(1))
            .load(OBJECT)?;
        let prog: &mut TracePoint = bpf
            .program_mut(edgeshift_ebpf::PROGRAM)
            .ok_or(DirtyError::BpfObject("the program dirty_bio_queue"))?
            .try_into()?;
        prog.load()?;
        let (category, name) = edgeshift_ebpf::TRACEPOINT;
        prog.attach(category, name)?;
        let info = prog.info()?;
        let prog_id = info.id();
        let map_ids = info.map_ids()?.unwrap_or_default();

        let take = |bpf: &mut Ebpf, name: &'static str| bpf.take_map(name).ok_or(DirtyError::BpfObject(name));
        let watched = BpfHashMap::try_from(take(&mut bpf, edgeshift_ebpf::WATCHED_MAP)?)?;
        let chunks = PerCpuHashMap::try_from(take(&mut bpf, edgeshift_ebpf::CHUNKS_MAP)?)?;
        let stats = PerCpuArray::try_from(take(&mut bpf, edgeshift_ebpf::STATS_MAP)?)?;
        tracing::debug!(
            prog_id,
            ?map_ids,
            chunk_size,
            capacity,
            "dirty BPF program attached"
        );
        Ok(EbpfTracker {
            chunk_size,
            watched,
            watched_count: 0,
            chunks,
            stats,
            prog_id,
            map_ids,
            _bpf: bpf,
        })
    }

    /// The kernel ids of the program and of its maps, to check with
    /// `bpftool prog show id N` that nothing outlives the tracker.
    pub fn kernel_ids(&self) -> (u32, &[u32]) {
        (self.prog_id, &self.map_ids)
    }
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
        self.watched.insert(key, 1, 0)?;
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
        for entry in self.chunks.iter() {
            let (Key(key), per_cpu) = entry?;
            let (writes, bytes) = per_cpu
                .iter()
                .fold((0u64, 0u64), |(w, b), Counts(c)| (w + c.writes, b + c.bytes));
            out.chunks.push(RawChunk {
                dev: DeviceId::from_kernel_dev(key.dev),
                index: key.chunk,
                writes,
                bytes,
            });
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
