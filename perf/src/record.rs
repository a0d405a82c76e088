//! What a run records (JSON beside the report): every figure in a report is
//! computed from these, never typed in.

use serde::{Deserialize, Serialize};

/// One measured handoff (or copy) of a VM disk to the destination edge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Scenario group: "bandwidth", "cache", "sources", "writes".
    pub scenario: String,
    /// "edgeshift", "rsync-whole", "rsync-base", "casync-seed", "qemu-mirror".
    pub tool: String,
    /// Edge-to-edge link rate in Mbit/s.
    pub rate_mbit: u32,
    /// Destination cache: "cold", "warm" (base image held) or "prefetched"
    /// (an earlier copy of this VM's disk held).
    pub cache: String,
    /// Sources used (hosts the destination pulled from).
    pub sources: Vec<String>,
    /// Data changed on the VM's disk since its earlier copy: "low" or "high".
    pub workload: String,
    /// Wall-clock seconds until the destination held the whole image.
    pub seconds: f64,
    /// Bytes on the destination's links, both directions, from interface counters.
    pub wire_bytes: u64,
    /// Bytes the destination lacked (non-zero chunks it had to receive).
    pub needed_bytes: u64,
    /// Sum of the rates (Mbit/s) of the paths this run used.
    pub path_mbit: u32,
    /// The physical limit: needed_bytes over path_mbit, in seconds.
    pub limit_seconds: f64,
    /// The image at the destination equals the source's, byte for byte.
    pub verified: bool,
    /// Not measured at this rate: wire bytes measured at `projected_from`
    /// Mbit/s divided by this rate (only for slow whole-image copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected_from: Option<u32>,
    /// Per-source bytes received over time (for the handoff timeline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Sample>,
    /// Extra figures (phase times, tool's own report).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl Run {
    /// seconds / limit_seconds (1.0 is the physical limit).
    pub fn ratio_to_limit(&self) -> Option<f64> {
        (self.limit_seconds > 0.0).then(|| self.seconds / self.limit_seconds)
    }
}

/// Bytes received from each source up to time `t` (seconds from start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub phase: String,
    /// (source host, cumulative bytes received from it).
    pub bytes: Vec<(String, u64)>,
}

/// Storage the fleet uses for the same set of held images under one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Storage {
    /// "image files", "chunk store per edge", "fleet-wide dedup".
    pub policy: String,
    /// (edge, bytes stored).
    pub per_edge: Vec<(String, u64)>,
    /// Sum of the sizes of the images held, as VMs see them.
    pub logical_bytes: u64,
    /// Bytes on disk across the fleet.
    pub physical_bytes: u64,
}

impl Storage {
    pub fn dedup_ratio(&self) -> f64 {
        if self.physical_bytes == 0 {
            0.0
        } else {
            self.logical_bytes as f64 / self.physical_bytes as f64
        }
    }
}

/// Per-chunk write rates over time, from `edgeshift dirty`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heatmap {
    pub chunk_size: u64,
    pub chunks: u64,
    /// Seconds per row.
    pub interval: f64,
    /// rows[time][chunk] = writes per second.
    pub rows: Vec<Vec<f64>>,
    /// Which tracker measured it (ebpf or ftrace).
    pub tracker: String,
}

/// Everything a report is made from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSet {
    pub name: String,
    /// UTC start, RFC 3339.
    pub started: String,
    /// Seconds the whole set took to measure.
    pub wall_seconds: f64,
    /// Host facts: cpus, kernel.
    pub host: serde_json::Value,
    /// Image sizes and the like.
    pub images: serde_json::Value,
    pub runs: Vec<Run>,
    #[serde(default)]
    pub storage: Vec<Storage>,
    #[serde(default)]
    pub heatmap: Option<Heatmap>,
    /// Anything a scenario could not do, and why.
    #[serde(default)]
    pub notes: Vec<String>,
}
