//! Reading the image into segments through [`crate::diskio`] (io_uring
//! where it works), a few reads in flight while the hashers work: the path
//! for an image that is not in the page cache (O_DIRECT) or cannot be mapped.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};

use super::image::ImageSource;
use super::segment::Segment;
use super::SlicerError;
use crate::diskio::{AlignedBuf, Engine, Queue, DIRECT_ALIGN};

/// Reads kept in flight while the hashers work.
pub(super) const READS_IN_FLIGHT: usize = 4;

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

/// Reads every segment of `src` into buffers from `free` (then from
/// `returned`, as the writer hands them back) and sends them to be hashed.
pub(super) fn read_segments(
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
                buf: Some(done.buf),
                fps: Vec::new(),
                new: Vec::new(),
            })
            .map_err(|_| stopped())?;
        done_segs += 1;
    }
    Ok(())
}
