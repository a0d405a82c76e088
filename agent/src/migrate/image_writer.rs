//! The incoming image's writer: chunks go from the destination's store into
//! the image file on threads of their own, so a `Pull` answers once its
//! chunks are in the store (fetched and verified) and the next round, or
//! memory, need not wait for local writes. With a warm destination those are
//! most of the disk (1 GiB of local writes took 0.3-2 s here, depending on
//! the host's writeback), and the link would idle meanwhile.
//!
//! Later rounds may ask for an index again while an earlier batch has not
//! written it yet. Every index with a write still to do has one entry in a
//! pending map: the content it must end with. Queueing replaces the entry;
//! a worker writes an index only while holding its shard's lock and only if
//! the entry still names the content it carries, then removes it. So an
//! index without an entry holds the newest content queued for it, whatever
//! order the workers ran in. `wait` (before the pause's check) joins every
//! worker and returns the first error.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use edgeshift_common::{ChunkSize, Fingerprint};

use super::MigrateError;
use crate::store::{ChunkStore, LocalStore};

/// Shards of the pending map: workers writing different indices rarely
/// wait for each other (a write holds its shard's lock).
const SHARDS: usize = 64;

/// Writes chunks of the store into an image file in the background.
pub(super) struct ImageWriter {
    target: Arc<Target>,
    workers: Vec<JoinHandle<Result<(), MigrateError>>>,
}

/// What every worker writes into, and how.
struct Target {
    file: File,
    path: PathBuf,
    store: Arc<LocalStore>,
    chunk_size: ChunkSize,
    image_size: u64,
    /// Index -> the content it must end with, for every write still to do;
    /// sharded (a write holds its shard's lock).
    pending: Vec<Mutex<HashMap<usize, Fingerprint>>>,
    stop: AtomicBool,
}

impl ImageWriter {
    pub(super) fn new(
        file: File,
        path: PathBuf,
        store: Arc<LocalStore>,
        chunk_size: ChunkSize,
        image_size: u64,
    ) -> Self {
        ImageWriter {
            target: Arc::new(Target {
                file,
                path,
                store,
                chunk_size,
                image_size,
                pending: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                stop: AtomicBool::new(false),
            }),
            workers: Vec::new(),
        }
    }

    /// Queues `jobs` (index, content it must hold; the zero chunk needs no
    /// store) and returns at once. An error of an earlier batch is returned
    /// here, before anything more is queued.
    pub(super) fn queue(&mut self, jobs: Vec<(usize, Fingerprint)>) -> Result<(), MigrateError> {
        self.reap(false)?;
        if jobs.is_empty() {
            return Ok(());
        }
        for &(i, fp) in &jobs {
            self.target.shard(i)?.insert(i, fp);
        }
        // Reads from the store (each checked against its fingerprint) run in
        // parallel; a small batch gets one thread.
        let per = jobs.len().div_ceil(crate::par::threads_for(jobs.len(), 8, 32));
        let mut jobs = jobs;
        while !jobs.is_empty() {
            let part: Vec<_> = jobs.drain(..per.min(jobs.len())).collect();
            let target = Arc::clone(&self.target);
            self.workers.push(std::thread::spawn(move || target.write(part)));
        }
        Ok(())
    }

    /// Waits until everything queued is in the image (not synced).
    pub(super) fn wait(&mut self) -> Result<(), MigrateError> {
        self.reap(true)
    }

    /// Joins the workers that are done (all of them with `all`); the first
    /// error wins.
    fn reap(&mut self, all: bool) -> Result<(), MigrateError> {
        let mut first = Ok(());
        let mut left = Vec::new();
        for h in self.workers.drain(..) {
            if !all && !h.is_finished() {
                left.push(h);
                continue;
            }
            let r = h
                .join()
                .unwrap_or_else(|_| Err(MigrateError::State("image writer panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        self.workers = left;
        first
    }

    /// Stops the workers after the chunk each is writing (the image is
    /// about to be deleted).
    pub(super) fn shutdown(&mut self) {
        self.target.stop.store(true, Ordering::Release);
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Target {
    fn shard(
        &self,
        index: usize,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<usize, Fingerprint>>, MigrateError> {
        self.pending[index % SHARDS]
            .lock()
            .map_err(|_| MigrateError::State("image writer state poisoned".into()))
    }

    /// One worker: writes its part, skipping what a newer job replaced.
    fn write(&self, part: Vec<(usize, Fingerprint)>) -> Result<(), MigrateError> {
        let cs = self.chunk_size.bytes();
        for (i, fp) in part {
            if self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let off = i as u64 * cs;
            let len = cs.min(self.image_size.saturating_sub(off)) as usize;
            let data = if fp.is_zero_chunk() {
                vec![0u8; len]
            } else {
                self.store.get_chunk(&fp)?
            };
            let mut p = self.shard(i)?;
            if p.get(&i) != Some(&fp) {
                // A newer job for this index replaced ours, or it is written.
                continue;
            }
            self.file
                .write_all_at(&data, off)
                .map_err(|source| MigrateError::Io {
                    op: "write",
                    path: self.path.clone(),
                    source,
                })?;
            p.remove(&i);
        }
        // Start writeback now so that the pause's sync finds little left.
        crate::store::local::start_writeback(&self.file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(
        chunks: usize,
    ) -> (
        tempfile::TempDir,
        Arc<LocalStore>,
        ImageWriter,
        PathBuf,
        Vec<Fingerprint>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::open_or_create(dir.path().join("store")).expect("store"));
        let cs = ChunkSize::new(4096).expect("chunk size");
        let mut fps = Vec::new();
        for k in 0..3u8 {
            let data = vec![k + 1; 4096];
            let fp = crate::vm::image::fingerprint_chunk(&data);
            store.put_chunk(&fp, &data).expect("put");
            fps.push(fp);
        }
        let path = dir.path().join("disk.raw");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("image");
        file.set_len(chunks as u64 * 4096).expect("size");
        let w = ImageWriter::new(file, path.clone(), Arc::clone(&store), cs, chunks as u64 * 4096);
        (dir, store, w, path, fps)
    }

    fn chunk_byte(path: &std::path::Path, i: usize) -> u8 {
        let f = File::open(path).expect("open");
        let mut b = [0u8; 4096];
        f.read_exact_at(&mut b, i as u64 * 4096).expect("read");
        assert!(b.iter().all(|&x| x == b[0]), "chunk {i} is not one content");
        b[0]
    }

    #[test]
    fn newest_queued_content_wins_whatever_order_workers_run() {
        let (_d, _s, mut w, path, fps) = setup(512);
        // Three batches over the same indices, queued back to back, so
        // their workers overlap: A everywhere, then B on evens, then A
        // again on multiples of 4, then zero on index 3.
        w.queue((0..512).map(|i| (i, fps[0])).collect()).expect("q1");
        w.queue((0..512).step_by(2).map(|i| (i, fps[1])).collect())
            .expect("q2");
        w.queue((0..512).step_by(4).map(|i| (i, fps[0])).collect())
            .expect("q3");
        w.queue(vec![(3, Fingerprint::ZERO_CHUNK)]).expect("q4");
        w.wait().expect("wait");
        for i in 0..512 {
            let want = if i == 3 {
                0
            } else if i % 4 == 0 || i % 2 == 1 {
                1
            } else {
                2
            };
            assert_eq!(chunk_byte(&path, i), want, "index {i}");
        }
    }

    #[test]
    fn a_missing_chunk_is_an_error_at_wait_or_next_queue() {
        let (_d, _s, mut w, _path, fps) = setup(8);
        let absent = crate::vm::image::fingerprint_chunk(&[9u8; 4096]);
        w.queue(vec![(0, fps[0]), (1, absent)]).expect("queue");
        let err = w.wait().expect_err("a chunk the store lacks must fail the write");
        assert!(
            matches!(err, MigrateError::Store(crate::store::StoreError::ChunkMissing(fp)) if fp == absent),
            "{err}"
        );
        // The error is reported once; the writer goes on.
        w.queue(vec![(2, fps[2])]).expect("queue after error");
        w.wait().expect("second batch");
    }
}
