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
    /// Edge-to-edge round-trip time in ms (the testbed's delay line; 0 for
    /// none, as in every run recorded before it existed).
    #[serde(default)]
    pub rtt_ms: f64,
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

/// One handoff of a caching-policy trace: a user's VM image fetched at its
/// new edge with `edgeshift fetch --coordinator`, its old edge unpinning it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStep {
    pub user: String,
    pub image: String,
    /// The edge the VM left (none for its first placement).
    pub from: Option<String>,
    pub to: String,
    /// Non-zero distinct chunks of the image, and their bytes.
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks already in the destination's store before the fetch.
    pub local_chunks: u64,
    /// Of the missing chunks, those some other edge (not the origin) held.
    pub edge_held_chunks: u64,
    /// Chunks the fetch got from edges, and from the origin.
    pub from_edges_chunks: u64,
    pub from_origin_chunks: u64,
    /// Bytes received from the origin and from edges (compressed, as sent).
    pub origin_wire_bytes: u64,
    pub edges_wire_bytes: u64,
    pub fetch_seconds: f64,
    /// Bytes the coordinator's GC removed from the fleet's edges after this step.
    pub evicted_bytes: u64,
}

impl PolicyStep {
    /// Chunks served by the edge tier (already local, or from another edge).
    pub fn edge_hits(&self) -> u64 {
        self.local_chunks + self.from_edges_chunks
    }
}

/// What one edge stores at the end of a policy trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeStore {
    pub edge: String,
    /// Bytes of chunk files in its store.
    pub stored_bytes: u64,
    /// Images complete in its store (pinned ones included).
    pub images: Vec<String>,
    /// Sum of those images' sizes as VMs see them.
    pub logical_bytes: u64,
    /// Sum of those images' non-zero distinct chunk bytes.
    pub nonzero_bytes: u64,
}

/// A whole trace under one caching policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRun {
    /// "lru", "lfu", "popularity".
    pub policy: String,
    /// Each edge's `--capacity`, bytes.
    pub capacity_bytes: u64,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub steps: Vec<PolicyStep>,
    /// Edges' stores after the trace.
    pub edges: Vec<EdgeStore>,
    pub wall_seconds: f64,
}

impl PolicyRun {
    fn sum(&self, f: impl Fn(&PolicyStep) -> u64) -> u64 {
        self.steps.iter().map(f).sum()
    }

    /// Fraction of needed chunks served by the edge tier.
    pub fn hit_ratio(&self) -> f64 {
        ratio(self.sum(PolicyStep::edge_hits), self.sum(|s| s.chunks))
    }

    /// Fraction of needed chunks already at the destination.
    pub fn local_hit_ratio(&self) -> f64 {
        ratio(self.sum(|s| s.local_chunks), self.sum(|s| s.chunks))
    }

    /// Fraction of needed chunks that the edge tier held (locally or at another edge).
    pub fn edge_held_ratio(&self) -> f64 {
        ratio(
            self.sum(|s| s.local_chunks + s.edge_held_chunks),
            self.sum(|s| s.chunks),
        )
    }

    pub fn origin_wire_bytes(&self) -> u64 {
        self.sum(|s| s.origin_wire_bytes)
    }

    pub fn edges_wire_bytes(&self) -> u64 {
        self.sum(|s| s.edges_wire_bytes)
    }

    pub fn evicted_bytes(&self) -> u64 {
        self.sum(|s| s.evicted_bytes)
    }

    pub fn stored_bytes(&self) -> u64 {
        self.edges.iter().map(|e| e.stored_bytes).sum()
    }

    /// Logical bytes of the images the edges hold ÷ bytes stored.
    pub fn dedup_ratio(&self) -> f64 {
        ratio(
            self.edges.iter().map(|e| e.logical_bytes).sum(),
            self.stored_bytes(),
        )
    }

    /// The same counting only the images' non-zero distinct chunks (sharing
    /// between images, without the holes that sparse files also skip).
    pub fn nonzero_dedup_ratio(&self) -> f64 {
        ratio(
            self.edges.iter().map(|e| e.nonzero_bytes).sum(),
            self.stored_bytes(),
        )
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
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
    /// Caching-policy traces, one per policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyRun>,
    /// Anything a scenario could not do, and why.
    #[serde(default)]
    pub notes: Vec<String>,
}
