//! The fallback tracker for hosts where no BPF program can be loaded.
//!
//! Signal: the same `block:block_bio_queue` tracepoint, recorded by ftrace
//! (no BPF involved) into a private tracefs instance
//! (`instances/edgeshift-dirty-…`, its own ring buffer, event enable and
//! filter, so several trackers and other tracers do not disturb each other),
//! filtered in the kernel to the watched devices and read as text from the
//! instance's `trace_pipe` by a thread. Each line carries the device, the
//! rwbs flags, the start sector and the sector count, so the per-chunk counts
//! equal the eBPF tracker's. A ring-buffer overrun is printed by the kernel
//! as `[LOST n EVENTS]` and reported as dropped.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{chunk_shift, split_span, DeviceId, DirtyError, DirtyTracker, RawChunk, RawCounts, TrackerKind};

/// Ring buffer per CPU for the instance, in KiB: room for ~100k events
/// between two drains.
const BUFFER_KB: u32 = 8192;
const DRAIN_EVERY: Duration = Duration::from_millis(10);

static INSTANCE_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Parsed {
    chunks: HashMap<(DeviceId, u64), (u64, u64)>,
    events: u64,
    lost: u64,
    truncated: u64,
    partial: Vec<u8>,
}

struct Shared {
    pipe: Option<File>,
    parsed: Parsed,
    shift: u32,
}

/// Per-chunk write counts from ftrace text events (see the module doc).
pub struct FtraceTracker {
    chunk_size: u64,
    instance: PathBuf,
    watched: BTreeSet<DeviceId>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // The reader thread never panics while holding the lock; if it did, the
    // counters are still plain numbers.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn tracefs_root() -> Result<PathBuf, DirtyError> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let root = Path::new(root);
        if root.join("events/block/block_bio_queue").is_dir() && root.join("instances").is_dir() {
            return Ok(root.to_path_buf());
        }
    }
    Err(DirtyError::NoTracefs)
}

fn write_file(path: &Path, value: &str) -> Result<(), DirtyError> {
    std::fs::write(path, value).map_err(|source| DirtyError::Tracefs {
        path: path.display().to_string(),
        source,
    })
}

impl FtraceTracker {
    pub fn new(chunk_size: u64) -> Result<Self, DirtyError> {
        let shift = chunk_shift(chunk_size)?;
        let root = tracefs_root()?;
        let name = format!(
            "edgeshift-dirty-{}-{}",
            std::process::id(),
            INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let instance = root.join("instances").join(name);
        std::fs::create_dir(&instance).map_err(|source| DirtyError::Tracefs {
            path: instance.display().to_string(),
            source,
        })?;
        // From here on, Drop removes the instance even if set-up fails.
        let mut tracker = FtraceTracker {
            chunk_size,
            instance,
            watched: BTreeSet::new(),
            shared: Arc::new(Mutex::new(Shared {
                pipe: None,
                parsed: Parsed::default(),
                shift,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            reader: None,
        };
        write_file(&tracker.instance.join("buffer_size_kb"), &BUFFER_KB.to_string())?;
        let pipe_path = tracker.instance.join("trace_pipe");
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe_path)
            .map_err(|source| DirtyError::Tracefs {
                path: pipe_path.display().to_string(),
                source,
            })?;
        lock(&tracker.shared).pipe = Some(pipe);
        let shared = tracker.shared.clone();
        let stop = tracker.stop.clone();
        tracker.reader = Some(
            std::thread::Builder::new()
                .name("dirty-ftrace".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = drain(&mut lock(&shared)) {
                            tracing::error!(error = %e, "reading trace_pipe failed; the fallback tracker stops");
                            return;
                        }
                        std::thread::sleep(DRAIN_EVERY);
                    }
                })
                .map_err(|source| DirtyError::Tracefs {
                    path: "reader thread".into(),
                    source,
                })?,
        );
        Ok(tracker)
    }

    /// The tracefs instance directory this tracker created (removed on drop).
    pub fn instance(&self) -> &Path {
        &self.instance
    }

    fn event_file(&self, file: &str) -> PathBuf {
        self.instance.join("events/block/block_bio_queue").join(file)
    }

    /// Points the instance's filter at the watched set (kernel-side, so
    /// other devices' events never reach the buffer) and enables or
    /// disables the event.
    fn apply_watch_set(&self) -> Result<(), DirtyError> {
        if self.watched.is_empty() {
            return write_file(&self.event_file("enable"), "0");
        }
        let filter = self
            .watched
            .iter()
            .map(|d| format!("dev == {}", d.kernel_dev()))
            .collect::<Vec<_>>()
            .join(" || ");
        write_file(&self.event_file("filter"), &filter)?;
        write_file(&self.event_file("enable"), "1")
    }
}

/// Reads what the pipe holds now and folds complete lines into the counts.
fn drain(shared: &mut Shared) -> std::io::Result<()> {
    let Some(pipe) = shared.pipe.as_mut() else {
        return Ok(());
    };
    let mut buf = [0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                let parsed = &mut shared.parsed;
                parsed.partial.extend_from_slice(&buf[..n]);
                let Some(end) = parsed.partial.iter().rposition(|&b| b == b'\n') else {
                    continue;
                };
                let complete: Vec<u8> = parsed.partial.drain(..=end).collect();
                for line in complete.split(|&b| b == b'\n') {
                    if let Ok(line) = std::str::from_utf8(line) {
                        fold_line(parsed, shared.shift, line);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// One trace_pipe line. Events look like
/// `dd-3788 [001] ..... 466.77: block_bio_queue: 7,0 WS 40 + 8 [dd]`;
/// an overrun shows as `CPU:1 [LOST 123 EVENTS]`.
fn fold_line(parsed: &mut Parsed, shift: u32, line: &str) {
    if let Some(rest) = line.split_once("[LOST ").map(|(_, r)| r) {
        if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()) {
            parsed.lost += n;
        }
        return;
    }
    let Some((_, fields)) = line.split_once("block_bio_queue: ") else {
        return;
    };
    let Some(event) = parse_event(fields) else {
        return;
    };
    if !event.modifying {
        return;
    }
    parsed.events += 1;
    let offset = event.sector << 9;
    let len = u64::from(event.nr_sector) << 9;
    let chunks = &mut parsed.chunks;
    if split_span(offset, len, shift, |c, b| {
        let e = chunks.entry((event.dev, c)).or_default();
        e.0 += 1;
        e.1 += b;
    }) {
        parsed.truncated += 1;
    }
}

struct BioEvent {
    dev: DeviceId,
    modifying: bool,
    sector: u64,
    nr_sector: u32,
}

/// `7,0 WS 40 + 8 [dd]` → device 7:0, a write, sector 40, 8 sectors.
fn parse_event(fields: &str) -> Option<BioEvent> {
    let mut it = fields.split_whitespace();
    let (major, minor) = it.next()?.split_once(',')?;
    let rwbs = it.next()?.as_bytes();
    let sector = it.next()?.parse().ok()?;
    if it.next()? != "+" {
        return None;
    }
    let nr_sector = it.next()?.parse().ok()?;
    // Same rule as the BPF program: an optional 'F' (preflush), then the op.
    let op = match rwbs.first()? {
        b'F' => rwbs.get(1).copied().unwrap_or(0),
        &c => c,
    };
    Some(BioEvent {
        dev: DeviceId {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        },
        modifying: (op == b'W' || op == b'D') && nr_sector > 0,
        sector,
        nr_sector,
    })
}

impl DirtyTracker for FtraceTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Fallback
    }

    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn watch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        if self.watched.insert(dev) {
            self.apply_watch_set()?;
        }
        Ok(())
    }

    fn unwatch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        if self.watched.remove(&dev) {
            self.apply_watch_set()?;
        }
        Ok(())
    }

    fn read_counts(&mut self) -> Result<RawCounts, DirtyError> {
        let mut shared = lock(&self.shared);
        drain(&mut shared).map_err(|source| DirtyError::Tracefs {
            path: self.instance.join("trace_pipe").display().to_string(),
            source,
        })?;
        let p = &shared.parsed;
        Ok(RawCounts {
            chunks: p
                .chunks
                .iter()
                .map(|(&(dev, index), &(writes, bytes))| RawChunk {
                    dev,
                    index,
                    writes,
                    bytes,
                })
                .collect(),
            events: p.events,
            dropped: p.lost,
            truncated: p.truncated,
        })
    }
}

/// How long Drop keeps trying to remove a busy instance.
const REMOVE_PATIENCE: Duration = Duration::from_secs(2);

/// Removes the instance directory. tracefs refuses (EBUSY) while any file
/// of the instance is open anywhere, and a child this process forks on
/// another thread holds copies of our descriptors until it execs, so a
/// busy instance is tried again for a while before it is reported.
fn remove_instance(instance: &Path) {
    let deadline = std::time::Instant::now() + REMOVE_PATIENCE;
    loop {
        match std::fs::remove_dir(instance) {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                tracing::warn!(instance = %instance.display(), error = %e, "could not remove the ftrace instance");
                return;
            }
        }
    }
}

impl Drop for FtraceTracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = std::fs::write(self.event_file("enable"), "0");
        // The instance cannot be removed while its trace_pipe is open.
        lock(&self.shared).pipe = None;
        remove_instance(&self.instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trace_pipe_lines() {
        let mut p = Parsed::default();
        let shift = 12;
        for line in [
            "              dd-3788    [001] .....   466.773996: block_bio_queue: 7,0 WS 40 + 8 [dd]",
            "              dd-3789    [000] .....   466.777647: block_bio_queue: 7,0 WS 6144 + 2048 [dd]",
            "            bash-3782    [001] .....   466.772252: block_bio_queue: 7,0 RM 48 + 8 [bash]",
            "  kworker/0:1-12 [000] .....   1.0: block_bio_queue: 7,0 FWS 0 + 8 [kworker/0:1 x]",
            "  kworker/0:1-12 [000] .....   1.0: block_bio_queue: 7,0 FS 0 + 0 [kworker]",
            "  fstrim-9 [000] .....   1.0: block_bio_queue: 7,1 DS 8 + 16 [fstrim]",
            "CPU:1 [LOST 17 EVENTS]",
            "garbage block_bio_queue: x,y WS",
            "",
        ] {
            fold_line(&mut p, shift, line);
        }
        let d0 = DeviceId { major: 7, minor: 0 };
        let d1 = DeviceId { major: 7, minor: 1 };
        // Sector 40 = byte 20480 = chunk 5; 1 MiB at sector 6144 = chunks 768..1024.
        assert_eq!(p.chunks.get(&(d0, 5)), Some(&(1, 4096)));
        assert_eq!(p.chunks.get(&(d0, 768)), Some(&(1, 4096)));
        assert_eq!(p.chunks.get(&(d0, 1023)), Some(&(1, 4096)));
        assert_eq!(p.chunks.get(&(d0, 1024)), None);
        // The read (RM) and the empty flush are not counted; FWS is.
        assert_eq!(p.chunks.get(&(d0, 6)), None);
        assert_eq!(p.chunks.get(&(d0, 0)), Some(&(1, 4096)));
        // The discard spans chunks 1 (4 KiB) and 2 (4 KiB).
        assert_eq!(p.chunks.get(&(d1, 1)), Some(&(1, 4096)));
        assert_eq!(p.chunks.get(&(d1, 2)), Some(&(1, 4096)));
        assert_eq!(p.events, 4);
        assert_eq!(p.lost, 17);
    }
}
