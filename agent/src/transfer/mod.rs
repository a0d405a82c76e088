//! Peer-to-peer chunk protocol, chunk server, striped multi-source fetcher.
//!
//! - [`conn`]: reading and writing frames of [`edgeshift_common::wire`] on a
//!   TCP stream, and the mutual keyed-BLAKE3 authentication both sides run
//!   before anything else flows.
//! - [`server`]: the agent's chunk server; uncompressed payloads go from the
//!   chunk file to the socket with `sendfile(2)` (no user-space copy).
//! - [`fetch`]: the destination side; pulls the chunks it lacks from every
//!   peer at once, weighted by measured path throughput, with tail stealing.
//! - [`peer`]: [`peer::PeerStore`], read access to one peer's store.
//! - [`pool`]: authenticated connections kept between fetches (a
//!   migration's rounds).
//! - [`dial`]: connecting and authenticating to a peer, under all three
//!   client modules above.
//! - [`trust`]: mutual TLS with the cluster's certificates (or, for tests
//!   only, the cluster key's handshake on plaintext) and [`stream`], the
//!   connection type either gives.
//!
//! The protocol and its choices are described in `docs/wire.md`.

pub mod admission;
pub mod compress;
pub mod conn;
pub mod dial;
pub mod fetch;
pub mod peer;
pub mod pool;
pub mod server;
pub mod stream;
pub mod trust;

pub use stream::PeerStream;
pub use trust::Trust;

use std::path::{Path, PathBuf};

use edgeshift_common::wire::WireError;
use edgeshift_common::{Fingerprint, ManifestError, ManifestId};

use crate::store::StoreError;

/// Errors from the transfer module.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cluster key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    #[error("authentication with {peer} failed: {reason}")]
    AuthFailed { peer: String, reason: String },
    #[error("peer sent a {0} frame where it was not expected")]
    Unexpected(String),
    #[error("peer reported error {code}: {message}")]
    Remote { code: u32, message: String },
    #[error("the peer closed the connection")]
    Closed,
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("manifest {id} from {peer} is invalid: {source}")]
    BadManifest {
        id: ManifestId,
        peer: String,
        source: Box<ManifestError>,
    },
    #[error("no peer could supply manifest {id}: {reasons}")]
    ManifestUnavailable { id: ManifestId, reasons: String },
    #[error(
        "{missing} chunk(s) could not be fetched: no live peer has them (first: {first}); peers: {peers}"
    )]
    ChunksUnavailable {
        missing: usize,
        first: Fingerprint,
        peers: String,
    },
    #[error("chunk {fp}: {reason}")]
    BadChunk { fp: Fingerprint, reason: String },
    #[error("chunk {fp}: its base {base} cannot be read here ({reason}); it is asked for whole")]
    BaseUnavailable {
        fp: Fingerprint,
        base: Fingerprint,
        reason: String,
    },
    #[error("the chunk writer stopped before storing a chunk")]
    WriterStopped,
    #[error("too many peers: {0} (at most 64 per fetch)")]
    TooManyPeers(usize),
    #[error("too many chunks: {0} (at most 2^32 per fetch)")]
    TooManyChunks(usize),
}

/// This host's name, the default node id.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "edgeshift".to_string())
}

/// The cluster's shared secret: 32 bytes, written as 64 hex digits in a file.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ClusterKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() != 64 {
            return Err(format!("expected 64 hex digits, found {} characters", t.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(t, &mut out)
            .map_err(|_| "expected 64 hex digits, found a non-hex character".to_string())?;
        Ok(ClusterKey(out))
    }

    /// Reads a key file holding 64 hex digits.
    pub fn from_file(path: &Path) -> Result<Self, TransferError> {
        let text = std::fs::read_to_string(path).map_err(|e| TransferError::KeyFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_hex(&text).map_err(|reason| TransferError::KeyFile {
            path: path.to_path_buf(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parsing() {
        let hex64 = "ab".repeat(32);
        assert_eq!(
            ClusterKey::from_hex(&format!("{hex64}\n"))
                .expect("valid")
                .as_bytes(),
            &[0xab; 32]
        );
        assert!(ClusterKey::from_hex("abcd").is_err());
        assert!(ClusterKey::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{:?}", ClusterKey::from_bytes([1; 32])), "ClusterKey(..)");
    }
}
