//! Evaluation harness: the emulated edge cloud ([`testbed`], [`topology`],
//! [`cluster`]), the images, the scenarios with their baselines
//! ([`scenario`]), and reports with plots ([`report`]).
//! It depends on the agent crate (its QMP client, its chunk store) while the
//! agent's tests dev-depend on this crate's testbed: a dev-dependency cycle
//! that builds, compiling the agent twice for those tests.

pub mod cluster;
pub mod demo;
pub mod heat;
pub mod holdings;
pub mod images;
pub mod live;
pub mod policy;
pub mod qemu_mirror;
pub mod record;
pub mod report;
pub mod scenario;
pub mod signals;
pub mod suite;
pub mod testbed;
pub mod topology;
