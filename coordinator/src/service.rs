//! The coordinator's operations, independent of HTTP: the ledger, the
//! settings, hints and the database, kept consistent. Every change that must
//! survive a restart is written to the database before memory changes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use edgeshift_common::{Fingerprint, Manifest, ManifestError, ManifestId};
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use crate::gc::{self, GcError, Watermarks};
use crate::handoff::Handoffs;
use crate::ledger::{ChunkId, EdgeIx, Ledger, LedgerError};
use crate::mobility::Mobility;
use crate::persist::{LeaseRecord, PersistError, Store};
use crate::planner::{self, ChunkJob, PlanError, Source};
use crate::policy::Policy;

mod predicted;

pub use edgeshift_common::control::{Orders, Plan, PlanChunk, PlanSource, PrefetchChunk, PrefetchOrder};
pub use predicted::PredictionStats;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Gc(#[from] GcError),
    #[error("manifest bytes are not valid: {0}")]
    BadManifest(#[from] ManifestError),
    #[error("manifest_hex is not hex: {0}")]
    BadHex(String),
    #[error("stored setting {0:?} cannot be read: {1}")]
    BadSetting(String, serde_json::Error),
    #[error("unknown lease {0} (released or expired)")]
    UnknownLease(u64),
    #[error("no hint for manifest {0} on edge {1:?}")]
    UnknownHint(ManifestId, String),
}

/// Settings an operator changes at run time; persisted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub policy: Policy,
    pub watermarks: Watermarks,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: Policy::Lru,
            watermarks: Watermarks::default(),
        }
    }
}

/// Knobs fixed at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Rate assumed for a path nobody measured, bytes/s.
    pub default_path_rate: f64,
    /// How long a plan or prefetch order protects its source chunks from GC.
    pub lease_ms: u64,
    /// Byte length assumed for a chunk no published manifest describes.
    pub default_chunk_len: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            default_path_rate: 12.5e6,
            lease_ms: 15 * 60 * 1000,
            default_chunk_len: 256 << 10,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChunkInfo {
    pub fp: Fingerprint,
    pub bytes: u64,
    /// Edges holding it.
    pub holders: Vec<String>,
    /// How many catalogue images use it (fleet popularity).
    pub images: u64,
    /// Per edge: how many manifests pinned there use it.
    pub pins: BTreeMap<String, u32>,
    /// Edges where an in-flight transfer holds a lease on it.
    pub leased_on: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeInfo {
    pub id: String,
    pub addr: String,
    pub capacity: u64,
    pub usage: u64,
    pub chunks: u64,
    pub reported: bool,
    pub pinned_manifests: BTreeMap<String, u32>,
    pub pinned_chunks: u64,
    pub leased_chunks: u64,
    pub high_watermark_bytes: u64,
    pub low_watermark_bytes: u64,
    pub hints: Vec<ManifestId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HintOutcome {
    pub manifest: ManifestId,
    pub edge: String,
    pub missing_chunks: u64,
    pub missing_bytes: u64,
}

/// Which of the candidate sources (sorted best path first) a plan may use:
/// the fastest half of `max`, then — greedy set cover — the sources holding
/// the most chunks no chosen source holds, until every chunk some candidate
/// holds is covered (past `max` if coverage needs it), then the next fastest
/// up to `max`. The transfer fetcher talks to at most 64 peers at once.
fn choose_sources(cands: &[(EdgeIx, Source, RoaringBitmap)], max: usize) -> Vec<bool> {
    let mut chosen = vec![false; cands.len()];
    if cands.len() <= max {
        chosen.iter_mut().for_each(|c| *c = true);
        return chosen;
    }
    let mut covered = RoaringBitmap::new();
    for (i, c) in cands.iter().enumerate().take(max.div_ceil(2)) {
        chosen[i] = true;
        covered |= &c.2;
    }
    // What each unchosen candidate holds that nobody chosen does.
    let mut extra: Vec<RoaringBitmap> = cands
        .iter()
        .zip(&chosen)
        .map(|(c, &ch)| if ch { RoaringBitmap::new() } else { &c.2 - &covered })
        .collect();
    loop {
        // Most new chunks; ties to the better path (lower index).
        let best = extra
            .iter()
            .enumerate()
            .filter(|(i, _)| !chosen[*i])
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(&a.0)));
        let Some((i, bm)) = best else { break };
        if bm.is_empty() {
            break;
        }
        let newly = bm.clone();
        chosen[i] = true;
        for e in extra.iter_mut() {
            *e -= &newly;
        }
    }
    let mut n = chosen.iter().filter(|&&c| c).count();
    for c in chosen.iter_mut() {
        if n >= max {
            break;
        }
        if !*c {
            *c = true;
            n += 1;
        }
    }
    chosen
}

pub struct Coordinator {
    pub ledger: Ledger,
    pub settings: Settings,
    pub options: Options,
    /// (edge, manifest) → when the hint was given (ms since the epoch).
    hints: BTreeMap<(String, ManifestId), u64>,
    /// Leases read back after a restart whose source edges have not
    /// reported yet: id → (deadline, per edge the chunks to protect).
    pending_leases: BTreeMap<u64, (u64, BTreeMap<String, Vec<Fingerprint>>)>,
    store: Store,
    /// Where VMs run and the handoffs ordered (in memory only).
    pub handoffs: Handoffs,
    /// Next-edge predictions learned from moves (in memory only).
    pub mobility: Mobility,
    /// The hint each VM's last move made: VM → (edge, manifest, whether
    /// this coordinator made the hint rather than found an operator's).
    auto_hints: BTreeMap<String, (String, ManifestId, bool)>,
    /// Hints made from predictions, per (edge, manifest): VMs relying on them.
    auto_hint_refs: BTreeMap<(String, ManifestId), u32>,
    pub predictions: PredictionStats,
}

const SETTINGS_KEY: &str = "settings";

/// Sources a plan uses unless asked otherwise (the fetcher's peer limit is 64).
pub const DEFAULT_MAX_SOURCES: usize = 32;

impl Coordinator {
    /// Opens the database under `data` and restores catalogue, settings,
    /// paths and hints from it. Edges and inventories come back as agents
    /// re-register and report.
    pub fn open(data: &Path, options: Options) -> Result<Self, ServiceError> {
        let store = Store::open(data)?;
        let snap = store.load()?;
        let mut ledger = Ledger::new(options.default_chunk_len);
        for bytes in &snap.manifests {
            ledger.publish(&Manifest::from_bytes(bytes)?);
        }
        let mut settings = Settings::default();
        for (k, v) in &snap.settings {
            if k == SETTINGS_KEY {
                settings = serde_json::from_str(v).map_err(|e| ServiceError::BadSetting(k.clone(), e))?;
            }
        }
        for (s, d, r) in &snap.paths {
            ledger.set_path(s, d, *r)?;
        }
        let hints = snap.hints.into_iter().map(|(e, m, at)| ((e, m), at)).collect();
        let now = now_ms();
        let mut pending_leases = BTreeMap::new();
        let mut expired = Vec::new();
        for (id, rec) in snap.leases {
            ledger.reserve_lease_id(id);
            if rec.deadline_ms <= now {
                expired.push(id);
            } else {
                pending_leases.insert(id, (rec.deadline_ms, rec.entries.into_iter().collect()));
            }
        }
        store.delete_leases(&expired)?;
        Ok(Coordinator {
            ledger,
            settings,
            options,
            hints,
            pending_leases,
            store,
            handoffs: Handoffs::default(),
            mobility: Mobility::default(),
            auto_hints: BTreeMap::new(),
            auto_hint_refs: BTreeMap::new(),
            predictions: PredictionStats::default(),
        })
    }

    pub fn store_path(&self) -> &Path {
        self.store.path()
    }

    pub fn set_settings(
        &mut self,
        policy: Option<Policy>,
        high: Option<f64>,
        low: Option<f64>,
    ) -> Result<Settings, ServiceError> {
        let marks = Watermarks::new(
            high.unwrap_or(self.settings.watermarks.high),
            low.unwrap_or(self.settings.watermarks.low),
        )?;
        let next = Settings {
            policy: policy.unwrap_or(self.settings.policy),
            watermarks: marks,
        };
        let json =
            serde_json::to_string(&next).map_err(|e| ServiceError::BadSetting(SETTINGS_KEY.into(), e))?;
        self.store.put_setting(SETTINGS_KEY, &json)?;
        self.settings = next;
        Ok(next)
    }

    /// Publishes raw manifest bytes; returns the id.
    pub fn publish_bytes(
        &mut self,
        bytes: &[u8],
    ) -> Result<(ManifestId, &crate::ledger::CatalogueEntry), ServiceError> {
        let m = Manifest::from_bytes(bytes)?;
        let id = Fingerprint::of(bytes);
        if !self.ledger.catalogue.contains_key(&id) {
            self.store.put_manifest(&id, bytes)?;
            self.ledger.publish(&m);
        }
        let entry = self
            .ledger
            .catalogue
            .get(&id)
            .ok_or(LedgerError::UnknownManifest(id))?;
        Ok((id, entry))
    }

    pub fn publish_hex(
        &mut self,
        hex_text: &str,
    ) -> Result<(ManifestId, &crate::ledger::CatalogueEntry), ServiceError> {
        let bytes = hex::decode(hex_text.trim()).map_err(|e| ServiceError::BadHex(e.to_string()))?;
        self.publish_bytes(&bytes)
    }

    pub fn set_paths(&mut self, dest: &str, rates: &[(String, f64)]) -> Result<(), ServiceError> {
        self.ledger.edge_ix(dest)?;
        // Validate all before writing any.
        let mut probe = Ledger::new(1);
        for (s, r) in rates {
            probe.set_path(s, dest, *r)?;
        }
        self.store.put_paths(dest, rates)?;
        for (s, r) in rates {
            self.ledger.set_path(s, dest, *r)?;
        }
        Ok(())
    }

    pub fn hint(&mut self, manifest: &ManifestId, edge: &str) -> Result<HintOutcome, ServiceError> {
        let missing = self.ledger.missing(manifest, edge)?;
        let at = now_ms();
        self.store.put_hint(edge, manifest, at)?;
        self.hints.insert((edge.to_string(), *manifest), at);
        metrics::counter!("coordinator_hints_total").increment(1);
        Ok(HintOutcome {
            manifest: *manifest,
            edge: edge.to_string(),
            missing_chunks: missing.len() as u64,
            missing_bytes: missing.iter().map(|(_, b)| b).sum(),
        })
    }

    pub fn delete_hint(&mut self, manifest: &ManifestId, edge: &str) -> Result<(), ServiceError> {
        if !self.hints.contains_key(&(edge.to_string(), *manifest)) {
            return Err(ServiceError::UnknownHint(*manifest, edge.to_string()));
        }
        self.store.delete_hint(edge, manifest)?;
        self.hints.remove(&(edge.to_string(), *manifest));
        Ok(())
    }

    /// Pins a manifest on an edge. A hint that it would arrive there is then
    /// fulfilled and withdrawn.
    pub fn pin(&mut self, edge: &str, manifest: &ManifestId) -> Result<u32, ServiceError> {
        let pins = self.ledger.pin(edge, manifest)?;
        if self.hints.contains_key(&(edge.to_string(), *manifest)) {
            self.delete_hint(manifest, edge)?;
        }
        Ok(pins)
    }

    pub fn hints(&self) -> impl Iterator<Item = (&str, &ManifestId)> {
        self.hints.keys().map(|(e, m)| (e.as_str(), m))
    }

    pub fn release(&mut self, lease: u64) -> Result<(), ServiceError> {
        let live = self.ledger.lease_entries(lease).is_some();
        let pending = self.pending_leases.contains_key(&lease);
        if !live && !pending {
            return Err(ServiceError::UnknownLease(lease));
        }
        self.store.delete_leases(&[lease])?;
        self.ledger.release(lease);
        self.pending_leases.remove(&lease);
        Ok(())
    }

    /// Takes a lease on `entries` and records it, so that it survives a restart.
    fn take_lease(&mut self, entries: Vec<(EdgeIx, ChunkId)>) -> Result<u64, ServiceError> {
        let deadline_ms = now_ms() + self.options.lease_ms;
        let mut per_edge: BTreeMap<String, Vec<Fingerprint>> = BTreeMap::new();
        for &(ix, cid) in &entries {
            per_edge
                .entry(self.ledger.edges[ix as usize].id.clone())
                .or_default()
                .push(self.ledger.interner.fp(cid));
        }
        let id = self.ledger.lease(entries, deadline_ms);
        let rec = LeaseRecord {
            deadline_ms,
            entries: per_edge.into_iter().collect(),
        };
        if let Err(e) = self.store.put_lease(id, &rec) {
            self.ledger.release(id);
            return Err(e.into());
        }
        Ok(id)
    }

    /// Drops expired leases, live and pending, from memory and the database.
    fn expire_leases(&mut self) -> Result<(), ServiceError> {
        let now = now_ms();
        let mut dead = self.ledger.expire_leases(now);
        let pending_dead: Vec<u64> = self
            .pending_leases
            .iter()
            .filter(|(_, (d, _))| *d <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in &pending_dead {
            self.pending_leases.remove(id);
        }
        dead.extend(pending_dead);
        self.store.delete_leases(&dead)?;
        Ok(())
    }

    /// Forgets an edge (operator): its inventory, pins, paths and hints.
    pub fn deregister(&mut self, edge: &str) -> Result<(), ServiceError> {
        self.ledger.edge_ix(edge)?;
        let hinted: Vec<ManifestId> = self
            .hints
            .keys()
            .filter(|(e, _)| e == edge)
            .map(|(_, m)| *m)
            .collect();
        for m in &hinted {
            self.store.delete_hint(edge, m)?;
            self.hints.remove(&(edge.to_string(), *m));
        }
        for (_, per_edge) in self.pending_leases.values_mut() {
            per_edge.remove(edge);
        }
        self.ledger.deregister(edge)?;
        self.handoffs.forget_edge(edge, now_ms());
        Ok(())
    }

    /// A full inventory report (on (re)connect): replaces the edge's chunks
    /// and pins, and re-applies leases from before a restart on this edge.
    pub fn report_inventory(
        &mut self,
        edge: &str,
        chunks: &[Fingerprint],
        usage: u64,
        pins: &[ManifestId],
    ) -> Result<(), ServiceError> {
        let ix = self.ledger.edge_ix(edge)?;
        // Check pins first so a bad report changes nothing.
        for m in pins {
            if !self.ledger.catalogue.contains_key(m) {
                return Err(LedgerError::UnknownManifest(*m).into());
            }
        }
        self.ledger.put_inventory(edge, chunks, usage)?;
        self.ledger.set_pins(edge, pins)?;
        let mut restored = 0;
        let mut done = Vec::new();
        for (&id, (deadline, per_edge)) in self.pending_leases.iter_mut() {
            if let Some(fps) = per_edge.remove(edge) {
                let entries: Vec<(EdgeIx, ChunkId)> = fps
                    .iter()
                    .filter_map(|f| self.ledger.interner.get(f))
                    .map(|c| (ix, c))
                    .collect();
                restored += entries.len();
                self.ledger.restore_lease(id, *deadline, entries);
            }
            if per_edge.is_empty() {
                done.push(id);
            }
        }
        for id in done {
            self.pending_leases.remove(&id);
        }
        if restored > 0 {
            tracing::info!(
                edge,
                chunks = restored,
                "leases from before the restart re-applied"
            );
        }
        Ok(())
    }

    fn source_for(&self, ix: EdgeIx, dest: &str) -> Source {
        let e = &self.ledger.edges[ix as usize];
        match self.ledger.path_rate(&e.id, dest) {
            Some(rate) => Source {
                name: e.id.clone(),
                rate,
                measured: true,
            },
            None => Source {
                name: e.id.clone(),
                rate: self.options.default_path_rate,
                measured: false,
            },
        }
    }

    /// Runs the planner over `chunks` (ids with bytes) for `dest` with at
    /// most `max_sources` sources (more only when needed to reach every chunk
    /// some edge holds): returns the sources used (edge indices, best path
    /// first), the planner's sources and its output.
    fn assign(
        &self,
        dest_ix: EdgeIx,
        chunks: &[(ChunkId, u64)],
        max_sources: usize,
    ) -> Result<(Vec<EdgeIx>, Vec<Source>, planner::Assignment), ServiceError> {
        let dest = &self.ledger.edges[dest_ix as usize].id;
        let wanted: RoaringBitmap = chunks.iter().map(|&(c, _)| c).collect();
        let mut cands: Vec<(EdgeIx, Source, RoaringBitmap)> = Vec::new();
        for (ix, e) in self.ledger.edges.iter().enumerate() {
            if ix == dest_ix as usize || !e.reported {
                continue;
            }
            let both = &e.chunks & &wanted;
            if !both.is_empty() {
                cands.push((ix as EdgeIx, self.source_for(ix as EdgeIx, dest), both));
            }
        }
        // Best path first (rate, then name): plans do not depend on
        // registration order, and holder lists below come out ranked.
        let by_rank = |a: &Source, b: &Source| b.rate.total_cmp(&a.rate).then_with(|| a.name.cmp(&b.name));
        cands.sort_by(|a, b| by_rank(&a.1, &b.1));
        let chosen = choose_sources(&cands, max_sources.max(1));
        let cands: Vec<_> = cands
            .into_iter()
            .zip(chosen)
            .filter(|(_, keep)| *keep)
            .map(|(c, _)| c)
            .collect();
        // Chunk id → position in `chunks`, dense over the interned ids.
        let mut pos = vec![u32::MAX; self.ledger.interner.len()];
        for (i, &(c, _)) in chunks.iter().enumerate() {
            pos[c as usize] = i as u32;
        }
        let mut jobs: Vec<ChunkJob> = chunks
            .iter()
            .map(|&(_, bytes)| ChunkJob {
                bytes,
                holders: Vec::new(),
            })
            .collect();
        for (s, (_, _, bm)) in cands.iter().enumerate() {
            for c in bm.iter() {
                jobs[pos[c as usize] as usize].holders.push(s);
            }
        }
        let (src_ix, sources): (Vec<EdgeIx>, Vec<Source>) =
            cands.into_iter().map(|(ix, s, _)| (ix, s)).unzip();
        let a = planner::assign(&sources, &jobs)?;
        Ok((src_ix, sources, a))
    }

    /// The plan to bring `manifest` to `dest`: every chunk it lacks, the
    /// edges holding each ranked by path rate, and the assignment.
    pub fn plan(
        &mut self,
        manifest: &ManifestId,
        dest: &str,
        alternatives: usize,
        max_sources: usize,
        take_lease: bool,
    ) -> Result<Plan, ServiceError> {
        let dest_ix = self.ledger.edge_ix(dest)?;
        let missing = self.ledger.missing(manifest, dest)?;
        let (src_ix, sources, a) = self.assign(dest_ix, &missing, max_sources)?;
        let mut plan_sources: Vec<PlanSource> = src_ix
            .iter()
            .zip(&sources)
            .zip(&a.load)
            .map(|((&ix, s), &bytes)| PlanSource {
                edge: s.name.clone(),
                addr: self.ledger.edges[ix as usize].addr.clone(),
                rate: s.rate,
                measured: s.measured,
                chunks: 0,
                bytes,
            })
            .collect();
        let mut lease_entries = Vec::new();
        let mut chunks = Vec::with_capacity(missing.len());
        let mut unavailable = 0;
        for (i, &(cid, bytes)) in missing.iter().enumerate() {
            let source = a.source[i].map(|s| {
                plan_sources[s].chunks += 1;
                lease_entries.push((src_ix[s], cid));
                sources[s].name.clone()
            });
            if source.is_none() {
                unavailable += 1;
            }
            chunks.push(PlanChunk {
                fp: self.ledger.interner.fp(cid),
                bytes,
                source,
                holders: a.ranked[i]
                    .iter()
                    .take(alternatives)
                    .map(|&s| sources[s].name.clone())
                    .collect(),
            });
        }
        plan_sources.retain(|s| s.chunks > 0);
        let mut named = vec![false; sources.len()];
        for r in &a.ranked {
            for &s in r.iter().take(alternatives) {
                named[s] = true;
            }
        }
        for s in a.source.iter().flatten() {
            named[*s] = true;
        }
        let addrs = named
            .iter()
            .enumerate()
            .filter(|(_, &n)| n)
            .map(|(s, _)| {
                (
                    sources[s].name.clone(),
                    self.ledger.edges[src_ix[s] as usize].addr.clone(),
                )
            })
            .collect();
        let lease = if take_lease && !lease_entries.is_empty() {
            Some(self.take_lease(lease_entries)?)
        } else {
            None
        };
        metrics::counter!("coordinator_plans_total").increment(1);
        Ok(Plan {
            manifest: *manifest,
            dest: dest.to_string(),
            missing_chunks: missing.len() as u64,
            missing_bytes: missing.iter().map(|(_, b)| b).sum(),
            unavailable_chunks: unavailable,
            makespan_secs: a.makespan_secs,
            lower_bound_secs: a.lower_bound_secs,
            lease,
            sources: plan_sources,
            chunks,
            addrs,
        })
    }

    /// What `edge` should do now: drop chunks (GC) and prefetch for hints.
    pub fn orders(&mut self, edge: &str) -> Result<Orders, ServiceError> {
        let ix = self.ledger.edge_ix(edge)?;
        self.expire_leases()?;
        let Settings { policy, watermarks } = self.settings;
        let hinted: Vec<ManifestId> = self
            .hints
            .keys()
            .filter(|(he, _)| he == edge)
            .map(|(_, m)| *m)
            .collect();
        let mut deferred = RoaringBitmap::new();
        for m in &hinted {
            if let Some(entry) = self.ledger.catalogue.get(m) {
                deferred.extend(entry.unique.iter().copied());
            }
        }
        let e = &self.ledger.edges[ix as usize];
        let g = gc::plan(&self.ledger, e, policy, watermarks, &deferred);
        let mut orders = Orders {
            policy: policy.to_string(),
            drop: g.drop.iter().map(|&c| self.ledger.interner.fp(c)).collect(),
            drop_bytes: g.bytes,
            handoffs: self.handoffs.orders_for(edge, now_ms()),
            ..Default::default()
        };
        if !g.drop.is_empty() {
            metrics::counter!("coordinator_gc_orders_total").increment(1);
            return Ok(orders);
        }
        // Prefetch fills the room under the high watermark, never more, so it
        // never makes GC run by itself; GC then drops hinted chunks last.
        let mut room = watermarks.high_bytes(e.capacity).saturating_sub(e.usage);
        let mut lease_entries = Vec::new();
        let mut taken = RoaringBitmap::new();
        for m in hinted {
            if room == 0 {
                break;
            }
            let Ok(missing) = self.ledger.missing(&m, edge) else {
                continue;
            };
            let mut want = Vec::new();
            for (cid, bytes) in missing {
                if bytes > room {
                    break;
                }
                if taken.insert(cid) {
                    room -= bytes;
                    want.push((cid, bytes));
                }
            }
            if want.is_empty() {
                continue;
            }
            let (src_ix, sources, a) = self.assign(ix, &want, DEFAULT_MAX_SOURCES)?;
            let mut chunks = Vec::new();
            for (i, &(cid, bytes)) in want.iter().enumerate() {
                if let Some(s) = a.source[i] {
                    lease_entries.push((src_ix[s], cid));
                    chunks.push(PrefetchChunk {
                        fp: self.ledger.interner.fp(cid),
                        bytes,
                        source: sources[s].name.clone(),
                        addr: self.ledger.edges[src_ix[s] as usize].addr.clone(),
                    });
                }
            }
            if !chunks.is_empty() {
                orders.prefetch.push(PrefetchOrder { manifest: m, chunks });
            }
        }
        if !lease_entries.is_empty() {
            orders.lease = Some(self.take_lease(lease_entries)?);
        }
        Ok(orders)
    }

    pub fn chunk_info(&self, fp: &Fingerprint) -> Option<ChunkInfo> {
        let cid = self.ledger.interner.get(fp)?;
        let mut info = ChunkInfo {
            fp: *fp,
            bytes: self.ledger.chunk_len(cid),
            holders: Vec::new(),
            images: self.ledger.image_refs(cid) as u64,
            pins: BTreeMap::new(),
            leased_on: Vec::new(),
        };
        for e in &self.ledger.edges {
            if e.holds(cid) {
                info.holders.push(e.id.clone());
            }
            if let Some(&n) = e.pinned.get(&cid) {
                info.pins.insert(e.id.clone(), n);
            }
            if e.leased.contains_key(&cid) {
                info.leased_on.push(e.id.clone());
            }
        }
        info.holders.sort();
        info.leased_on.sort();
        Some(info)
    }

    pub fn edge_info(&self, id: &str) -> Result<EdgeInfo, ServiceError> {
        let e = self.ledger.edge(id)?;
        let marks = self.settings.watermarks;
        Ok(EdgeInfo {
            id: e.id.clone(),
            addr: e.addr.clone(),
            capacity: e.capacity,
            usage: e.usage,
            chunks: e.chunks.len(),
            reported: e.reported,
            pinned_manifests: e.pins.iter().map(|(m, &n)| (m.to_hex(), n)).collect(),
            pinned_chunks: e.pinned.len() as u64,
            leased_chunks: e.leased.len() as u64,
            high_watermark_bytes: marks.high_bytes(e.capacity),
            low_watermark_bytes: marks.low_bytes(e.capacity),
            hints: self
                .hints
                .keys()
                .filter(|(he, _)| he == id)
                .map(|(_, m)| *m)
                .collect(),
        })
    }
}
