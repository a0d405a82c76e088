//! What a fetch tells its caller: live counters while it runs, figures
//! once it is done.

use std::sync::atomic::AtomicU64;

use edgeshift_common::Fingerprint;
use serde::Serialize;

/// Live counters a progress bar can poll.
#[derive(Debug, Default)]
pub struct FetchProgress {
    pub total_bytes: AtomicU64,
    pub total_chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
}

/// Per-peer figures of a finished fetch.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    pub addr: String,
    /// The peer's node id, once authenticated.
    pub id: Option<String>,
    /// Chunk payload bytes received on the wire from this peer (compressed size when zstd).
    pub bytes: u64,
    /// Chunks this peer delivered first and that were stored.
    pub chunks: u64,
    /// `bytes` over the time this peer was busy (first request to last chunk).
    pub mbit_per_s: f64,
    /// Copies that arrived after another peer's (tail stealing) or were not needed.
    pub duplicate_chunks: u64,
    /// Chunks this peer was asked for and answered `Missing` (none when the
    /// holdings probe ran and the peer's store did not change meanwhile).
    pub lacking_chunks: u64,
    pub zstd_chunks: u64,
    /// Chunks that came as deltas against the version this store held
    /// (`ChunkWant::base`), and the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    /// Why the peer was dropped during this fetch, if it was.
    pub dropped: Option<String>,
}

/// Figures of a finished fetch.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    /// Chunk payload bytes received on the wire, duplicates included.
    pub bytes_received: u64,
    /// Bytes of the chunks stored (after decompression).
    pub bytes_stored: u64,
    pub chunks_fetched: u64,
    pub seconds: f64,
    pub peers: Vec<PeerReport>,
    /// Optional chunks left out.
    pub skipped: Vec<Fingerprint>,
}
