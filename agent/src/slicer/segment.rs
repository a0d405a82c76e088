//! What travels between the slicer's stages: a run of whole chunks of the
//! image, its fingerprints, and which of them the store lacks.

use edgeshift_common::Fingerprint;

use crate::diskio::AlignedBuf;

/// A run of whole chunks at `offset`, `len` bytes of the image.
pub(super) struct Segment {
    pub(super) offset: u64,
    pub(super) len: usize,
    /// Chunk `i`'s bytes are at `buf[i * chunk_size..]` where `new[i]`
    /// (and everywhere when the segment was read, not mapped); `None` when
    /// no chunk of a mapped segment is new.
    pub(super) buf: Option<AlignedBuf>,
    pub(super) fps: Vec<Fingerprint>,
    /// True where the chunk is not the zero chunk and the store lacked it
    /// when it was hashed.
    pub(super) new: Vec<bool>,
}
