//! [`ChunkWant`]: one chunk a fetch is asked for.

use std::net::SocketAddr;

use edgeshift_common::Fingerprint;

/// One chunk to fetch. `sources`, if given, lists the only peers it may come
/// from (e.g. the coordinator's plan); otherwise any peer.
#[derive(Debug, Clone)]
pub struct ChunkWant {
    pub fp: Fingerprint,
    /// Expected length in bytes (from the manifest); a payload of another length is rejected.
    pub len: u64,
    pub sources: Option<Vec<SocketAddr>>,
    /// Filler: fetched only while chunks that are not optional are still
    /// queued or on their way (it fills the paths' idle tail); once they are
    /// all done, the optional chunks not yet asked for are left out (listed
    /// in [`super::FetchReport::skipped`]), as are those no source has.
    pub optional: bool,
    /// A chunk this store holds that the wanted one is a later version of
    /// (what the image held at that place before): a peer holding both may
    /// send only the blocks that differ (`docs/wire.md`, deltas).
    pub base: Option<Fingerprint>,
}

impl ChunkWant {
    /// Whether the chunk may come from the peer at `addr`.
    pub(crate) fn may_come_from(&self, addr: &SocketAddr) -> bool {
        self.sources.as_ref().is_none_or(|s| s.contains(addr))
    }
}
