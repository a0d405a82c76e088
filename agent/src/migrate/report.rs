//! What a migration reports: its phases, disk rounds and throttle, as the
//! `--json` output prints them (a contract `perf` parses: the field names
//! and values stay as they are).

use std::collections::BTreeMap;

use serde::Serialize;

use super::coord::CoordReport;
use super::temperature::Ordering;

/// The phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Plan,
    Precopy,
    Incoming,
    /// The last chunks beside QEMU's disk mirror: from the mirror's start
    /// to its completion in the pause (it overlaps `Memory`); its bytes are
    /// the engine's last round and the guest writes the mirror carried.
    Mirror,
    Memory,
    Pause,
    /// Not a phase of its own: a disk round while QEMU moves memory (the
    /// two overlap). Only a fault-injection point.
    MemoryRound,
}

/// One phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: Phase,
    /// When it started, seconds after the migration's (phases may overlap:
    /// `mirror` runs beside `memory`).
    pub start_seconds: f64,
    pub seconds: f64,
    pub bytes: u64,
}

/// One disk round's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    /// Indices asked for.
    pub chunks: u64,
    /// Bytes pulled from holders.
    pub bytes: u64,
    /// Indices sent before that were sent again (written in between).
    pub resent_chunks: u64,
    /// Chunks that went as the blocks that differ from what the
    /// destination's image held there, and the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    pub seconds: f64,
}

/// Whether and how hard the source VM's disk writes were throttled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThrottleReport {
    pub max_downtime_ms: u64,
    pub applied: bool,
    /// Times the squeeze was tightened.
    pub steps: u32,
    /// The tightest limits set (0: none).
    pub bps_wr: u64,
    pub iops_wr: u64,
    /// The estimate that last triggered a step: pending chunks and the
    /// seconds they would take over the source's rate.
    pub pending_chunks: u64,
    pub estimated_pause_seconds: f64,
}

/// How the chunks written after the pre-copy rounds reach the destination
/// (`migrate --disk-handoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DiskHandoff {
    /// An active mirror of new writes (QEMU `blockdev-mirror`,
    /// write-blocking) to the destination's NBD export; the chunks written
    /// before it go beside it; the pause only checks.
    Mirror,
    /// The last dirty chunks are sent in the pause.
    Pause,
}

/// What the disk mirror moved.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorReport {
    /// Chunks written before the mirror was ready, sent beside it, and
    /// their bytes.
    pub engine_chunks: u64,
    pub engine_bytes: u64,
    /// Guest writes the mirror carried (QEMU's job offset).
    pub mirrored_bytes: u64,
}

/// How the source learnt which chunks changed since the manifest the VM
/// booted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ChangedSinceBoot {
    /// The VM's boot log (the pinned eBPF tracker): no slice; round 0
    /// carries them.
    #[serde(rename = "boot log")]
    BootLog,
    /// The live disk sliced beside round 0; they go in round 1.
    #[serde(rename = "slice")]
    Slice,
}

/// What a migration did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    pub vm: String,
    pub to: String,
    pub ordering: Ordering,
    pub total_seconds: f64,
    pub downtime_ms: u64,
    /// Time the source VM was paused for the disk (within the downtime).
    pub pause_disk_seconds: f64,
    /// Memory moved beside the disk pre-copy (held from converging until
    /// it ended), not after it; the phases then overlap.
    pub memory_started_with_disk: bool,
    pub changed_since_boot_from: ChangedSinceBoot,
    /// How the last chunks went: `mirror` (beside QEMU's disk mirror) or
    /// `pause`.
    pub disk_handoff: DiskHandoff,
    /// The disk mirror's figures, when it ran (its phase is `mirror`).
    pub mirror: Option<MirrorReport>,
    pub phases: Vec<PhaseReport>,
    pub rounds: Vec<RoundReport>,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    pub bytes_by_source: BTreeMap<String, u64>,
    pub chunks_resent: u64,
    /// Over all rounds: chunks sent as deltas, and the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    pub missing_at_plan_chunks: u64,
    pub missing_at_plan_bytes: u64,
    pub manifest_id: String,
    /// The coordinator's part: where the plan came from, the references moved.
    pub coordination: CoordReport,
    /// Disk-write throttling to keep the pause within `--max-downtime`.
    pub throttle: ThrottleReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_since_boot_serializes_as_before() {
        // perf and the handoff tests read these strings.
        assert_eq!(
            serde_json::to_value(ChangedSinceBoot::BootLog).expect("json"),
            "boot log"
        );
        assert_eq!(
            serde_json::to_value(ChangedSinceBoot::Slice).expect("json"),
            "slice"
        );
        assert_eq!(
            serde_json::to_value(Phase::MemoryRound).expect("json"),
            "memory-round"
        );
    }
}
