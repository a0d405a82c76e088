//! The writer thread: verified chunks, already written to temp files by
//! the tasks that checked them, made durable and visible in batches.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::store::local::ChunkBatch;
use crate::store::{LocalStore, StagedChunk, StoreError};

/// Where the writer reports one chunk's outcome.
type Outcome = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// A verified, staged chunk for the writer thread, and where to report
/// its outcome.
pub(crate) struct WriteJob {
    pub(crate) staged: StagedChunk,
    pub(crate) done: Outcome,
}

/// Longest a received chunk waits before its batch is made durable.
const COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Starts the writer thread for one fetch. It ends once every sender is
/// gone and its last batch is committed.
pub(crate) fn spawn_writer(store: Arc<LocalStore>) -> std::io::Result<(Sender<WriteJob>, JoinHandle<()>)> {
    let (writer, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("chunk-writer".into())
        .spawn(move || writer_thread(store, rx))?;
    Ok((writer, handle))
}

/// Makes verified chunks durable in batches ([`LocalStore::batch`]: one
/// parallel sync per batch instead of one per chunk). A chunk counts as
/// fetched only once its batch is committed, so an interrupted fetch never
/// believes it has a chunk that is not on disk. Staging the next batch
/// overlaps with committing the previous one (a second, scoped thread).
/// The chunks arrive already written to temp files (in parallel, by the
/// tasks that verified them), so this thread only gathers them.
fn writer_thread(store: Arc<LocalStore>, rx: Receiver<WriteJob>) {
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
            let mut waiting = Vec::new();
            let started = Instant::now();
            let mut next = Some(first);
            loop {
                if let Some(job) = next.take() {
                    batch.adopt(job.staged);
                    waiting.push(job.done);
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
            debug!(chunks = batch.len(), "chunk batch gathered");
            if commit_tx.send((batch, waiting)).is_err() {
                return;
            }
        }
    });
}
