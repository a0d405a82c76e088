//! The striped multi-source fetcher: the destination side of a transfer.
//!
//! Every peer gets one connection and one task. Work is pulled, not pushed:
//! a peer's task asks for more chunks whenever its in-flight bytes fall below
//! its window, and the window is sized from that path's measured goodput
//! (about 100 ms of it). Each path therefore carries work in proportion to
//! its throughput, and nothing is queued behind a slow path beyond its
//! window: chunks not yet requested stay in the shared priority order, where
//! faster paths take them. At the tail, an idle peer re-requests the chunk
//! that a slower peer would deliver last (work stealing); the first verified
//! copy wins and the other is discarded.
//!
//! Every chunk is hashed and checked against its fingerprint before it is
//! stored (in batches made durable together); a peer whose
//! bytes do not match is dropped for the rest of the fetch and its in-flight
//! chunks go back to the others, as do those of a peer that dies or stalls.
//!
//! The parts, in the order a fetch uses them:
//! - `basis`: each missing chunk's earlier version held here (the chunk at
//!   its place in the nearest manifest), asked for as a delta against it;
//! - `holdings`: with several peers and many chunks, every peer is first
//!   asked what it holds, and each chunk's sources narrowed to its holders;
//! - `schedule`: the pure scheduler deciding which peer asks for what;
//! - `peer_task`: one task per peer, requesting what the scheduler hands
//!   it and booking what arrives;
//! - `receive`: its frames read, raw chunks into page-aligned buffers;
//! - `verify`: each chunk checked (decompressed, or rebuilt from a delta),
//!   then written to a temp file on the same blocking thread;
//! - `writer`: a thread making verified chunks durable in batches;
//! - `report`: live counters and the figures handed back.

pub mod basis;
mod holdings;
mod options;
mod peer_task;
mod receive;
mod report;
mod schedule;
mod verify;
mod want;
mod writer;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use tokio::task::JoinSet;
use tracing::warn;

pub use self::options::FetchOptions;
pub use self::report::{FetchProgress, FetchReport, PeerReport};
pub use self::want::ChunkWant;

use self::peer_task::{run_peer, PeerCtx, Shared};
use self::receive::BufPools;
use self::schedule::{ChunkIdx, PeerIdx, PeerSet, Sched};
use self::writer::spawn_writer;
use super::peer::PeerStore;
use super::pool::ConnPool;
use super::{TransferError, Trust};
use crate::store::{ChunkStore, LocalStore, StoreError};

/// Fetches manifests and chunks from a set of peers into a local store.
pub struct Fetcher {
    store: Arc<LocalStore>,
    peers: Vec<SocketAddr>,
    trust: Trust,
    opts: FetchOptions,
    progress: Arc<FetchProgress>,
    /// Connections kept between fetches (see [`ConnPool`]).
    pool: Option<Arc<ConnPool>>,
    /// Told each chunk stored (an image written as its chunks arrive).
    placement: Option<std::sync::mpsc::Sender<Option<Fingerprint>>>,
}

impl Fetcher {
    pub fn new(store: Arc<LocalStore>, peers: Vec<SocketAddr>, trust: Trust) -> Self {
        Self::with_options(store, peers, trust, FetchOptions::default())
    }

    pub fn with_options(
        store: Arc<LocalStore>,
        peers: Vec<SocketAddr>,
        trust: Trust,
        opts: FetchOptions,
    ) -> Self {
        Fetcher {
            store,
            peers,
            trust,
            opts,
            progress: Arc::new(FetchProgress::default()),
            pool: None,
            placement: None,
        }
    }

    /// Takes peer connections from `pool` and gives them back after each
    /// fetch, so a series of fetches (a migration's rounds) connects and
    /// authenticates once per peer.
    pub fn with_pool(mut self, pool: Arc<ConnPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Names each chunk on `sink` once it is verified and durable here
    /// (`slicer::place`: the image is written as its chunks arrive).
    pub fn with_placement(mut self, sink: std::sync::mpsc::Sender<Option<Fingerprint>>) -> Self {
        self.placement = Some(sink);
        self
    }

    /// Counters updated while a fetch runs.
    pub fn progress(&self) -> Arc<FetchProgress> {
        self.progress.clone()
    }

    /// The manifest `id`: from the local store if there, else from the first
    /// peer that has it; its bytes must hash to `id`. Stored locally.
    pub async fn fetch_manifest(&self, id: &ManifestId) -> Result<Manifest, TransferError> {
        match self.store.get_manifest(id) {
            Ok(m) => return Ok(m),
            Err(StoreError::ManifestMissing(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let mut reasons = Vec::new();
        for addr in &self.peers {
            match self.manifest_from(*addr, id).await {
                Ok(m) => {
                    self.store.put_manifest(&m)?;
                    return Ok(m);
                }
                Err(e) => {
                    warn!(peer = %addr, error = %e, "could not get the manifest from this peer");
                    reasons.push(format!("{addr}: {e}"));
                }
            }
        }
        Err(TransferError::ManifestUnavailable {
            id: *id,
            reasons: if reasons.is_empty() {
                "no peers given".into()
            } else {
                reasons.join("; ")
            },
        })
    }

    async fn manifest_from(&self, addr: SocketAddr, id: &ManifestId) -> Result<Manifest, TransferError> {
        let mut peer = PeerStore::connect(addr, &self.trust, self.opts.dial()).await?;
        peer.get_manifest(id).await
    }

    /// The chunks of `manifest` this store lacks, in manifest order, each once;
    /// all-zero chunks are never fetched. Each has as base the chunk at its
    /// place in the nearest earlier version of the image held here
    /// ([`basis`]), so a peer holding both sends only the blocks that differ.
    pub fn missing_chunks(&self, manifest: &Manifest) -> Result<Vec<ChunkWant>, TransferError> {
        let basis = basis::basis_for(&self.store, manifest)?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (i, fp) in manifest.chunks.iter().enumerate() {
            if fp.is_zero_chunk() || !seen.insert(*fp) {
                continue;
            }
            if !self.store.has_chunk(fp)? {
                out.push(ChunkWant {
                    optional: false,
                    fp: *fp,
                    len: manifest.chunk_len(i),
                    sources: None,
                    base: basis.base_of(fp),
                });
            }
        }
        Ok(out)
    }

    /// Manifest, then every missing chunk from all peers.
    pub async fn fetch(&self, id: &ManifestId) -> Result<FetchReport, TransferError> {
        let manifest = self.fetch_manifest(id).await?;
        let wants = self.missing_chunks(&manifest)?;
        self.fetch_chunks(wants).await
    }

    /// Fetches `wants` (earlier = higher priority) from all peers at once.
    pub async fn fetch_chunks(&self, mut wants: Vec<ChunkWant>) -> Result<FetchReport, TransferError> {
        let n_peers = self.peers.len();
        if n_peers > PeerSet::CAPACITY {
            return Err(TransferError::TooManyPeers(n_peers));
        }
        if wants.len() >= ChunkIdx::CAPACITY {
            return Err(TransferError::TooManyChunks(wants.len()));
        }
        let started = Instant::now();
        let mut bases_lacking = std::collections::HashMap::new();
        if n_peers > 1 && self.opts.probe_min_chunks > 0 && wants.len() >= self.opts.probe_min_chunks {
            bases_lacking = holdings::narrow_to_holders(
                &self.peers,
                &self.trust,
                &self.opts,
                self.pool.as_ref(),
                &mut wants,
            )
            .await;
        }
        let mut sched = Sched::new(&self.peers, wants, &self.opts);
        if !bases_lacking.is_empty() {
            sched.note_bases_lacking(&bases_lacking);
        }
        let sched = Arc::new(Shared::new(sched));
        {
            let s = sched.lock();
            let chunks = s.chunks();
            self.progress
                .total_chunks
                .store(chunks.len() as u64, Ordering::Relaxed);
            self.progress
                .total_bytes
                .store(chunks.iter().map(|c| c.len).sum(), Ordering::Relaxed);
        }
        let pool = Arc::new(BufPools::default());
        let (writer, writer_handle) = spawn_writer(self.store.clone())?;
        let mut tasks = JoinSet::new();
        for (i, addr) in self.peers.iter().enumerate() {
            let ctx = PeerCtx {
                index: PeerIdx::new(i),
                addr: *addr,
                trust: self.trust.clone(),
                opts: self.opts.clone(),
                sched: sched.clone(),
                progress: self.progress.clone(),
                writer: writer.clone(),
                pool: pool.clone(),
                store: self.store.clone(),
                conns: self.pool.clone(),
                placement: self.placement.clone(),
            };
            tasks.spawn(async move {
                let reason = run_peer(&ctx).await;
                ctx.sched.lock().peer_dead(ctx.index, reason);
                ctx.sched.wake.notify_waiters();
            });
        }
        while tasks.join_next().await.is_some() {}
        drop(writer);
        // Every sender is gone now, so the writer ends after its last batch.
        let _ = tokio::task::spawn_blocking(move || writer_handle.join()).await;
        let s = sched.lock();
        self.report(&s, started)
    }

    /// The figures of a fetch that began at `started`, or why it failed.
    fn report(&self, s: &Sched, started: Instant) -> Result<FetchReport, TransferError> {
        if let Some(e) = s.fatal() {
            return Err(TransferError::Store(StoreError::Io {
                op: "store chunk",
                path: self.store.root().to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            }));
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(
            required_done_s = s.required_done().map(|t| (t - started).as_secs_f64()),
            seconds,
            "fetch done"
        );
        for p in s.peers() {
            tracing::debug!(
                peer = %p.addr,
                chunks = p.chunks,
                fillers = p.fillers,
                exclusive = p.exclusive,
                first_request_s = p.first_request.map(|t| (t - started).as_secs_f64()),
                last_chunk_s = p.last_chunk.map(|t| (t - started).as_secs_f64()),
                "fetch share"
            );
        }
        let peers: Vec<PeerReport> = s.peers().iter().map(|p| p.report()).collect();
        let left = s.left_out();
        if let Some(&first) = left.missing.first() {
            let peers_text = peers
                .iter()
                .map(|p| format!("{} ({})", p.addr, p.dropped.as_deref().unwrap_or("ok")))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(TransferError::ChunksUnavailable {
                missing: left.missing.len(),
                first,
                peers: peers_text,
            });
        }
        Ok(FetchReport {
            bytes_received: peers.iter().map(|p| p.bytes).sum(),
            bytes_stored: s.stored_bytes(),
            chunks_fetched: (s.chunks().len() - left.skipped.len()) as u64,
            seconds,
            peers,
            skipped: left.skipped,
        })
    }
}
