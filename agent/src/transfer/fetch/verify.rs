//! Checking received chunks before they are stored: the announced length
//! against the manifest's, the bytes against the fingerprint asked for,
//! after decompressing or rebuilding a delta against its base.

use edgeshift_common::wire;
use edgeshift_common::Fingerprint;

use super::receive::Payload;
use crate::store::{LocalStore, StoreError};
use crate::transfer::TransferError;

/// A received chunk's bytes, wherever they landed.
pub(crate) enum ChunkBytes {
    /// `body[start..]`: behind a frame head, decompressed or rebuilt.
    Framed { body: Vec<u8>, start: usize },
    /// A raw payload in an aligned buffer (written with O_DIRECT).
    Aligned(Payload),
}

impl ChunkBytes {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            ChunkBytes::Framed { body, start } => &body[*start..],
            ChunkBytes::Aligned(p) => p.bytes(),
        }
    }
}

/// Rebuilds chunk `fp` from a delta body against `base`, read (and
/// checked) from this store, then checks the result's fingerprint: a wrong
/// delta is a bad chunk from the peer; a base this store cannot read is a
/// local failure. A `zstd` delta is decompressed first, bounded by the
/// most a delta of the chunk's length can take.
pub(crate) fn rebuild(
    store: &LocalStore,
    fp: &Fingerprint,
    want_len: u64,
    base: &Fingerprint,
    body: &[u8],
    zstd: bool,
) -> Result<ChunkBytes, TransferError> {
    let bad = |reason: String| TransferError::BadChunk { fp: *fp, reason };
    let (head, tail) = wire::decode_delta_head(body).map_err(|e| bad(e.to_string()))?;
    check_announced(fp, head.raw_len.get(), want_len)?;
    let inflated;
    let tail = if zstd {
        let bound = wire::delta_body_bound(head.raw_len.get());
        inflated = zstd::bulk::decompress(tail, bound).map_err(|e| bad(format!("zstd: {e}")))?;
        &inflated[..]
    } else {
        tail
    };
    let (bitmap, payload) = wire::split_delta(head.raw_len.get(), tail).map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0u8; want_len as usize];
    // A base whose length differs from the chunk's fails the read (its
    // length is checked), like a corrupt one.
    store
        .read_chunk_into(base, &mut buf)
        .map_err(|e| TransferError::BaseUnavailable {
            fp: *fp,
            base: *base,
            reason: e.to_string(),
        })?;
    edgeshift_common::delta::apply(&mut buf, bitmap, payload).map_err(|e| bad(format!("delta: {e}")))?;
    check_fingerprint(fp, &buf)?;
    Ok(ChunkBytes::Framed { body: buf, start: 0 })
}

/// A payload announcing another length than the manifest's is a bad chunk.
fn check_announced(fp: &Fingerprint, raw_len: u32, want_len: u64) -> Result<(), TransferError> {
    if raw_len as u64 == want_len {
        return Ok(());
    }
    Err(TransferError::BadChunk {
        fp: *fp,
        reason: format!("announced {raw_len} bytes, the manifest says {want_len}"),
    })
}

/// Bytes that do not hash to the fingerprint asked for are rejected.
fn check_fingerprint(fp: &Fingerprint, bytes: &[u8]) -> Result<(), TransferError> {
    // Single-threaded BLAKE3 (SIMD within the chunk): for chunks of at most a
    // few MiB, fanning out to rayon costs more than it saves on a busy host.
    let actual = Fingerprint::of(bytes);
    if actual != *fp {
        return Err(TransferError::Store(StoreError::ChunkRejected {
            fp: *fp,
            actual,
        }));
    }
    Ok(())
}

/// Checks a received chunk against the manifest's length and its
/// fingerprint (decompressing `received` first if `zstd`; it then holds the
/// compressed bytes). Raw payloads are checked where they lie, no copy.
pub(crate) fn verify(
    fp: &Fingerprint,
    want_len: u64,
    raw_len: u32,
    zstd: bool,
    received: ChunkBytes,
) -> Result<ChunkBytes, TransferError> {
    let bad = |reason: String| TransferError::BadChunk { fp: *fp, reason };
    check_announced(fp, raw_len, want_len)?;
    let chunk = if zstd {
        // Bounded by the manifest's length, so a zstd bomb cannot grow past it.
        let raw = zstd::bulk::decompress(received.bytes(), want_len as usize)
            .map_err(|e| bad(format!("zstd: {e}")))?;
        ChunkBytes::Framed { body: raw, start: 0 }
    } else {
        received
    };
    let bytes = chunk.bytes();
    if bytes.len() as u64 != want_len {
        return Err(bad(format!(
            "{} bytes, the manifest says {want_len}",
            bytes.len()
        )));
    }
    check_fingerprint(fp, bytes)?;
    Ok(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: Vec<u8>) -> ChunkBytes {
        ChunkBytes::Framed {
            body,
            start: wire::CHUNK_HEAD_LEN,
        }
    }

    #[test]
    fn verify_rejects_wrong_lengths_bytes_and_bad_zstd() {
        let data = vec![7u8; 4096];
        let fp = Fingerprint::of(&data);
        let mut body = vec![0u8; wire::CHUNK_HEAD_LEN];
        body.extend_from_slice(&data);
        let chunk = verify(&fp, 4096, 4096, false, framed(body.clone())).expect("valid");
        assert_eq!(chunk.bytes(), &data[..]);
        // Announced length differs from the manifest.
        assert!(matches!(
            verify(&fp, 4096, 4095, false, framed(body.clone())),
            Err(TransferError::BadChunk { .. })
        ));
        // Payload shorter than the manifest says.
        assert!(matches!(
            verify(&fp, 4096, 4096, false, framed(body[..body.len() - 1].to_vec())),
            Err(TransferError::BadChunk { .. })
        ));
        // Right length, wrong bytes.
        let mut flipped = body.clone();
        flipped[wire::CHUNK_HEAD_LEN] ^= 1;
        assert!(matches!(
            verify(&fp, 4096, 4096, false, framed(flipped)),
            Err(TransferError::Store(StoreError::ChunkRejected { .. }))
        ));
        // zstd: round trip, garbage, and a bomb larger than the manifest allows.
        let mut z = vec![0u8; wire::CHUNK_HEAD_LEN];
        z.extend(zstd::bulk::compress(&data, 1).expect("compress"));
        let chunk = verify(&fp, 4096, 4096, true, framed(z)).expect("zstd valid");
        assert_eq!(chunk.bytes(), &data[..]);
        let mut garbage = vec![0u8; wire::CHUNK_HEAD_LEN];
        garbage.extend_from_slice(b"not zstd at all");
        assert!(verify(&fp, 4096, 4096, true, framed(garbage)).is_err());
        let mut bomb = vec![0u8; wire::CHUNK_HEAD_LEN];
        bomb.extend(zstd::bulk::compress(&vec![7u8; 1 << 20], 1).expect("compress"));
        assert!(verify(&fp, 4096, 4096, true, framed(bomb)).is_err());
    }
}
