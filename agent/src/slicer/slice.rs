//! Slicing: reads into aligned buffers ([`crate::diskio`], io_uring where it
//! works), BLAKE3 on every core while the next reads are in flight, new
//! chunks written to the store in durable batches. A buffer travels reader → hasher → store writer → reader by
//! ownership; the bytes the kernel read are hashed and written where they lie.

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Mutex;
use std::time::Instant;

use edgeshift_common::manifest::chunk_count;
use edgeshift_common::{ChunkSize, Fingerprint, Manifest, ManifestId};

use super::image::{ImageSource, ReadMode};
use super::{chunk_fingerprint, Progress, SlicerError};
use crate::diskio::{AlignedBuf, Engine, Queue, DIRECT_ALIGN};
use crate::store::{ChunkStore, LocalStore};

/// Bytes one read (and one hashing task) covers: a whole number of chunks,
/// large enough that per-read and per-task costs vanish.
const SEGMENT_MIN: usize = 4 << 20;
/// Reads kept in flight while the hashers work.
const READS_IN_FLIGHT: usize = 4;

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
}

/// A run of whole chunks at `offset`, in `buf[..len]`.
struct Segment {
    offset: u64,
    len: usize,
    buf: AlignedBuf,
    fps: Vec<Fingerprint>,
}

/// Slices the image at `path` into `store`; stores its manifest too.
pub fn slice_image(
    path: &Path,
    store: &LocalStore,
    opts: &SliceOptions<'_>,
) -> Result<SliceReport, SlicerError> {
    let started = Instant::now();
    let src = ImageSource::open(path, opts.read_mode)?;
    let cs = opts.chunk_size.as_usize();
    let seg_bytes = cs.max(SEGMENT_MIN);
    let hashers = crate::par::cores(8);
    let pool = READS_IN_FLIGHT + 2 * hashers + 2;
    let n_chunks = chunk_count(src.size, opts.chunk_size) as usize;
    tracing::debug!(path = %path.display(), size = src.size, direct = src.direct, chunk_size = cs, "slicing");

    let (hash_tx, hash_rx) = mpsc::sync_channel::<Segment>(pool);
    let hash_rx = Mutex::new(hash_rx);
    let (store_tx, store_rx) = mpsc::sync_channel::<Segment>(pool);
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();

    let (read_result, writer_result) = std::thread::scope(|s| {
        for _ in 0..hashers {
            let rx = &hash_rx;
            let tx = store_tx.clone();
            s.spawn(move || hash_segments(rx, tx, cs));
        }
        drop(store_tx);
        let writer = s.spawn(|| store_segments(store, store_rx, free_tx, cs, n_chunks, opts.progress));
        let bufs = (0..pool).map(|_| AlignedBuf::new(seg_bytes)).collect();
        let read_result = read_segments(&src, seg_bytes, bufs, hash_tx, free_rx);
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
    };
    metrics::counter!("edgeshift_slice_bytes_total").increment(src.size);
    metrics::counter!("edgeshift_slice_new_chunks_total").increment(stored.new_chunks);
    tracing::debug!(
        id = %manifest_id, size = src.size, new = stored.new_chunks, present = stored.present_chunks,
        zero = stored.zero_chunks, secs = report.seconds, "sliced"
    );
    Ok(report)
}

fn hash_segments(rx: &Mutex<Receiver<Segment>>, tx: SyncSender<Segment>, cs: usize) {
    loop {
        let next = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(mut seg) = next else { return };
        seg.fps.clear();
        seg.fps
            .extend(seg.buf.as_slice()[..seg.len].chunks(cs).map(chunk_fingerprint));
        if tx.send(seg).is_err() {
            return;
        }
    }
}

struct Stored {
    fps: Vec<Fingerprint>,
    zero_chunks: u64,
    unique_chunks: u64,
    new_chunks: u64,
    new_bytes: u64,
    present_chunks: u64,
}

/// Places fingerprints in manifest order and writes chunks the store lacks.
/// The presence check is one `stat` per distinct chunk, done here so that it
/// never holds up reading or hashing.
fn store_segments(
    store: &LocalStore,
    rx: Receiver<Segment>,
    free: mpsc::Sender<AlignedBuf>,
    cs: usize,
    n_chunks: usize,
    progress: Option<Progress<'_>>,
) -> Result<Stored, SlicerError> {
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
        let data = &seg.buf.as_slice()[..seg.len];
        for (i, (fp, bytes)) in seg.fps.iter().zip(data.chunks(cs)).enumerate() {
            out.fps[first + i] = *fp;
            if fp.is_zero_chunk() {
                out.zero_chunks += 1;
                continue;
            }
            if !seen.insert(*fp) {
                continue;
            }
            if store.has_chunk(fp)? {
                out.present_chunks += 1;
                continue;
            }
            batch.stage(fp, bytes)?;
            out.new_chunks += 1;
            out.new_bytes += bytes.len() as u64;
            if batch.is_full() {
                batch.commit()?;
            }
        }
        done += seg.len as u64;
        if let Some(p) = progress {
            p(done);
        }
        // The reader may have finished already; then the buffer is just freed.
        let _ = free.send(seg.buf);
    }
    batch.commit()?;
    out.unique_chunks = seen.len() as u64;
    Ok(out)
}

/// One read in flight: segment bytes `[offset, offset + expected)`, `filled`
/// of them read so far (its buffer is with the queue meanwhile).
struct InFlight {
    offset: u64,
    expected: usize,
    filled: usize,
}

/// Asks for the rest of `f`'s segment, into `buf` where it left off.
fn submit_read<'f>(
    queue: &mut Queue<'f, AlignedBuf>,
    src: &'f ImageSource,
    f: &InFlight,
    buf: AlignedBuf,
    slot: usize,
) -> Result<(), SlicerError> {
    let remaining = f.expected - f.filled;
    // O_DIRECT reads whole blocks; the tail past the end of the image
    // comes back short, which is what we want.
    let len = if src.direct && f.filled.is_multiple_of(DIRECT_ALIGN) {
        remaining.next_multiple_of(DIRECT_ALIGN)
    } else {
        remaining
    };
    let end = (f.filled + len).min(buf.len());
    queue
        .read(&src.file, buf, f.filled..end, f.offset + f.filled as u64, slot)
        .map_err(|e| SlicerError::io("submit a read of", &src.path, e))
}

fn read_segments(
    src: &ImageSource,
    seg_bytes: usize,
    mut free: Vec<AlignedBuf>,
    to_hash: SyncSender<Segment>,
    returned: Receiver<AlignedBuf>,
) -> Result<(), SlicerError> {
    let n_segs = src.size.div_ceil(seg_bytes as u64);
    let mut queue = Engine::current()
        .queue::<AlignedBuf>(READS_IN_FLIGHT * 2)
        .map_err(|e| SlicerError::io("set up disk reads for", &src.path, e))?;
    let mut slots: Vec<Option<InFlight>> = (0..READS_IN_FLIGHT).map(|_| None).collect();
    let stopped = || {
        SlicerError::io(
            "hand over a chunk of",
            &src.path,
            std::io::Error::other("pipeline stopped"),
        )
    };
    let mut next_seg = 0u64;
    let mut done_segs = 0u64;
    while done_segs < n_segs {
        while queue.in_flight() < READS_IN_FLIGHT && next_seg < n_segs {
            let buf = match free.pop() {
                Some(b) => b,
                None => match returned.try_recv() {
                    Ok(b) => b,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(stopped()),
                },
            };
            let Some(slot) = slots.iter().position(Option::is_none) else {
                free.push(buf);
                break;
            };
            let offset = next_seg * seg_bytes as u64;
            let expected = (src.size - offset).min(seg_bytes as u64) as usize;
            let f = slots[slot].insert(InFlight {
                offset,
                expected,
                filled: 0,
            });
            submit_read(&mut queue, src, f, buf, slot)?;
            next_seg += 1;
        }
        if queue.in_flight() == 0 {
            // Every buffer is with the hashers or the writer: wait for one.
            free.push(returned.recv().map_err(|_| stopped())?);
            continue;
        }
        let done = queue
            .next_completion()
            .map_err(|e| SlicerError::io("wait for reads of", &src.path, e))?;
        let Some(f) = slots.get_mut(done.tag).and_then(Option::as_mut) else {
            continue;
        };
        let n = match done.result {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                submit_read(&mut queue, src, f, done.buf, done.tag)?;
                continue;
            }
            Err(e) => return Err(SlicerError::io("read", &src.path, e)),
        };
        if n == 0 {
            return Err(SlicerError::ImageShrank {
                path: src.path.clone(),
                expected: src.size,
                got: f.offset + f.filled as u64,
            });
        }
        f.filled = (f.filled + n).min(f.expected);
        if f.filled < f.expected {
            submit_read(&mut queue, src, f, done.buf, done.tag)?;
            continue;
        }
        let Some(read) = slots[done.tag].take() else {
            continue;
        };
        to_hash
            .send(Segment {
                offset: read.offset,
                len: read.expected,
                buf: done.buf,
                fps: Vec::new(),
            })
            .map_err(|_| stopped())?;
        done_segs += 1;
    }
    Ok(())
}
