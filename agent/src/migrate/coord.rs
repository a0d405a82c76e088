//! The migration's coordinator steps (DESIGN.md, "Migration, step by step"):
//!
//! - **Step 1, plan.** Before Prepare the source reports the live disk to the
//!   coordinator (its manifest, and its chunks as a delta: the chunks the
//!   running VM wrote exist only there). On Prepare a destination with a
//!   coordinator pins the manifest (so GC keeps what arrives) and asks for a
//!   plan: per chunk it lacks, the edges holding it ranked by path rate to the
//!   destination. The pulls then use those holders through the transfer
//!   fetcher's per-chunk source lists ([`CoordinatedFetch`]). A coordinator
//!   that cannot be reached here fails the migration before anything starts.
//! - **Step 5, after.** Once the VM runs at the destination, the destination
//!   pins its final manifest (locally and at the coordinator) and the source
//!   drops its reference; the source's chunks stay cached until the policy
//!   evicts them. A coordinator that is down then does not undo the
//!   switchover: what was left is logged and reported, and the local pins
//!   (the truth) reach the coordinator with the agent link's next full
//!   inventory, which it sends after any lost connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use edgeshift_common::control::PlanSource;
use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use serde::{Deserialize, Serialize};

use super::MigrateError;
use crate::coordination::client::Client;
use crate::coordination::fetch::{pin_image, unpin_image, CoordinatedFetch};
use crate::coordination::pins::LocalPins;
use crate::coordination::CoordError;
use crate::store::{ChunkStore, LocalStore};
use crate::transfer::fetch::FetchReport;
use crate::vm::StateDir;

/// How an agent reaches the coordinator, and its name there.
#[derive(Debug, Clone)]
pub struct CoordConfig {
    /// Base URL, `https://HOST:PORT`.
    pub url: String,
    /// This edge's cluster files (`None`: plain http to an open coordinator).
    pub tls: Option<edgeshift_common::identity::TlsFiles>,
    /// This edge's id at the coordinator: the `--id` of its `edgeshift agent`.
    pub edge: String,
}

impl CoordConfig {
    pub fn client(&self) -> Result<Client, CoordError> {
        Client::new(&self.url, self.tls.as_ref())
    }
}

/// The plan a destination got from the coordinator, as reported to the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanSummary {
    pub coordinator: String,
    /// The destination's id at the coordinator.
    pub dest: String,
    pub missing_chunks: u64,
    pub missing_bytes: u64,
    /// Chunks no edge holds (by the coordinator's ledger).
    pub unavailable_chunks: u64,
    pub makespan_secs: f64,
    pub lower_bound_secs: f64,
    /// Sources with the chunks assigned to each, fastest path first.
    pub sources: Vec<PlanSource>,
    /// Time from Prepare's arrival to the plan in hand (publish, pin, plan).
    pub seconds: f64,
}

/// What the coordinator did in one migration (the `coordination` field of
/// `edgeshift migrate --json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CoordReport {
    /// Where the destination's sources came from: `coordinator`, or
    /// `peer list` (the source and `--peer`).
    pub plan_from: String,
    pub plan: Option<PlanSummary>,
    /// Chunks of the live disk the source reported before Prepare.
    pub reported_chunks: u64,
    /// Time the source spent on that report (publish and delta).
    pub report_seconds: f64,
    /// Step 5 at the source: its reference to the VM's image was dropped.
    pub source_released: bool,
    /// Step 5 at the destination, as it reported it.
    pub destination: Option<String>,
    /// What could not be done at the coordinator (it was unreachable).
    pub left: Vec<String>,
}

/// Step 1 at the source: publish the live disk's manifest and report its
/// chunks as held here, so the coordinator's plan can name this edge for
/// what the running VM wrote. Fills `reported_chunks` and `report_seconds`.
pub fn report_live_disk(
    cfg: &CoordConfig,
    store: &LocalStore,
    live: &Manifest,
    out: &mut CoordReport,
) -> Result<(), MigrateError> {
    let t = Instant::now();
    let client = cfg.client()?;
    client.publish(live)?;
    let mut seen = std::collections::HashSet::new();
    let mut added = Vec::new();
    for fp in live.chunks.iter().filter(|f| !f.is_zero_chunk()) {
        if seen.insert(*fp) && store.has_chunk(fp)? {
            added.push(*fp);
        }
    }
    let usage = store.stats()?.chunk_bytes;
    let n = added.len() as u64;
    client.delta(
        &cfg.edge,
        &crate::coordination::client::Delta {
            added,
            removed: Vec::new(),
            accessed: Vec::new(),
            usage,
        },
    )?;
    out.reported_chunks = n;
    out.report_seconds = t.elapsed().as_secs_f64();
    tracing::info!(edge = %cfg.edge, chunks = n, seconds = out.report_seconds, "reported the live disk to the coordinator");
    Ok(())
}

/// Step 5 at the source: the VM left, so this edge's reference to its image
/// goes — one pin at the coordinator, and the local pin unless another VM
/// here still uses that image. The chunks stay in the store. Returns what
/// was left undone (empty when all went through).
pub fn release_source(
    cfg: &CoordConfig,
    state: &StateDir,
    store: &Path,
    vm: &str,
    manifest_hex: &str,
) -> Vec<String> {
    let mut left = Vec::new();
    let id: ManifestId = match manifest_hex.parse() {
        Ok(id) => id,
        Err(_) => {
            left.push(format!(
                "the VM record's manifest id {manifest_hex:?} is not a manifest id"
            ));
            return left;
        }
    };
    let shared = state
        .list()
        .map(|recs| {
            recs.iter()
                .any(|r| r.spec.name != vm && !r.stopped && r.manifest_id == manifest_hex)
        })
        .unwrap_or(true);
    let result = (|| -> Result<(), CoordError> {
        let store = LocalStore::open(store)?;
        let client = cfg.client()?;
        if shared {
            match client.unpin(&cfg.edge, &id) {
                Err(CoordError::Refused { status: 404, .. }) => Ok(()),
                r => r,
            }
        } else {
            unpin_image(&client, &store, &cfg.edge, &id)
        }
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, manifest = %id, "the VM moved, but its reference here was not dropped at the coordinator");
        left.push(format!(
            "unpin {id} on edge {}: {e} (the agent's next full inventory carries the local pins)",
            cfg.edge
        ));
    }
    left
}

/// A destination's plan for one incoming VM: the pin of its manifest, the
/// plan's lease and the holders of each chunk. Dropped without
/// [`IncomingPlan::switched_over`], it takes the pin back and releases the lease.
pub struct IncomingPlan {
    fetch: CoordinatedFetch,
    sources: HashMap<Fingerprint, Vec<SocketAddr>>,
    pub summary: PlanSummary,
    settled: bool,
}

impl std::fmt::Debug for IncomingPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingPlan")
            .field("summary", &self.summary)
            .finish()
    }
}

/// Step 1 at the destination: publish and pin `manifest` here, then ask for
/// the plan of what this store lacks.
pub fn plan_incoming(
    cfg: &CoordConfig,
    store: &LocalStore,
    manifest: &Manifest,
) -> Result<IncomingPlan, MigrateError> {
    let t = Instant::now();
    let client = cfg.client()?;
    // The local pin needs the manifest in the store (GC reads it to know
    // which chunks the pin protects).
    let id = store.put_manifest(manifest)?;
    client.publish(manifest)?;
    let fetch = CoordinatedFetch::begin_pinned_for(client, store, &cfg.edge, &id, "incoming VM")?;
    let p = &fetch.plan;
    let summary = PlanSummary {
        coordinator: cfg.url.clone(),
        dest: p.dest.clone(),
        missing_chunks: p.missing_chunks,
        missing_bytes: p.missing_bytes,
        unavailable_chunks: p.unavailable_chunks,
        makespan_secs: p.makespan_secs,
        lower_bound_secs: p.lower_bound_secs,
        sources: p.sources.clone(),
        seconds: t.elapsed().as_secs_f64(),
    };
    metrics::histogram!("edgeshift_migrate_plan_seconds").record(summary.seconds);
    tracing::info!(
        dest = %summary.dest,
        missing = summary.missing_chunks,
        sources = ?summary.sources.iter().map(|s| (&s.edge, s.chunks)).collect::<Vec<_>>(),
        seconds = summary.seconds,
        "plan from the coordinator"
    );
    let sources = fetch.planned_sources();
    Ok(IncomingPlan {
        fetch,
        sources,
        summary,
        settled: false,
    })
}

impl IncomingPlan {
    /// Chunk servers the plan names, for the fetcher.
    pub fn peers(&self) -> &[SocketAddr] {
        &self.fetch.peers
    }

    /// The holders `fp` may come from (best path first); `None` for a chunk
    /// the plan does not list (written since, or thought to be here).
    pub fn sources_for(&self, fp: &Fingerprint) -> Option<&Vec<SocketAddr>> {
        self.sources.get(fp)
    }

    /// Feeds a pull's measured path rates back to the coordinator.
    pub fn report_rates(&self, report: &FetchReport) {
        self.fetch.report_rates(report);
    }

    /// Step 5 at the destination: the VM runs here on `final_manifest`, so
    /// that manifest is pinned (locally, then at the coordinator), the
    /// Prepare-time pin and the plan's lease go. Returns a one-line account.
    pub fn switched_over(mut self, store: &LocalStore, final_manifest: &Manifest) -> String {
        self.settled = true;
        self.fetch.release_lease();
        let final_id = final_manifest.id();
        let client = self.fetch.client().clone();
        let edge = self.fetch.edge().to_string();
        let pinned = (|| -> Result<(), CoordError> {
            store.put_manifest(final_manifest)?;
            client.publish(final_manifest)?;
            pin_image(&client, store, &edge, &final_id, "VM runs here")
        })();
        let mut text = match &pinned {
            Ok(()) => format!("pinned {final_id} on edge {edge}"),
            Err(e) => {
                // The VM runs here: keep the local pin whatever the coordinator says.
                let local = LocalPins::for_store(store).and_then(|p| p.pin(&final_id, "VM runs here"));
                tracing::warn!(error = %e, manifest = %final_id, "the VM runs here, but the coordinator did not take its pin");
                format!(
                    "left: pin {final_id} on edge {edge} at the coordinator ({e}); local pin {}",
                    if local.is_ok() { "kept" } else { "missing" }
                )
            }
        };
        let undo = if *self.fetch.manifest() == final_id {
            // The disk did not change since Prepare: that pin is the VM's
            // reference already; only the coordinator's second count goes.
            match pinned {
                Ok(()) => match client.unpin(&edge, &final_id) {
                    Err(CoordError::Refused { status: 404, .. }) => Ok(()),
                    r => r,
                },
                Err(_) => Ok(()),
            }
        } else {
            self.fetch.take_back_pin()
        };
        if let Err(e) = undo {
            tracing::warn!(error = %e, "the Prepare-time pin was not taken back");
            text.push_str(&format!("; left: unpin {} ({e})", self.fetch.manifest()));
        }
        text
    }
}

impl Drop for IncomingPlan {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.fetch.release_lease();
        if let Err(e) = self.fetch.take_back_pin() {
            tracing::warn!(error = %e, manifest = %self.fetch.manifest(), "an aborted migration's pin was not taken back");
        }
    }
}
