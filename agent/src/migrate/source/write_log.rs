//! The write log: which chunks of the VM's disk the guest wrote since the
//! last looks, from the dirty tracker or the VM's boot log, so a look at
//! the live disk reads only those again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::dirty::{boot_log, open_tracker, DeviceId, DirtyTracker, TrackerChoice, DEFAULT_CAPACITY};

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
pub(super) struct WriteLog {
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
        vm_dir: PathBuf,
        dev: PathBuf,
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
    pub(super) fn open(dev_path: &Path, chunk_size: u64) -> Option<Self> {
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
    pub(super) fn boot_log(
        vm_dir: &Path,
        dev_path: &Path,
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
    pub(super) fn take(&mut self) -> Option<Vec<(u32, u64)>> {
        let now = self.counts()?;
        self.take_from(now)
    }

    /// The chunks written since the newest mark, without taking a mark:
    /// whether a slice is worth it now. `None` when it cannot say.
    pub(super) fn peek(&mut self) -> Option<Vec<u32>> {
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
