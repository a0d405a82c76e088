//! The destination half of a migration, run by `edgeshift agent
//! --migrate-listen`: it receives incoming VMs. Chunks come from the
//! holders' chunk servers through the transfer module's fetcher.
//!
//! The source drives it over the control channel ([`crate::migrate::proto`]),
//! one request at a time, in this order (see [`state`] for what each state
//! takes):
//! 1. `Prepare` (`prepare.rs`): the sparse image, what the store lacks, the
//!    coordinator's plan;
//! 2. `StartIncoming` (`incoming_qemu.rs`): the destination QEMU starts in
//!    the background, waiting for memory;
//! 3. `Pull` rounds (`pull.rs`): the disk's chunks, from every holder at once;
//! 4. `AwaitIncoming`: QEMU listens; memory moves; the last `Pull` in the pause;
//! 5. `Verify` (`verify.rs`): the image equals the source's final manifest;
//! 6. `Finish` (`finish.rs`): the VM runs here and is recorded.
//!
//! An incoming VM belongs to the control connection that prepared it
//! (`session.rs`). If that connection ends before `Finish`, or the source
//! sends `Abort`, the destination half is torn down (`teardown.rs`: QEMU
//! killed, tap removed, loop device detached, image deleted) — unless the
//! migration had already switched over and the VM runs here, in which case
//! it is kept and recorded, so nothing of the VM is ever lost.

mod context;
mod drain;
mod finish;
mod incoming;
mod incoming_qemu;
mod listener;
mod mirror;
mod mirror_server;
mod prepare;
mod pull;
#[cfg(test)]
mod round0_tests;
mod session;
pub mod state;
mod teardown;
mod verify;

use std::sync::Arc;

pub use context::{Host, HostConfig};
pub use listener::serve;

use crate::store::LocalStore;

/// Opens this edge's destination side on the daemon's `store`: what a
/// crashed daemon left half received is removed and the KVM probe started
/// ahead of the first incoming VM. Pulls run on `runtime`.
pub fn open(cfg: HostConfig, store: Arc<LocalStore>, runtime: tokio::runtime::Handle) -> Arc<Host> {
    let host = Host::new(cfg, store, runtime);
    teardown::remove_stale_incoming(&host);
    host.cfg.qemu.probe_ahead();
    Arc::new(host)
}
