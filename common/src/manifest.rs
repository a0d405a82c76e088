//! The manifest: an image's recipe. A fixed little-endian header followed by
//! the fingerprint of every chunk in order. Its id is the BLAKE3 of its bytes,
//! so a manifest fetched from anywhere can be checked against the id asked for.

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::fingerprint::Fingerprint;
use crate::size::{ChunkSize, SizeError};

/// A manifest is named by the BLAKE3 of its bytes.
pub type ManifestId = Fingerprint;

pub const MANIFEST_MAGIC: [u8; 8] = *b"EDGSHMF\0";
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, shorter than its {1}-byte header (truncated?)")]
    TruncatedHeader(usize, usize),
    #[error("not an edgeshift manifest (bad magic)")]
    BadMagic,
    #[error("manifest format version {0} is not supported (this build reads version {MANIFEST_VERSION})")]
    UnsupportedVersion(u32),
    #[error("manifest has an invalid chunk size: {0}")]
    ChunkSize(#[from] SizeError),
    #[error("manifest says {chunks} chunks but an image of {image_size} bytes in {chunk_size}-byte chunks has {expected}")]
    ChunkCountMismatch {
        image_size: u64,
        chunk_size: u64,
        chunks: u64,
        expected: u64,
    },
    #[error("manifest body is {got} bytes but {chunks} fingerprints need {want} (truncated or padded)")]
    BodyLength { chunks: u64, want: u64, got: u64 },
    #[error("manifest bytes hash to {actual}, not to the id asked for {expected}")]
    IdMismatch {
        expected: ManifestId,
        actual: ManifestId,
    },
}

/// On-disk and on-wire header, 32 bytes, little-endian.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ManifestHeader {
    pub magic: [u8; 8],
    pub version: U32,
    pub chunk_size: U32,
    pub image_size: U64,
    pub chunk_count: U64,
}

pub const MANIFEST_HEADER_LEN: usize = std::mem::size_of::<ManifestHeader>();

/// An image as its chunk size, its byte length and its chunks' fingerprints.
/// A chunk whose bytes are all zero is recorded as [`Fingerprint::ZERO_CHUNK`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub chunk_size: ChunkSize,
    pub image_size: u64,
    pub chunks: Vec<Fingerprint>,
}

/// Number of chunks an image of `image_size` bytes has.
pub fn chunk_count(image_size: u64, chunk_size: ChunkSize) -> u64 {
    image_size.div_ceil(chunk_size.bytes())
}

impl Manifest {
    pub fn new(chunk_size: ChunkSize, image_size: u64, chunks: Vec<Fingerprint>) -> Self {
        debug_assert_eq!(chunks.len() as u64, chunk_count(image_size, chunk_size));
        Manifest {
            chunk_size,
            image_size,
            chunks,
        }
    }

    /// Byte length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: usize) -> u64 {
        let start = index as u64 * self.chunk_size.bytes();
        (self.image_size - start).min(self.chunk_size.bytes())
    }

    /// Byte offset of chunk `index` in the image.
    pub fn chunk_offset(&self, index: usize) -> u64 {
        index as u64 * self.chunk_size.bytes()
    }

    pub fn header(&self) -> ManifestHeader {
        ManifestHeader {
            magic: MANIFEST_MAGIC,
            version: U32::new(MANIFEST_VERSION),
            chunk_size: U32::new(self.chunk_size.bytes() as u32),
            image_size: U64::new(self.image_size),
            chunk_count: U64::new(self.chunks.len() as u64),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MANIFEST_HEADER_LEN + 32 * self.chunks.len());
        out.extend_from_slice(self.header().as_bytes());
        out.extend_from_slice(self.chunks.as_slice().as_bytes());
        out
    }

    pub fn id(&self) -> ManifestId {
        Fingerprint::of(&self.to_bytes())
    }

    /// Parses and validates manifest bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        let (header, body) = ManifestHeader::read_from_prefix(bytes)
            .map_err(|_| ManifestError::TruncatedHeader(bytes.len(), MANIFEST_HEADER_LEN))?;
        if header.magic != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        if header.version.get() != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion(header.version.get()));
        }
        let chunk_size = ChunkSize::new(header.chunk_size.get() as u64)?;
        let image_size = header.image_size.get();
        let chunks = header.chunk_count.get();
        let expected = chunk_count(image_size, chunk_size);
        if chunks != expected {
            return Err(ManifestError::ChunkCountMismatch {
                image_size,
                chunk_size: chunk_size.bytes(),
                chunks,
                expected,
            });
        }
        let want = chunks.saturating_mul(32);
        if body.len() as u64 != want {
            return Err(ManifestError::BodyLength {
                chunks,
                want,
                got: body.len() as u64,
            });
        }
        let fps = <[Fingerprint]>::ref_from_bytes(body).map_err(|_| ManifestError::BodyLength {
            chunks,
            want,
            got: body.len() as u64,
        })?;
        Ok(Manifest {
            chunk_size,
            image_size,
            chunks: fps.to_vec(),
        })
    }

    /// Parses manifest bytes and checks they hash to `id`.
    pub fn from_bytes_checked(bytes: &[u8], id: &ManifestId) -> Result<Self, ManifestError> {
        let actual = Fingerprint::of(bytes);
        if actual != *id {
            return Err(ManifestError::IdMismatch {
                expected: *id,
                actual,
            });
        }
        Self::from_bytes(bytes)
    }

    /// Distinct non-zero fingerprints, in first-seen order.
    pub fn unique_chunks(&self) -> Vec<Fingerprint> {
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        self.chunks
            .iter()
            .copied()
            .filter(|f| !f.is_zero_chunk() && seen.insert(*f))
            .collect()
    }

    /// Number of all-zero chunks (holes).
    pub fn zero_chunks(&self) -> usize {
        self.chunks.iter().filter(|f| f.is_zero_chunk()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let cs = ChunkSize::new(4096).expect("valid");
        let chunks = vec![
            Fingerprint::of(b"a"),
            Fingerprint::ZERO_CHUNK,
            Fingerprint::of(b"a"),
        ];
        Manifest::new(cs, 4096 * 2 + 100, chunks)
    }

    #[test]
    fn round_trip_and_id() {
        let m = sample();
        let b = m.to_bytes();
        assert_eq!(b.len(), MANIFEST_HEADER_LEN + 96);
        assert_eq!(Manifest::from_bytes_checked(&b, &m.id()), Ok(m.clone()));
        assert_eq!(m.unique_chunks().len(), 1);
        assert_eq!(m.zero_chunks(), 1);
        assert_eq!(m.chunk_len(2), 100);
    }

    #[test]
    fn truncated_and_corrupt_are_refused() {
        let m = sample();
        let b = m.to_bytes();
        assert!(matches!(
            Manifest::from_bytes(&b[..10]),
            Err(ManifestError::TruncatedHeader(10, 32))
        ));
        assert!(matches!(
            Manifest::from_bytes(&b[..b.len() - 1]),
            Err(ManifestError::BodyLength { .. })
        ));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert_eq!(Manifest::from_bytes(&bad), Err(ManifestError::BadMagic));
        let mut flipped = b.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            Manifest::from_bytes_checked(&flipped, &m.id()),
            Err(ManifestError::IdMismatch { .. })
        ));
        let mut count = b.clone();
        count[24] = 9;
        assert!(matches!(
            Manifest::from_bytes(&count),
            Err(ManifestError::ChunkCountMismatch { .. })
        ));
    }
}
