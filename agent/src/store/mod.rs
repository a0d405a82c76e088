//! The chunk store. A store is content-addressed: a chunk is named by its
//! BLAKE3 fingerprint, and a manifest by the BLAKE3 of its bytes.
//!
//! [`ChunkStore`] is that contract: has/get/put a chunk (verified), get/put/
//! list manifests, figures. [`LocalStore`] (a directory on this edge) is its
//! one implementation; code that needs only the contract takes
//! `&dyn ChunkStore` (`vm::image`). What is about files stays inherent on
//! [`LocalStore`], and code that needs it names `LocalStore`: the chunk's
//! path (the chunk server sends payloads with sendfile from it), reads into
//! a caller's buffer, [`ChunkBatch`] and [`LocalStore::publish`]. A peer's
//! store (`transfer::peer::PeerStore`) is asynchronous and read-only, so it
//! is not a `ChunkStore`.
//!
//! Files, from the bottom up: [`layout`] (where things are, temp names),
//! `fs` (path-naming errors, directory and batch syncs), `recover` (what a
//! crash leaves, cleared at open), [`staged`] (one chunk in a temp file),
//! [`batch`] (writes made durable together),
//! [`local`] (the store), [`publish`] (chunks visible now, durable later),
//! [`uses`] (chunks used since the last heartbeat).

pub mod batch;
mod fs;
pub mod layout;
pub mod local;
pub mod publish;
mod recover;
pub mod staged;
pub mod uses;

use edgeshift_common::{Fingerprint, Manifest, ManifestError, ManifestId};

pub use batch::ChunkBatch;
pub use local::LocalStore;
pub use publish::Unsynced;
pub use staged::StagedChunk;
pub use uses::ChunkUses;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no chunk store at {0} (create one with `edgeshift slice IMAGE --store DIR`)")]
    Missing(std::path::PathBuf),
    #[error("{0} is not an edgeshift chunk store (no {marker} file)", marker = layout::STORE_MARKER)]
    NotAStore(std::path::PathBuf),
    #[error("chunk {0} is not in the store")]
    ChunkMissing(Fingerprint),
    #[error("chunk {fp} is corrupt in the store: its bytes hash to {actual}")]
    ChunkInvalid { fp: Fingerprint, actual: Fingerprint },
    #[error("received bytes for chunk {fp} hash to {actual}: rejected")]
    ChunkRejected { fp: Fingerprint, actual: Fingerprint },
    #[error("the all-zero chunk is never stored")]
    ZeroChunk,
    #[error("manifest {0} is not in the store")]
    ManifestMissing(ManifestId),
    #[error("manifest {id} in the store is invalid: {source}")]
    ManifestInvalid { id: ManifestId, source: ManifestError },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    AlreadyPresent,
}

/// Usage figures a store reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub manifests: u64,
}

/// A content-addressed chunk store.
pub trait ChunkStore: Send + Sync {
    fn has_chunk(&self, fp: &Fingerprint) -> Result<bool, StoreError>;
    /// Reads a chunk and checks its fingerprint; a chunk that fails is
    /// reported as [`StoreError::ChunkInvalid`], never returned.
    fn get_chunk(&self, fp: &Fingerprint) -> Result<Vec<u8>, StoreError>;
    /// Stores bytes the caller has just hashed to `fp` itself (the slicer).
    fn put_chunk(&self, fp: &Fingerprint, data: &[u8]) -> Result<PutOutcome, StoreError>;
    /// Stores bytes that came from elsewhere: hashes them first and rejects
    /// them with [`StoreError::ChunkRejected`] unless they hash to `fp`.
    fn put_chunk_verified(&self, fp: &Fingerprint, data: &[u8]) -> Result<PutOutcome, StoreError> {
        let actual = Fingerprint::of(data);
        if actual != *fp {
            return Err(StoreError::ChunkRejected { fp: *fp, actual });
        }
        self.put_chunk(fp, data)
    }
    fn get_manifest(&self, id: &ManifestId) -> Result<Manifest, StoreError>;
    /// Stores a manifest; returns its id.
    fn put_manifest(&self, manifest: &Manifest) -> Result<ManifestId, StoreError>;
    fn list_manifests(&self) -> Result<Vec<ManifestId>, StoreError>;
    fn stats(&self) -> Result<StoreStats, StoreError>;
}
