//! The source VM's live disk as the phases see it: looks at it (the whole
//! disk, or what the write log names), the chunks read again, the flush
//! before the last look. [`LiveDisk`] is the seam; [`SourceDisk`] reads the
//! VM's loop device and publishes to this edge's store.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use edgeshift_common::{ChunkSize, Manifest};

use super::reslice::{full_slice, reslice, reslice_some};
use super::write_log::WriteLog;
use crate::migrate::coord::{CoordConfig, CoordReport};
use crate::migrate::temperature::Temperature;
use crate::migrate::MigrateError;
use crate::store::LocalStore;

/// The live disk. `Sync`: a look runs on a thread of its own beside a
/// disk round.
pub(super) trait LiveDisk: Sync {
    /// Starts the write log: the VM's boot log when `use_boot_log` and it
    /// has one that can be trusted (then returns every chunk written since
    /// boot, with its writes), else a tracker started now (or none).
    fn open_write_log(&self, use_boot_log: bool, chunk_bytes: u64) -> Option<Vec<(u32, u64)>>;
    /// Whether a write log runs (a look then reads only what it names).
    fn tracked(&self) -> bool;
    /// The chunks written since the last look, without taking a mark.
    fn peek_written(&self) -> Option<Vec<u32>>;
    /// The disk now, after `cur`: what the write log names read again, or
    /// all of it; the writes counted warm `temp`.
    fn look(&self, cur: &Manifest, temp: &mut Temperature) -> Result<Manifest, MigrateError>;
    /// `cur` with the chunks at `indices` read again.
    fn read_again(&self, cur: &Manifest, indices: &[u32]) -> Result<Manifest, MigrateError>;
    /// The whole disk, sliced.
    fn slice_all(&self, chunk_size: ChunkSize) -> Result<Manifest, MigrateError>;
    /// Flushes what the paused VM wrote to the disk.
    fn flush(&self) -> Result<(), MigrateError>;
    /// Starts collecting every chunk a look names from now on (the disk
    /// mirror's start).
    fn collect_written(&self);
    /// The chunks looks named since [`LiveDisk::collect_written`], but for
    /// those the last look read.
    fn written_collected(&self) -> Vec<u32>;
    /// Reports `live` to the coordinator as held here.
    fn report_to(&self, c: &CoordConfig, live: &Manifest, out: &mut CoordReport) -> Result<(), MigrateError>;
}

/// The VM's loop device and image file, and this edge's store.
///
/// The write log counts a write when it is queued, so a look may read a
/// chunk before a write it counted has landed. Each look therefore reads
/// again what the look before it named (by then landed), and once the
/// mirror runs, the pause reads again every chunk named since.
pub(super) struct SourceDisk<'a> {
    dev: PathBuf,
    image: PathBuf,
    store: &'a LocalStore,
    writes: Mutex<Option<WriteLog>>,
    named: Mutex<Named>,
}

/// What looks named (see [`SourceDisk`]).
#[derive(Default)]
struct Named {
    /// By the last look.
    last: Vec<u32>,
    /// Read by the last look (what it and the one before it named).
    last_read: std::collections::BTreeSet<u32>,
    /// By every look since `collect_written` (None: not collecting).
    collected: Option<std::collections::BTreeSet<u32>>,
}

impl<'a> SourceDisk<'a> {
    pub(super) fn new(dev: PathBuf, image: PathBuf, store: &'a LocalStore) -> Self {
        SourceDisk {
            dev,
            image,
            store,
            writes: Mutex::new(None),
            named: Mutex::new(Named::default()),
        }
    }

    fn writes(&self) -> MutexGuard<'_, Option<WriteLog>> {
        // A panic elsewhere leaves the log as it was: still usable.
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LiveDisk for SourceDisk<'_> {
    fn open_write_log(&self, use_boot_log: bool, chunk_bytes: u64) -> Option<Vec<(u32, u64)>> {
        // The boot log sits beside the VM's image.
        let vm_dir = self.image.parent().filter(|_| use_boot_log);
        let (log, since_boot) = match vm_dir.and_then(|d| WriteLog::boot_log(d, &self.dev, chunk_bytes)) {
            Some((w, since)) => (Some(w), Some(since)),
            None => {
                let mut w = WriteLog::open(&self.dev, chunk_bytes);
                if let Some(w) = w.as_mut() {
                    w.take();
                }
                (w, None)
            }
        };
        *self.writes() = log;
        since_boot
    }

    fn tracked(&self) -> bool {
        self.writes().is_some()
    }

    fn peek_written(&self) -> Option<Vec<u32>> {
        self.writes().as_mut().and_then(WriteLog::peek)
    }

    fn look(&self, cur: &Manifest, temp: &mut Temperature) -> Result<Manifest, MigrateError> {
        let mut writes = self.writes();
        let mut named = self.named.lock().unwrap_or_else(|p| p.into_inner());
        let (next, now) = reslice(
            &self.dev,
            &self.image,
            cur,
            writes.as_mut(),
            &named.last,
            temp,
            self.store,
        )?;
        let now = now.unwrap_or_default();
        if let Some(all) = named.collected.as_mut() {
            all.extend(now.iter().copied());
        }
        named.last_read = named.last.iter().chain(&now).copied().collect();
        named.last = now;
        Ok(next)
    }

    fn collect_written(&self) {
        self.named.lock().unwrap_or_else(|p| p.into_inner()).collected = Some(Default::default());
    }

    fn written_collected(&self) -> Vec<u32> {
        let named = self.named.lock().unwrap_or_else(|p| p.into_inner());
        // What the last look read needs no second read.
        named
            .collected
            .as_ref()
            .map(|s| s.difference(&named.last_read).copied().collect())
            .unwrap_or_default()
    }

    fn read_again(&self, cur: &Manifest, indices: &[u32]) -> Result<Manifest, MigrateError> {
        reslice_some(&self.dev, cur, indices, self.store)
    }

    fn slice_all(&self, chunk_size: ChunkSize) -> Result<Manifest, MigrateError> {
        full_slice(&self.image, chunk_size, self.store)
    }

    fn flush(&self) -> Result<(), MigrateError> {
        sync_device(&self.dev)
    }

    fn report_to(&self, c: &CoordConfig, live: &Manifest, out: &mut CoordReport) -> Result<(), MigrateError> {
        crate::migrate::coord::report_live_disk(c, self.store, live, out)
    }
}

fn sync_device(dev: &Path) -> Result<(), MigrateError> {
    std::fs::File::open(dev)
        .and_then(|f| f.sync_all())
        .map_err(|source| MigrateError::Io {
            op: "flush",
            path: dev.to_path_buf(),
            source,
        })
}
