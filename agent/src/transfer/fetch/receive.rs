//! Reading a peer's frames during a fetch. A raw chunk's payload is read
//! straight into a page-aligned buffer, so the store can write it to disk
//! with O_DIRECT (no copy into the page cache); other frames are read as
//! usual. Both kinds of buffer are recycled through [`BufPools`].

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use edgeshift_common::wire::{self, FrameKind};
use tokio::io::AsyncRead;

use crate::diskio::AlignedBuf;
use crate::transfer::conn::{read_body_into, read_exact_counted, read_header, Frame};
use crate::transfer::TransferError;

/// A raw chunk's payload: the first `len` bytes of `buf`.
pub(crate) struct Payload {
    pub(crate) buf: AlignedBuf,
    pub(crate) len: usize,
}

impl Payload {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }
}

/// One frame from a peer. For a raw chunk, `frame.body` holds only the
/// chunk's head and `payload` the chunk.
pub(crate) struct Received {
    pub(crate) frame: Frame,
    pub(crate) payload: Option<Payload>,
}

/// Reads the next frame, a raw chunk's payload into an aligned buffer from
/// `pools`; `progress` counts body bytes as they arrive.
pub(crate) async fn read_received<R: AsyncRead + Unpin>(
    r: &mut R,
    max_len: u32,
    progress: &AtomicU64,
    pools: &BufPools,
) -> Result<Received, TransferError> {
    let (header, kind) = read_header(r, max_len).await?;
    let len = header.body_len() as usize;
    let raw_chunk =
        kind == FrameKind::Chunk && header.flags() & wire::FLAG_ZSTD == 0 && len > wire::CHUNK_HEAD_LEN;
    if !raw_chunk {
        let frame = read_body_into(r, header, kind, Some(progress), pools.take_vec()).await?;
        return Ok(Received { frame, payload: None });
    }
    let mut head = pools.take_vec();
    head.clear();
    head.resize(wire::CHUNK_HEAD_LEN, 0);
    read_exact_counted(r, &mut head, Some(progress)).await?;
    let payload_len = len - wire::CHUNK_HEAD_LEN;
    let mut buf = pools.take_aligned(payload_len);
    read_exact_counted(r, &mut buf.as_mut_slice()[..payload_len], Some(progress)).await?;
    Ok(Received {
        frame: Frame {
            header,
            kind,
            body: head,
        },
        payload: Some(Payload {
            buf,
            len: payload_len,
        }),
    })
}

/// Receive buffers given back once their chunk is staged, for reuse: a
/// fresh buffer per chunk would cost its page faults (and, aligned, its
/// zero-fill) on every chunk.
#[derive(Default)]
pub(crate) struct BufPools {
    vecs: Mutex<Spare<Vec<u8>>>,
    aligned: Mutex<Spare<AlignedBuf>>,
}

struct Spare<B> {
    bufs: Vec<B>,
    bytes: usize,
}

impl<B> Default for Spare<B> {
    fn default() -> Self {
        Spare {
            bufs: Vec::new(),
            bytes: 0,
        }
    }
}

impl BufPools {
    /// Most bytes of spare buffers kept of each kind (a few fast windows' worth).
    const MAX_BYTES: usize = 64 << 20;

    /// A spare buffer, or a new empty one.
    pub(crate) fn take_vec(&self) -> Vec<u8> {
        let mut g = self.vecs.lock().unwrap_or_else(|p| p.into_inner());
        match g.bufs.pop() {
            Some(buf) => {
                g.bytes -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    /// A spare aligned buffer of at least `len` bytes, or a new one.
    fn take_aligned(&self, len: usize) -> AlignedBuf {
        let mut g = self.aligned.lock().unwrap_or_else(|p| p.into_inner());
        match g.bufs.iter().rposition(|b| b.len() >= len) {
            Some(i) => {
                let buf = g.bufs.swap_remove(i);
                g.bytes -= buf.len();
                buf
            }
            None => AlignedBuf::new(len),
        }
    }

    pub(crate) fn put_vec(&self, buf: Vec<u8>) {
        let mut g = self.vecs.lock().unwrap_or_else(|p| p.into_inner());
        if g.bytes + buf.capacity() <= Self::MAX_BYTES {
            g.bytes += buf.capacity();
            g.bufs.push(buf);
        }
    }

    pub(crate) fn put_aligned(&self, buf: AlignedBuf) {
        let mut g = self.aligned.lock().unwrap_or_else(|p| p.into_inner());
        if g.bytes + buf.len() <= Self::MAX_BYTES {
            g.bytes += buf.len();
            g.bufs.push(buf);
        }
    }
}
