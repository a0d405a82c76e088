//! The ref ledger: which edge holds which chunk, which manifests each edge has
//! pinned (and so how many pinned manifests use each chunk there), which chunks
//! are leased to an in-flight transfer, per-edge access records for the cache
//! policies, and fleet-wide popularity.
//!
//! Sized for a fleet of thousands of edges with hundreds of thousands of chunks
//! each: fingerprints are interned to `u32` ids once, an edge's inventory is a
//! compressed bitmap of ids (`roaring`), and per-chunk fleet figures are flat
//! `u16`/`u32` vectors indexed by id. Per-edge maps (pins, leases, accesses)
//! only hold the chunks that have such a record.

use std::collections::{BTreeMap, HashMap};

use edgeshift_common::{Fingerprint, Manifest, ManifestError, ManifestId};
use roaring::RoaringBitmap;

/// A chunk's interned id.
pub type ChunkId = u32;
/// An edge's index in the ledger (registration order; never shown outside).
pub type EdgeIx = u16;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LedgerError {
    #[error("unknown edge {0:?} (an agent must POST /v1/edges/{0}/register first)")]
    UnknownEdge(String),
    #[error("unknown manifest {0} (publish it with POST /v1/manifests first)")]
    UnknownManifest(ManifestId),
    #[error("manifest {0} is not pinned on edge {1:?}")]
    NotPinned(ManifestId, String),
    #[error("invalid manifest: {0}")]
    BadManifest(#[from] ManifestError),
    #[error("the fleet is full: at most {0} edges")]
    TooManyEdges(usize),
    #[error("invalid edge id {0:?}: use 1-64 characters from [A-Za-z0-9._-]")]
    BadEdgeId(String),
    #[error("path rate {0} for peer {1:?} is not a positive finite number of bytes per second")]
    BadRate(f64, String),
    #[error(
        "edge {edge:?} would hold {chunks} chunks, more than its capacity of {capacity} bytes allows ({max})"
    )]
    TooManyChunks {
        edge: String,
        chunks: u64,
        capacity: u64,
        max: u64,
    },
}

/// Chunks beyond `capacity / ChunkSize::MIN` an edge may report: room for
/// the short last chunk of each image.
const CHUNK_SLACK: u64 = 4096;

/// Most distinct chunks an edge of `capacity` bytes can hold. Reports past
/// it are refused before anything is interned, so a caller cannot grow the
/// coordinator's tables beyond what its declared store could keep.
pub fn max_chunks(capacity: u64) -> u64 {
    (capacity / edgeshift_common::ChunkSize::MIN).saturating_add(CHUNK_SLACK)
}

/// Hashes a fingerprint by its first 8 bytes: BLAKE3 output is already
/// uniform, so SipHash over all 32 bytes buys nothing. (Only authenticated
/// agents report fingerprints; see docs/coordinator.md.)
#[derive(Debug, Default, Clone, Copy)]
pub struct FpHasher(u64);

impl std::hash::Hasher for FpHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
    }

    // The slice length prefix of `[u8; 32]` is the same for every key.
    fn write_usize(&mut self, _: usize) {}
}

type FpMap<V> = HashMap<Fingerprint, V, std::hash::BuildHasherDefault<FpHasher>>;

/// Fingerprint ↔ dense id table. Ids are never reused: a chunk that no edge
/// holds any more keeps its id (4 bytes in each per-chunk vector), which keeps
/// ids stable for the bitmaps.
#[derive(Debug, Default)]
pub struct Interner {
    ids: FpMap<ChunkId>,
    fps: Vec<Fingerprint>,
}

impl Interner {
    pub fn intern(&mut self, fp: &Fingerprint) -> ChunkId {
        if let Some(&id) = self.ids.get(fp) {
            return id;
        }
        let id = self.fps.len() as ChunkId;
        self.fps.push(*fp);
        self.ids.insert(*fp, id);
        id
    }

    pub fn get(&self, fp: &Fingerprint) -> Option<ChunkId> {
        self.ids.get(fp).copied()
    }

    pub fn fp(&self, id: ChunkId) -> Fingerprint {
        self.fps[id as usize]
    }

    pub fn len(&self) -> usize {
        self.fps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fps.is_empty()
    }
}

/// How recently and how often an edge used a chunk, in ledger ticks (one
/// tick per report that carries accesses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    pub last: u64,
    pub count: u32,
}

/// One edge as the coordinator knows it.
#[derive(Debug)]
pub struct Edge {
    pub id: String,
    /// Where its chunk server listens (`host:port`), for peers.
    pub addr: String,
    pub capacity: u64,
    /// Bytes its store uses, as last reported.
    pub usage: u64,
    pub chunks: RoaringBitmap,
    /// Manifests pinned here → pin count (a VM may pin its image twice).
    pub pins: HashMap<ManifestId, u32>,
    /// Chunk → number of distinct pinned manifests here that use it.
    pub pinned: HashMap<ChunkId, u32>,
    /// Chunk → number of live leases (in-flight transfers) that need it here.
    pub leased: HashMap<ChunkId, u32>,
    /// Access records for chunks used since the edge's last full inventory.
    pub access: HashMap<ChunkId, Access>,
    /// True once the edge sent its full inventory since registering.
    pub reported: bool,
}

impl Edge {
    pub fn holds(&self, id: ChunkId) -> bool {
        self.chunks.contains(id)
    }

    pub fn is_protected(&self, id: ChunkId) -> bool {
        self.pinned.contains_key(&id) || self.leased.contains_key(&id)
    }
}

/// A published image: its chunks as ids, in image order (holes left out).
#[derive(Debug, Clone)]
pub struct CatalogueEntry {
    pub chunk_size: u64,
    pub image_size: u64,
    /// Non-zero chunks in image order, with their byte lengths.
    pub chunks: Vec<(ChunkId, u32)>,
    /// Distinct non-zero chunks, in first-seen order.
    pub unique: Vec<ChunkId>,
}

/// A lease: chunks on source edges that an in-flight transfer relies on.
#[derive(Debug, Clone)]
pub struct Lease {
    pub deadline_ms: u64,
    pub entries: Vec<(EdgeIx, ChunkId)>,
}

#[derive(Debug, Default)]
pub struct Ledger {
    pub interner: Interner,
    /// Byte length per chunk id; 0 = not known from any manifest.
    chunk_len: Vec<u32>,
    /// Number of edges holding each chunk.
    holders: Vec<u16>,
    /// Number of catalogue manifests that use each chunk.
    image_refs: Vec<u16>,
    pub edges: Vec<Edge>,
    edge_ix: HashMap<String, EdgeIx>,
    pub catalogue: HashMap<ManifestId, CatalogueEntry>,
    /// (source edge id, destination edge id) → measured bytes/s from source to destination.
    pub paths: BTreeMap<(String, String), f64>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    tick: u64,
    /// Byte length assumed for a chunk no published manifest describes.
    pub default_chunk_len: u32,
}

pub fn valid_edge_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl Ledger {
    pub fn new(default_chunk_len: u32) -> Self {
        Ledger {
            default_chunk_len,
            next_lease: 1,
            ..Default::default()
        }
    }

    fn intern(&mut self, fp: &Fingerprint) -> ChunkId {
        let id = self.interner.intern(fp);
        if id as usize == self.holders.len() {
            self.holders.push(0);
            self.image_refs.push(0);
            self.chunk_len.push(0);
        }
        id
    }

    pub fn chunk_len(&self, id: ChunkId) -> u64 {
        match self.chunk_len[id as usize] {
            0 => self.default_chunk_len as u64,
            n => n as u64,
        }
    }

    pub fn holders(&self, id: ChunkId) -> u16 {
        self.holders[id as usize]
    }

    pub fn image_refs(&self, id: ChunkId) -> u16 {
        self.image_refs[id as usize]
    }

    pub fn tick(&self) -> u64 {
        self.tick
    }

    pub fn edge_ix(&self, id: &str) -> Result<EdgeIx, LedgerError> {
        self.edge_ix
            .get(id)
            .copied()
            .ok_or_else(|| LedgerError::UnknownEdge(id.to_string()))
    }

    pub fn edge(&self, id: &str) -> Result<&Edge, LedgerError> {
        Ok(&self.edges[self.edge_ix(id)? as usize])
    }

    /// Registers an edge or updates its address and capacity. Its inventory
    /// stays until it sends a full one.
    pub fn register(&mut self, id: &str, addr: &str, capacity: u64) -> Result<EdgeIx, LedgerError> {
        if !valid_edge_id(id) {
            return Err(LedgerError::BadEdgeId(id.to_string()));
        }
        if let Some(&ix) = self.edge_ix.get(id) {
            let e = &mut self.edges[ix as usize];
            e.addr = addr.to_string();
            e.capacity = capacity;
            return Ok(ix);
        }
        if self.edges.len() >= EdgeIx::MAX as usize {
            return Err(LedgerError::TooManyEdges(EdgeIx::MAX as usize));
        }
        let ix = self.edges.len() as EdgeIx;
        self.edges.push(Edge {
            id: id.to_string(),
            addr: addr.to_string(),
            capacity,
            usage: 0,
            chunks: RoaringBitmap::new(),
            pins: HashMap::new(),
            pinned: HashMap::new(),
            leased: HashMap::new(),
            access: HashMap::new(),
            reported: false,
        });
        self.edge_ix.insert(id.to_string(), ix);
        Ok(ix)
    }

    /// Forgets an edge: its chunks, pins, leases there and measured paths.
    /// The last edge takes its index, so indexes stay dense.
    pub fn deregister(&mut self, id: &str) -> Result<(), LedgerError> {
        let ix = self.edge_ix(id)?;
        let gone = self.edges.swap_remove(ix as usize);
        self.edge_ix.remove(id);
        for cid in &gone.chunks {
            let h = &mut self.holders[cid as usize];
            *h = h.saturating_sub(1);
        }
        let moved_from = self.edges.len() as EdgeIx;
        if let Some(moved) = self.edges.get(ix as usize) {
            self.edge_ix.insert(moved.id.clone(), ix);
        }
        for lease in self.leases.values_mut() {
            lease.entries.retain(|&(e, _)| e != ix);
            for (e, _) in lease.entries.iter_mut() {
                if *e == moved_from {
                    *e = ix;
                }
            }
        }
        self.paths.retain(|(source, dest), _| source != id && dest != id);
        Ok(())
    }

    fn check_room(&self, ix: EdgeIx, chunks: u64) -> Result<(), LedgerError> {
        let e = &self.edges[ix as usize];
        let max = max_chunks(e.capacity);
        if chunks > max {
            return Err(LedgerError::TooManyChunks {
                edge: e.id.clone(),
                chunks,
                capacity: e.capacity,
                max,
            });
        }
        Ok(())
    }

    /// Adds a manifest to the catalogue; returns its id.
    pub fn publish(&mut self, manifest: &Manifest) -> ManifestId {
        let id = manifest.id();
        if self.catalogue.contains_key(&id) {
            return id;
        }
        let mut chunks = Vec::with_capacity(manifest.chunks.len());
        let mut unique = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, fp) in manifest.chunks.iter().enumerate() {
            if fp.is_zero_chunk() {
                continue;
            }
            let cid = self.intern(fp);
            let len = manifest.chunk_len(i) as u32;
            self.chunk_len[cid as usize] = self.chunk_len[cid as usize].max(len);
            chunks.push((cid, len));
            if seen.insert(cid) {
                unique.push(cid);
                let r = &mut self.image_refs[cid as usize];
                *r = r.saturating_add(1);
            }
        }
        self.catalogue.insert(
            id,
            CatalogueEntry {
                chunk_size: manifest.chunk_size.bytes(),
                image_size: manifest.image_size,
                chunks,
                unique,
            },
        );
        id
    }

    fn add_chunk(&mut self, ix: EdgeIx, cid: ChunkId) -> bool {
        let added = self.edges[ix as usize].chunks.insert(cid);
        if added {
            let h = &mut self.holders[cid as usize];
            *h = h.saturating_add(1);
        }
        added
    }

    fn remove_chunk(&mut self, ix: EdgeIx, cid: ChunkId) -> bool {
        let removed = self.edges[ix as usize].chunks.remove(cid);
        if removed {
            let h = &mut self.holders[cid as usize];
            *h = h.saturating_sub(1);
        }
        removed
    }

    /// Replaces an edge's inventory with a full report (on (re)connect).
    /// Access records start over: the report says nothing about them.
    pub fn put_inventory(
        &mut self,
        edge: &str,
        chunks: &[Fingerprint],
        usage: u64,
    ) -> Result<(), LedgerError> {
        let ix = self.edge_ix(edge)?;
        self.check_room(ix, chunks.len() as u64)?;
        let mut ids: Vec<ChunkId> = chunks
            .iter()
            .filter(|fp| !fp.is_zero_chunk())
            .map(|fp| self.intern(fp))
            .collect();
        // Building from sorted ids is much faster than random inserts.
        ids.sort_unstable();
        ids.dedup();
        let next = RoaringBitmap::from_sorted_iter(ids.iter().copied())
            .unwrap_or_else(|_| ids.iter().copied().collect());
        let prev = std::mem::take(&mut self.edges[ix as usize].chunks);
        for gone in &prev - &next {
            let h = &mut self.holders[gone as usize];
            *h = h.saturating_sub(1);
        }
        for new in &next - &prev {
            let h = &mut self.holders[new as usize];
            *h = h.saturating_add(1);
        }
        let e = &mut self.edges[ix as usize];
        e.chunks = next;
        e.usage = usage;
        e.access.clear();
        e.reported = true;
        Ok(())
    }

    /// Applies a heartbeat: chunks added and removed since the last report,
    /// chunks the edge's VMs or peers used, and its current usage.
    pub fn apply_delta(
        &mut self,
        edge: &str,
        added: &[Fingerprint],
        removed: &[Fingerprint],
        accessed: &[Fingerprint],
        usage: u64,
    ) -> Result<(), LedgerError> {
        let ix = self.edge_ix(edge)?;
        self.check_room(ix, self.edges[ix as usize].chunks.len() + added.len() as u64)?;
        if !added.is_empty() || !accessed.is_empty() {
            self.tick += 1;
        }
        let tick = self.tick;
        for fp in added.iter().filter(|f| !f.is_zero_chunk()) {
            let cid = self.intern(fp);
            if self.add_chunk(ix, cid) {
                // Arrival counts as a use, so a fresh chunk is not the first LRU victim.
                let a = self.edges[ix as usize].access.entry(cid).or_default();
                a.last = tick;
                a.count = a.count.saturating_add(1);
            }
        }
        for fp in removed {
            if let Some(cid) = self.interner.get(fp) {
                self.remove_chunk(ix, cid);
                self.edges[ix as usize].access.remove(&cid);
            }
        }
        for fp in accessed {
            if let Some(cid) = self.interner.get(fp) {
                let e = &mut self.edges[ix as usize];
                if e.chunks.contains(cid) {
                    let a = e.access.entry(cid).or_default();
                    a.last = tick;
                    a.count = a.count.saturating_add(1);
                }
            }
        }
        self.edges[ix as usize].usage = usage;
        Ok(())
    }

    /// Pins a published manifest on an edge: its chunks there are kept.
    pub fn pin(&mut self, edge: &str, manifest: &ManifestId) -> Result<u32, LedgerError> {
        let ix = self.edge_ix(edge)?;
        let entry = self
            .catalogue
            .get(manifest)
            .ok_or(LedgerError::UnknownManifest(*manifest))?;
        let e = &mut self.edges[ix as usize];
        let count = e.pins.entry(*manifest).or_insert(0);
        *count += 1;
        if *count == 1 {
            for &cid in &entry.unique {
                *e.pinned.entry(cid).or_insert(0) += 1;
            }
        }
        Ok(*count)
    }

    /// Drops one pin of a manifest on an edge; returns the pins left.
    pub fn unpin(&mut self, edge: &str, manifest: &ManifestId) -> Result<u32, LedgerError> {
        let ix = self.edge_ix(edge)?;
        let e = &mut self.edges[ix as usize];
        let Some(count) = e.pins.get_mut(manifest) else {
            return Err(LedgerError::NotPinned(*manifest, edge.to_string()));
        };
        *count -= 1;
        let left = *count;
        if left == 0 {
            e.pins.remove(manifest);
            if let Some(entry) = self.catalogue.get(manifest) {
                for cid in &entry.unique {
                    if let Some(n) = e.pinned.get_mut(cid) {
                        *n -= 1;
                        if *n == 0 {
                            e.pinned.remove(cid);
                        }
                    }
                }
            }
        }
        Ok(left)
    }

    /// Replaces an edge's pins with the set it reports (on (re)connect).
    pub fn set_pins(&mut self, edge: &str, manifests: &[ManifestId]) -> Result<(), LedgerError> {
        let ix = self.edge_ix(edge)?;
        for m in manifests {
            if !self.catalogue.contains_key(m) {
                return Err(LedgerError::UnknownManifest(*m));
            }
        }
        let e = &mut self.edges[ix as usize];
        e.pins.clear();
        e.pinned.clear();
        for m in manifests {
            self.pin(edge, m)?;
        }
        Ok(())
    }

    /// Records a measured rate of the path `source → dest`.
    pub fn set_path(&mut self, source: &str, dest: &str, bytes_per_sec: f64) -> Result<(), LedgerError> {
        if !(bytes_per_sec.is_finite() && bytes_per_sec > 0.0) {
            return Err(LedgerError::BadRate(bytes_per_sec, source.to_string()));
        }
        if !valid_edge_id(source) {
            return Err(LedgerError::BadEdgeId(source.to_string()));
        }
        self.paths
            .insert((source.to_string(), dest.to_string()), bytes_per_sec);
        Ok(())
    }

    pub fn path_rate(&self, source: &str, dest: &str) -> Option<f64> {
        self.paths.get(&(source.to_string(), dest.to_string())).copied()
    }

    /// Protects `(edge, chunk)` pairs from GC until `deadline_ms` or release.
    pub fn lease(&mut self, entries: Vec<(EdgeIx, ChunkId)>, deadline_ms: u64) -> u64 {
        let id = self.next_lease;
        self.next_lease += 1;
        for &(ix, cid) in &entries {
            *self.edges[ix as usize].leased.entry(cid).or_insert(0) += 1;
        }
        self.leases.insert(id, Lease { deadline_ms, entries });
        id
    }

    /// Releases a lease; false when it is unknown (released or expired).
    pub fn release(&mut self, lease: u64) -> bool {
        let Some(l) = self.leases.remove(&lease) else {
            return false;
        };
        for (ix, cid) in l.entries {
            let leased = &mut self.edges[ix as usize].leased;
            if let Some(n) = leased.get_mut(&cid) {
                *n -= 1;
                if *n == 0 {
                    leased.remove(&cid);
                }
            }
        }
        true
    }

    /// Releases every lease whose deadline has passed; returns their ids.
    pub fn expire_leases(&mut self, now_ms: u64) -> Vec<u64> {
        let dead: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline_ms <= now_ms)
            .map(|(&id, _)| id)
            .collect();
        for id in &dead {
            self.release(*id);
        }
        dead
    }

    /// Re-applies entries of lease `id` read back after a restart (edges come
    /// back one by one, so a lease may be restored in several calls).
    pub fn restore_lease(&mut self, id: u64, deadline_ms: u64, entries: Vec<(EdgeIx, ChunkId)>) {
        for &(ix, cid) in &entries {
            *self.edges[ix as usize].leased.entry(cid).or_insert(0) += 1;
        }
        let l = self.leases.entry(id).or_insert(Lease {
            deadline_ms,
            entries: Vec::new(),
        });
        l.entries.extend(entries);
        self.next_lease = self.next_lease.max(id + 1);
    }

    /// Makes sure new lease ids come after `id` (ids are never reused).
    pub fn reserve_lease_id(&mut self, id: u64) {
        self.next_lease = self.next_lease.max(id + 1);
    }

    /// A live lease's entries.
    pub fn lease_entries(&self, id: u64) -> Option<&[(EdgeIx, ChunkId)]> {
        self.leases.get(&id).map(|l| l.entries.as_slice())
    }

    pub fn live_leases(&self) -> usize {
        self.leases.len()
    }

    /// Chunks of a manifest that an edge lacks, in image order, deduplicated.
    pub fn missing(&self, manifest: &ManifestId, edge: &str) -> Result<Vec<(ChunkId, u64)>, LedgerError> {
        let e = self.edge(edge)?;
        let entry = self
            .catalogue
            .get(manifest)
            .ok_or(LedgerError::UnknownManifest(*manifest))?;
        let mut seen = RoaringBitmap::new();
        Ok(entry
            .chunks
            .iter()
            .filter(|(cid, _)| !e.chunks.contains(*cid) && seen.insert(*cid))
            .map(|&(cid, len)| (cid, len as u64))
            .collect())
    }

    /// Bytes of heap the ledger's big tables take (approximate).
    pub fn approx_heap_bytes(&self) -> u64 {
        let per_chunk = self.interner.len() as u64 * (32 + 4 + 4 + 2 + 2 + 1 + 8);
        let bitmaps: u64 = self.edges.iter().map(|e| e.chunks.serialized_size() as u64).sum();
        per_chunk + bitmaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::ChunkSize;

    fn fp(n: u32) -> Fingerprint {
        Fingerprint::of(&n.to_le_bytes())
    }

    fn manifest(ns: &[u32]) -> Manifest {
        let cs = ChunkSize::new(4096).expect("valid");
        Manifest::new(cs, 4096 * ns.len() as u64, ns.iter().map(|&n| fp(n)).collect())
    }

    #[test]
    fn inventory_delta_and_holder_counts() {
        let mut l = Ledger::new(4096);
        l.register("a", "127.0.0.1:1", 1 << 20).expect("register");
        l.register("b", "127.0.0.1:2", 1 << 20).expect("register");
        l.put_inventory("a", &[fp(1), fp(2)], 8192).expect("inv");
        l.put_inventory("b", &[fp(2), fp(3)], 8192).expect("inv");
        let id2 = l.interner.get(&fp(2)).expect("interned");
        assert_eq!(l.holders(id2), 2);
        l.apply_delta("a", &[fp(3)], &[fp(2)], &[], 8192).expect("delta");
        assert_eq!(l.holders(id2), 1);
        let id3 = l.interner.get(&fp(3)).expect("interned");
        assert_eq!(l.holders(id3), 2);
        // A full report replaces, and holder counts follow.
        l.put_inventory("b", &[], 0).expect("inv");
        assert_eq!(l.holders(id2), 0);
        assert_eq!(l.holders(id3), 1);
        assert_eq!(
            l.apply_delta("zz", &[], &[], &[], 0),
            Err(LedgerError::UnknownEdge("zz".into()))
        );
    }

    #[test]
    fn pins_count_manifests_per_chunk() {
        let mut l = Ledger::new(4096);
        l.register("a", "x:1", 1 << 20).expect("register");
        let m1 = l.publish(&manifest(&[1, 2, 2]));
        let m2 = l.publish(&manifest(&[2, 3]));
        assert_eq!(l.image_refs(l.interner.get(&fp(2)).expect("id")), 2);
        l.pin("a", &m1).expect("pin");
        l.pin("a", &m2).expect("pin");
        let e = l.edge("a").expect("edge");
        assert_eq!(e.pinned.get(&l.interner.get(&fp(2)).expect("id")), Some(&2));
        assert_eq!(e.pinned.get(&l.interner.get(&fp(1)).expect("id")), Some(&1));
        l.unpin("a", &m1).expect("unpin");
        let e = l.edge("a").expect("edge");
        assert!(!e.pinned.contains_key(&l.interner.get(&fp(1)).expect("id")));
        assert_eq!(e.pinned.get(&l.interner.get(&fp(2)).expect("id")), Some(&1));
        assert!(matches!(l.unpin("a", &m1), Err(LedgerError::NotPinned(..))));
        let unknown = Fingerprint::of(b"nope");
        assert_eq!(l.pin("a", &unknown), Err(LedgerError::UnknownManifest(unknown)));
    }

    #[test]
    fn leases_protect_until_released_or_expired() {
        let mut l = Ledger::new(4096);
        let a = l.register("a", "x:1", 1 << 20).expect("register");
        l.put_inventory("a", &[fp(1)], 4096).expect("inv");
        let c = l.interner.get(&fp(1)).expect("id");
        let lease1 = l.lease(vec![(a, c)], 100);
        let lease2 = l.lease(vec![(a, c)], 200);
        assert!(l.edge("a").expect("edge").is_protected(c));
        assert!(l.release(lease1));
        assert!(!l.release(lease1));
        assert!(l.edge("a").expect("edge").is_protected(c));
        assert!(l.expire_leases(150).is_empty());
        assert_eq!(l.expire_leases(200), vec![lease2]);
        assert!(!l.edge("a").expect("edge").is_protected(c));
        assert!(!l.release(lease2));
    }

    #[test]
    fn reports_past_capacity_are_refused_before_interning() {
        let mut l = Ledger::new(4096);
        l.register("a", "x:1", 0).expect("register");
        let too_many: Vec<_> = (0..=max_chunks(0) as u32).map(fp).collect();
        assert!(matches!(
            l.put_inventory("a", &too_many, 0),
            Err(LedgerError::TooManyChunks { .. })
        ));
        assert!(matches!(
            l.apply_delta("a", &too_many, &[], &[], 0),
            Err(LedgerError::TooManyChunks { .. })
        ));
        assert_eq!(l.interner.len(), 0, "a refused report must not grow the tables");
        l.put_inventory("a", &too_many[1..], 0).expect("at the bound");
    }

    #[test]
    fn deregistering_keeps_the_other_edges_straight() {
        let mut l = Ledger::new(4096);
        for e in ["a", "b", "c"] {
            l.register(e, "x:1", 1 << 20).expect("register");
        }
        l.put_inventory("a", &[fp(1)], 4096).expect("inv");
        l.put_inventory("c", &[fp(1), fp(2)], 8192).expect("inv");
        let c1 = l.interner.get(&fp(1)).expect("id");
        let c2 = l.interner.get(&fp(2)).expect("id");
        let (a, c) = (l.edge_ix("a").expect("a"), l.edge_ix("c").expect("c"));
        let lease = l.lease(vec![(a, c1), (c, c2)], 100);
        l.set_path("c", "a", 5.0).expect("path");
        l.deregister("a").expect("deregister");
        assert!(matches!(l.edge("a"), Err(LedgerError::UnknownEdge(_))));
        assert_eq!(l.holders(c1), 1);
        assert_eq!(l.path_rate("c", "a"), None);
        // "c" moved into "a"'s slot: its lease entry follows it.
        let c = l.edge_ix("c").expect("c");
        assert_eq!(l.lease_entries(lease), Some(&[(c, c2)][..]));
        assert!(l.edge("c").expect("c").is_protected(c2));
        assert!(l.release(lease));
        assert!(!l.edge("c").expect("c").is_protected(c2));
        l.register("a", "x:1", 1 << 20).expect("a name can come back");
    }

    #[test]
    fn bad_input_is_refused() {
        let mut l = Ledger::new(4096);
        assert!(matches!(l.register("", "x", 1), Err(LedgerError::BadEdgeId(_))));
        assert!(matches!(
            l.register("a/b", "x", 1),
            Err(LedgerError::BadEdgeId(_))
        ));
        assert!(matches!(
            l.set_path("a", "b", f64::NAN),
            Err(LedgerError::BadRate(..))
        ));
        assert!(matches!(
            l.set_path("a", "b", -1.0),
            Err(LedgerError::BadRate(..))
        ));
        assert!(matches!(l.missing(&fp(1), "a"), Err(LedgerError::UnknownEdge(_))));
    }
}
