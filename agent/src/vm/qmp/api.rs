//! The QMP operations the agent drives a VM with, as a trait: the real
//! [`super::QmpClient`] implements it over QEMU's socket, and
//! [`super::fake::FakeQmp`] scripts it for tests of the migration engine's
//! phases without root or QEMU.

use std::path::Path;
use std::time::Duration;

use super::types::{
    BlockJobInfo, DiskThrottle, MemoryTransport, MigrationInfo, MigrationTls, NbdTls, QmpEvent, StatusInfo,
};
use crate::vm::tls::TlsEndpoint;
use crate::vm::VmError;

/// One QMP session with one QEMU. `Send`: the migration engine watches
/// memory from a second thread while the disk rounds run.
pub trait Qmp: Send {
    /// `query-status`.
    fn query_status(&mut self) -> Result<StatusInfo, VmError>;
    fn stop(&mut self) -> Result<(), VmError>;
    fn cont(&mut self) -> Result<(), VmError>;
    /// `migrate-set-capabilities` with each `(capability, state)`.
    fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmError>;
    /// The allowed downtime (ms) and the migration bandwidth cap (bytes/s).
    fn migrate_set_parameters(
        &mut self,
        downtime_limit_ms: Option<u64>,
        max_bandwidth: Option<u64>,
    ) -> Result<(), VmError>;
    /// `avail-switchover-bandwidth` (bytes/s; 0: the measured rate).
    fn set_switchover_bandwidth(&mut self, bytes_per_sec: u64) -> Result<(), VmError>;
    /// Sets up `t` for the next migration (either end).
    fn set_memory_transport(&mut self, t: MemoryTransport) -> Result<(), VmError>;
    fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmError>;
    fn migrate(&mut self, uri: &str) -> Result<(), VmError>;
    fn query_migrate(&mut self) -> Result<MigrationInfo, VmError>;
    /// Leaves the pause `pause-before-switchover` made (`state`: the state left).
    fn migrate_continue(&mut self, state: &str) -> Result<(), VmError>;
    /// The write throttle of the disk whose block node is `node`.
    fn disk_write_throttle(&mut self, node: &str) -> Result<DiskThrottle, VmError>;
    /// Limits guest writes of the disk at `qdev` (0 lifts a limit).
    fn set_disk_write_throttle(&mut self, qdev: &str, bps_wr: u64, iops_wr: u64) -> Result<(), VmError>;
    fn migrate_cancel(&mut self) -> Result<(), VmError>;
    /// `object-add` of a `tls-creds-x509` object `id` reading the
    /// directory `dir`, for `endpoint`, peers' certificates verified.
    fn add_tls_creds(&mut self, id: &str, dir: &Path, endpoint: TlsEndpoint) -> Result<(), VmError>;
    /// `object-add` of an `authz-simple` object `id` that allows only
    /// `identity` (a certificate's distinguished name).
    fn add_authz(&mut self, id: &str, identity: &str) -> Result<(), VmError>;
    fn object_del(&mut self, id: &str) -> Result<(), VmError>;
    /// The next migration's TLS (`migrate-set-parameters` `tls-creds`,
    /// `tls-hostname`, `tls-authz`).
    fn migrate_set_tls(&mut self, tls: &MigrationTls) -> Result<(), VmError>;
    /// Gratuitous ARP/RARP for the VM's NICs.
    fn announce_self(&mut self) -> Result<(), VmError>;
    /// Events received so far and not yet taken.
    fn take_events(&mut self) -> Vec<QmpEvent>;
    /// Waits for an event named `name` (a queued one counts).
    fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, VmError>;
    /// An NBD client node `node` for `export` at `host:port`, over TLS
    /// when `tls` is given.
    fn blockdev_add_nbd(
        &mut self,
        node: &str,
        host: &str,
        port: u16,
        export: &str,
        tls: Option<&NbdTls>,
    ) -> Result<(), VmError>;
    fn blockdev_del(&mut self, node: &str) -> Result<(), VmError>;
    /// An active mirror (job `job`) of `device`'s new writes to `target`.
    fn mirror_new_writes(&mut self, job: &str, device: &str, target: &str) -> Result<(), VmError>;
    fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>, VmError>;
    /// Completes a ready mirror, or with `force` stops it at once.
    fn block_job_cancel(&mut self, job: &str, force: bool) -> Result<(), VmError>;
    /// Removes a concluded job.
    fn job_dismiss(&mut self, job: &str) -> Result<(), VmError>;
}
