//! The image chunks manager: slicing an image (raw file or block device, or
//! any format QEMU reads through its raw view, [`view`]) into BLAKE3-named
//! chunks with io_uring ([`slice`]), rebuilding it from its
//! manifest ([`restore`]), and its figures ([`inspect`]).

pub mod format;
mod hash;
pub mod image;
pub mod inspect;
pub mod place;
mod read;
pub mod restore;
mod segment;
pub mod slice;
#[cfg(test)]
mod slice_tests;
pub mod view;

use std::path::{Path, PathBuf};

use edgeshift_common::{Fingerprint, ManifestId};

use crate::store::StoreError;

pub use crate::diskio::AlignedBuf;
pub use image::{ImageSource, ReadMode};
pub use inspect::{inspect_image, ImageFigures};
pub use restore::{restore_image, RestoreReport};
pub use slice::{slice_image, SliceOptions, SliceReport};

/// Called with the number of bytes done so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

#[derive(Debug, thiserror::Error)]
pub enum SlicerError {
    #[error("image {0} does not exist")]
    ImageMissing(PathBuf),
    #[error("{0} is neither a regular file nor a block device")]
    NotAnImage(PathBuf),
    #[error(
        "{path} is a {format} image, not a raw one; slice a raw view of it instead: \
         `qemu-img convert -O raw {path} IMAGE.raw` and slice IMAGE.raw, or \
         `qemu-nbd --connect /dev/nbd0 {path}` and slice /dev/nbd0"
    )]
    NotRaw { path: PathBuf, format: &'static str },
    #[error("{path} ({format}) cannot be sliced: {reason}")]
    BadImage {
        path: PathBuf,
        format: String,
        reason: String,
    },
    #[error("{tool}: {reason}")]
    Tool { tool: String, reason: String },
    #[error(
        "reading the raw view of {path} ({format}) failed; check it with `qemu-img check {path}`: {source}"
    )]
    ViewRead {
        path: PathBuf,
        format: String,
        source: Box<SlicerError>,
    },
    #[error("{path} ended at byte {got} while slicing, but it was {expected} bytes when opened")]
    ImageShrank { path: PathBuf, expected: u64, got: u64 },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("restore of {id} failed at chunk {index} (byte {offset}): {source}")]
    RestoreChunk {
        id: ManifestId,
        index: usize,
        offset: u64,
        source: Box<StoreError>,
    },
    #[error("{0} is a directory; give the path of the image file to write")]
    OutIsDirectory(PathBuf),
    #[error("block device {path} holds {device} bytes, less than the {image}-byte image")]
    DeviceTooSmall { path: PathBuf, device: u64, image: u64 },
    #[error("{path}: chunk {index} ({fp}) reads back as {actual} after writing")]
    ReadBack {
        path: PathBuf,
        index: usize,
        fp: Fingerprint,
        actual: Fingerprint,
    },
    #[error("a slicer worker thread panicked")]
    WorkerPanicked,
}

impl SlicerError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        SlicerError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// True if every byte is zero. Ors 512-byte blocks (which the compiler
/// vectorises) and stops at the first block with a set bit, so a data chunk
/// costs almost nothing and a zero chunk one pass at memory speed.
pub fn is_all_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(512);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|b| *b == 0)
}

/// A chunk's fingerprint, or [`Fingerprint::ZERO_CHUNK`] if it is all zero.
pub fn chunk_fingerprint(bytes: &[u8]) -> Fingerprint {
    if is_all_zero(bytes) {
        Fingerprint::ZERO_CHUNK
    } else {
        Fingerprint::of(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0u8; 4097]));
        for pos in [0, 511, 512, 4000, 4096] {
            let mut b = vec![0u8; 4097];
            b[pos] = 1;
            assert!(!is_all_zero(&b), "set byte at {pos} missed");
        }
        assert_eq!(chunk_fingerprint(&[0u8; 4096]), Fingerprint::ZERO_CHUNK);
        assert_eq!(chunk_fingerprint(b"x"), Fingerprint::of(b"x"));
    }
}
