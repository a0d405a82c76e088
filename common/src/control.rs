//! Control-plane messages between agents and the coordinator (HTTP + JSON
//! under `/v1/`). Both sides use these types, so the two ends cannot drift.
//! See docs/coordinator.md for the endpoints that carry them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Fingerprint, ManifestId};

/// A source edge in a plan, with the path rate the plan assumed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanSource {
    pub edge: String,
    pub addr: String,
    /// Bytes per second on the path from this edge to the destination.
    pub rate: f64,
    /// False when no measurement exists and a default rate was assumed.
    pub measured: bool,
    pub chunks: u64,
    pub bytes: u64,
}

/// One chunk the destination lacks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanChunk {
    pub fp: Fingerprint,
    pub bytes: u64,
    /// The edge assigned to send it; null when no edge holds it.
    pub source: Option<String>,
    /// Edges holding it, best path to the destination first.
    pub holders: Vec<String>,
}

/// `GET /v1/plan?manifest=ID&dest=EDGE`: what the destination lacks and who sends what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    pub manifest: ManifestId,
    pub dest: String,
    pub missing_chunks: u64,
    pub missing_bytes: u64,
    pub unavailable_chunks: u64,
    /// Finish time of the assignment, and a lower bound no assignment beats.
    pub makespan_secs: f64,
    pub lower_bound_secs: f64,
    /// Lease protecting the assigned chunks on their sources; release it with
    /// DELETE /v1/leases/{id} when the transfer is done.
    pub lease: Option<u64>,
    pub sources: Vec<PlanSource>,
    pub chunks: Vec<PlanChunk>,
    /// Chunk-server address of every edge named in `chunks`.
    #[serde(default)]
    pub addrs: BTreeMap<String, String>,
}

/// A chunk to pull in the background, and from where.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrefetchChunk {
    pub fp: Fingerprint,
    pub bytes: u64,
    pub source: String,
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PrefetchOrder {
    pub manifest: ManifestId,
    pub chunks: Vec<PrefetchChunk>,
}

/// `GET /v1/edges/{id}/orders`: what the coordinator asks an edge to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Orders {
    pub policy: String,
    /// Drop these chunks (first victim first) unless a local pin holds them.
    pub drop: Vec<Fingerprint>,
    pub drop_bytes: u64,
    /// Pull these in the background, at low priority.
    pub prefetch: Vec<PrefetchOrder>,
    pub lease: Option<u64>,
    /// Hand these VMs over (`POST /v1/vms/{name}/handoff`); the source
    /// acknowledges each with a progress report and ignores an id it has
    /// already started.
    #[serde(default)]
    pub handoffs: Vec<HandoffOrder>,
}

/// One handoff the coordinator orders a VM's source edge to carry out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HandoffOrder {
    pub id: u64,
    pub vm: String,
    /// The destination edge's id, and its migration listener
    /// (`edgeshift agent --migrate-listen`) as it reported it.
    pub to: String,
    pub to_migrate_addr: String,
}

/// `PUT /v1/edges/{id}/vms`: the VMs running on an edge, and where it
/// receives migrations (none: it receives no VMs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmsReport {
    pub vms: Vec<String>,
    #[serde(default)]
    pub migrate_addr: Option<String>,
}

/// Where an ordered handoff stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HandoffState {
    /// Ordered; the source has not taken it yet.
    Ordered,
    Running,
    Done,
    /// Failed before the switchover: the VM keeps running at the source.
    Failed,
}

impl HandoffState {
    pub fn is_over(self) -> bool {
        matches!(self, HandoffState::Done | HandoffState::Failed)
    }
}

/// `POST /v1/edges/{id}/handoffs/{handoff}`: the source's progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandoffProgress {
    pub state: HandoffState,
    /// The migration's current phase (`migrate --json`'s phase names).
    #[serde(default)]
    pub phase: Option<String>,
    /// Disk and memory bytes sent so far, and disk rounds.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub rounds: u32,
    /// The `migrate --json` report, once done.
    #[serde(default)]
    pub report: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /v1/edges/{id}/delta`: a heartbeat's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    #[serde(default)]
    pub added: Vec<Fingerprint>,
    #[serde(default)]
    pub removed: Vec<Fingerprint>,
    /// Chunks used (read by a VM, served to a peer) since the last report.
    #[serde(default)]
    pub accessed: Vec<Fingerprint>,
    pub usage: u64,
}
