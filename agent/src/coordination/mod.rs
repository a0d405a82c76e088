//! The agent's link to the cache coordinator (issue 4).
//!
//! - [`client`]: a small blocking HTTP + JSON client for the coordinator's `/v1` API.
//! - [`pins`]: the local pin set, `STORE/pins/<manifest id>`: manifests this
//!   edge must keep whole. GC orders are checked against it (under a lock the
//!   pinning side takes too) before any chunk is deleted.
//! - [`link`]: the agent daemon's background loop: register, full inventory
//!   on (re)connect, deltas after, poll orders, carry out GC and prefetch.
//! - [`handoff`]: handoffs the coordinator orders: this edge's running VMs
//!   reported, each order run by the migration engine, its progress posted.
//! - [`fetch`]: `edgeshift fetch --coordinator`: pin, ask for a plan, fetch
//!   from the planned sources, report measured path rates, release the lease.

pub mod client;
pub mod fetch;
pub mod handoff;
pub mod link;
pub mod pins;

use std::path::PathBuf;

use edgeshift_common::ManifestId;

use crate::store::StoreError;
use crate::transfer::TransferError;

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error(
        "coordinator URL {0:?} must be https://HOST:PORT (or http:// for one run with --insecure-no-auth)"
    )]
    BadUrl(String),
    #[error("coordinator {0}: https needs this edge's cluster certificate (--tls-ca, --tls-cert, --tls-key; `edgeshift cluster add-edge NAME` makes them)")]
    NoCredentials(String),
    #[error("coordinator {0}: plain http would send this edge's reports unauthenticated; use https:// (http:// only with --insecure-plaintext, for a coordinator run with --insecure-no-auth)")]
    PlainWithCredentials(String),
    #[error("{path}: {reason} (make the cluster's files with `edgeshift cluster add-edge NAME`)")]
    Tls { path: PathBuf, reason: String },
    #[error("cannot reach the coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("coordinator refused {what} ({status}): {message}")]
    Refused {
        what: String,
        status: u16,
        message: String,
    },
    #[error("coordinator answer to {what} is not what this agent expects: {reason}")]
    BadAnswer { what: String, reason: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("transfer: {0}")]
    Transfer(#[from] TransferError),
    #[error("pin set {path}: {source}")]
    Pins { path: PathBuf, source: std::io::Error },
    #[error("pinned manifest {0} is not in the local store, so its chunks cannot be protected")]
    PinnedManifestMissing(ManifestId),
    #[error("reading this edge's VM records: {0}")]
    Vms(String),
    #[error("peer address {addr:?} from the coordinator: {reason}")]
    BadPeer { addr: String, reason: String },
}

impl CoordError {
    /// True when the coordinator does not know this edge (it restarted):
    /// the link registers and reports its full inventory again.
    pub fn is_unknown_edge(&self) -> bool {
        matches!(self, CoordError::Refused { status: 404, message, .. } if message.contains("unknown edge"))
    }
}
