//! Hashing segments on every core, with the store's presence check beside
//! it (one `stat` per chunk, off the writer's thread): segments read into
//! buffers ([`hash_read_segments`]), or hashed where they lie in a mapping
//! of the image ([`hash_mapped_segments`]), which copies out only the
//! chunks the store lacks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Mutex;

use edgeshift_common::Fingerprint;

use super::chunk_fingerprint;
use super::segment::Segment;
use crate::diskio::AlignedBuf;
use crate::store::{ChunkStore, LocalStore};

/// True when chunk `fp` must be stored: not the zero chunk, not present.
fn absent(store: &LocalStore, fp: &Fingerprint) -> bool {
    // A failed stat counts as absent: staging it again is harmless (a
    // commit skips a chunk that is there).
    !fp.is_zero_chunk() && !store.has_chunk(fp).unwrap_or(false)
}

/// Hashes segments that were read into buffers, until `rx` ends.
pub(super) fn hash_read_segments(
    rx: &Mutex<Receiver<Segment>>,
    tx: SyncSender<Segment>,
    cs: usize,
    store: &LocalStore,
) {
    loop {
        let next = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(mut seg) = next else { return };
        let Some(buf) = &seg.buf else { return };
        seg.fps.clear();
        seg.new.clear();
        for chunk in buf.as_slice()[..seg.len].chunks(cs) {
            let fp = chunk_fingerprint(chunk);
            seg.new.push(absent(store, &fp));
            seg.fps.push(fp);
        }
        if tx.send(seg).is_err() {
            return;
        }
    }
}

/// Buffers for the chunks copied out of a mapping: reused once the writer
/// hands them back, at most `max` made.
pub(super) struct CopyBufs {
    returned: Mutex<Receiver<AlignedBuf>>,
    made: AtomicUsize,
    max: usize,
    size: usize,
}

impl CopyBufs {
    pub(super) fn new(returned: Receiver<AlignedBuf>, max: usize, size: usize) -> Self {
        CopyBufs {
            returned: Mutex::new(returned),
            made: AtomicUsize::new(0),
            max,
            size,
        }
    }

    /// A buffer, waiting for one to come back when `max` are out; `None`
    /// once the writer is gone.
    fn get(&self) -> Option<AlignedBuf> {
        let rx = self.returned.lock().ok()?;
        match rx.try_recv() {
            Ok(b) => return Some(b),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        if self.made.fetch_add(1, Ordering::Relaxed) < self.max {
            drop(rx);
            return Some(AlignedBuf::new(self.size));
        }
        self.made.fetch_sub(1, Ordering::Relaxed);
        rx.recv().ok()
    }
}

/// Hashes segments of `image` (a mapping of it) taken in turn from `next`
/// until none is left. A chunk the store lacks is copied into a buffer and
/// hashed again there: the copy is what is stored, so a write to the image
/// meanwhile can never put other bytes under the fingerprint. When most
/// chunks of the last segment were new (an empty store), the whole segment
/// is copied first and hashed once, in the copy.
pub(super) fn hash_mapped_segments(
    image: &[u8],
    next: &AtomicUsize,
    seg_bytes: usize,
    cs: usize,
    store: &LocalStore,
    bufs: &CopyBufs,
    tx: SyncSender<Segment>,
) {
    let n_segs = image.len().div_ceil(seg_bytes);
    let mut expect_new = false;
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= n_segs {
            return;
        }
        let offset = k * seg_bytes;
        let bytes = &image[offset..(offset + seg_bytes).min(image.len())];
        let Some(seg) = hash_mapped(bytes, offset as u64, cs, store, bufs, expect_new) else {
            return;
        };
        let new = seg.new.iter().filter(|n| **n).count();
        expect_new = new * 2 > seg.new.len();
        if tx.send(seg).is_err() {
            return;
        }
    }
}

/// One segment of a mapping; `None` once the writer is gone.
fn hash_mapped(
    bytes: &[u8],
    offset: u64,
    cs: usize,
    store: &LocalStore,
    bufs: &CopyBufs,
    copy_first: bool,
) -> Option<Segment> {
    let mut buf = None;
    if copy_first {
        let mut b = bufs.get()?;
        b.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        buf = Some(b);
    }
    let n = bytes.len().div_ceil(cs);
    let (mut fps, mut new) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (i, chunk) in bytes.chunks(cs).enumerate() {
        let at = i * cs..i * cs + chunk.len();
        let (fp, is_new) = match buf.as_mut() {
            Some(b) if copy_first => {
                let fp = chunk_fingerprint(&b.as_slice()[at]);
                (fp, absent(store, &fp))
            }
            _ => {
                let fp = chunk_fingerprint(chunk);
                if absent(store, &fp) {
                    if buf.is_none() {
                        buf = Some(bufs.get()?);
                    }
                    let b = buf.as_mut()?;
                    b.as_mut_slice()[at.clone()].copy_from_slice(chunk);
                    let copied = chunk_fingerprint(&b.as_slice()[at]);
                    let is_new = copied == fp || absent(store, &copied);
                    (copied, is_new)
                } else {
                    (fp, false)
                }
            }
        };
        fps.push(fp);
        new.push(is_new);
    }
    Some(Segment {
        offset,
        len: bytes.len(),
        buf,
        fps,
        new,
    })
}
