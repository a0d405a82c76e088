//! Slicing: the image hashed on every core, where it lies in the page cache
//! (a mapping, [`super::hash`]) or read into aligned buffers with io_uring
//! when it is not cached ([`super::read`]); the store's presence check beside
//! the hashing; new chunks written to the store in durable batches by one
//! writer, which places fingerprints in manifest order.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver};
use std::sync::Mutex;
use std::time::Instant;

use edgeshift_common::manifest::chunk_count;
use edgeshift_common::{ChunkSize, Fingerprint, Manifest, ManifestId};

use super::hash::{hash_mapped_segments, hash_read_segments, CopyBufs};
use super::image::{ImageSource, ReadMode};
use super::read::{read_segments, READS_IN_FLIGHT};
use super::segment::Segment;
use super::view::RawView;
use super::{Progress, SlicerError};
use crate::diskio::{AlignedBuf, MappedFile};
use crate::store::{ChunkBatch, ChunkStore, LocalStore, StoreError};

/// Bytes one read (and one hashing task) covers: a whole number of chunks,
/// large enough that per-read and per-task costs vanish.
const SEGMENT_MIN: usize = 4 << 20;

pub struct SliceOptions<'a> {
    pub chunk_size: ChunkSize,
    pub read_mode: ReadMode,
    pub progress: Option<Progress<'a>>,
}

impl Default for SliceOptions<'_> {
    fn default() -> Self {
        SliceOptions {
            chunk_size: ChunkSize::DEFAULT,
            read_mode: ReadMode::Auto,
            progress: None,
        }
    }
}

/// What a slice did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SliceReport {
    pub manifest_id: ManifestId,
    pub image_size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub unique_chunks: u64,
    /// Chunks this slice wrote to the store.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Chunks the store already held.
    pub present_chunks: u64,
    /// "direct" (O_DIRECT) or "buffered".
    pub read_mode: &'static str,
    pub seconds: f64,
    /// The image's format ("raw", or what QEMU read: "qcow2", ...) and the
    /// images in its backing chain (1: none).
    pub format: String,
    pub backing_chain: usize,
}

/// Slices the image at `path` into `store`; stores its manifest too. A
/// raw image or block device is read directly; an image in a format QEMU
/// reads is sliced through its raw view ([`RawView`]), so its manifest is
/// the one its raw conversion would get.
pub fn slice_image(
    path: &Path,
    store: &LocalStore,
    opts: &SliceOptions<'_>,
) -> Result<SliceReport, SlicerError> {
    let format = match slice_raw(path, store, opts) {
        Err(SlicerError::NotRaw { format, .. }) => format,
        other => return other,
    };
    let started = Instant::now();
    let view = RawView::open(path, format)?;
    let mut report = slice_raw(&view.path, store, opts).map_err(|e| SlicerError::ViewRead {
        path: path.to_path_buf(),
        format: view.format.clone(),
        source: Box::new(e),
    })?;
    report.format = view.format.clone();
    report.backing_chain = view.chain;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn slice_raw(path: &Path, store: &LocalStore, opts: &SliceOptions<'_>) -> Result<SliceReport, SlicerError> {
    let started = Instant::now();
    let src = ImageSource::open(path, opts.read_mode)?;
    let cs = opts.chunk_size.as_usize();
    let seg_bytes = cs.max(SEGMENT_MIN);
    let hashers = crate::par::cores(8);
    let pool = READS_IN_FLIGHT + 2 * hashers + 2;
    let n_chunks = chunk_count(src.size, opts.chunk_size) as usize;
    tracing::debug!(path = %path.display(), size = src.size, direct = src.direct, chunk_size = cs, "slicing");

    // Buffered: map the image and hash it where it lies (no copy through
    // `read`); O_DIRECT, or a file that cannot be mapped: read it.
    let mapped = if src.direct {
        None
    } else {
        MappedFile::map(&src.file, src.size)
            .inspect_err(|e| tracing::debug!(error = %e, "mapping the image failed; reading it"))
            .ok()
    };
    let (store_tx, store_rx) = mpsc::sync_channel::<Segment>(pool);
    let (hash_tx, hash_rx) = mpsc::sync_channel::<Segment>(pool);
    let hash_rx = Mutex::new(hash_rx);
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();

    let (read_result, writer_result) = std::thread::scope(|s| {
        let writer = s.spawn(|| store_segments(store, store_rx, free_tx, cs, n_chunks, opts.progress));
        let read_result = match &mapped {
            Some(map) => {
                let next = AtomicUsize::new(0);
                let bufs = CopyBufs::new(free_rx, pool, seg_bytes);
                std::thread::scope(|h| {
                    for _ in 0..hashers {
                        let tx = store_tx.clone();
                        let (next, bufs) = (&next, &bufs);
                        h.spawn(move || {
                            hash_mapped_segments(map.bytes(), next, seg_bytes, cs, store, bufs, tx)
                        });
                    }
                    drop(store_tx);
                });
                Ok(())
            }
            None => {
                for _ in 0..hashers {
                    let rx = &hash_rx;
                    let tx = store_tx.clone();
                    s.spawn(move || hash_read_segments(rx, tx, cs, store));
                }
                drop(store_tx);
                let bufs = (0..pool).map(|_| AlignedBuf::new(seg_bytes)).collect();
                read_segments(&src, seg_bytes, bufs, hash_tx, free_rx)
            }
        };
        (read_result, writer.join())
    });
    let stored = writer_result.map_err(|_| SlicerError::WorkerPanicked)?;
    // A reader that stopped because the writer failed reports the writer's error.
    let stored = match (read_result, stored) {
        (_, Err(e)) => return Err(e),
        (Err(e), _) => return Err(e),
        (Ok(()), Ok(s)) => s,
    };

    let manifest = Manifest::new(opts.chunk_size, src.size, stored.fps);
    let manifest_id = store.put_manifest(&manifest)?;
    let report = SliceReport {
        manifest_id,
        image_size: src.size,
        chunk_size: cs as u64,
        chunks: n_chunks as u64,
        zero_chunks: stored.zero_chunks,
        unique_chunks: stored.unique_chunks,
        new_chunks: stored.new_chunks,
        new_bytes: stored.new_bytes,
        present_chunks: stored.present_chunks,
        read_mode: if src.direct { "direct" } else { "buffered" },
        seconds: started.elapsed().as_secs_f64(),
        format: "raw".to_string(),
        backing_chain: 1,
    };
    metrics::counter!("edgeshift_slice_bytes_total").increment(src.size);
    metrics::counter!("edgeshift_slice_new_chunks_total").increment(stored.new_chunks);
    tracing::debug!(
        id = %manifest_id, size = src.size, new = stored.new_chunks, present = stored.present_chunks,
        zero = stored.zero_chunks, secs = report.seconds, "sliced"
    );
    Ok(report)
}

struct Stored {
    fps: Vec<Fingerprint>,
    zero_chunks: u64,
    unique_chunks: u64,
    new_chunks: u64,
    new_bytes: u64,
    present_chunks: u64,
}

/// Places fingerprints in manifest order and writes chunks the store lacks
/// (the hashers checked their presence), in batches: a full batch is
/// committed on a second thread while the next one is staged, so the disk
/// flushes one batch while the next is copied into the page cache.
fn store_segments(
    store: &LocalStore,
    rx: Receiver<Segment>,
    free: mpsc::Sender<AlignedBuf>,
    cs: usize,
    n_chunks: usize,
    progress: Option<Progress<'_>>,
) -> Result<Stored, SlicerError> {
    std::thread::scope(|s| {
        // Rendezvous: at most one batch committing and one staging, so the
        // open temp files stay within two batches' worth.
        let (commit_tx, commit_rx) = mpsc::sync_channel::<ChunkBatch<'_>>(0);
        let committer = s.spawn(move || -> Result<(), StoreError> {
            for mut batch in commit_rx {
                batch.commit()?;
            }
            Ok(())
        });
        let staged = stage_segments(store, rx, free, cs, n_chunks, progress, &commit_tx);
        drop(commit_tx);
        let committed = committer.join().map_err(|_| SlicerError::WorkerPanicked)?;
        // A stager stopped by a failed commit reports the commit's error.
        committed?;
        staged
    })
}

fn stage_segments<'s>(
    store: &'s LocalStore,
    rx: Receiver<Segment>,
    free: mpsc::Sender<AlignedBuf>,
    cs: usize,
    n_chunks: usize,
    progress: Option<Progress<'_>>,
    commit: &mpsc::SyncSender<ChunkBatch<'s>>,
) -> Result<Stored, SlicerError> {
    let committer_gone = || {
        SlicerError::io(
            "hand a batch to the committer of",
            store.root(),
            std::io::Error::other("committer stopped"),
        )
    };
    let mut out = Stored {
        fps: vec![Fingerprint::ZERO_CHUNK; n_chunks],
        zero_chunks: 0,
        unique_chunks: 0,
        new_chunks: 0,
        new_bytes: 0,
        present_chunks: 0,
    };
    let mut seen: HashSet<Fingerprint> = HashSet::new();
    let mut batch = store.batch();
    let mut done = 0u64;
    for seg in rx {
        let first = (seg.offset / cs as u64) as usize;
        for (i, (fp, new)) in seg.fps.iter().zip(&seg.new).enumerate() {
            out.fps[first + i] = *fp;
            if fp.is_zero_chunk() {
                out.zero_chunks += 1;
                continue;
            }
            if !seen.insert(*fp) {
                continue;
            }
            let bytes = match (&seg.buf, new) {
                (Some(buf), true) => buf.as_slice().get(i * cs..((i + 1) * cs).min(seg.len)),
                _ => None,
            };
            let Some(bytes) = bytes else {
                out.present_chunks += 1;
                continue;
            };
            batch.stage(fp, bytes)?;
            out.new_chunks += 1;
            out.new_bytes += bytes.len() as u64;
            if batch.is_full() {
                commit
                    .send(std::mem::replace(&mut batch, store.batch()))
                    .map_err(|_| committer_gone())?;
            }
        }
        done += seg.len as u64;
        if let Some(p) = progress {
            p(done);
        }
        // The reader may have finished already; then the buffer is just freed.
        if let Some(buf) = seg.buf {
            let _ = free.send(buf);
        }
    }
    commit.send(batch).map_err(|_| committer_gone())?;
    out.unique_chunks = seen.len() as u64;
    Ok(out)
}
