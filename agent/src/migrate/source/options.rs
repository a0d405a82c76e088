//! What to migrate and how: the options of `edgeshift migrate`.

use std::path::PathBuf;
use std::time::Duration;

use crate::migrate::coord::CoordConfig;
use crate::migrate::report::{DiskHandoff, Phase};
use crate::migrate::temperature::Ordering;
use crate::transfer::Trust;
use crate::vm::MemoryTransport;

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub name: String,
    pub state_dir: PathBuf,
    /// The destination's host listener.
    pub to: String,
    /// This edge's host listener as the destination reaches it (a holder).
    pub source_addr: String,
    /// Other holders (edges with some of the image's chunks).
    pub peers: Vec<String>,
    /// How this edge and the destination authenticate each other.
    pub trust: Trust,
    pub id: String,
    pub ordering: Ordering,
    /// Most pre-copy rounds after the first.
    pub max_rounds: u32,
    /// Pre-copy ends once a round has at most this many chunks to send.
    pub converge_chunks: usize,
    /// QEMU's downtime limit for memory, ms.
    pub downtime_limit_ms: u64,
    /// Seconds between the first slice and the second (a temperature sample).
    pub sample_interval: Duration,
    /// Fault injection for tests: stop with an error after this phase.
    pub fail_after: Option<Phase>,
    /// The coordinator, if this edge reports to one: the live disk is
    /// reported to it before Prepare, and this edge's reference to the VM's
    /// image is dropped there after the switchover.
    pub coordinator: Option<CoordConfig>,
    /// How QEMU moves memory (plain, or multifd with zstd); falls back to
    /// plain when either QEMU lacks it.
    pub memory: MemoryTransport,
    /// Budget for the disk's part of the downtime: while memory moves, if
    /// the chunks dirtied per round would take longer than this to send
    /// over the source's measured rate, the source VM's disk writes are
    /// throttled, harder each round, so the pause stays near the budget.
    pub max_downtime: Duration,
    /// Cap on QEMU's memory streams in bytes per second (None: 1 GiB/s,
    /// i.e. whatever the path gives), to leave link for other traffic.
    pub memory_max_bps: Option<u64>,
    /// Start memory with the disk pre-copy (held from converging until
    /// the disk rounds end) instead of after it.
    pub memory_with_disk: bool,
    /// Read the VM's boot log (if it has one) instead of slicing the live
    /// disk to find what changed since boot.
    pub use_boot_log: bool,
    /// Chunks written again after they were sent go as the blocks that
    /// differ from what the destination holds (false: whole, to compare).
    pub deltas: bool,
    /// How the chunks written after the pre-copy rounds reach the
    /// destination: beside QEMU's disk mirror while the VM runs, or in the
    /// pause (the way before the mirror, to compare).
    pub disk_handoff: DiskHandoff,
}
