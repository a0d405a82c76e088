//! QMP, QEMU's monitor protocol.
//!
//! - [`api`]: the [`Qmp`] trait, the operations the agent drives a VM with.
//! - [`client`]: [`QmpClient`], the typed client over QEMU's socket
//!   (its block-job commands in `block.rs`, its TLS objects in
//!   `objects.rs`).
//! - [`fake`]: [`fake::FakeQmp`], a scripted stand-in for tests.
//! - [`types`]: the values both return.

pub mod api;
mod block;
pub mod client;
pub mod fake;
mod objects;
pub mod types;

pub use api::Qmp;
pub use client::QmpClient;
pub use types::{
    BlockJobInfo, DiskThrottle, MemoryTransport, MigrationInfo, MigrationRam, MigrationTls, NbdTls, QmpEvent,
    StatusInfo, MULTIFD_CHANNELS,
};
