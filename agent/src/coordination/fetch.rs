//! `edgeshift fetch --coordinator`: the coordinator's plan instead of a peer
//! list. The image is pinned here first (locally and at the coordinator) so
//! GC keeps what arrives; the plan's lease keeps the sources' chunks; the
//! chunks the local store lacks are fetched from the holders the plan names
//! (best path first); the measured path rates go back to the coordinator and
//! the lease is released.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};

use edgeshift_common::{Fingerprint, ManifestId};

use super::client::{Client, Plan};
use super::pins::LocalPins;
use super::CoordError;
use crate::store::LocalStore;
use crate::transfer::fetch::{ChunkWant, FetchReport, Fetcher};

/// Holders listed per chunk in the plan asked for.
const ALTERNATIVES: usize = 4;
/// Peers one transfer fetcher works with at most.
const FETCHER_MAX_PEERS: usize = 64;

/// Measured rates per peer (by its node id), in bytes/s, from a fetch report.
/// Paths that carried under 1 MiB are left out: too short to measure.
pub fn path_rates(report: &FetchReport) -> Vec<(String, f64)> {
    report
        .peers
        .iter()
        .filter(|p| p.bytes >= 1 << 20 && p.mbit_per_s > 0.0 && p.dropped.is_none())
        .filter_map(|p| p.id.clone().map(|id| (id, p.mbit_per_s * 1e6 / 8.0)))
        .collect()
}

/// A fetch planned by the coordinator.
pub struct CoordinatedFetch {
    client: Client,
    /// The pin `begin` made was new: taken back if the manifest never arrives.
    fresh_pin: bool,
    pins: LocalPins,
    edge: String,
    manifest: ManifestId,
    pub plan: Plan,
    /// Every peer the plan names, for the fetcher.
    pub peers: Vec<SocketAddr>,
    by_edge: HashMap<String, SocketAddr>,
}

impl CoordinatedFetch {
    /// [`Self::begin`] with a client for `url` presenting the edge's `tls` files.
    pub fn begin_url(
        url: &str,
        tls: Option<&edgeshift_common::identity::TlsFiles>,
        store: &LocalStore,
        edge: &str,
        manifest: &ManifestId,
    ) -> Result<Self, CoordError> {
        Self::begin(Client::new(url, tls)?, store, edge, manifest)
    }

    /// Pins `manifest` on this edge (locally, then at the coordinator) and
    /// asks for the plan.
    pub fn begin(
        client: Client,
        store: &LocalStore,
        edge: &str,
        manifest: &ManifestId,
    ) -> Result<Self, CoordError> {
        Self::begin_pinned_for(client, store, edge, manifest, "edgeshift fetch")
    }

    /// [`Self::begin`], with `why` recorded in the local pin (for operators).
    pub fn begin_pinned_for(
        client: Client,
        store: &LocalStore,
        edge: &str,
        manifest: &ManifestId,
        why: &str,
    ) -> Result<Self, CoordError> {
        let fresh_pin = pin_both(&client, store, edge, manifest, why)?;
        let plan = match client.plan(manifest, edge, ALTERNATIVES) {
            Ok(p) => p,
            Err(e) => {
                // No plan, no transfer: the pin made for it goes again.
                if fresh_pin {
                    let _ = LocalPins::for_store(store).and_then(|p| p.unpin(manifest));
                }
                let _ = client.unpin(edge, manifest);
                return Err(e);
            }
        };
        // The fetcher talks to at most 64 peers: keep the edges with the
        // most assigned chunks. Chunks whose holders all fall outside may
        // come from any kept peer; what none has is left for the next run.
        let mut assigned: HashMap<&str, usize> = HashMap::new();
        for c in &plan.chunks {
            if let Some(s) = &c.source {
                *assigned.entry(s.as_str()).or_default() += 1;
            }
        }
        let mut names: Vec<&String> = plan.addrs.keys().collect();
        names.sort_by_key(|n| std::cmp::Reverse(assigned.get(n.as_str()).copied().unwrap_or(0)));
        names.truncate(FETCHER_MAX_PEERS);
        let mut by_edge = HashMap::new();
        let mut peers = Vec::new();
        for (name, addr) in plan.addrs.iter().filter(|(n, _)| names.contains(n)) {
            let a = addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| CoordError::BadPeer {
                    addr: addr.clone(),
                    reason: "does not resolve".into(),
                })?;
            by_edge.insert(name.clone(), a);
            if !peers.contains(&a) {
                peers.push(a);
            }
        }
        tracing::info!(
            manifest = %manifest,
            missing = plan.missing_chunks,
            sources = plan.sources.len(),
            makespan_s = plan.makespan_secs,
            lower_bound_s = plan.lower_bound_secs,
            "coordinator plan"
        );
        Ok(CoordinatedFetch {
            fresh_pin,
            pins: LocalPins::for_store(store)?,
            client,
            edge: edge.to_string(),
            manifest: *manifest,
            plan,
            peers,
            by_edge,
        })
    }

    /// The fetcher's work list: what the local store lacks, each chunk
    /// restricted to the holders the plan names (assigned source first).
    /// A chunk the plan does not list (the coordinator thought it was here)
    /// may come from any planned peer.
    pub fn wants(
        &self,
        fetcher: &Fetcher,
        manifest: &edgeshift_common::Manifest,
    ) -> Result<Vec<ChunkWant>, CoordError> {
        let planned = self.planned_sources();
        let mut wants = fetcher.missing_chunks(manifest)?;
        for w in &mut wants {
            if let Some(srcs) = planned.get(&w.fp) {
                w.sources = Some(srcs.clone());
            }
        }
        Ok(wants)
    }

    /// Per planned chunk, the chunk servers it may come from: the assigned
    /// source first, then the other holders by path rate. Chunks whose
    /// holders all fell outside [`Self::peers`] are left out.
    pub fn planned_sources(&self) -> HashMap<Fingerprint, Vec<SocketAddr>> {
        let mut out = HashMap::with_capacity(self.plan.chunks.len());
        for c in &self.plan.chunks {
            let mut srcs: Vec<SocketAddr> = Vec::new();
            for name in c.source.iter().chain(&c.holders) {
                if let Some(a) = self.by_edge.get(name) {
                    if !srcs.contains(a) {
                        srcs.push(*a);
                    }
                }
            }
            if !srcs.is_empty() {
                out.insert(c.fp, srcs);
            }
        }
        out
    }

    /// Posts the measured rates of a finished fetch as path measurements
    /// (best effort: a failure is logged).
    pub fn report_rates(&self, report: &FetchReport) {
        let rates = path_rates(report);
        if !rates.is_empty() {
            if let Err(e) = self.client.paths(&self.edge, &rates) {
                tracing::warn!(error = %e, "could not report path rates");
            }
        }
    }

    /// Releases the plan's lease (once); the sources' chunks are no longer
    /// held for this transfer. Best effort: a lease also expires by itself.
    pub fn release_lease(&mut self) {
        if let Some(lease) = self.plan.lease.take() {
            if let Err(e) = self.client.release(lease) {
                tracing::warn!(lease, error = %e, "could not release the plan's lease (it expires by itself)");
            }
        }
    }

    /// Takes back the pin [`Self::begin`] made: one pin at the coordinator,
    /// and the local pin if `begin` created it.
    pub fn take_back_pin(&self) -> Result<(), CoordError> {
        if self.fresh_pin {
            self.pins.unpin(&self.manifest)?;
        }
        match self.client.unpin(&self.edge, &self.manifest) {
            Err(CoordError::Refused { status: 404, .. }) => Ok(()),
            r => r,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn edge(&self) -> &str {
        &self.edge
    }

    pub fn manifest(&self) -> &ManifestId {
        &self.manifest
    }

    /// Runs the fetch with `fetcher` (built over [`Self::peers`]), reports
    /// path rates and releases the plan's lease, whatever the outcome.
    pub async fn run(&self, fetcher: &Fetcher) -> Result<FetchReport, CoordError> {
        let result = async {
            let manifest = match fetcher.fetch_manifest(&self.manifest).await {
                Ok(m) => m,
                Err(e) => {
                    // Nothing of the image arrived: a pin of a manifest this
                    // store lacks would only stop local GC.
                    if self.fresh_pin {
                        let _ = self.pins.unpin(&self.manifest);
                        let _ = self.client.unpin(&self.edge, &self.manifest);
                    }
                    return Err(e.into());
                }
            };
            let wants = self.wants(fetcher, &manifest)?;
            Ok::<_, CoordError>(fetcher.fetch_chunks(wants).await?)
        }
        .await;
        if let Ok(report) = &result {
            self.report_rates(report);
        }
        if let Some(lease) = self.plan.lease {
            if let Err(e) = self.client.release(lease) {
                tracing::warn!(lease, error = %e, "could not release the plan's lease (it expires by itself)");
            }
        }
        result
    }
}

/// Pins an image on this edge, locally and at the coordinator (a VM using it
/// runs or is about to arrive here).
/// If the coordinator refuses, a local pin made just now is taken back: a
/// pin whose manifest never arrives would stop local GC.
pub fn pin_image(
    client: &Client,
    store: &LocalStore,
    edge: &str,
    manifest: &ManifestId,
    why: &str,
) -> Result<(), CoordError> {
    pin_both(client, store, edge, manifest, why).map(drop)
}

/// [`pin_image`]; returns whether the local pin is new.
fn pin_both(
    client: &Client,
    store: &LocalStore,
    edge: &str,
    manifest: &ManifestId,
    why: &str,
) -> Result<bool, CoordError> {
    let pins = LocalPins::for_store(store)?;
    let fresh = pins.pin(manifest, why)?;
    if let Err(e) = client.pin(edge, manifest) {
        if fresh {
            let _ = pins.unpin(manifest);
        }
        return Err(e);
    }
    Ok(fresh)
}

/// Releases an image on this edge after its VM left (migration step 4): the
/// local pin goes, and one pin at the coordinator. The chunks stay cached
/// until the policy evicts them. A pin the coordinator does not have (it
/// restarted and this edge has not re-reported yet) is not an error.
pub fn unpin_image(
    client: &Client,
    store: &LocalStore,
    edge: &str,
    manifest: &ManifestId,
) -> Result<(), CoordError> {
    LocalPins::for_store(store)?.unpin(manifest)?;
    match client.unpin(edge, manifest) {
        Err(CoordError::Refused { status: 404, .. }) => Ok(()),
        r => r,
    }
}
