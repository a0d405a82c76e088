//! Slicing: io_uring reads into aligned buffers, BLAKE3 on every core while
//! the next reads are in flight, new chunks written to the store in durable
//! batches. A buffer travels reader → hasher → store writer → reader by
//! ownership; the bytes the kernel read are hashed and written where they lie.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Mutex;
use std::time::Instant;

use edgeshift_common::manifest::chunk_count;
use edgeshift_common::{ChunkSize, Fingerprint, Manifest, ManifestId};
use io_uring::{opcode, types, IoUring};

use super::image::{AlignedBuf, ImageSource, ReadMode, DIRECT_ALIGN};
use super::{chunk_fingerprint, Progress, SlicerError};
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

/// One read in flight: segment bytes `[offset, offset + expected)` landing in
/// `buf`, `filled` of them so far.
struct InFlight {
    offset: u64,
    expected: usize,
    filled: usize,
    buf: AlignedBuf,
}

/// An io_uring with the buffers its reads point into. Dropping it waits for
/// every read still in flight, so the kernel never writes into freed memory.
struct Reader<'a> {
    ring: IoUring,
    slots: Vec<Option<InFlight>>,
    in_flight: usize,
    src: &'a ImageSource,
}

impl Reader<'_> {
    fn submit(&mut self, slot: usize) -> Result<(), SlicerError> {
        let src = self.src;
        let Some(f) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let remaining = f.expected - f.filled;
        // O_DIRECT reads whole blocks; the tail past the end of the image
        // comes back short, which is what we want.
        let len = if src.direct && f.filled % DIRECT_ALIGN == 0 {
            remaining.next_multiple_of(DIRECT_ALIGN)
        } else {
            remaining
        };
        let buf = &mut f.buf.as_mut_slice()[f.filled..];
        let len = len.min(buf.len());
        let sqe = opcode::Read::new(types::Fd(src.file.as_raw_fd()), buf.as_mut_ptr(), len as u32)
            .offset(f.offset + f.filled as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: the entry points into `slots[slot].buf`, whose heap bytes
        // stay put and alive until its completion is reaped: the slot is only
        // emptied after that, and Drop reaps every read still in flight. The
        // fd belongs to `src`, which outlives the reader. The queue has room:
        // it is larger than the number of slots.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            return Err(SlicerError::io(
                "io_uring submit for",
                &src.path,
                std::io::Error::other("queue full"),
            ));
        }
        self.in_flight += 1;
        self.ring
            .submit()
            .map_err(|e| SlicerError::io("io_uring submit for", &src.path, e))?;
        Ok(())
    }

    /// Waits for one completion: (slot, result).
    fn reap(&mut self) -> Result<(usize, i32), SlicerError> {
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                self.in_flight -= 1;
                return Ok((cqe.user_data() as usize, cqe.result()));
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SlicerError::io("io_uring wait for", &self.src.path, e)),
            }
        }
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if self.reap().is_err() {
                // Cannot tell when the kernel is done with the buffers: leak
                // them rather than free memory it may still write into.
                for slot in self.slots.drain(..).flatten() {
                    std::mem::forget(slot.buf);
                }
                return;
            }
        }
    }
}

fn read_segments(
    src: &ImageSource,
    seg_bytes: usize,
    mut free: Vec<AlignedBuf>,
    to_hash: SyncSender<Segment>,
    returned: Receiver<AlignedBuf>,
) -> Result<(), SlicerError> {
    let n_segs = src.size.div_ceil(seg_bytes as u64);
    let ring = IoUring::new((READS_IN_FLIGHT * 2) as u32)
        .map_err(|e| SlicerError::io("io_uring setup for", &src.path, e))?;
    let mut reader = Reader {
        ring,
        slots: (0..READS_IN_FLIGHT).map(|_| None).collect(),
        in_flight: 0,
        src,
    };
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
        while reader.in_flight < READS_IN_FLIGHT && next_seg < n_segs {
            let buf = match free.pop() {
                Some(b) => b,
                None => match returned.try_recv() {
                    Ok(b) => b,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Err(stopped()),
                },
            };
            let Some(slot) = reader.slots.iter().position(Option::is_none) else {
                free.push(buf);
                break;
            };
            let offset = next_seg * seg_bytes as u64;
            let expected = (src.size - offset).min(seg_bytes as u64) as usize;
            reader.slots[slot] = Some(InFlight {
                offset,
                expected,
                filled: 0,
                buf,
            });
            reader.submit(slot)?;
            next_seg += 1;
        }
        if reader.in_flight == 0 {
            // Every buffer is with the hashers or the writer: wait for one.
            free.push(returned.recv().map_err(|_| stopped())?);
            continue;
        }
        let (slot, res) = reader.reap()?;
        let Some(f) = reader.slots.get_mut(slot).and_then(Option::as_mut) else {
            continue;
        };
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                reader.submit(slot)?;
                continue;
            }
            return Err(SlicerError::io(
                "read",
                &src.path,
                std::io::Error::from_raw_os_error(-res),
            ));
        }
        if res == 0 {
            return Err(SlicerError::ImageShrank {
                path: src.path.clone(),
                expected: src.size,
                got: f.offset + f.filled as u64,
            });
        }
        f.filled = (f.filled + res as usize).min(f.expected);
        if f.filled < f.expected {
            reader.submit(slot)?;
            continue;
        }
        let Some(done) = reader.slots[slot].take() else {
            continue;
        };
        to_hash
            .send(Segment {
                offset: done.offset,
                len: done.expected,
                buf: done.buf,
                fps: Vec::new(),
            })
            .map_err(|_| stopped())?;
        done_segs += 1;
    }
    Ok(())
}
