//! Evaluation harness: the emulated edge cloud (the `edgeshift-testbed`
//! crate's namespaces and links, shaped by [`topology`], populated by
//! [`cluster`]), the images, the scenarios with their baselines
//! ([`scenario`]), and reports with plots ([`report`]).
//! It depends on the agent crate (its QMP client, its chunk store); the
//! agent's tests use `edgeshift-testbed` directly, so there is no cycle.

pub mod boot_logs;
pub mod cluster;
pub mod counter_client;
pub mod creds;
pub mod demo;
pub mod heat;
pub mod holdings;
pub mod images;
pub mod live;
pub mod operator_api;
pub mod policy;
pub mod qemu_mirror;
pub mod record;
pub mod report;
pub mod scenario;
pub mod service_probe;
pub mod signals;
pub mod suite;
pub mod topology;

/// The testbed crate under its old path `edgeshift_perf::testbed`, for the
/// few call sites that still name it so.
pub use edgeshift_testbed as testbed;
