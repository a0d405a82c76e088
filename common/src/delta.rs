//! Block deltas between two versions of one chunk.
//!
//! A chunk the guest wrote again after it was sent differs from the copy the
//! destination already holds in a few 4 KiB blocks (the guest writes pages,
//! not chunks). A delta carries a bitmap of the blocks that differ and those
//! blocks' bytes; the receiver rebuilds the new chunk from its base and then
//! checks the result against the chunk's fingerprint, as it does for every
//! chunk, so a wrong base or a lying sender can never corrupt an image.

/// Granularity of a delta: a page, the unit the guest's writes come in.
pub const DELTA_BLOCK: usize = 4096;

/// Errors from applying a delta.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("bitmap is {got} bytes, a chunk of {chunk} bytes needs {want}")]
    BitmapLength { got: usize, want: usize, chunk: usize },
    #[error("payload is {got} bytes, the bitmap names {want}")]
    PayloadLength { got: usize, want: usize },
}

/// Bytes of the bitmap of a chunk of `len` bytes.
pub fn bitmap_len(len: usize) -> usize {
    len.div_ceil(DELTA_BLOCK).div_ceil(8)
}

fn block(len: usize, b: usize) -> std::ops::Range<usize> {
    let start = b * DELTA_BLOCK;
    start..(start + DELTA_BLOCK).min(len)
}

/// The blocks of `new` that differ from `base`: (bitmap, their bytes in
/// order). `None` when the two are not the same length (not versions of
/// one chunk) or when the delta would not be smaller than
/// `limit` bytes in all.
pub fn encode(base: &[u8], new: &[u8], limit: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    if base.len() != new.len() {
        return None;
    }
    let len = new.len();
    let mut bitmap = vec![0u8; bitmap_len(len)];
    let mut payload = Vec::new();
    for b in 0..len.div_ceil(DELTA_BLOCK) {
        let r = block(len, b);
        if base[r.clone()] != new[r.clone()] {
            bitmap[b / 8] |= 1 << (b % 8);
            payload.extend_from_slice(&new[r]);
            if bitmap.len() + payload.len() >= limit {
                return None;
            }
        }
    }
    Some((bitmap, payload))
}

/// Rebuilds the new chunk in `base` (overwritten in place) from a delta.
/// The caller checks the result's fingerprint.
pub fn apply(base: &mut [u8], bitmap: &[u8], payload: &[u8]) -> Result<(), DeltaError> {
    let len = base.len();
    if bitmap.len() != bitmap_len(len) {
        return Err(DeltaError::BitmapLength {
            got: bitmap.len(),
            want: bitmap_len(len),
            chunk: len,
        });
    }
    let blocks = len.div_ceil(DELTA_BLOCK);
    let named = |b: usize| bitmap[b / 8] & (1 << (b % 8)) != 0;
    let want: usize = (0..blocks)
        .filter(|&b| named(b))
        .map(|b| block(len, b).len())
        .sum();
    // Bits past the last block must be clear: a bitmap is one exact encoding.
    let stray = (blocks..bitmap.len() * 8).any(named);
    if payload.len() != want || stray {
        return Err(DeltaError::PayloadLength {
            got: payload.len(),
            want,
        });
    }
    let mut at = 0;
    for b in (0..blocks).filter(|&b| named(b)) {
        let r = block(len, b);
        let n = r.len();
        base[r].copy_from_slice(&payload[at..at + n]);
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_delta_carries_only_changed_blocks_and_rebuilds_the_chunk() {
        let base = pattern(256 << 10, 1);
        let mut new = base.clone();
        // One 64 KiB slot rewritten, and one byte of the last block.
        new[64 << 10..128 << 10].copy_from_slice(&pattern(64 << 10, 9));
        let last = new.len() - 1;
        new[last] ^= 0xff;
        let (bitmap, payload) = encode(&base, &new, new.len()).expect("pays");
        assert_eq!(bitmap.len(), 8, "64 blocks, 8 bytes");
        assert_eq!(payload.len(), (64 << 10) + DELTA_BLOCK);
        let mut rebuilt = base.clone();
        apply(&mut rebuilt, &bitmap, &payload).expect("applies");
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn a_short_last_block_and_identical_chunks() {
        let base = pattern(10_000, 3);
        let mut new = base.clone();
        new[9_999] = 0;
        let (bitmap, payload) = encode(&base, &new, usize::MAX).expect("pays");
        assert_eq!(
            payload.len(),
            10_000 - 2 * DELTA_BLOCK,
            "only the short last block"
        );
        let mut rebuilt = base.clone();
        apply(&mut rebuilt, &bitmap, &payload).expect("applies");
        assert_eq!(rebuilt, new);
        let (bitmap, payload) = encode(&base, &base, usize::MAX).expect("empty delta");
        assert!(payload.is_empty() && bitmap.iter().all(|&b| b == 0));
    }

    #[test]
    fn no_delta_when_it_would_not_pay_or_lengths_differ() {
        let base = pattern(64 << 10, 1);
        let new = pattern(64 << 10, 2);
        assert!(
            encode(&base, &new, new.len() * 3 / 4).is_none(),
            "every block differs"
        );
        assert!(encode(&base, &new[..1000], usize::MAX).is_none());
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let mut base = pattern(3 * DELTA_BLOCK, 1);
        assert!(matches!(
            apply(&mut base, &[], &[]),
            Err(DeltaError::BitmapLength { .. })
        ));
        // Names block 0 but carries half of it.
        assert!(matches!(
            apply(&mut base, &[1], &[0u8; DELTA_BLOCK / 2]),
            Err(DeltaError::PayloadLength { .. })
        ));
        // A bit past the last of 3 blocks.
        assert!(apply(&mut base, &[0b1000], &[]).is_err());
    }
}
