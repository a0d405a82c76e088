//! Dirty-rate tracking per chunk: which chunks of a VM's disk are written,
//! how often, and how fast lately, so the migration engine can send cold
//! chunks first and hot chunks last.
//!
//! A [`DirtyTracker`] is a source of cumulative per-(device, chunk) write
//! counts; [`DirtyMonitor`] turns successive readings into exponentially
//! weighted rates and temperature classes. Trackers:
//! - [`EbpfTracker`]: a BPF program on `block:block_bio_queue` (see
//!   `ebpf/src/dirty.bpf.c`) counting with atomic adds into an array with one
//!   slot per chunk of each watched device, which the agent reads via mmap.
//! - [`FtraceTracker`]: the fallback for hosts where BPF cannot be loaded. Its
//!   signal is the same tracepoint's text events, read from a private ftrace
//!   instance's `trace_pipe` in tracefs (ftrace needs no BPF), so it sees every
//!   write bio with its sector and length and gives the same per-chunk counts;
//!   it costs more CPU per event and a buffer overrun shows as dropped events.
//! - [`FakeTracker`]: fed by hand, for unit tests of the rate logic.
//!
//! Why block devices: a VM disk here is a block device (loop over a raw
//! image, nbd over qcow2 via qemu-nbd, or an LV), so a sector on the traced
//! device is an offset in the guest's disk. An image file on the host's own
//! file system would not do: the block events there carry the host file
//! system's sectors (where its allocator put the file's extents, plus its
//! journal and metadata writes), not offsets in the image, and writes that
//! sit in the page cache reach the disk later, merged, under the flusher's
//! name.

pub mod boot_log;
mod ebpf;
mod fake;
mod ftrace;

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use ebpf::EbpfTracker;
pub use fake::FakeTracker;
pub use ftrace::FtraceTracker;

/// Errors of the dirty tracker.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("{path}: {source}")]
    Device { path: String, source: std::io::Error },
    #[error("{0} is not a block device (watch a loop, nbd or LV device)")]
    NotBlockDevice(String),
    #[error("chunk size {0} is not a power of two between 4 KiB and 16 MiB")]
    ChunkSize(u64),
    #[error("loading the BPF program: {0}")]
    BpfLoad(#[from] aya::EbpfError),
    #[error("reading the kernel's BTF: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("attaching the BPF program: {0}")]
    BpfProgram(#[from] aya::programs::ProgramError),
    #[error("the kernel refused the BPF program ({attempts} attempts): {source}; verifier log:\n{log}")]
    BpfRefused {
        attempts: u32,
        source: std::io::Error,
        log: String,
    },
    #[error("BPF map: {0}")]
    BpfMap(#[from] aya::maps::MapError),
    #[error("the BPF object lacks {0}")]
    BpfObject(&'static str),
    #[error("tracefs ({path}): {source}")]
    Tracefs { path: String, source: std::io::Error },
    #[error("no tracefs with block events is mounted (mount -t tracefs nodev /sys/kernel/tracing)")]
    NoTracefs,
    #[error("{dev} needs {need} chunk counters but the tracker has {free} left (raise the capacity)")]
    Capacity { dev: DeviceId, need: u64, free: u32 },
    #[error("mapping the BPF counter array: {0}")]
    Mmap(std::io::Error),
    #[error("size of block device {dev}: {source}")]
    DeviceSize { dev: DeviceId, source: std::io::Error },
    #[error("too many watched devices (at most {0})")]
    TooManyDevices(usize),
    #[error("pinning the BPF tracker: {0}")]
    Pin(String),
    #[error("no bpffs to pin the boot log in: {0}")]
    NoBpffs(String),
    #[error("the boot log cannot be trusted: {0}")]
    BootLog(String),
    #[error("no tracker could start: eBPF: {ebpf}; fallback: {fallback}")]
    NoTracker { ebpf: String, fallback: String },
}

/// A block device as the kernel names it in block tracepoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DeviceId {
    pub major: u32,
    pub minor: u32,
}

impl DeviceId {
    /// The device of a block special file (`/dev/loop3`).
    pub fn of_path(path: &Path) -> Result<Self, DirtyError> {
        let md = std::fs::metadata(path).map_err(|source| DirtyError::Device {
            path: path.display().to_string(),
            source,
        })?;
        if !md.file_type().is_block_device() {
            return Err(DirtyError::NotBlockDevice(path.display().to_string()));
        }
        let rdev = md.rdev();
        Ok(DeviceId {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        })
    }

    /// The kernel-internal `dev_t` (`major << 20 | minor`) that the
    /// tracepoint's `dev` field holds.
    pub fn kernel_dev(self) -> u32 {
        edgeshift_ebpf::kernel_dev(self.major, self.minor)
    }

    /// The device's size in bytes, from `/sys/dev/block/MAJ:MIN/size`
    /// (always in 512-byte sectors).
    pub fn size(self) -> Result<u64, DirtyError> {
        let path = format!("/sys/dev/block/{}:{}/size", self.major, self.minor);
        let text =
            std::fs::read_to_string(&path).map_err(|source| DirtyError::DeviceSize { dev: self, source })?;
        let sectors: u64 = text.trim().parse().map_err(|_| DirtyError::DeviceSize {
            dev: self,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{path} holds {text:?}")),
        })?;
        Ok(sectors.saturating_mul(512))
    }

    pub fn from_kernel_dev(dev: u32) -> Self {
        DeviceId {
            major: dev >> 20,
            minor: dev & 0xfffff,
        }
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Which implementation a tracker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackerKind {
    Ebpf,
    Fallback,
    Fake,
}

impl std::fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrackerKind::Ebpf => "ebpf",
            TrackerKind::Fallback => "fallback",
            TrackerKind::Fake => "fake",
        })
    }
}

/// Cumulative counts of one chunk since the tracker started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawChunk {
    pub dev: DeviceId,
    pub index: u64,
    pub writes: u64,
    pub bytes: u64,
}

/// One reading of a tracker: cumulative since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawCounts {
    pub chunks: Vec<RawChunk>,
    /// Write events (bios) counted on watched devices.
    pub events: u64,
    /// Events or chunk updates lost (full map, overrun buffer). Never silent.
    pub dropped: u64,
    /// Bios touching more chunks than one event may count into.
    pub truncated: u64,
}

/// A source of per-chunk write counts for watched block devices.
pub trait DirtyTracker: Send {
    fn kind(&self) -> TrackerKind;
    fn chunk_size(&self) -> u64;
    /// Starts counting writes to `dev`.
    fn watch(&mut self, dev: DeviceId) -> Result<(), DirtyError>;
    /// Stops counting writes to `dev` (counts so far are kept).
    fn unwatch(&mut self, dev: DeviceId) -> Result<(), DirtyError>;
    /// Reads the cumulative counts now.
    fn read_counts(&mut self) -> Result<RawCounts, DirtyError>;
}

/// The user's pick of tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TrackerChoice {
    /// eBPF if it loads, else the ftrace fallback.
    #[default]
    Auto,
    /// The BPF program on block_bio_queue (needs root and BTF).
    Ebpf,
    /// block_bio_queue text events from a private ftrace instance (no BPF).
    Fallback,
}

/// Default number of eBPF chunk counters (16 bytes each, 16 MiB in all):
/// 256 GiB of devices at 256 KiB chunks, 4 GiB at 4 KiB. Callers that know
/// their devices size the tracker with [`capacity_for`].
pub const DEFAULT_CAPACITY: u32 = 1 << 20;

/// Chunk counters the given devices need at `chunk_size`, to size an
/// [`EbpfTracker`] exactly.
pub fn capacity_for(devices: &[DeviceId], chunk_size: u64) -> Result<u32, DirtyError> {
    let mut total = 0u64;
    for &dev in devices {
        let need = ebpf::chunks_of(dev.size()?, chunk_size);
        total = total.saturating_add(need);
        if total > u64::from(u32::MAX) {
            return Err(DirtyError::Capacity {
                dev,
                need,
                free: u32::MAX,
            });
        }
    }
    Ok(total as u32)
}

/// Starts the chosen tracker and logs which one is active.
pub fn open_tracker(
    choice: TrackerChoice,
    chunk_size: u64,
    capacity: u32,
) -> Result<Box<dyn DirtyTracker>, DirtyError> {
    let tracker: Box<dyn DirtyTracker> = match choice {
        TrackerChoice::Ebpf => Box::new(EbpfTracker::new(chunk_size, capacity)?),
        TrackerChoice::Fallback => Box::new(FtraceTracker::new(chunk_size)?),
        TrackerChoice::Auto => match EbpfTracker::new(chunk_size, capacity) {
            Ok(t) => Box::new(t),
            Err(ebpf) => {
                tracing::warn!(error = %ebpf, "eBPF dirty tracker unavailable, trying the ftrace fallback");
                match FtraceTracker::new(chunk_size) {
                    Ok(t) => Box::new(t),
                    Err(fallback) => {
                        return Err(DirtyError::NoTracker {
                            ebpf: ebpf.to_string(),
                            fallback: fallback.to_string(),
                        })
                    }
                }
            }
        },
    };
    match tracker.kind() {
        TrackerKind::Ebpf => tracing::info!(
            tracker = "ebpf",
            chunk_size,
            "dirty tracker active: eBPF program on block:block_bio_queue, atomic per-chunk counters"
        ),
        TrackerKind::Fallback => tracing::info!(
            tracker = "fallback",
            chunk_size,
            "dirty tracker active: fallback, block_bio_queue text events from an ftrace instance"
        ),
        TrackerKind::Fake => tracing::info!(tracker = "fake", "dirty tracker active: fake"),
    }
    Ok(tracker)
}

pub(crate) fn chunk_shift(chunk_size: u64) -> Result<u32, DirtyError> {
    edgeshift_common::size::ChunkSize::new(chunk_size)
        .map(|c| c.bytes().trailing_zeros())
        .map_err(|_| DirtyError::ChunkSize(chunk_size))
}

/// The chunks a write of `len` bytes at byte `offset` touches, with the bytes
/// falling in each; the same split the BPF program does, capped alike.
/// Returns whether the span was truncated.
pub(crate) fn split_span(offset: u64, len: u64, shift: u32, mut each: impl FnMut(u64, u64)) -> bool {
    if len == 0 {
        return false;
    }
    let end = offset.saturating_add(len);
    let first = offset >> shift;
    let last = (end - 1) >> shift;
    let truncated = last - first >= edgeshift_ebpf::MAX_SPAN_CHUNKS;
    let last = last.min(first + edgeshift_ebpf::MAX_SPAN_CHUNKS - 1);
    for chunk in first..=last {
        let lo = (chunk << shift).max(offset);
        let hi = ((chunk + 1) << shift).min(end);
        each(chunk, hi - lo);
    }
    truncated
}

/// How hot a chunk is, from its current rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Temperature {
    /// Written, but its rate has decayed below the warm threshold.
    Cold,
    Warm,
    Hot,
}

/// Rate smoothing and temperature thresholds.
#[derive(Debug, Clone, Copy)]
pub struct RateConfig {
    /// Half-life of the exponentially weighted rate.
    pub half_life: Duration,
    /// Writes per second at or above which a chunk is hot.
    pub hot_rate: f64,
    /// Writes per second at or above which a chunk is warm.
    pub warm_rate: f64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            half_life: Duration::from_secs(5),
            hot_rate: 1.0,
            warm_rate: 0.05,
        }
    }
}

impl RateConfig {
    pub fn temperature(&self, rate: f64) -> Temperature {
        if rate >= self.hot_rate {
            Temperature::Hot
        } else if rate >= self.warm_rate {
            Temperature::Warm
        } else {
            Temperature::Cold
        }
    }
}

/// One chunk's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChunkStat {
    pub device: DeviceId,
    pub index: u64,
    pub writes: u64,
    pub bytes: u64,
    /// Exponentially weighted writes per second.
    pub rate: f64,
    pub temperature: Temperature,
}

/// The full map at one moment, hottest first.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub tracker: TrackerKind,
    pub chunk_size: u64,
    pub elapsed_secs: f64,
    pub events: u64,
    pub dropped: u64,
    pub truncated: u64,
    pub chunks: Vec<ChunkStat>,
}

impl Snapshot {
    /// The `n` hottest chunks.
    pub fn hottest(&self, n: usize) -> &[ChunkStat] {
        &self.chunks[..n.min(self.chunks.len())]
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct ChunkState {
    writes: u64,
    bytes: u64,
    rate: f64,
}

/// Turns a tracker's cumulative counts into rates and temperatures.
pub struct DirtyMonitor {
    tracker: Box<dyn DirtyTracker>,
    config: RateConfig,
    chunks: HashMap<(DeviceId, u64), ChunkState>,
    started: Instant,
    last_poll: Instant,
    last: RawCounts,
}

impl DirtyMonitor {
    pub fn new(tracker: Box<dyn DirtyTracker>, config: RateConfig) -> Self {
        let now = Instant::now();
        DirtyMonitor {
            tracker,
            config,
            chunks: HashMap::new(),
            started: now,
            last_poll: now,
            last: RawCounts::default(),
        }
    }

    pub fn tracker(&mut self) -> &mut dyn DirtyTracker {
        self.tracker.as_mut()
    }

    /// Reads the tracker and folds the new writes into the rates.
    pub fn poll(&mut self) -> Result<(), DirtyError> {
        let counts = self.tracker.read_counts()?;
        self.fold(counts, Instant::now());
        Ok(())
    }

    fn fold(&mut self, counts: RawCounts, now: Instant) {
        let dt = now.duration_since(self.last_poll).as_secs_f64();
        self.last_poll = now;
        // EWMA over time: the old rate decays by 2^(-dt/half_life) and the
        // rate seen over this interval fills the rest.
        let decay = if dt > 0.0 {
            (-dt * std::f64::consts::LN_2 / self.config.half_life.as_secs_f64().max(1e-9)).exp()
        } else {
            1.0
        };
        let mut seen = std::collections::HashSet::with_capacity(counts.chunks.len());
        for c in &counts.chunks {
            let key = (c.dev, c.index);
            seen.insert(key);
            let st = self.chunks.entry(key).or_default();
            let delta = c.writes.saturating_sub(st.writes) as f64;
            let interval_rate = if dt > 0.0 { delta / dt } else { 0.0 };
            st.rate = st.rate * decay + interval_rate * (1.0 - decay);
            st.writes = c.writes;
            st.bytes = c.bytes;
        }
        for (key, st) in self.chunks.iter_mut() {
            if !seen.contains(key) {
                st.rate *= decay;
            }
        }
        let new_events = counts.events.saturating_sub(self.last.events);
        let new_dropped = counts.dropped.saturating_sub(self.last.dropped);
        let kind = self.tracker.kind().to_string();
        metrics::counter!("edgeshift_dirty_events_total", "tracker" => kind.clone()).increment(new_events);
        metrics::counter!("edgeshift_dirty_dropped_total", "tracker" => kind).increment(new_dropped);
        if new_dropped > 0 {
            tracing::warn!(
                dropped = counts.dropped,
                "dirty tracker lost {new_dropped} updates (map full or buffer overrun)"
            );
        }
        self.last = RawCounts {
            chunks: Vec::new(),
            ..counts
        };
    }

    /// Polls, then returns every tracked chunk, hottest first.
    pub fn snapshot(&mut self) -> Result<Snapshot, DirtyError> {
        self.poll()?;
        Ok(self.current())
    }

    /// The figures as of the last poll, hottest first.
    pub fn current(&self) -> Snapshot {
        let mut chunks: Vec<ChunkStat> = self
            .chunks
            .iter()
            .map(|(&(device, index), st)| ChunkStat {
                device,
                index,
                writes: st.writes,
                bytes: st.bytes,
                rate: st.rate,
                temperature: self.config.temperature(st.rate),
            })
            .collect();
        chunks.sort_by(|a, b| {
            b.rate
                .total_cmp(&a.rate)
                .then(b.writes.cmp(&a.writes))
                .then(a.device.cmp(&b.device))
                .then(a.index.cmp(&b.index))
        });
        Snapshot {
            tracker: self.tracker.kind(),
            chunk_size: self.tracker.chunk_size(),
            elapsed_secs: self.last_poll.duration_since(self.started).as_secs_f64(),
            events: self.last.events,
            dropped: self.last.dropped,
            truncated: self.last.truncated,
            chunks,
        }
    }

    /// Polls, then returns the `n` hottest chunks.
    pub fn hottest(&mut self, n: usize) -> Result<Vec<ChunkStat>, DirtyError> {
        let snap = self.snapshot()?;
        Ok(snap.hottest(n).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: DeviceId = DeviceId { major: 7, minor: 3 };

    #[test]
    fn split_span_counts_bytes_into_each_chunk() {
        let mut got = Vec::new();
        // 4 KiB chunks; 6 KiB written at 3 KiB: 1 KiB, 4 KiB, 1 KiB.
        let t = split_span(3072, 6144, 12, |c, b| got.push((c, b)));
        assert!(!t);
        assert_eq!(got, vec![(0, 1024), (1, 4096), (2, 1024)]);
        got.clear();
        assert!(!split_span(4096, 0, 12, |c, b| got.push((c, b))));
        assert!(got.is_empty());
        // Wider than the cap: only the first MAX_SPAN_CHUNKS chunks, flagged.
        let mut n = 0;
        let t = split_span(0, (edgeshift_ebpf::MAX_SPAN_CHUNKS + 5) << 12, 12, |_, _| n += 1);
        assert!(t);
        assert_eq!(n, edgeshift_ebpf::MAX_SPAN_CHUNKS);
    }

    #[test]
    fn chunk_shift_rejects_bad_sizes() {
        assert_eq!(chunk_shift(4096).expect("4 KiB is valid"), 12);
        assert_eq!(chunk_shift(1 << 20).expect("1 MiB is valid"), 20);
        assert!(chunk_shift(5000).is_err());
        assert!(chunk_shift(2048).is_err());
        assert!(chunk_shift(32 << 20).is_err());
    }

    #[test]
    fn device_id_round_trips_kernel_encoding() {
        let d = DeviceId {
            major: 259,
            minor: 70000,
        };
        assert_eq!(DeviceId::from_kernel_dev(d.kernel_dev()), d);
        assert!(matches!(
            DeviceId::of_path(Path::new("/etc/hostname")),
            Err(DirtyError::NotBlockDevice(_))
        ));
        assert!(matches!(
            DeviceId::of_path(Path::new("/nonexistent/dev")),
            Err(DirtyError::Device { .. })
        ));
    }

    #[test]
    fn monitor_rates_rank_and_decay() {
        let fake = FakeTracker::new(4096).expect("valid chunk size");
        let handle = fake.handle();
        let config = RateConfig {
            half_life: Duration::from_secs(1),
            hot_rate: 5.0,
            warm_rate: 0.5,
        };
        let mut m = DirtyMonitor::new(Box::new(fake), config);
        m.tracker().watch(DEV).expect("watch");
        let t0 = m.started;
        // One second: chunk 2 written 20 times, chunk 9 twice.
        for _ in 0..20 {
            handle.write(DEV, 2 * 4096, 4096);
        }
        handle.write(DEV, 9 * 4096, 512);
        handle.write(DEV, 9 * 4096 + 512, 512);
        let counts = m.tracker().read_counts().expect("read");
        m.fold(counts, t0 + Duration::from_secs(1));
        let s = m.current();
        assert_eq!(s.chunks.len(), 2);
        assert_eq!((s.chunks[0].index, s.chunks[0].writes), (2, 20));
        assert_eq!((s.chunks[1].index, s.chunks[1].bytes), (9, 1024));
        // One half-life: half of the interval rate.
        assert!((s.chunks[0].rate - 10.0).abs() < 1e-9, "{}", s.chunks[0].rate);
        assert_eq!(s.chunks[0].temperature, Temperature::Hot);
        assert_eq!(s.chunks[1].temperature, Temperature::Warm);
        // Ten quiet seconds: both decay to cold, ranking kept.
        let counts = m.tracker().read_counts().expect("read");
        m.fold(counts, t0 + Duration::from_secs(11));
        let s = m.current();
        assert!(s.chunks.iter().all(|c| c.temperature == Temperature::Cold));
        assert_eq!(s.hottest(1)[0].index, 2);
        assert_eq!(s.hottest(10).len(), 2);
    }

    #[test]
    fn monitor_reports_unwatched_and_dropped() {
        let fake = FakeTracker::new(4096).expect("valid chunk size");
        let handle = fake.handle();
        let mut m = DirtyMonitor::new(Box::new(fake), RateConfig::default());
        handle.write(DEV, 0, 4096); // not watched yet: not counted
        m.tracker().watch(DEV).expect("watch");
        handle.write(DEV, 0, 4096);
        handle.drop_events(3);
        let s = m.snapshot().expect("snapshot");
        assert_eq!(s.chunks.len(), 1);
        assert_eq!(s.chunks[0].writes, 1);
        assert_eq!(s.dropped, 3);
        assert_eq!(s.tracker, TrackerKind::Fake);
    }
}
