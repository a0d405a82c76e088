//! The migration engine: plan, disk pre-copy by temperature, memory through
//! QEMU, final chunks in the pause, switchover.
//!
//! - [`proto`]: the authenticated control channel between agents.
//! - [`destination`]: the destination half, run by every edge's agent to
//!   receive incoming VMs; chunks come through [`crate::transfer`]'s fetcher.
//! - [`source`]: the source half, driving both QEMUs and the destination.
//! - [`report`]: what a migration reports (its `--json` output).
//! - [`temperature`]: the order chunks go in (coldest first, hottest last).
//! - [`nbd`]: the small NBD server the source's disk mirror writes to.
//! - [`coord`]: the coordinator's part: the plan (step 1) and the reference
//!   counts that move with the VM (step 5).

pub mod channel;
pub mod coord;
pub mod destination;
mod image_writer;
pub mod nbd;
pub mod proto;
pub mod report;
pub mod source;
pub mod temperature;

pub use report::MigrationReport;
pub use source::{migrate, MigrateOptions};

pub use destination::{Host, HostConfig};

/// Errors of a migration, named by what failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("control channel: {0}")]
    Channel(String),
    #[error("control protocol: {0}")]
    Protocol(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("the destination reported: {0}")]
    Remote(String),
    #[error("chunks unavailable: {0}")]
    Unavailable(String),
    #[error("disk mirror: {0}")]
    Mirror(String),
    #[error("disk check failed: {0}")]
    Verify(String),
    #[error("QEMU migration {0}")]
    Memory(String),
    #[error("{0}")]
    State(String),
    #[error("{0}")]
    OutOfOrder(#[from] destination::state::OutOfOrder),
    #[error("coordinator: {0}")]
    Coordinator(#[from] crate::coordination::CoordError),
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("slicing the live disk: {0}")]
    Slicer(#[from] crate::slicer::SlicerError),
    #[error("manifest: {0}")]
    Manifest(#[from] edgeshift_common::ManifestError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
