//! Evaluation harness: the emulated edge cloud ([`testbed`]), baselines, reports.
//! Must never depend on the agent crate: the agent's tests dev-depend on this.

pub mod testbed;
