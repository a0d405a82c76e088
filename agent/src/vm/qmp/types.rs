//! The values QMP returns (and the memory transport both ends agree on),
//! shared by the real client and the fake.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An event QEMU emitted (`STOP`, `RESUME`, `MIGRATION`, ...).
#[derive(Debug, Clone, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// `query-status`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

/// RAM figures of `query-migrate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRam {
    #[serde(default)]
    pub transferred: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub dirty_sync_count: u64,
}

/// `query-migrate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `setup`, `active`, `pre-switchover`, `device`, `completed`, `failed`, `cancelled`, ...
    pub status: Option<String>,
    pub total_time: Option<u64>,
    /// Milliseconds the VM was stopped, once completed.
    pub downtime: Option<u64>,
    pub ram: Option<MigrationRam>,
    pub error_desc: Option<String>,
}

/// How QEMU moves memory. Both ends of a migration must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryTransport {
    /// One TCP stream, pages uncompressed (QEMU's default).
    Plain,
    /// `multifd` with [`MULTIFD_CHANNELS`] streams, pages compressed with
    /// zstd: on slow links memory is bandwidth-bound, and guest RAM
    /// (kernel, page cache) compresses well.
    MultifdZstd,
}

/// Parallel memory streams under [`MemoryTransport::MultifdZstd`]: one per
/// core here; more would only contend with the guest for CPU.
pub const MULTIFD_CHANNELS: u64 = 2;

/// A disk's write throttle as QEMU holds it (0: unlimited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskThrottle {
    /// The device's qdev path, e.g. `/machine/peripheral/vd0/virtio-backend`.
    pub qdev: String,
    pub bps_wr: u64,
    pub iops_wr: u64,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct BlockJobInfo {
    /// The job's id.
    pub device: String,
    /// `running`, `ready`, `concluded`, ...
    pub status: String,
    #[serde(default)]
    pub ready: bool,
    /// Bytes done, of `len` known so far (an active mirror counts the
    /// guest writes it carried).
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub len: u64,
    /// Why the job failed, once it has.
    #[serde(default)]
    pub error: Option<String>,
}

/// A migration's TLS, as `migrate-set-parameters` takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationTls {
    /// The `tls-creds-x509` object (empty: plaintext).
    pub creds: String,
    /// Source: the name the destination's certificate must carry.
    pub hostname: Option<String>,
    /// Destination: the `authz` object that names the one source allowed.
    pub authz: Option<String>,
}

/// TLS of an NBD client node: its credentials and the name the server's
/// certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTls {
    pub creds: String,
    pub hostname: String,
}
