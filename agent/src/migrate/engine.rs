//! The source half of a migration, step by step:
//!
//! 1. **plan**: the destination prepares with the manifest the VM booted
//!    from (this edge holds it in full) and says what its store lacks and,
//!    with a coordinator, which edges send what ([`super::coord`]).
//! 2. **pre-copy**: the VM's boot log (a pinned eBPF write counter,
//!    [`crate::dirty::boot_log`]) names what changed since boot; round 0
//!    pulls the whole live disk from every holder at once, coldest first,
//!    the hot chunks only as filler of its tail (without a boot log: the
//!    boot manifest while the live disk is sliced here, then a round 1 of
//!    what changed); each later round re-reads what the guest wrote since
//!    and sends it, until the rounds stop shrinking; the hottest chunks
//!    wait for the pause, within its budget.
//! 3. **memory**: the destination QEMU waits with `-incoming`; the source runs
//!    QMP `migrate` with `pause-before-switchover`.
//!    If the chunks dirtied per round would overrun `--max-downtime` in the
//!    pause, the source VM's disk writes are throttled step by step.
//! 4. **pause**: the source VM is stopped and its disk flushed; the last
//!    dirty chunks go over, the destination's disk is checked equal to the
//!    source's manifest, then `migrate-continue`.
//! 5. **after**: the destination keeps the VM and announces it; the source
//!    stops its QEMU and frees the disk; the coordinator's reference counts
//!    move with the VM.
//!
//! Any failure before step 4's `migrate-continue` cancels the migration,
//! resumes the source VM if it was paused, and tells the destination to tear
//! its half down.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use edgeshift_common::{Fingerprint, Manifest};
use serde::Serialize;

use super::proto::{self, PullStats, Request, Response};
use super::temperature::{Ordering, Temperature};
use super::MigrateError;
use crate::dirty::{boot_log, open_tracker, DeviceId, DirtyTracker, TrackerChoice, DEFAULT_CAPACITY};
use crate::slicer::{slice_image, ReadMode, SliceOptions};
use crate::store::{ChunkStore, LocalStore};
use crate::vm::{self, MemoryTransport, Qemu, QmpClient, StateDir};

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub name: String,
    pub state_dir: std::path::PathBuf,
    /// The destination's host listener.
    pub to: String,
    /// This edge's host listener as the destination reaches it (a holder).
    pub source_addr: String,
    /// Other holders (edges with some of the image's chunks).
    pub peers: Vec<String>,
    pub key: [u8; 32],
    pub id: String,
    pub ordering: Ordering,
    /// Most pre-copy rounds after the first.
    pub max_rounds: u32,
    /// Pre-copy ends once a round has at most this many chunks to send.
    pub converge_chunks: usize,
    /// QEMU's downtime limit for memory, ms.
    pub downtime_limit_ms: u64,
    /// Seconds between the first slice and the second (a temperature sample).
    pub sample_interval: Duration,
    /// Fault injection for tests: stop with an error after this phase.
    pub fail_after: Option<Phase>,
    /// The coordinator, if this edge reports to one: the live disk is
    /// reported to it before Prepare, and this edge's reference to the VM's
    /// image is dropped there after the switchover.
    pub coordinator: Option<super::coord::CoordConfig>,
    /// How QEMU moves memory (plain, or multifd with zstd); falls back to
    /// plain when either QEMU lacks it.
    pub memory: MemoryTransport,
    /// Budget for the disk's part of the downtime: while memory moves, if
    /// the chunks dirtied per round would take longer than this to send
    /// over the source's measured rate, the source VM's disk writes are
    /// throttled, harder each round, so the pause stays near the budget.
    pub max_downtime: Duration,
    /// Cap on QEMU's memory streams in bytes per second (None: 1 GiB/s,
    /// i.e. whatever the path gives), to leave link for other traffic.
    pub memory_max_bps: Option<u64>,
    /// Start memory with the disk pre-copy (held from converging until
    /// the disk rounds end) instead of after it.
    pub memory_with_disk: bool,
    /// Read the VM's boot log (if it has one) instead of slicing the live
    /// disk to find what changed since boot.
    pub use_boot_log: bool,
    /// Chunks written again after they were sent go as the blocks that
    /// differ from what the destination holds (false: whole, to compare).
    pub deltas: bool,
}

/// Whether and how hard the source VM's disk writes were throttled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThrottleReport {
    pub max_downtime_ms: u64,
    pub applied: bool,
    /// Times the squeeze was tightened.
    pub steps: u32,
    /// The tightest limits set (0: none).
    pub bps_wr: u64,
    pub iops_wr: u64,
    /// The estimate that last triggered a step: pending chunks and the
    /// seconds they would take over the source's rate.
    pub pending_chunks: u64,
    pub estimated_pause_seconds: f64,
}

/// The phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Plan,
    Precopy,
    Incoming,
    Memory,
    Pause,
    /// Not a phase of its own: a disk round while QEMU moves memory (the
    /// two overlap). Only a fault-injection point.
    MemoryRound,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    pub seconds: f64,
    pub bytes: u64,
}

/// One disk round's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// Indices asked for.
    pub chunks: u64,
    /// Bytes pulled from holders.
    pub bytes: u64,
    /// Indices sent before that were sent again (written in between).
    pub resent_chunks: u64,
    /// Chunks that went as the blocks that differ from what the
    /// destination's image held there, and the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    pub seconds: f64,
}

/// What a migration did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub vm: String,
    pub to: String,
    pub ordering: Ordering,
    pub total_seconds: f64,
    pub downtime_ms: u64,
    /// Time the source VM was paused for the disk (within the downtime).
    pub pause_disk_seconds: f64,
    /// Memory moved beside the disk pre-copy (held from converging until
    /// it ended), not after it; the phases then overlap.
    pub memory_started_with_disk: bool,
    /// How the source learnt which chunks changed since the manifest the VM
    /// booted from: "boot log" (the pinned eBPF tracker, no slice; round 0
    /// carries them) or "slice" (the live disk sliced beside round 0, they
    /// go in round 1).
    pub changed_since_boot_from: String,
    pub phases: Vec<PhaseReport>,
    pub rounds: Vec<RoundReport>,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    pub bytes_by_source: BTreeMap<String, u64>,
    pub chunks_resent: u64,
    /// Over all rounds: chunks sent as deltas, and the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    pub missing_at_plan_chunks: u64,
    pub missing_at_plan_bytes: u64,
    pub manifest_id: String,
    /// The coordinator's part: where the plan came from, the references moved.
    pub coordination: super::coord::CoordReport,
    /// Disk-write throttling to keep the pause within `--max-downtime`.
    pub throttle: ThrottleReport,
}

const QMP_WAIT: Duration = Duration::from_secs(5);
/// A chunk the boot log saw written at least this often since boot is hot
/// from the start: one guest write of a chunk is one or two block writes,
/// so three mean it was written again. (The test guest rewrites a random
/// slot of a 32-chunk hot file 5 times a second, each chunk about every
/// 6 s: about 5 writes each by the time it migrates.) A chunk written
/// often long ago (a journal block of an earlier lap) counts as hot too;
/// waiting costs it nothing but pause time, and the pause's budget caps
/// how many wait. (When each chunk was last written would tell them apart:
/// a timestamp per write in the BPF program measured 125-145 ns per event
/// against 82-88 ns, too dear for every write of every VM.)
const HOT_WRITES: u64 = 3;
/// How often a disk round runs while QEMU moves memory.
const DISK_ROUND_DURING_MEMORY: Duration = Duration::from_secs(1);
const MEMORY_TIMEOUT: Duration = Duration::from_secs(900);
/// The squeeze on the source VM's disk writes starts at what the source's
/// path can send within the budget each second (a write can dirty a whole
/// chunk, so IOPS is chunks per second), at most these; each further step
/// halves both, down to the floors (the guest keeps making progress).
const THROTTLE_START_BPS: u64 = 16 << 20;
const THROTTLE_START_IOPS: u64 = 1024;
const THROTTLE_FLOOR_BPS: u64 = 64 << 10;
const THROTTLE_FLOOR_IOPS: u64 = 2;

struct Run {
    opts: MigrateOptions,
    ctl: Option<TcpStream>,
    rounds: Vec<RoundReport>,
    bytes_by_source: BTreeMap<String, u64>,
    /// What the destination was last asked to hold at each index.
    sent: Vec<Option<Fingerprint>>,
    resent: u64,
    coord: super::coord::CoordReport,
    /// Bytes per second the source's path carried in the last round it sent
    /// in with no memory stream beside it (the pause has the path to itself;
    /// a round beside QEMU's streams gets a small share of it).
    source_rate: Option<f64>,
    /// QEMU's memory stream runs beside the rounds now.
    memory_running: bool,
    throttle: ThrottleReport,
    /// The source disk's qdev path once a throttle was set (to lift it).
    throttled_qdev: Option<String>,
    /// Memory started with the disk pre-copy (see [`start_memory`]).
    memory_with_disk: bool,
    /// "boot log" or "slice": how the source learnt what changed since boot.
    changed_since_boot_from: &'static str,
    /// The disk's chunk size in bytes.
    chunk_bytes: u64,
}

impl Run {
    fn holders(&self) -> Vec<String> {
        let mut h = vec![self.opts.source_addr.clone()];
        h.extend(self.opts.peers.iter().cloned());
        h
    }

    fn ctl(&mut self) -> Result<&mut TcpStream, MigrateError> {
        self.ctl
            .as_mut()
            .ok_or_else(|| MigrateError::Channel("no control connection".into()))
    }

    /// One disk round: asks the destination to match `m` at `indices`.
    fn round(&mut self, m: &Manifest, indices: Vec<u32>) -> Result<PullStats, MigrateError> {
        let holders = self.holders();
        self.round_from(m, indices, holders, Vec::new())
    }

    /// A round from `holders`; the chunks at `filler` only fill its tail
    /// (see `Request::Pull`).
    fn round_from(
        &mut self,
        m: &Manifest,
        indices: Vec<u32>,
        holders: Vec<String>,
        filler: Vec<u32>,
    ) -> Result<PullStats, MigrateError> {
        self.pull(m, indices, holders, filler, true)
    }

    /// Asks the destination to match `m` at `indices`; with `count_resent`,
    /// an index sent before counts as re-sent (without: first sends of the
    /// live disk, what changed since boot).
    fn pull(
        &mut self,
        m: &Manifest,
        indices: Vec<u32>,
        holders: Vec<String>,
        filler: Vec<u32>,
        count_resent: bool,
    ) -> Result<PullStats, MigrateError> {
        let start = Instant::now();
        let n = indices.len() as u64;
        let again: Vec<u32> = indices
            .iter()
            .copied()
            .filter(|&i| count_resent && self.sent[i as usize].is_some())
            .collect();
        let resent = again.len() as u64;
        tracing::debug!(?again, ?filler, "round sends these indices again");
        let req = Request::Pull {
            image_size: m.image_size,
            chunk_size: m.chunk_size.bytes() as u32,
            chunks: indices
                .iter()
                .map(|&i| {
                    m.chunks
                        .get(i as usize)
                        .map(|fp| (i, fp.0))
                        .ok_or_else(|| MigrateError::State(format!("chunk index {i} past the disk's end")))
                })
                .collect::<Result<_, _>>()?,
            holders,
            filler,
            deltas: self.opts.deltas,
        };
        let stats = match proto::call(self.ctl()?, &req)? {
            Response::Pulled(s) => s,
            other => {
                return Err(MigrateError::Protocol(format!(
                    "unexpected answer to Pull: {other:?}"
                )))
            }
        };
        let skipped: std::collections::HashSet<u32> = stats.skipped.iter().copied().collect();
        for &i in &indices {
            if !skipped.contains(&i) {
                self.sent[i as usize] = Some(m.chunks[i as usize]);
            }
        }
        let bytes: u64 = stats.holders.iter().map(|h| h.bytes).sum();
        for h in &stats.holders {
            *self.bytes_by_source.entry(h.holder.clone()).or_default() += h.bytes;
            if h.holder == self.opts.source_addr
                && h.bytes > 0
                && stats.seconds > 0.0
                && (!self.memory_running || self.source_rate.is_none())
            {
                self.source_rate = Some(h.bytes as f64 / stats.seconds);
            }
        }
        self.resent += resent;
        let r = RoundReport {
            round: self.rounds.len() as u32,
            chunks: n,
            bytes,
            resent_chunks: resent,
            delta_chunks: stats.holders.iter().map(|h| h.delta_chunks).sum(),
            delta_saved_bytes: stats.holders.iter().map(|h| h.delta_saved_bytes).sum(),
            seconds: start.elapsed().as_secs_f64(),
        };
        tracing::info!(
            round = r.round,
            chunks = r.chunks,
            bytes = r.bytes,
            resent = r.resent_chunks,
            delta = r.delta_chunks,
            seconds = r.seconds,
            "disk round"
        );
        self.rounds.push(r);
        Ok(stats)
    }

    /// Chunks the source's path sends within the budget.
    fn budget_chunks(&self) -> usize {
        self.source_rate.map_or(usize::MAX, |rate| {
            (rate * self.opts.max_downtime.as_secs_f64() / self.chunk_bytes as f64) as usize
        })
    }

    /// How many hot chunks may wait for the pause: half of what the budget
    /// sends (the rest is for what the guest writes meanwhile); none before
    /// the source's path has been measured.
    fn hold_room(&self) -> usize {
        if self.source_rate.is_none() {
            return 0;
        }
        self.budget_chunks() / 2
    }

    /// Bytes the pause would send for `pending`: a chunk the destination
    /// holds an earlier version of goes as a delta, at the share of a whole
    /// chunk the deltas of the rounds so far took (a whole chunk until one
    /// was measured).
    fn pause_bytes(&self, pending: &[u32]) -> f64 {
        let cb = self.chunk_bytes as f64;
        let deltas: u64 = self.rounds.iter().map(|r| r.delta_chunks).sum();
        let saved: u64 = self.rounds.iter().map(|r| r.delta_saved_bytes).sum();
        let delta_share = if self.opts.deltas && deltas > 0 {
            1.0 - saved as f64 / (deltas as f64 * cb)
        } else {
            1.0
        };
        pending
            .iter()
            .map(|&i| match self.sent.get(i as usize) {
                Some(Some(fp)) if !fp.is_zero_chunk() => cb * delta_share,
                _ => cb,
            })
            .sum()
    }

    /// Seconds the pause would take to send `pending` (None: the source's
    /// path not measured yet).
    fn pause_estimate(&self, pending: &[u32]) -> Option<f64> {
        self.source_rate.map(|rate| self.pause_bytes(pending) / rate)
    }

    /// Whether `pending` would take longer than the budget to send.
    fn over_budget(&self, pending: &[u32]) -> bool {
        self.pause_estimate(pending)
            .is_some_and(|t| t > self.opts.max_downtime.as_secs_f64())
    }

    /// Tightens the throttle on the source VM's disk writes one step when
    /// `pending` chunks would take longer than the budget to send in the
    /// pause (QEMU's auto-converge does the same to vCPUs for memory).
    fn squeeze(&mut self, qmp: &mut QmpClient, stale: &[u32]) -> Result<(), MigrateError> {
        let (Some(rate), Some(estimate)) = (self.source_rate, self.pause_estimate(stale)) else {
            return Ok(());
        };
        if estimate <= self.opts.max_downtime.as_secs_f64() {
            return Ok(());
        }
        let pending = stale.len();
        let qdev = match &self.throttled_qdev {
            Some(q) => q.clone(),
            None => qmp.disk_write_throttle(vm::qemu::DISK_NODE_NAME)?.qdev,
        };
        let t = &mut self.throttle;
        let (bps, iops) = if t.applied {
            (
                (t.bps_wr / 2).max(THROTTLE_FLOOR_BPS),
                (t.iops_wr / 2).max(THROTTLE_FLOOR_IOPS),
            )
        } else {
            let budget_bytes = rate * self.opts.max_downtime.as_secs_f64();
            (
                (budget_bytes as u64).clamp(THROTTLE_FLOOR_BPS, THROTTLE_START_BPS),
                ((budget_bytes / self.chunk_bytes as f64) as u64)
                    .clamp(THROTTLE_FLOOR_IOPS, THROTTLE_START_IOPS),
            )
        };
        if t.applied && bps == t.bps_wr && iops == t.iops_wr {
            return Ok(());
        }
        qmp.set_disk_write_throttle(&qdev, bps, iops)?;
        self.throttled_qdev = Some(qdev);
        t.applied = true;
        t.steps += 1;
        t.bps_wr = bps;
        t.iops_wr = iops;
        t.pending_chunks = pending as u64;
        t.estimated_pause_seconds = estimate;
        tracing::warn!(
            pending,
            estimate_s = estimate,
            budget_s = self.opts.max_downtime.as_secs_f64(),
            bps_wr = bps,
            iops_wr = iops,
            step = t.steps,
            "throttling the source VM's disk writes so the pause fits the downtime budget"
        );
        metrics::counter!("edgeshift_migrate_throttle_steps_total").increment(1);
        Ok(())
    }

    /// Indices whose current fingerprint the destination was not yet asked for.
    fn stale(&self, m: &Manifest) -> Vec<u32> {
        (0..m.chunks.len())
            .filter(|&i| self.sent[i] != Some(m.chunks[i]))
            .map(|i| i as u32)
            .collect()
    }
}

/// The dirty tracker (eBPF on block_bio_queue, or its ftrace fallback)
/// watching the VM's loop device: in the pause it names the chunks written
/// since the last slices, so only those are read again instead of the whole
/// disk. Counts mark when a write was queued, not when it completed, so the
/// pause re-reads what was written since the mark taken before the
/// *previous* slice: a write in flight across one slice is still covered.
///
/// With a boot log the counts are the log's (counting since the VM
/// started, so the first [`WriteLog::take`] names every chunk written since
/// boot); without one, a tracker started now.
struct WriteLog {
    counts: WriteCounts,
    /// Cumulative writes per chunk at the last two marks (older first).
    marks: [HashMap<u64, u64>; 2],
    lost: u64,
}

enum WriteCounts {
    Tracker {
        tracker: Box<dyn DirtyTracker>,
        dev: DeviceId,
    },
    BootLog {
        vm_dir: std::path::PathBuf,
        dev: std::path::PathBuf,
        chunk_size: u64,
    },
}

impl WriteLog {
    fn new(counts: WriteCounts) -> Self {
        WriteLog {
            counts,
            marks: [HashMap::new(), HashMap::new()],
            lost: 0,
        }
    }

    /// A tracker started now.
    fn open(dev_path: &std::path::Path, chunk_size: u64) -> Option<Self> {
        let attempt = || -> Result<Self, crate::dirty::DirtyError> {
            let dev = DeviceId::of_path(dev_path)?;
            let mut tracker = open_tracker(TrackerChoice::Auto, chunk_size, DEFAULT_CAPACITY)?;
            tracker.watch(dev)?;
            Ok(WriteLog::new(WriteCounts::Tracker { tracker, dev }))
        };
        match attempt() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no dirty tracker: the pause re-reads the whole disk");
                None
            }
        }
    }

    /// The VM's boot log, if it has one that can be trusted now, with its
    /// first look taken: every chunk written since boot, with its writes.
    fn boot_log(
        vm_dir: &std::path::Path,
        dev_path: &std::path::Path,
        chunk_size: u64,
    ) -> Option<(Self, Vec<(u32, u64)>)> {
        match boot_log::read(vm_dir, dev_path, chunk_size) {
            Ok(now) => {
                let mut w = WriteLog::new(WriteCounts::BootLog {
                    vm_dir: vm_dir.to_path_buf(),
                    dev: dev_path.to_path_buf(),
                    chunk_size,
                });
                let since = w.take_from(Self::boot_counts(now))?;
                Some((w, since))
            }
            Err(e) => {
                tracing::info!(error = %e, "no boot log: the live disk is sliced");
                None
            }
        }
    }

    fn boot_counts(written: Vec<boot_log::PinnedChunk>) -> HashMap<u64, u64> {
        written.into_iter().map(|c| (c.index, c.writes)).collect()
    }

    fn counts(&mut self) -> Option<HashMap<u64, u64>> {
        match &mut self.counts {
            WriteCounts::Tracker { tracker, dev } => {
                let c = tracker.read_counts().ok()?;
                self.lost = c.dropped + c.truncated;
                Some(
                    c.chunks
                        .iter()
                        .filter(|ch| ch.dev == *dev)
                        .map(|ch| (ch.index, ch.writes))
                        .collect(),
                )
            }
            WriteCounts::BootLog {
                vm_dir,
                dev,
                chunk_size,
            } => match boot_log::read(vm_dir, dev, *chunk_size) {
                Ok(w) => Some(Self::boot_counts(w)),
                Err(e) => {
                    // Lost updates (or a log gone): only a slice is right now.
                    tracing::warn!(error = %e, "boot log unusable: reading the whole disk");
                    None
                }
            },
        }
    }

    /// Chunks written since the older of the last two marks, with how many
    /// writes each got in the newest window; takes a new mark. Call right
    /// before reading the disk. `None` when the tracker lost events (then
    /// only a full slice can be trusted).
    fn take(&mut self) -> Option<Vec<(u32, u64)>> {
        let now = self.counts()?;
        self.take_from(now)
    }

    /// The chunks written since the newest mark, without taking a mark:
    /// whether a slice is worth it now. `None` when it cannot say.
    fn peek(&mut self) -> Option<Vec<u32>> {
        let now = self.counts()?;
        if self.lost > 0 {
            return None;
        }
        let newer = &self.marks[1];
        Some(
            now.iter()
                .filter(|(i, w)| newer.get(i).copied().unwrap_or(0) < **w)
                .filter_map(|(i, _)| u32::try_from(*i).ok())
                .collect(),
        )
    }

    /// [`WriteLog::take`] with the cumulative counts read already.
    fn take_from(&mut self, now: HashMap<u64, u64>) -> Option<Vec<(u32, u64)>> {
        let lost = self.lost;
        let [older, newer] = &mut self.marks;
        let mut out: Vec<(u32, u64)> = now
            .iter()
            .filter(|(i, w)| older.get(i).copied().unwrap_or(0) < **w)
            .filter_map(|(i, w)| {
                let recent = w.saturating_sub(newer.get(i).copied().unwrap_or(0));
                u32::try_from(*i).ok().map(|i| (i, recent))
            })
            .collect();
        *older = std::mem::replace(newer, now);
        if lost > 0 {
            tracing::warn!(lost, "dirty tracker lost events: reading the whole disk");
            return None;
        }
        out.sort_unstable();
        Some(out)
    }
}

/// The whole live disk, through the slicer's io_uring pipeline (parallel
/// hashing) reading the loop device's backing file: the loop device writes it
/// with O_DIRECT, so a read never sees stale cached pages.
fn full_slice(
    image: &std::path::Path,
    chunk_size: edgeshift_common::ChunkSize,
    store: &LocalStore,
) -> Result<Manifest, MigrateError> {
    let opts = SliceOptions {
        chunk_size,
        read_mode: ReadMode::Auto,
        progress: None,
    };
    let report = slice_image(image, store, &opts)?;
    Ok(store.get_manifest(&report.manifest_id)?)
}

/// The live disk now: only the chunks the tracker saw written are read
/// again when it can say so, else all of it.
fn reslice(
    dev: &std::path::Path,
    image: &std::path::Path,
    cur: &Manifest,
    writes: &mut Option<WriteLog>,
    temp: &mut Temperature,
    store: &LocalStore,
) -> Result<Manifest, MigrateError> {
    match writes.as_mut().and_then(|w| w.take()) {
        Some(written) => {
            for &(i, n) in &written {
                temp.add_writes(i as usize, n as f64);
            }
            let idx: Vec<u32> = written.iter().map(|&(i, _)| i).collect();
            tracing::debug!(
                chunks = idx.len(),
                "re-reading the chunks written since the last slices"
            );
            reslice_some(dev, cur, &idx, store)
        }
        None => full_slice(image, cur.chunk_size, store),
    }
}

/// `cur` with the chunks at `indices` read again from the device. Reads
/// and hashes run on up to 8 threads whatever the cores: the guest's
/// writes reach the disk with O_DIRECT, so these reads wait on the disk,
/// and more of them in flight overlap those waits with the hashing (the
/// ~140 chunks of a boot log: 0.035-0.06 s, against 0.05-0.1 s on 2
/// threads, a TCG guest beside them); the chunks the store lacks are
/// written and synced behind (writing and syncing first kept the source's
/// path idle 0.1–0.19 s for the ~140 chunks a boot log names), placed
/// roughly in the order of `indices`.
fn reslice_some(
    dev: &std::path::Path,
    cur: &Manifest,
    indices: &[u32],
    store: &LocalStore,
) -> Result<Manifest, MigrateError> {
    let started = Instant::now();
    let f = std::fs::File::open(dev).map_err(|source| MigrateError::Io {
        op: "open",
        path: dev.to_path_buf(),
        source,
    })?;
    let indices: Vec<usize> = indices
        .iter()
        .map(|&i| i as usize)
        .filter(|&i| i < cur.chunks.len())
        .collect();
    let read: Vec<(usize, Fingerprint, Vec<u8>)> = crate::par::map_in_parts_waiting(&indices, 8, 8, |&i| {
        let data = vm::image::read_chunk(&f, dev, cur.chunk_size, cur.image_size, i)?;
        Ok((i, vm::image::fingerprint_chunk(&data), data))
    })
    .into_iter()
    .map(|r| r.unwrap_or_else(|| Err(MigrateError::State("chunk reader panicked".into()))))
    .collect::<Result<_, MigrateError>>()?;
    let read_s = started.elapsed().as_secs_f64();
    let mut next = cur.clone();
    let mut chunks = Vec::with_capacity(indices.len());
    for (i, fp, data) in read {
        next.chunks[i] = fp;
        chunks.push((fp, data));
    }
    // The destination asks the source's chunk server for these at once:
    // they are written and synced on another thread once an intent names
    // them (the server waits for a chunk being written; see
    // `store::publish`), so the source's path waits for neither.
    let stored = store.publish_sync_later(chunks)?;
    tracing::debug!(
        chunks = indices.len(),
        stored,
        read_s,
        seconds = started.elapsed().as_secs_f64(),
        "chunks read again"
    );
    Ok(next)
}

/// `a` and `b` alternately, then what is left of the longer.
fn interleave(a: Vec<u32>, b: Vec<u32>) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// Tells the coordinator what the source holds now (the live disk): the
/// plan is made with the boot image, which it knows already, so a
/// coordinator gone since the plan does not stop the handoff.
fn report_live_disk(run: &mut Run, store: &LocalStore, cur: &Manifest, progress: &dyn Fn(Phase, &str)) {
    if let Some(c) = &run.opts.coordinator {
        progress(Phase::Precopy, "reporting the live disk to the coordinator");
        if let Err(e) = super::coord::report_live_disk(c, store, cur, &mut run.coord) {
            tracing::warn!(error = %e, "live disk not reported to the coordinator; the handoff goes on");
            run.coord.left.push(format!("live disk not reported: {e}"));
        }
    }
}

/// Without a boot log: round 0 pulls the boot image from every holder while
/// the live disk is sliced here (io_uring, parallel hashing); round 1 then
/// sends what changed since boot (it exists only in that slice), from every
/// holder, coldest first. Returns the live disk as last read.
#[allow(clippy::too_many_arguments)]
fn round0_beside_slice(
    run: &mut Run,
    writes: &mut Option<WriteLog>,
    temp: &mut Temperature,
    boot: &Manifest,
    dev: &std::path::Path,
    image: &std::path::Path,
    store: &LocalStore,
    progress: &dyn Fn(Phase, &str),
) -> Result<Manifest, MigrateError> {
    let ordering = run.opts.ordering;
    progress(Phase::Precopy, "round 0 (boot image), slicing the live disk");
    let all: Vec<u32> = (0..boot.chunks.len() as u32).collect();
    let round0 = temp.order(all, ordering, true);
    // With a warm destination round 0 is local writes there, with a cold
    // one it pulls from every holder.
    let (sliced, pulled) = std::thread::scope(|sc| {
        let slicer = sc.spawn(|| {
            let t = Instant::now();
            full_slice(image, boot.chunk_size, store).map(|m| (m, t.elapsed().as_secs_f64()))
        });
        let pulled = run.round(boot, round0);
        let sliced = slicer
            .join()
            .unwrap_or_else(|_| Err(MigrateError::State("live disk slicer panicked".into())));
        (sliced, pulled)
    });
    pulled?;
    let (mut cur, slice_s) = sliced?;
    tracing::info!(slice_s, "live disk sliced alongside round 0");
    if ordering == Ordering::ColdFirst && !run.opts.sample_interval.is_zero() {
        // An optional longer first temperature sample.
        std::thread::sleep(run.opts.sample_interval);
    }
    if writes.is_some() {
        // The first temperature sample is what the guest wrote while the
        // slice ran (what changed since boot is not a temperature: the
        // guest's first minutes wrote much that stays cold).
        let next = reslice(dev, image, &cur, writes, temp, store)?;
        temp.observe(&cur, &next);
        cur = next;
    }
    report_live_disk(run, store, &cur, progress);
    let changed = run.stale(&cur);
    if changed.len() > run.opts.converge_chunks {
        let todo = temp.order(changed, ordering, true);
        progress(
            Phase::Precopy,
            &format!("round 1: {} chunks changed since boot", todo.len()),
        );
        let holders = run.holders();
        run.pull(&cur, todo, holders, Vec::new(), false)?;
    }
    Ok(cur)
}

/// Sets `want` on the source QEMU, or plain migration (with a log line)
/// when this QEMU cannot take it. Returns what was set.
fn source_memory_transport(
    qmp: &mut QmpClient,
    want: MemoryTransport,
) -> Result<MemoryTransport, MigrateError> {
    match qmp.set_memory_transport(want) {
        Ok(()) => Ok(want),
        Err(e) => {
            tracing::warn!(error = %e, ?want, "this QEMU cannot take that memory transport; falling back to plain migration");
            qmp.set_memory_transport(MemoryTransport::Plain)?;
            Ok(MemoryTransport::Plain)
        }
    }
}

/// QEMU's `max-bandwidth` when nothing caps memory (1 GiB/s: the path decides).
const UNCAPPED_BPS: u64 = 1 << 30;

/// Starts QEMU's memory migration to `uri` once the destination QEMU
/// listens: the transport the destination settled on, pause-before-switchover,
/// the downtime limit and the `--memory-max-mbit` cap. With `hold`, memory
/// cannot converge (QEMU's switchover bandwidth set to a few bytes/s) until
/// [`let_memory_converge`]; false, and nothing started, when this QEMU
/// cannot do that.
fn start_memory(
    run: &mut Run,
    qmp: &mut QmpClient,
    uri: &str,
    asked: MemoryTransport,
    hold: bool,
    progress: &dyn Fn(Phase, &str),
) -> Result<bool, MigrateError> {
    if hold {
        // QEMU converges once what is pending fits the downtime at this
        // rate. The budget must stay above zero: at zero the first pass's
        // end (nothing pending before a new dirty sync) counts as
        // converged. Half a page (2 KiB over the downtime limit) lets
        // only a sync that finds no page dirty converge.
        let hold_bps = (2048 * 1000 / run.opts.downtime_limit_ms.max(1)).max(1);
        if let Err(e) = qmp.set_switchover_bandwidth(hold_bps) {
            tracing::warn!(error = %e, "this QEMU cannot hold memory back; memory goes after the disk");
            return Ok(false);
        }
    } else if let Err(e) = qmp.set_switchover_bandwidth(0) {
        // Older QEMU: nothing of a held migration can linger there either.
        tracing::debug!(error = %e, "no avail-switchover-bandwidth in this QEMU");
    }
    progress(Phase::Memory, "waiting for the destination QEMU");
    let memory = match proto::call(run.ctl()?, &Request::AwaitIncoming)? {
        Response::Incoming { memory, .. } => memory,
        other => {
            return Err(MigrateError::Protocol(format!(
                "unexpected answer to AwaitIncoming: {other:?}"
            )))
        }
    };
    if memory != asked {
        tracing::warn!(
            ?asked,
            ?memory,
            "the destination QEMU fell back; so does the source"
        );
        qmp.set_memory_transport(memory)?;
    }
    progress(Phase::Memory, &format!("QEMU migrate to {uri} ({memory:?})"));
    qmp.migrate_set_capabilities(&[("pause-before-switchover", true), ("events", true)])?;
    let cap = memory_cap(&run.opts);
    qmp.migrate_set_parameters(Some(run.opts.downtime_limit_ms), Some(cap))?;
    qmp.migrate(uri)?;
    tracing::info!(%uri, ?memory, hold, cap_bps = cap, "memory migration started");
    Ok(true)
}

/// Ends the hold of [`start_memory`]: the measured rate decides the
/// switchover again, and memory has the path (up to `--memory-max-mbit`).
fn let_memory_converge(run: &Run, qmp: &mut QmpClient) -> Result<(), MigrateError> {
    qmp.set_switchover_bandwidth(0)?;
    qmp.migrate_set_parameters(Some(run.opts.downtime_limit_ms), Some(memory_cap(&run.opts)))?;
    Ok(())
}

/// QEMU's `max-bandwidth` for memory: `--memory-max-mbit`, else uncapped.
fn memory_cap(opts: &MigrateOptions) -> u64 {
    opts.memory_max_bps.unwrap_or(UNCAPPED_BPS)
}

/// Signals between the disk pre-copy and [`hold_memory_back`].
#[derive(Default)]
struct MemoryHold {
    /// QEMU reached pre-switchover (the VM is stopped) under the disk rounds.
    converged: AtomicBool,
    stop: AtomicBool,
}

/// QEMU's `max-bandwidth` once memory's first pass is nearly over and disk
/// rounds still run: a trickle. Passes over the dirty pages now would send
/// pages that are dirtied again before the switchover (the path is the
/// disk's), and slow passes leave little chance of one with nothing dirty
/// (the one way a held migration can still converge). QEMU 10's multifd
/// streams do not keep to it (1-2 MB/s measured), but its passes slow down.
const MEMORY_TRICKLE_BPS: u64 = 64 << 10;
/// How often the watch looks at QEMU.
const MEMORY_WATCH: Duration = Duration::from_millis(25);

/// Runs beside the disk pre-copy while memory moves (held from converging,
/// see [`start_memory`]): before the first pass ends (in its last quarter,
/// or at QEMU's second dirty sync) memory drops to a trickle. (A cap on
/// memory's share of the path beside round 0 was tried and dropped: QEMU's
/// multifd streams ran at 11.7 MB/s under a 6.1 MB/s `max-bandwidth`.)
fn hold_memory_back(qmp: &mut QmpClient, hold: &MemoryHold) -> Result<(), MigrateError> {
    let mut held = false;
    while !hold.stop.load(AtomicOrdering::Acquire) {
        let info = qmp.query_migrate()?;
        match info.status.as_deref() {
            Some("pre-switchover") => {
                hold.converged.store(true, AtomicOrdering::Release);
                tracing::warn!("memory converged before the disk rounds ended; the pause sends the rest");
                return Ok(());
            }
            // The memory phase reports these.
            Some("failed") | Some("cancelled") | Some("completed") => return Ok(()),
            _ => {}
        }
        let ram = info.ram.unwrap_or_default();
        tracing::debug!(
            status = info.status.as_deref().unwrap_or("-"),
            transferred = ram.transferred,
            remaining = ram.remaining,
            dirty_syncs = ram.dirty_sync_count,
            "memory under the disk rounds"
        );
        // QEMU walks memory in address order and the end of a guest's
        // memory is mostly zero pages (free on the wire), so the last
        // quarter goes in a blink; held back before it, the pass ends (if
        // at all) at a trickle, where no quick run of empty dirty syncs can
        // converge it.
        let last_quarter = ram.total > 0 && ram.remaining < ram.total / 4 && ram.transferred > 0;
        if !held && (ram.dirty_sync_count >= 2 || last_quarter) {
            qmp.migrate_set_parameters(None, Some(MEMORY_TRICKLE_BPS))?;
            held = true;
            tracing::info!(
                transferred = ram.transferred,
                remaining = ram.remaining,
                "memory's first pass nearly done under the disk rounds: held back until they end"
            );
        }
        std::thread::sleep(MEMORY_WATCH);
    }
    Ok(())
}

fn injected(opts: &MigrateOptions, phase: Phase) -> Result<(), MigrateError> {
    if opts.fail_after == Some(phase) {
        return Err(MigrateError::State(format!(
            "failure injected after the {phase:?} phase"
        )));
    }
    Ok(())
}

fn sync_device(dev: &std::path::Path) -> Result<(), MigrateError> {
    std::fs::File::open(dev)
        .and_then(|f| f.sync_all())
        .map_err(|source| MigrateError::Io {
            op: "flush",
            path: dev.to_path_buf(),
            source,
        })
}

/// Migrates a VM of this edge to another. On error before the switchover
/// the VM keeps running here and the destination's half is torn down.
pub fn migrate(
    opts: MigrateOptions,
    progress: &dyn Fn(Phase, &str),
) -> Result<MigrationReport, MigrateError> {
    let t0 = Instant::now();
    let sd = StateDir::new(&opts.state_dir);
    let rec = sd.load(&opts.name)?;
    if !vm::state::is_running(&rec) {
        return Err(MigrateError::State(format!(
            "VM {} is not running (pid {} gone)",
            opts.name, rec.pid
        )));
    }
    let mut qmp = QmpClient::connect(&rec.qmp_socket, QMP_WAIT)?;
    let status = qmp.query_status()?;
    if !status.running {
        return Err(MigrateError::State(format!(
            "VM {} is {}, not running",
            opts.name, status.status
        )));
    }
    let store = LocalStore::open(&rec.store)?;
    let boot_id = Fingerprint(
        hex::decode(&rec.manifest_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                MigrateError::State(format!("VM record has a bad manifest id {:?}", rec.manifest_id))
            })?,
    );
    let boot = store.get_manifest(&boot_id)?;
    let mut run = Run {
        ctl: None,
        rounds: Vec::new(),
        bytes_by_source: BTreeMap::new(),
        sent: vec![None; boot.chunks.len()],
        resent: 0,
        source_rate: None,
        memory_running: false,
        chunk_bytes: boot.chunk_size.bytes(),
        throttle: ThrottleReport {
            max_downtime_ms: opts.max_downtime.as_millis() as u64,
            ..Default::default()
        },
        throttled_qdev: None,
        memory_with_disk: false,
        changed_since_boot_from: "slice",
        coord: Default::default(),
        opts,
    };
    let mut phases = Vec::new();
    let mut migration_started = false;
    tracing::debug!(
        setup_s = t0.elapsed().as_secs_f64(),
        "VM record, QMP session and boot manifest loaded"
    );
    let result = drive(
        &mut run,
        &mut qmp,
        &rec,
        &store,
        &boot,
        &mut phases,
        &mut migration_started,
        progress,
    );
    match result {
        Ok((downtime_ms, memory_bytes, pause_disk_seconds, final_id, missing)) => {
            // The handoff is done when the destination runs the VM; the
            // source's clean-up below is not part of it.
            let total_seconds = t0.elapsed().as_secs_f64();
            // The VM runs at the destination: stop the source's copy. QEMU
            // serves one QMP client at a time, so ours goes first or the
            // teardown's own session would wait for a greeting.
            drop(qmp);
            if let Err(e) = vm::teardown(&Qemu::default(), &rec) {
                tracing::warn!(error = %e, "source QEMU teardown incomplete");
            }
            let _ = sd.remove_record(&rec.spec.name);
            if let Ok(dir) = sd.vm_dir(&rec.spec.name) {
                let _ = std::fs::remove_dir_all(dir);
            }
            // Step 5 at the source: this edge's reference to the image goes.
            if let Some(c) = &run.opts.coordinator {
                let left = super::coord::release_source(c, &sd, &rec.store, &rec.spec.name, &rec.manifest_id);
                run.coord.source_released = left.is_empty();
                run.coord.left.extend(left);
            }
            let disk_bytes = run.bytes_by_source.values().sum();
            Ok(MigrationReport {
                vm: rec.spec.name.clone(),
                to: run.opts.to.clone(),
                ordering: run.opts.ordering,
                total_seconds,
                downtime_ms,
                pause_disk_seconds,
                phases,
                chunks_resent: run.resent,
                delta_chunks: run.rounds.iter().map(|r| r.delta_chunks).sum(),
                delta_saved_bytes: run.rounds.iter().map(|r| r.delta_saved_bytes).sum(),
                rounds: run.rounds,
                disk_bytes,
                memory_bytes,
                bytes_by_source: run.bytes_by_source,
                missing_at_plan_chunks: missing.0,
                missing_at_plan_bytes: missing.1,
                manifest_id: final_id,
                coordination: run.coord,
                throttle: run.throttle,
                memory_started_with_disk: run.memory_with_disk,
                changed_since_boot_from: run.changed_since_boot_from.into(),
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "migration failed; keeping the VM at the source");
            rollback(&mut run, &mut qmp, &rec, migration_started);
            Err(e)
        }
    }
}

/// Puts the source back as it was: migration cancelled, VM running,
/// destination told to drop its half.
fn rollback(run: &mut Run, qmp: &mut QmpClient, rec: &vm::VmRecord, migration_started: bool) {
    // A fresh QMP session: the old one may be mid-reply after an error.
    let mut fresh = QmpClient::connect(&rec.qmp_socket, QMP_WAIT);
    let q = match fresh.as_mut() {
        Ok(q) => q,
        Err(_) => qmp,
    };
    if migration_started {
        if let Err(e) = q.migrate_cancel() {
            tracing::warn!(error = %e, "migrate_cancel failed");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match q.query_migrate() {
                Ok(m)
                    if matches!(
                        m.status.as_deref(),
                        Some("cancelled" | "failed" | "completed") | None
                    ) =>
                {
                    break
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
    }
    if let Some(qdev) = run.throttled_qdev.take() {
        // The VM stays here: its disk runs at full speed again.
        match q.set_disk_write_throttle(&qdev, 0, 0) {
            Ok(()) => tracing::info!("source disk write throttle lifted"),
            Err(e) => tracing::error!(error = %e, "the source disk write throttle could not be lifted"),
        }
    }
    match q.query_status() {
        Ok(s) if !s.running => {
            if let Err(e) = q.cont() {
                tracing::error!(error = %e, "the source VM could not be resumed");
            } else {
                tracing::info!("source VM resumed");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "source VM state unknown"),
    }
    if let Some(mut s) = run.ctl.take() {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        match proto::call(&mut s, &Request::Abort) {
            Ok(_) => tracing::info!("destination tore its half down"),
            Err(e) => {
                tracing::warn!(error = %e, "destination not reachable for abort (it tears down when the connection drops)")
            }
        }
    }
}

type Outcome = (u64, u64, f64, String, (u64, u64));

/// Steps 1 (the destination's side of the plan: `Prepare`) and 2 (its QEMU
/// started with `-incoming defer`); the plan's phase started at `t`.
/// Returns the memory transport asked for, the URI memory goes to, and the
/// chunks and bytes the destination lacked.
#[allow(clippy::too_many_arguments)]
fn prepare_destination(
    run: &mut Run,
    qmp: &mut QmpClient,
    rec: &vm::VmRecord,
    boot: &Manifest,
    t: Instant,
    phases: &mut Vec<PhaseReport>,
    progress: &dyn Fn(Phase, &str),
) -> Result<(MemoryTransport, String, (u64, u64)), MigrateError> {
    let ctl = proto::connect_auth(&run.opts.to, &run.opts.key, &run.opts.id, Duration::from_secs(5))?;
    ctl.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| MigrateError::Channel(e.to_string()))?;
    run.ctl = Some(ctl);
    progress(Phase::Plan, "asking the destination what it lacks");
    let missing = match proto::call(
        run.ctl()?,
        &Request::Prepare {
            spec: rec.spec.clone(),
            manifest: boot.to_bytes(),
        },
    )? {
        Response::Prepared {
            missing_chunks,
            missing_bytes,
            local_chunks,
            plan,
        } => {
            tracing::info!(
                missing_chunks,
                missing_bytes,
                local_chunks,
                coordinator = plan.is_some(),
                "plan"
            );
            run.coord.plan_from = if plan.is_some() {
                "coordinator"
            } else {
                "peer list"
            }
            .into();
            run.coord.plan = plan;
            (missing_chunks, missing_bytes)
        }
        other => {
            return Err(MigrateError::Protocol(format!(
                "unexpected answer to Prepare: {other:?}"
            )))
        }
    };
    phases.push(PhaseReport {
        phase: Phase::Plan,
        seconds: t.elapsed().as_secs_f64(),
        bytes: 0,
    });
    injected(&run.opts, Phase::Plan)?;

    // 2. The destination QEMU starts in the background (`-incoming defer`,
    //    the memory transport set on it) while the disk moves.
    let t = Instant::now();
    progress(Phase::Incoming, "starting the destination QEMU");
    let asked = source_memory_transport(qmp, run.opts.memory)?;
    let uri = match proto::call(run.ctl()?, &Request::StartIncoming { memory: asked })? {
        Response::Incoming { uri, .. } => uri,
        other => {
            return Err(MigrateError::Protocol(format!(
                "unexpected answer to StartIncoming: {other:?}"
            )))
        }
    };
    phases.push(PhaseReport {
        phase: Phase::Incoming,
        seconds: t.elapsed().as_secs_f64(),
        bytes: 0,
    });
    injected(&run.opts, Phase::Incoming)?;
    Ok((asked, uri, missing))
}

#[allow(clippy::too_many_arguments)]
fn drive(
    run: &mut Run,
    qmp: &mut QmpClient,
    rec: &vm::VmRecord,
    store: &LocalStore,
    boot: &Manifest,
    phases: &mut Vec<PhaseReport>,
    migration_started: &mut bool,
    progress: &dyn Fn(Phase, &str),
) -> Result<Outcome, MigrateError> {
    let dev = rec.loop_device.clone();
    let cs = boot.chunk_size;
    let mut temp = Temperature::new(boot.chunks.len());
    let ordering = run.opts.ordering;

    // 1. Plan. The VM booted from a manifest this edge's store holds in
    //    full (pinned while it runs), so the destination prepares with it at
    //    once (the coordinator plans sources for it) while nothing of the
    //    live disk is read yet. The pause's check is against the final live
    //    manifest, so the shortcut does not weaken it.
    let t = Instant::now();
    progress(Phase::Plan, "asking the destination what it lacks");
    // What changed since the boot manifest: the boot log's first look, when
    // the VM has a log that can be trusted; else a slice beside round 0.
    let booted = rec.image_path.parent().filter(|_| run.opts.use_boot_log);
    let (mut writes, since_boot) = match booted.and_then(|d| WriteLog::boot_log(d, &dev, cs.bytes())) {
        Some((w, since)) => {
            // Written again and again since boot: such chunks are hot before
            // any look of ours and wait (the most written first, within the
            // pause's budget) instead of going in round 0 to be sent twice.
            let mut hot = 0;
            for &(i, n) in &since {
                temp.add_writes(i as usize, n as f64);
                if n >= HOT_WRITES {
                    temp.mark_hot(i as usize);
                    hot += 1;
                }
            }
            tracing::info!(chunks = since.len(), hot, "boot log: chunks written since boot");
            tracing::debug!(?since, "boot log: (chunk, writes since boot)");
            (Some(w), Some(since))
        }
        None => {
            let mut w = WriteLog::open(&dev, cs.bytes());
            if let Some(w) = w.as_mut() {
                w.take();
            }
            (w, None)
        }
    };
    run.changed_since_boot_from = if since_boot.is_some() { "boot log" } else { "slice" };
    let image = rec.image_path.clone();
    // What changed since boot is read (and published) while the
    // destination prepares and its QEMU starts: the source's path would
    // otherwise wait for the read.
    let since_idx: Option<Vec<u32>> = since_boot.as_ref().map(|w| w.iter().map(|&(i, _)| i).collect());
    // Read and published in the order the destination will likely ask the
    // source for them (its chunk server waits for a chunk not yet placed):
    // round 0's order, with the hot ones that fill its tail interleaved,
    // since which of the two the source is asked for first depends on what
    // the neighbours hold (the source's queue puts what only it holds first).
    let publish_order: Option<Vec<u32>> = since_idx.as_ref().map(|idx| {
        let (hot, rest): (Vec<u32>, Vec<u32>) = idx.iter().partition(|&&i| temp.is_hot(i as usize));
        interleave(
            temp.order(rest, ordering, false),
            temp.order(hot, ordering, false),
        )
    });
    let (steps, live0) = std::thread::scope(|sc| {
        let reader = publish_order
            .as_deref()
            .map(|idx| sc.spawn(|| reslice_some(&dev, boot, idx, store)));
        let steps = prepare_destination(run, qmp, rec, boot, t, phases, progress);
        let live0 = reader.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(MigrateError::State("chunk reader panicked".into())))
        });
        (steps, live0)
    });
    let (asked, uri, missing) = steps?;
    let mut live0 = live0.transpose()?;
    // Memory starts with the disk when asked: the path carries it while the
    // live disk is sliced (else idle), then shares it with the disk rounds
    // (capped so that it cannot converge first); it converges after them.
    let memory_started = if run.opts.memory_with_disk {
        let t = Instant::now();
        let started = start_memory(run, qmp, &uri, asked, true, progress)?;
        *migration_started = started;
        run.memory_with_disk = started;
        run.memory_running = started;
        started.then_some(t)
    } else {
        None
    };

    // 3. Disk pre-copy: round 0 pulls the live disk from every holder, the
    //    hot chunks only as filler of its tail (without a boot log: the boot
    //    image while the live disk is sliced here, then a round 1 of what
    //    changed since boot, from every holder); then rounds of what was
    //    written since (it exists only here) while they are big and
    //    shrinking, the hottest waiting for the pause.
    let t = Instant::now();
    let before = run.bytes_by_source.values().sum::<u64>();
    let hold = MemoryHold::default();
    let (precopy, monitor) = std::thread::scope(|sc| {
        // Beside the disk rounds, a watch on memory slows it as its first
        // pass ends, so that it cannot converge (stop the VM) before the
        // disk rounds do.
        let monitor = memory_started.map(|_| {
            let (qmp, hold) = (&mut *qmp, &hold);
            sc.spawn(move || hold_memory_back(qmp, hold))
        });
        let precopy = (|| -> Result<Manifest, MigrateError> {
            // What changed since boot: from the boot log when it can be
            // trusted (no slice), else from a slice of the live disk beside
            // round 0.
            let mut cur = match (since_idx.as_deref(), live0.take()) {
                (Some(idx), Some(cur)) => {
                    report_live_disk(run, store, &cur, progress);
                    // Round 0: the boot image and what changed since boot at
                    // once, from every holder (an earlier copy of this disk
                    // may sit at a neighbour; the fetcher's holdings query
                    // keeps the source's path on what only it holds), the
                    // chunks the log counts fewest writes for first.
                    progress(
                        Phase::Precopy,
                        &format!(
                            "round 0: the boot image and {} chunks written since boot",
                            idx.len()
                        ),
                    );
                    let all: Vec<u32> = (0..boot.chunks.len() as u32).collect();
                    // The hot chunks go last, and only while the rest of
                    // round 0 is still on its way (a neighbour holding an
                    // earlier copy still sends, the source's path fills its
                    // idle tail); the others wait, to be sent once.
                    let hot: Vec<u32> = all
                        .iter()
                        .copied()
                        .filter(|&i| {
                            temp.is_hot(i as usize) && cur.chunks[i as usize] != boot.chunks[i as usize]
                        })
                        .collect();
                    let round0 = temp.order(all, ordering, false);
                    let filler = if ordering == Ordering::ColdFirst {
                        hot
                    } else {
                        Vec::new()
                    };
                    let holders = run.holders();
                    run.pull(&cur, round0, holders, filler, false)?;
                    cur
                }
                _ => round0_beside_slice(run, &mut writes, &mut temp, boot, &dev, &image, store, progress)?,
            };
            let mut last_len = usize::MAX;
            for r in 1..=run.opts.max_rounds {
                if hold.converged.load(AtomicOrdering::Acquire) {
                    // Memory converged under the disk rounds after all (the
                    // watch said so): the VM is stopped, the rest goes in the pause.
                    break;
                }
                // Few enough written since the last look (the log says so
                // without a slice): memory starts now, and the slice runs
                // beside it (the first look while memory moves) instead of
                // keeping the source's path idle (0.07 s for a boot log's
                // chunks). A round that the pause's budget could nearly hold
                // goes beside memory too, at that first look: before memory,
                // its slice and its tail left the source's path idle (a
                // 10-chunk round cost 0.26-0.31 s where its bytes take 0.22).
                let written = writes.as_mut().and_then(WriteLog::peek);
                if let Some(written) = written {
                    let mut pending = run.stale(&cur);
                    pending.extend(written);
                    pending.sort_unstable();
                    pending.dedup();
                    let (_, todo) = temp.hold_hottest(pending, ordering, run.hold_room());
                    if todo.len() <= run.opts.converge_chunks.max(run.budget_chunks()) {
                        break;
                    }
                }
                let next = reslice(&dev, &image, &cur, &mut writes, &mut temp, store)?;
                temp.observe(&cur, &next);
                cur = next;
                // The hottest chunks wait for the pause, as many as its
                // budget holds; the rest go, coldest first.
                let (waiting, todo) = temp.hold_hottest(run.stale(&cur), ordering, run.hold_room());
                let n = todo.len();
                // Few enough left for the pause, or shrinking by less than a
                // fifth (another round would mostly send the hot set again:
                // at 10 Mbit/s rounds of 31, 26 and 23 chunks took 18 s):
                // memory starts now.
                if n <= run.opts.converge_chunks || (n as u64) * 5 > (last_len as u64).saturating_mul(4) {
                    break;
                }
                progress(
                    Phase::Precopy,
                    &format!("round {r}: {n} chunks ({} hot wait)", waiting.len()),
                );
                // What was written since the last round, and the hot chunks
                // no neighbour had, exist only here.
                let only_source = vec![run.opts.source_addr.clone()];
                run.round_from(&cur, todo, only_source, Vec::new())?;
                last_len = n;
            }
            Ok(cur)
        })();
        hold.stop.store(true, AtomicOrdering::Release);
        let monitor = monitor.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(MigrateError::State("memory monitor panicked".into())))
        });
        (precopy, monitor)
    });
    let mut cur = precopy?;
    if let Some(m) = monitor {
        m?;
    }
    phases.push(PhaseReport {
        phase: Phase::Precopy,
        seconds: t.elapsed().as_secs_f64(),
        bytes: run.bytes_by_source.values().sum::<u64>() - before,
    });
    injected(&run.opts, Phase::Precopy)?;

    // 4. Memory, up to the pause before switchover, with disk rounds
    //    alongside (QEMU's `migrate` runs in its own threads). Started
    //    already with the disk, memory is now let converge at full rate.
    let t = match memory_started {
        Some(started) => {
            progress(Phase::Memory, &format!("QEMU migrate to {uri}: converging"));
            let_memory_converge(run, qmp)?;
            started
        }
        None => {
            let t = Instant::now();
            start_memory(run, qmp, &uri, asked, false, progress)?;
            *migration_started = true;
            t
        }
    };
    run.memory_running = true;
    // The first look at the disk goes at once.
    let mut last_disk: Option<Instant> = None;
    let info = loop {
        let m = qmp.query_migrate()?;
        match m.status.as_deref() {
            Some("pre-switchover") => break m,
            Some("failed") | Some("cancelled") => {
                return Err(MigrateError::Memory(format!(
                    "failed before the switchover: {}",
                    m.error_desc.unwrap_or_else(|| "no reason given".into())
                )))
            }
            _ => {}
        }
        if t.elapsed() > MEMORY_TIMEOUT {
            return Err(MigrateError::Memory("did not converge in time".into()));
        }
        // While memory moves, the writes pile up for the pause (downtime).
        // Past twice `converge_chunks` a round sends them (the hot chunks
        // held so far included, coldest first). Fewer are left for the
        // pause: a round beside QEMU's streams gets a small share of the
        // source's path (measured: 2.6 MB in 1.4 s at 100 Mbit/s) and holds
        // up noticing the pre-switchover state. The first look, with
        // memory's whole pass ahead, sends what pre-copy left past
        // `converge_chunks`, as a round before memory would have.
        let first_look = last_disk.is_none();
        if last_disk.is_none_or(|l| l.elapsed() >= DISK_ROUND_DURING_MEMORY) {
            last_disk = Some(Instant::now());
            let next = reslice(&dev, &image, &cur, &mut writes, &mut temp, store)?;
            temp.observe(&cur, &next);
            cur = next;
            let stale = run.stale(&cur);
            run.squeeze(qmp, &stale)?;
            // Throttled, a round goes whenever more is pending than the
            // budget allows, so the pause starts from a small set.
            let over_budget = run.throttle.applied && run.over_budget(&stale);
            let (_, todo) = temp.hold_hottest(stale, ordering, run.hold_room());
            let most_left = if first_look {
                run.opts.converge_chunks
            } else {
                2 * run.opts.converge_chunks
            };
            if todo.len() > most_left || over_budget {
                let mut todo = todo;
                if run.throttle.applied {
                    // A round blocks noticing the pause; throttled (a slow
                    // path), it sends only what the budget holds, coldest
                    // first, so a pause that comes meanwhile waits little.
                    todo.truncate(run.budget_chunks().max(1));
                }
                let only_source = vec![run.opts.source_addr.clone()];
                run.round_from(&cur, todo, only_source, Vec::new())?;
            }
            if run.opts.fail_after == Some(Phase::MemoryRound) {
                return Err(MigrateError::State(format!(
                    "failure injected at a disk round while QEMU moves memory (migration {})",
                    m.status.as_deref().unwrap_or("unknown")
                )));
            }
        }
        // The pause starts when this loop notices it: a short poll.
        std::thread::sleep(Duration::from_millis(10));
    };
    let mem_bytes_precopy = info.ram.map(|r| r.transferred).unwrap_or(0);
    phases.push(PhaseReport {
        phase: Phase::Memory,
        seconds: t.elapsed().as_secs_f64(),
        bytes: mem_bytes_precopy,
    });
    injected(&run.opts, Phase::Memory)?;

    // 5. The pause: the source is stopped; send the last chunks and check.
    let t = Instant::now();
    progress(Phase::Pause, "final chunks");
    let st = qmp.query_status()?;
    if st.running {
        return Err(MigrateError::Memory(format!(
            "source VM still {} in the pause",
            st.status
        )));
    }
    sync_device(&dev)?;
    let fin = reslice(&dev, &image, &cur, &mut writes, &mut temp, store)?;
    let t_slice = t.elapsed().as_secs_f64();
    temp.observe(&cur, &fin);
    let last = run.stale(&fin);
    let last_n = last.len();
    let before = run.bytes_by_source.values().sum::<u64>();
    // Everything written since the last round exists only at the source.
    let only_source = vec![run.opts.source_addr.clone()];
    run.round_from(&fin, last.clone(), only_source, Vec::new())?;
    let t_round = t.elapsed().as_secs_f64();
    let fin_id = fin.id();
    let (ok, detail) = match proto::call(
        run.ctl()?,
        &Request::Verify {
            manifest_id: fin_id.0,
            recheck: last,
        },
    )? {
        Response::Verified { ok, detail } => (ok, detail),
        other => {
            return Err(MigrateError::Protocol(format!(
                "unexpected answer to Verify: {other:?}"
            )))
        }
    };
    if !ok {
        return Err(MigrateError::Verify(detail));
    }
    tracing::info!(
        final_chunks = last_n,
        %detail,
        slice_s = t_slice,
        round_s = t_round - t_slice,
        verify_s = t.elapsed().as_secs_f64() - t_round,
        tracker = writes.is_some(),
        "pause: destination disk equals the source's"
    );
    injected(&run.opts, Phase::Pause)?;
    let pause_disk_seconds = t.elapsed().as_secs_f64();
    qmp.migrate_continue("pre-switchover")?;
    let done = loop {
        let m = qmp.query_migrate()?;
        match m.status.as_deref() {
            Some("completed") => break m,
            Some("failed") | Some("cancelled") => {
                return Err(MigrateError::Memory(format!(
                    "failed at the switchover: {}",
                    m.error_desc.unwrap_or_else(|| "no reason given".into())
                )))
            }
            _ => {}
        }
        if t.elapsed() > MEMORY_TIMEOUT {
            return Err(MigrateError::Memory("switchover did not complete".into()));
        }
        // The VM is down until this completes: poll tightly.
        std::thread::sleep(Duration::from_millis(2));
    };
    // Past this point the VM is the destination's: no rollback.
    *migration_started = false;
    phases.push(PhaseReport {
        phase: Phase::Pause,
        seconds: t.elapsed().as_secs_f64(),
        bytes: run.bytes_by_source.values().sum::<u64>() - before,
    });
    let downtime = done.downtime.unwrap_or(0);
    let memory_bytes = done.ram.map(|r| r.transferred).unwrap_or(mem_bytes_precopy);
    progress(Phase::Pause, "finishing at the destination");
    match proto::call(run.ctl()?, &Request::Finish) {
        Ok(Response::Done) => {}
        Ok(Response::Finished { coordinator }) => {
            if let Some(t) = coordinator.as_deref().filter(|t| t.contains("left:")) {
                run.coord.left.push(format!("destination: {t}"));
            }
            run.coord.destination = coordinator;
        }
        Ok(other) => tracing::warn!(?other, "unexpected answer to Finish"),
        Err(e) => {
            tracing::warn!(error = %e, "destination did not confirm Finish; it keeps a VM that switched over")
        }
    }
    Ok((
        downtime,
        memory_bytes,
        pause_disk_seconds,
        fin_id.to_hex(),
        missing,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_alternates_then_keeps_the_rest_of_the_longer() {
        assert_eq!(interleave(vec![1, 2, 3], vec![7]), vec![1, 7, 2, 3]);
        assert_eq!(interleave(vec![], vec![7, 8]), vec![7, 8]);
        assert_eq!(interleave(vec![1, 2], vec![7, 8, 9]), vec![1, 7, 2, 8, 9]);
        assert!(interleave(vec![], vec![]).is_empty());
    }
}
