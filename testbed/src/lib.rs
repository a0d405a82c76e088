//! Test support for edgeshift's integration tests and benches, depending on
//! no edgeshift crate (so the agent's tests and `edgeshift-perf` can both
//! use it without a dependency cycle):
//!
//! - the emulated edge cloud ([`Testbed`]): network namespaces as hosts,
//!   veth pairs with tbf rate limits as WAN links ([`link`]), and bridges
//!   across namespaces as shared L2 segments ([`segment`], so QEMU taps at
//!   two edges sit on one Ethernet); [`iperf`] measures a path's goodput;
//! - the programs under test ([`bins`]) and a coordinator fixture
//!   ([`coordinator`]), with [`daemon`] readiness for any daemon;
//! - capability guards ([`caps`]): skip outside CI, fail under `CI=true`;
//! - the test images built by perf/images ([`images`]).
//!
//! Everything a [`Testbed`] creates lives inside namespaces named
//! `es-{tag}-{host}`: deleting those namespaces (after killing whatever runs in
//! them) removes every veth, bridge and qdisc too. [`Testbed`] does that on
//! drop, also while unwinding from a panic; [`cleanup_stale`] does it for a
//! tag whose owner died (kill -9, Ctrl-C without handler).
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range) only:
//! point-to-point links get 198.18.{link}.1/.2 /24, L2 segments
//! 198.19.{segment}.0/24. Namespaces isolate testbeds from one another, so two
//! testbeds may reuse the same addresses.
//!
//! Bandwidth is emulated with tbf; latency, jitter and loss (this kernel has
//! no netem) with a user-space delay line in a middle namespace per delayed
//! link ([`delayline`], placed by `delay`; docs/wan.md has its validation).

pub mod bins;
pub mod caps;
mod cmd;
pub mod coordinator;
pub mod counters;
pub mod daemon;
mod delay;
pub mod delayline;
mod error;
pub mod images;
pub mod iperf;
pub mod link;
mod netns;
pub mod segment;
mod testbed;

pub use bins::{repo_root, Binaries};
pub use cmd::run;
pub use counters::{all_counters, iface_counters, IfaceCounters};
pub use delay::DelayStats;
pub use error::TestbedError;
pub use link::{LinkEnd, LinkSpec};
pub use netns::{cleanup_stale, list_netns, MAX_NAME_LEN, NETNS_PREFIX};
pub use segment::L2Segment;
pub use testbed::{HostHandle, Testbed};
