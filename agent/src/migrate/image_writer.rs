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
//!
//! Once the source's disk mirror runs, its writes come in through a
//! [`MirrorSink`] and take the same shard locks. A mirror write carries
//! what the guest wrote after every chunk the engine still sends was read
//! (those are read after the mirror started), so it is the newest content
//! of its bytes: the byte ranges it wrote are kept per index, and a chunk
//! the engine writes later leaves them as they are.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Sharded by index (a write holds its shard's lock).
    shards: Vec<Mutex<Shard>>,
    stop: AtomicBool,
    /// The mirror's writes are taken (between `mirror_sink` and `close`).
    mirror_open: AtomicBool,
    mirrored_bytes: AtomicU64,
}

/// One shard's indices.
#[derive(Default)]
struct Shard {
    /// Index -> the content it must end with, for every write still to do.
    pending: HashMap<usize, Fingerprint>,
    /// Index -> the byte ranges of the chunk (from its start, sorted,
    /// disjoint) that the mirror wrote: the newest content there.
    mirrored: HashMap<usize, Vec<(u64, u64)>>,
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
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                stop: AtomicBool::new(false),
                mirror_open: AtomicBool::new(false),
                mirrored_bytes: AtomicU64::new(0),
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
            self.target.shard(i)?.pending.insert(i, fp);
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

    /// Takes the mirror's writes from now on, through the sink returned.
    pub(super) fn mirror_sink(&self) -> MirrorSink {
        self.target.mirror_open.store(true, Ordering::Release);
        MirrorSink {
            target: Arc::clone(&self.target),
        }
    }

    /// Refuses the mirror's writes from now on (the pause's check reads
    /// the image); returns the indices it wrote to, sorted, and its bytes.
    pub(super) fn close_mirror(&self) -> Result<(Vec<usize>, u64), MigrateError> {
        self.target.mirror_open.store(false, Ordering::Release);
        let mut touched = Vec::new();
        for k in 0..SHARDS {
            touched.extend(self.target.shard(k)?.mirrored.keys().copied());
        }
        touched.sort_unstable();
        Ok((touched, self.target.mirrored_bytes.load(Ordering::Acquire)))
    }

    /// Stops the workers after the chunk each is writing (the image is
    /// about to be deleted).
    pub(super) fn shutdown(&mut self) {
        self.target.stop.store(true, Ordering::Release);
        self.target.mirror_open.store(false, Ordering::Release);
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
    fn shard(&self, index: usize) -> Result<std::sync::MutexGuard<'_, Shard>, MigrateError> {
        self.shards[index % SHARDS]
            .lock()
            .map_err(|_| MigrateError::State("image writer state poisoned".into()))
    }

    fn write_at(&self, data: &[u8], off: u64) -> Result<(), MigrateError> {
        self.file
            .write_all_at(data, off)
            .map_err(|source| MigrateError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            })
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
            if p.pending.get(&i) != Some(&fp) {
                // A newer job for this index replaced ours, or it is written.
                continue;
            }
            match p.mirrored.get(&i) {
                None => self.write_at(&data, off)?,
                // The mirror's bytes are newer than ours: write around them.
                Some(ranges) => {
                    for (a, b) in gaps(ranges, data.len() as u64) {
                        self.write_at(&data[a as usize..b as usize], off + a)?;
                    }
                }
            }
            p.pending.remove(&i);
        }
        // Start writeback now so that the pause's sync finds little left.
        crate::store::local::start_writeback(&self.file);
        Ok(())
    }
}

/// The parts of `0..len` outside the sorted, disjoint `ranges`.
fn gaps(ranges: &[(u64, u64)], len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0;
    for &(a, b) in ranges {
        if a > at {
            out.push((at, a.min(len)));
        }
        at = at.max(b);
    }
    if at < len {
        out.push((at, len));
    }
    out.retain(|(a, b)| a < b);
    out
}

/// Adds `a..b` to the sorted, disjoint `ranges`, merging what touches it.
fn add_range(ranges: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    let (mut a, mut b) = (a, b);
    ranges.retain(|&(x, y)| {
        let apart = y < a || x > b;
        if !apart {
            a = a.min(x);
            b = b.max(y);
        }
        apart
    });
    let at = ranges.partition_point(|&(x, _)| x < a);
    ranges.insert(at, (a, b));
}

/// The mirror's way into the image (the NBD server's target): each write
/// is split at chunk boundaries and done under the chunk's shard lock,
/// its byte ranges kept (see the module docs).
pub(crate) struct MirrorSink {
    target: Arc<Target>,
}

fn refused() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "the mirror is closed: the pause's check has begun",
    )
}

impl crate::migrate::nbd::BlockTarget for MirrorSink {
    fn size(&self) -> u64 {
        self.target.image_size
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let t = &self.target;
        let cs = t.chunk_size.bytes();
        let mut done = 0usize;
        while done < data.len() {
            let off = offset + done as u64;
            let i = (off / cs) as usize;
            let within = off % cs;
            let n = ((cs - within) as usize).min(data.len() - done);
            let mut shard = t.shard(i).map_err(std::io::Error::other)?;
            if !t.mirror_open.load(Ordering::Acquire) {
                return Err(refused());
            }
            t.file.write_all_at(&data[done..done + n], off)?;
            add_range(shard.mirrored.entry(i).or_default(), within, within + n as u64);
            done += n;
        }
        t.mirrored_bytes.fetch_add(data.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.target.file.read_exact_at(buf, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        if !self.target.mirror_open.load(Ordering::Acquire) {
            return Err(refused());
        }
        // The pause's `Verify` syncs the image before the switchover (and
        // the image means nothing to anyone before): a sync here, as the
        // mirror completes in the pause, would only come first.
        crate::store::local::start_writeback(&self.target.file);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::nbd::BlockTarget;

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

    #[test]
    fn ranges_merge_and_gaps_are_their_complement() {
        let mut r = Vec::new();
        add_range(&mut r, 10, 20);
        add_range(&mut r, 30, 40);
        add_range(&mut r, 20, 25);
        assert_eq!(r, vec![(10, 25), (30, 40)]);
        add_range(&mut r, 5, 35);
        assert_eq!(r, vec![(5, 40)]);
        assert_eq!(gaps(&r, 50), vec![(0, 5), (40, 50)]);
        assert_eq!(gaps(&[(0, 50)], 50), vec![]);
        assert_eq!(gaps(&[], 8), vec![(0, 8)]);
    }

    #[test]
    fn the_mirrors_bytes_win_over_a_chunk_written_before_or_after_them() {
        let (_d, _s, mut w, path, fps) = setup(4);
        let sink = w.mirror_sink();
        // Index 0: the mirror writes first, the engine's chunk lands after.
        sink.write(100, &[0xee; 200]).expect("mirror write");
        w.queue(vec![(0, fps[0])]).expect("queue");
        w.wait().expect("wait");
        // Index 1: the engine first, then the mirror across into index 2.
        w.queue(vec![(1, fps[1]), (2, fps[1])]).expect("queue");
        w.wait().expect("wait");
        sink.write(2 * 4096 - 10, &[0xdd; 20]).expect("across two chunks");
        // A later engine write of index 2 (content read earlier) keeps the
        // mirror's bytes.
        w.queue(vec![(2, fps[2])]).expect("queue");
        w.wait().expect("wait");
        let f = File::open(&path).expect("open");
        let mut b = vec![0u8; 3 * 4096];
        f.read_exact_at(&mut b, 0).expect("read");
        for (at, &x) in b.iter().enumerate() {
            let want = if (100..300).contains(&at) {
                0xee
            } else if (8182..8202).contains(&at) {
                0xdd
            } else {
                [1, 2, 3][at / 4096]
            };
            assert_eq!(x, want, "byte {at}");
        }
        let (touched, bytes) = w.close_mirror().expect("close");
        assert_eq!(touched, vec![0, 1, 2]);
        assert_eq!(bytes, 220);
        assert!(sink.write(0, &[1]).is_err(), "closed: the check has begun");
    }
}
