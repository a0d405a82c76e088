//! The writer thread: verified chunks made durable in batches, and the
//! receive buffers it hands back for reuse.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgeshift_common::Fingerprint;
use tracing::debug;

use crate::store::local::ChunkBatch;
use crate::store::{LocalStore, StoreError};

/// Where the writer reports one chunk's outcome.
type Outcome = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// A verified chunk for the writer thread, and where to report its outcome.
pub(crate) struct WriteJob {
    pub(crate) fp: Fingerprint,
    /// The chunk is `buf[start..]`.
    pub(crate) buf: Vec<u8>,
    pub(crate) start: usize,
    pub(crate) done: Outcome,
}

/// Longest a received chunk waits before its batch is made durable.
const COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Starts the writer thread for one fetch. It ends once every sender is
/// gone and its last batch is committed; staged buffers go back to `pool`.
pub(crate) fn spawn_writer(
    store: Arc<LocalStore>,
    pool: Arc<BufPool>,
) -> std::io::Result<(Sender<WriteJob>, JoinHandle<()>)> {
    let (writer, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("chunk-writer".into())
        .spawn(move || writer_thread(store, rx, pool))?;
    Ok((writer, handle))
}

/// Makes verified chunks durable in batches ([`LocalStore::batch`]: one
/// parallel sync per batch instead of one per chunk). A chunk counts as
/// fetched only once its batch is committed, so an interrupted fetch never
/// believes it has a chunk that is not on disk. Staging the next batch
/// overlaps with committing the previous one (a second, scoped thread).
fn writer_thread(store: Arc<LocalStore>, rx: Receiver<WriteJob>, pool: Arc<BufPool>) {
    let store: &LocalStore = &store;
    std::thread::scope(|scope| {
        let (commit_tx, commit_rx) = std::sync::mpsc::sync_channel::<(ChunkBatch<'_>, Vec<Outcome>)>(1);
        scope.spawn(move || {
            for (mut batch, waiting) in commit_rx {
                let t = Instant::now();
                let n = batch.len();
                let result = batch.commit();
                debug!(
                    chunks = n,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "chunk batch committed"
                );
                match result {
                    Ok(_) => {
                        for d in waiting {
                            let _ = d.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        let text = e.to_string();
                        for d in waiting {
                            let _ = d.send(Err(StoreError::Io {
                                op: "commit chunk batch",
                                path: store.root().to_path_buf(),
                                source: std::io::Error::other(text.clone()),
                            }));
                        }
                    }
                }
            }
        });
        while let Ok(first) = rx.recv() {
            let mut batch = store.batch();
            let mut stage_time = Duration::ZERO;
            let mut waiting = Vec::new();
            let started = Instant::now();
            let mut next = Some(first);
            loop {
                if let Some(job) = next.take() {
                    let t = Instant::now();
                    let staged = batch.stage(&job.fp, &job.buf[job.start..]);
                    stage_time += t.elapsed();
                    pool.put(job.buf);
                    match staged {
                        Ok(()) => waiting.push(job.done),
                        Err(e) => {
                            let _ = job.done.send(Err(e));
                        }
                    }
                }
                if batch.is_full() || started.elapsed() >= COMMIT_DELAY {
                    break;
                }
                // Commit as soon as the stream pauses, so the tail is not delayed.
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(job) => next = Some(job),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            debug!(
                chunks = batch.len(),
                stage_ms = stage_time.as_secs_f64() * 1e3,
                "chunk batch staged"
            );
            if commit_tx.send((batch, waiting)).is_err() {
                return;
            }
        }
    });
}

/// Receive buffers handed back by the writer once their chunk is staged.
#[derive(Default)]
pub(crate) struct BufPool(Mutex<(Vec<Vec<u8>>, usize)>);

impl BufPool {
    /// Most bytes of spare buffers kept (a few fast windows' worth).
    const MAX_BYTES: usize = 64 << 20;

    /// A spare buffer, or a new empty one.
    pub(crate) fn take(&self) -> Vec<u8> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.pop() {
            Some(buf) => {
                g.1 -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 + buf.capacity() <= Self::MAX_BYTES {
            g.1 += buf.capacity();
            g.0.push(buf);
        }
    }
}
