//! An image's figures from its manifest and the store.

use std::collections::HashSet;

use edgeshift_common::manifest::MANIFEST_HEADER_LEN;
use edgeshift_common::{Fingerprint, ManifestId};

use super::SlicerError;
use crate::store::{ChunkStore, LocalStore, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageFigures {
    pub manifest_id: ManifestId,
    pub image_size: u64,
    pub chunk_size: u64,
    /// Chunks in the image, zero chunks included.
    pub chunks: u64,
    /// Distinct non-zero chunks.
    pub unique_chunks: u64,
    /// All-zero chunks (holes, never stored).
    pub zero_chunks: u64,
    /// Bytes of the distinct non-zero chunks (what a store needs to hold).
    pub unique_bytes: u64,
    /// Distinct chunks the store holds, and their bytes on disk.
    pub stored_chunks: u64,
    pub stored_bytes: u64,
    /// Distinct chunks the store lacks (a restore would fail on them).
    pub missing_chunks: u64,
    pub manifest_bytes: u64,
    /// With `verify`: distinct chunks whose stored bytes fail their
    /// fingerprint (they count as stored above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt_chunks: Option<Vec<Fingerprint>>,
}

/// Figures of image `id`; with `verify`, every stored chunk is also re-read
/// and hashed.
pub fn inspect_image(store: &LocalStore, id: &ManifestId, verify: bool) -> Result<ImageFigures, SlicerError> {
    let m = store.get_manifest(id)?;
    let mut seen = HashSet::with_capacity(m.chunks.len());
    let mut f = ImageFigures {
        manifest_id: *id,
        image_size: m.image_size,
        chunk_size: m.chunk_size.bytes(),
        chunks: m.chunks.len() as u64,
        unique_chunks: 0,
        zero_chunks: 0,
        unique_bytes: 0,
        stored_chunks: 0,
        stored_bytes: 0,
        missing_chunks: 0,
        manifest_bytes: (MANIFEST_HEADER_LEN + 32 * m.chunks.len()) as u64,
        corrupt_chunks: verify.then(Vec::new),
    };
    for (index, fp) in m.chunks.iter().enumerate() {
        if fp.is_zero_chunk() {
            f.zero_chunks += 1;
            continue;
        }
        if !seen.insert(*fp) {
            continue;
        }
        f.unique_chunks += 1;
        f.unique_bytes += m.chunk_len(index);
        match store.chunk_len(fp)? {
            Some(len) => {
                f.stored_chunks += 1;
                f.stored_bytes += len;
                if let Some(bad) = f.corrupt_chunks.as_mut() {
                    match store.get_chunk(fp) {
                        Ok(_) => {}
                        Err(StoreError::ChunkInvalid { .. }) => bad.push(*fp),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            None => f.missing_chunks += 1,
        }
    }
    Ok(f)
}
