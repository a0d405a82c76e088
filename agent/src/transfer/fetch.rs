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

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edgeshift_common::wire::{self, FrameKind, MAX_FRAME_LEN};
use edgeshift_common::{Fingerprint, Manifest, ManifestId};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::conn::{client_handshake, read_frame_into, unexpected, Frame, AUTH_TIMEOUT};
use super::peer::PeerStore;
use super::pool::{checkin, checkout, ConnPool};
use super::{ClusterKey, TransferError};
use crate::store::{ChunkStore, LocalStore, StoreError};

/// Knobs of a fetch; the defaults suit WAN paths from 10 Mbit/s to 10 Gbit/s.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Our node id, sent in the hello.
    pub id: String,
    /// Most chunks in one request frame.
    pub batch: usize,
    /// A peer with chunks in flight and no byte received for this long is dropped.
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    /// Let servers compress chunks when that makes them arrive sooner.
    pub zstd: bool,
    /// Bounds of a peer's in-flight window in bytes.
    pub min_window: u64,
    pub max_window: u64,
    /// Window before a path's goodput has been measured.
    pub initial_window: u64,
    /// A path's window holds this much of its measured goodput. It must
    /// exceed the path's round-trip time, or the window limits the path.
    pub window_time: Duration,
    /// With several peers and at least this many chunks, first ask every
    /// peer which of them it holds (one `HasRequest` each, in parallel):
    /// nobody is asked for a chunk it lacks, and each peer takes the chunks
    /// only it holds first, so a path that alone holds some chunks is not
    /// busy with shared ones while the others run dry. 0: never.
    pub probe_min_chunks: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            id: default_node_id(),
            batch: 32,
            stall_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            zstd: true,
            min_window: 1 << 20,
            max_window: 32 << 20,
            initial_window: 4 << 20,
            window_time: Duration::from_millis(100),
            probe_min_chunks: 64,
        }
    }
}

/// This host's name, the default node id.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "edgeshift".to_string())
}

/// One chunk to fetch. `sources`, if given, lists the only peers it may come
/// from (e.g. the coordinator's plan); otherwise any peer.
#[derive(Debug, Clone)]
pub struct ChunkWant {
    pub fp: Fingerprint,
    /// Expected length in bytes (from the manifest); a payload of another length is rejected.
    pub len: u64,
    pub sources: Option<Vec<SocketAddr>>,
    /// Filler: fetched only while chunks that are not optional are still
    /// queued or on their way (it fills the paths' idle tail); once they are
    /// all done, the optional chunks not yet asked for are left out (listed
    /// in [`FetchReport::skipped`]), as are those no source has.
    pub optional: bool,
    /// A chunk this store holds that the wanted one is a later version of
    /// (what the image held at that place before): a peer holding both may
    /// send only the blocks that differ (`docs/wire.md`, deltas).
    pub base: Option<Fingerprint>,
}

impl ChunkWant {
    /// Whether the chunk may come from the peer at `addr`.
    fn may_come_from(&self, addr: &SocketAddr) -> bool {
        self.sources.as_ref().is_none_or(|s| s.contains(addr))
    }
}

/// Live counters a progress bar can poll.
#[derive(Debug, Default)]
pub struct FetchProgress {
    pub total_bytes: AtomicU64,
    pub total_chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub chunks: AtomicU64,
}

/// Per-peer figures of a finished fetch.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    pub addr: String,
    /// The peer's node id, once authenticated.
    pub id: Option<String>,
    /// Chunk payload bytes received on the wire from this peer (compressed size when zstd).
    pub bytes: u64,
    /// Chunks this peer delivered first and that were stored.
    pub chunks: u64,
    /// `bytes` over the time this peer was busy (first request to last chunk).
    pub mbit_per_s: f64,
    /// Copies that arrived after another peer's (tail stealing) or were not needed.
    pub duplicate_chunks: u64,
    /// Chunks this peer was asked for and answered `Missing` (none when the
    /// holdings probe ran and the peer's store did not change meanwhile).
    pub lacking_chunks: u64,
    pub zstd_chunks: u64,
    /// Chunks that came as deltas against the version this store held
    /// (`ChunkWant::base`), and the bytes that saved.
    pub delta_chunks: u64,
    pub delta_saved_bytes: u64,
    /// Why the peer was dropped during this fetch, if it was.
    pub dropped: Option<String>,
}

/// Figures of a finished fetch.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    /// Chunk payload bytes received on the wire, duplicates included.
    pub bytes_received: u64,
    /// Bytes of the chunks stored (after decompression).
    pub bytes_stored: u64,
    pub chunks_fetched: u64,
    pub seconds: f64,
    pub peers: Vec<PeerReport>,
    /// Optional chunks left out.
    pub skipped: Vec<Fingerprint>,
}

/// Fetches manifests and chunks from a set of peers into a local store.
pub struct Fetcher {
    store: Arc<LocalStore>,
    peers: Vec<SocketAddr>,
    key: ClusterKey,
    opts: FetchOptions,
    progress: Arc<FetchProgress>,
    /// Connections kept between fetches (see [`ConnPool`]).
    pool: Option<Arc<ConnPool>>,
}

impl Fetcher {
    pub fn new(store: Arc<LocalStore>, peers: Vec<SocketAddr>, key: ClusterKey) -> Self {
        Self::with_options(store, peers, key, FetchOptions::default())
    }

    pub fn with_options(
        store: Arc<LocalStore>,
        peers: Vec<SocketAddr>,
        key: ClusterKey,
        opts: FetchOptions,
    ) -> Self {
        Fetcher {
            store,
            peers,
            key,
            opts,
            progress: Arc::new(FetchProgress::default()),
            pool: None,
        }
    }

    /// Takes peer connections from `pool` and gives them back after each
    /// fetch, so a series of fetches (a migration's rounds) connects and
    /// authenticates once per peer.
    pub fn with_pool(mut self, pool: Arc<ConnPool>) -> Self {
        self.pool = Some(pool);
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
        let mut peer = PeerStore::connect(addr, &self.key, self.opts.clone()).await?;
        peer.get_manifest(id).await
    }

    /// The chunks of `manifest` this store lacks, in manifest order, each once;
    /// all-zero chunks are never fetched.
    pub fn missing_chunks(&self, manifest: &Manifest) -> Result<Vec<ChunkWant>, TransferError> {
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
                    base: None,
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
        if n_peers > 64 {
            return Err(TransferError::TooManyPeers(n_peers));
        }
        let started = Instant::now();
        if n_peers > 1 && self.opts.probe_min_chunks > 0 && wants.len() >= self.opts.probe_min_chunks {
            self.narrow_to_holders(&mut wants).await;
        }
        let sched = Arc::new(Shared {
            state: Mutex::new(Sched::new(&self.peers, wants, &self.opts)),
            wake: Notify::new(),
        });
        {
            let s = sched.lock();
            self.progress
                .total_chunks
                .store(s.wants.len() as u64, Ordering::Relaxed);
            self.progress
                .total_bytes
                .store(s.wants.iter().map(|w| w.len).sum(), Ordering::Relaxed);
        }
        let (writer, writer_rx) = std::sync::mpsc::channel();
        let writer_store = self.store.clone();
        let pool = Arc::new(BufPool::default());
        let writer_pool = pool.clone();
        let writer_handle = std::thread::Builder::new()
            .name("chunk-writer".into())
            .spawn(move || writer_thread(writer_store, writer_rx, writer_pool))?;
        let mut tasks = JoinSet::new();
        for (i, addr) in self.peers.iter().enumerate() {
            let ctx = PeerCtx {
                index: i,
                addr: *addr,
                key: self.key.clone(),
                opts: self.opts.clone(),
                sched: sched.clone(),
                progress: self.progress.clone(),
                writer: writer.clone(),
                pool: pool.clone(),
                store: self.store.clone(),
                conns: self.pool.clone(),
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
        if let Some(e) = &s.fatal {
            return Err(TransferError::Store(StoreError::Io {
                op: "store chunk",
                path: self.store.root().to_path_buf(),
                source: std::io::Error::other(e.clone()),
            }));
        }
        let seconds = started.elapsed().as_secs_f64();
        tracing::debug!(
            required_done_s = s.required_done.map(|t| (t - started).as_secs_f64()),
            seconds,
            "fetch done"
        );
        for p in &s.peers {
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
        let peers: Vec<PeerReport> = s.peers.iter().map(|p| p.report()).collect();
        let (skipped, unavailable): (Vec<usize>, Vec<usize>) = (0..s.wants.len())
            .filter(|&i| s.state[i] != ChunkState::Done)
            .partition(|&i| s.wants[i].optional && s.state[i] == ChunkState::Unavailable);
        if let Some(&first) = unavailable.first() {
            let peers_text = peers
                .iter()
                .map(|p| format!("{} ({})", p.addr, p.dropped.as_deref().unwrap_or("ok")))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(TransferError::ChunksUnavailable {
                missing: unavailable.len(),
                first: s.wants[first].fp,
                peers: peers_text,
            });
        }
        Ok(FetchReport {
            bytes_received: peers.iter().map(|p| p.bytes).sum(),
            bytes_stored: s.stored_bytes,
            chunks_fetched: (s.wants.len() - skipped.len()) as u64,
            seconds,
            peers,
            skipped: skipped.iter().map(|&i| s.wants[i].fp).collect(),
        })
    }

    /// Asks every peer at once which of `wants` it holds and narrows each
    /// want's sources to the peers that said yes (a peer that could not be
    /// asked stays a candidate; a chunk nobody claims keeps its sources, so
    /// the fetch itself reports it). Costs one connection and a query of 32
    /// bytes per chunk per peer; saves a `Missing` round trip per chunk a
    /// peer lacks and lets the scheduler put exclusive chunks first.
    async fn narrow_to_holders(&self, wants: &mut [ChunkWant]) {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for (i, &addr) in self.peers.iter().enumerate() {
            let fps: Vec<Fingerprint> = wants
                .iter()
                .filter(|w| !w.fp.is_zero_chunk() && w.may_come_from(&addr))
                .map(|w| w.fp)
                .collect();
            let key = self.key.clone();
            let opts = self.opts.clone();
            let pool = self.pool.clone();
            tasks.spawn(async move {
                let limit = opts.connect_timeout + Duration::from_secs(10);
                let r = tokio::time::timeout(limit, query_holdings(addr, &key, &opts, &fps, pool.as_deref())).await;
                let held = match r {
                    Ok(Ok(held)) => Some(held),
                    Ok(Err(e)) => {
                        debug!(peer = %addr, error = %e, "no holdings answer; the peer stays a candidate for every chunk");
                        None
                    }
                    Err(_) => {
                        debug!(peer = %addr, "holdings query timed out; the peer stays a candidate for every chunk");
                        None
                    }
                };
                (i, fps, held)
            });
        }
        // Per chunk, the peers known to lack it.
        let mut lacks: HashMap<Fingerprint, u64> = HashMap::new();
        let mut answered = 0;
        while let Some(r) = tasks.join_next().await {
            let Ok((i, fps, Some(held))) = r else { continue };
            answered += 1;
            for (fp, h) in fps.iter().zip(held) {
                if !h {
                    *lacks.entry(*fp).or_default() |= 1 << i;
                }
            }
        }
        let mut narrowed = 0;
        for w in wants.iter_mut() {
            let Some(&lack) = lacks.get(&w.fp) else { continue };
            let keep: Vec<SocketAddr> = self
                .peers
                .iter()
                .enumerate()
                .filter(|(i, a)| lack & (1 << i) == 0 && w.may_come_from(a))
                .map(|(_, a)| *a)
                .collect();
            if !keep.is_empty() {
                w.sources = Some(keep);
                narrowed += 1;
            }
        }
        info!(
            peers = self.peers.len(),
            answered,
            chunks = wants.len(),
            narrowed,
            seconds = started.elapsed().as_secs_f64(),
            "asked the peers what they hold"
        );
    }
}

/// One holdings query: connects, asks about `fps` (in frames of at most
/// [`wire::MAX_HAS`]), returns one answer per fingerprint.
async fn query_holdings(
    addr: SocketAddr,
    key: &ClusterKey,
    opts: &FetchOptions,
    fps: &[Fingerprint],
    pool: Option<&ConnPool>,
) -> Result<Vec<bool>, TransferError> {
    let (mut sock, id) = checkout(pool, addr, key, opts).await?;
    let mut held = Vec::with_capacity(fps.len());
    for (n, part) in fps.chunks(wire::MAX_HAS).enumerate() {
        let rid = n as u64 + 1;
        sock.write_all(&wire::encode_has_request(rid, part)).await?;
        let frame = super::conn::read_frame(&mut sock, MAX_FRAME_LEN, None).await?;
        if frame.kind != FrameKind::HasReply || frame.header.request_id() != rid {
            return Err(unexpected(&frame));
        }
        held.extend(wire::decode_has_reply(&frame.body, part.len())?);
    }
    // Nothing is outstanding on it: the chunk requests may use it next.
    checkin(pool, addr, sock, id);
    Ok(held)
}

/// Connects and authenticates; returns the stream and the peer's id.
pub(crate) async fn connect(
    addr: SocketAddr,
    key: &ClusterKey,
    opts: &FetchOptions,
) -> Result<(TcpStream, String), TransferError> {
    let mut sock = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| TransferError::Timeout("connecting"))??;
    let _ = sock.set_nodelay(true);
    let label = addr.to_string();
    let id = tokio::time::timeout(AUTH_TIMEOUT, client_handshake(&mut sock, key, &opts.id, &label))
        .await
        .map_err(|_| TransferError::Timeout("authenticating"))?;
    match id {
        Ok(id) => Ok((sock, id)),
        Err(e) => {
            metrics::counter!("edgeshift_auth_failures_total", "side" => "client").increment(1);
            Err(e)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Queued,
    InFlight,
    Done,
    /// No live, allowed peer has it.
    Unavailable,
}

struct Want {
    fp: Fingerprint,
    len: u64,
    /// Bit i set: peer i may serve it.
    allowed: u64,
    optional: bool,
    base: Option<Fingerprint>,
}

struct PeerState {
    addr: SocketAddr,
    id: Option<String>,
    alive: bool,
    /// Candidate chunks in priority order (may hold stale entries; skipped on pop).
    queue: VecDeque<usize>,
    /// Requested and not yet received, in request order, with the bytes
    /// each was expected to take on the wire when asked for.
    inflight: VecDeque<(usize, u64)>,
    /// Expected wire bytes of `inflight`: what the window limits.
    inflight_bytes: u64,
    /// Received, being verified and made durable.
    storing: Vec<usize>,
    /// Smoothed goodput, bytes/s (0 = not measured yet).
    rate: f64,
    bytes: u64,
    chunks: u64,
    duplicates: u64,
    lacking: u64,
    zstd_chunks: u64,
    delta_chunks: u64,
    delta_saved_bytes: u64,
    /// Of `chunks`, the optional ones, and the ones only this peer could send.
    fillers: u64,
    exclusive: u64,
    first_request: Option<Instant>,
    last_chunk: Option<Instant>,
    dropped: Option<String>,
}

impl PeerState {
    fn report(&self) -> PeerReport {
        let busy = match (self.first_request, self.last_chunk) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        PeerReport {
            addr: self.addr.to_string(),
            id: self.id.clone(),
            bytes: self.bytes,
            chunks: self.chunks,
            mbit_per_s: if busy > 0.0 {
                self.bytes as f64 * 8.0 / busy / 1e6
            } else {
                0.0
            },
            duplicate_chunks: self.duplicates,
            lacking_chunks: self.lacking,
            zstd_chunks: self.zstd_chunks,
            delta_chunks: self.delta_chunks,
            delta_saved_bytes: self.delta_saved_bytes,
            dropped: self.dropped.clone(),
        }
    }

    /// The rate used for planning: measured, or a neutral guess before any sample.
    fn planning_rate(&self) -> f64 {
        if self.rate > 0.0 {
            self.rate
        } else {
            1e6
        }
    }
}

struct Sched {
    wants: Vec<Want>,
    index: HashMap<Fingerprint, usize>,
    state: Vec<ChunkState>,
    /// Peers (bitmask) a chunk is in flight at.
    holders: Vec<u64>,
    /// Peers (bitmask) that said they do not hold a chunk.
    lacking: Vec<u64>,
    peers: Vec<PeerState>,
    /// Chunks neither done nor given up.
    remaining: usize,
    /// Of those, the ones that are not optional: at 0, the optional ones
    /// still queued are given up.
    required_left: usize,
    /// When the last chunk that is not optional was stored.
    required_done: Option<Instant>,
    stored_bytes: u64,
    fatal: Option<String>,
    min_window: u64,
    max_window: u64,
    initial_window: u64,
    window_secs: f64,
    /// Wire bytes of the deltas stored so far, and the chunks' whole length.
    delta_wire: u64,
    delta_whole: u64,
}

struct Shared {
    state: Mutex<Sched>,
    wake: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Sched> {
        // A panic while holding the lock is a bug in this module; the state
        // itself stays consistent enough to report, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sched {
    fn new(addrs: &[SocketAddr], wants: Vec<ChunkWant>, opts: &FetchOptions) -> Self {
        let all: u64 = if addrs.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << addrs.len()) - 1
        };
        let mut index = HashMap::new();
        let mut ws = Vec::new();
        for w in wants {
            if w.fp.is_zero_chunk() || index.contains_key(&w.fp) {
                continue;
            }
            let allowed = match &w.sources {
                None => all,
                Some(list) => addrs
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| list.contains(a))
                    .fold(0u64, |m, (i, _)| m | (1 << i)),
            };
            index.insert(w.fp, ws.len());
            ws.push(Want {
                fp: w.fp,
                len: w.len,
                allowed,
                optional: w.optional,
                base: w.base.filter(|b| !b.is_zero_chunk() && *b != w.fp),
            });
        }
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| PeerState {
                addr: *a,
                id: None,
                alive: true,
                queue: {
                    // Chunks fewer peers may serve first (stable: the
                    // caller's priority order within each group), so a
                    // peer spends itself on what only it can send before
                    // it takes shared work the others could do.
                    let mut q: Vec<usize> =
                        (0..ws.len()).filter(|&c| ws[c].allowed & (1 << i) != 0).collect();
                    q.sort_by_key(|&c| ws[c].allowed.count_ones());
                    q.into()
                },
                inflight: VecDeque::new(),
                inflight_bytes: 0,
                storing: Vec::new(),
                rate: 0.0,
                bytes: 0,
                chunks: 0,
                duplicates: 0,
                lacking: 0,
                zstd_chunks: 0,
                delta_chunks: 0,
                delta_saved_bytes: 0,
                fillers: 0,
                exclusive: 0,
                first_request: None,
                last_chunk: None,
                dropped: None,
            })
            .collect();
        let n = ws.len();
        let required_left = ws.iter().filter(|w| !w.optional).count();
        let mut s = Sched {
            state: vec![ChunkState::Queued; n],
            holders: vec![0; n],
            lacking: vec![0; n],
            index,
            wants: ws,
            peers,
            remaining: n,
            required_left,
            required_done: None,
            stored_bytes: 0,
            fatal: None,
            min_window: opts.min_window,
            max_window: opts.max_window,
            initial_window: opts.initial_window,
            window_secs: opts.window_time.as_secs_f64(),
            delta_wire: 0,
            delta_whole: 0,
        };
        for c in 0..n {
            if s.wants[c].allowed == 0 {
                s.give_up(c);
            }
        }
        s.settle_fillers();
        s
    }

    fn finished(&self) -> bool {
        self.remaining == 0 || self.fatal.is_some()
    }

    /// Marks chunk `c` as one nobody will send.
    fn give_up(&mut self, c: usize) {
        self.state[c] = ChunkState::Unavailable;
        self.remaining -= 1;
        if !self.wants[c].optional {
            self.required_left -= 1;
        }
    }

    /// Once no chunk that is not optional is queued or in flight, the
    /// optional ones still queued are left out.
    fn settle_fillers(&mut self) {
        if self.required_left > 0 {
            return;
        }
        for c in 0..self.wants.len() {
            if self.wants[c].optional && self.state[c] == ChunkState::Queued {
                self.give_up(c);
            }
        }
    }

    fn window(&self, p: usize) -> u64 {
        // A little of this path's goodput (100 ms by default) keeps it busy
        // without parking much work behind it.
        let rate = self.peers[p].rate;
        let by_rate = if rate > 0.0 {
            (rate * self.window_secs) as u64
        } else {
            self.initial_window
        };
        by_rate.clamp(self.min_window, self.max_window)
    }

    fn can_serve(&self, p: usize, c: usize) -> bool {
        let bit = 1u64 << p;
        self.wants[c].allowed & bit != 0 && self.lacking[c] & bit == 0
    }

    /// Chunks peer `p` should request now (possibly none).
    fn take_batch(&mut self, p: usize, max: usize) -> Vec<usize> {
        let window = self.window(p);
        let mut out = Vec::new();
        while out.len() < max && self.peers[p].inflight_bytes < window {
            let Some(c) = self.peers[p].queue.pop_front() else {
                break;
            };
            if self.state[c] != ChunkState::Queued || !self.can_serve(p, c) {
                continue;
            }
            self.assign(p, c);
            out.push(c);
        }
        if out.is_empty() && self.peers[p].inflight_bytes < window {
            if let Some(c) = self.steal_for(p) {
                self.assign(p, c);
                out.push(c);
            }
        }
        if !out.is_empty() && self.peers[p].first_request.is_none() {
            self.peers[p].first_request = Some(Instant::now());
        }
        out
    }

    fn assign(&mut self, p: usize, c: usize) {
        self.state[c] = ChunkState::InFlight;
        self.holders[c] |= 1 << p;
        let expected = self.expected_wire(c);
        self.peers[p].inflight.push_back((c, expected));
        self.peers[p].inflight_bytes += expected;
    }

    /// Bytes chunk `c` is expected to take on the wire: a chunk with a base
    /// may come as a delta, at the share of a whole chunk the deltas of this
    /// fetch took so far (half before the first). Charging its whole length
    /// against the window would leave the path idle between small answers
    /// (a pause's round ran at 8.8 MB/s of 11.9 so).
    fn expected_wire(&self, c: usize) -> u64 {
        let w = &self.wants[c];
        if w.base.is_none() {
            return w.len;
        }
        let share = if self.delta_whole > 0 {
            self.delta_wire as f64 / self.delta_whole as f64
        } else {
            0.5
        };
        ((w.len as f64 * share) as u64).max(1)
    }

    /// Tail stealing: with nothing left to request, take the chunk another
    /// peer would deliver last, if this peer would deliver it clearly sooner.
    fn steal_for(&self, p: usize) -> Option<usize> {
        let my_rate = self.peers[p].planning_rate();
        let mut best: Option<(f64, usize)> = None;
        for (q, peer) in self.peers.iter().enumerate() {
            if q == p || !peer.alive || peer.inflight.is_empty() {
                continue;
            }
            let their_finish = peer.inflight_bytes as f64 / peer.planning_rate();
            // Latest-requested chunk there that is still only at q and that p may serve.
            let Some(&(c, _)) = peer.inflight.iter().rev().find(|&&(c, _)| {
                self.state[c] == ChunkState::InFlight && self.holders[c] == 1 << q && self.can_serve(p, c)
            }) else {
                continue;
            };
            let my_finish = (self.peers[p].inflight_bytes + self.wants[c].len) as f64 / my_rate;
            if my_finish < 0.8 * their_finish && best.is_none_or(|(t, _)| their_finish > t) {
                best = Some((their_finish, c));
            }
        }
        best.map(|(_, c)| c)
    }

    /// Chunk `c` arrived from `p`: it no longer counts against the window,
    /// but stays `p`'s until stored. False if `p` was not asked for it.
    fn arrived(&mut self, p: usize, c: usize) -> bool {
        let peer = &mut self.peers[p];
        let Some(pos) = peer.inflight.iter().position(|&(x, _)| x == c) else {
            return false;
        };
        let charged = peer.inflight.remove(pos).map_or(0, |(_, b)| b);
        peer.inflight_bytes = peer.inflight_bytes.saturating_sub(charged);
        peer.storing.push(c);
        true
    }

    /// Forgets chunk `c` from peer `p` (requested or arrived).
    fn release(&mut self, p: usize, c: usize) {
        self.arrived(p, c);
        let peer = &mut self.peers[p];
        if let Some(pos) = peer.storing.iter().position(|&x| x == c) {
            peer.storing.swap_remove(pos);
        }
        self.holders[c] &= !(1 << p);
    }

    /// Puts `c` back for other peers, or marks it unavailable if none may serve it.
    fn requeue(&mut self, c: usize) {
        if self.state[c] != ChunkState::InFlight || self.holders[c] != 0 {
            return;
        }
        let mut any = false;
        for q in 0..self.peers.len() {
            if self.peers[q].alive && self.can_serve(q, c) {
                self.peers[q].queue.push_front(c);
                any = true;
            }
        }
        if any {
            self.state[c] = ChunkState::Queued;
        } else {
            self.give_up(c);
        }
    }

    /// The base of chunk `c` could not be read here (evicted, damaged):
    /// `c` goes back to the queues, to be asked for whole.
    fn base_unusable(&mut self, p: usize, c: usize, wire_len: u64) {
        self.wants[c].base = None;
        self.peers[p].bytes += wire_len;
        self.release(p, c);
        self.requeue(c);
    }

    fn chunk_lacking(&mut self, p: usize, c: usize) {
        self.peers[p].lacking += 1;
        self.lacking[c] |= 1 << p;
        self.release(p, c);
        self.requeue(c);
        self.settle_fillers();
    }

    fn chunk_stored(&mut self, p: usize, c: usize, wire_len: u64, encoding: Encoding) {
        self.release(p, c);
        let peer = &mut self.peers[p];
        peer.bytes += wire_len;
        peer.last_chunk = Some(Instant::now());
        if self.state[c] == ChunkState::Done {
            peer.duplicates += 1;
            return;
        }
        peer.chunks += 1;
        match encoding {
            Encoding::Raw => {}
            Encoding::Zstd => peer.zstd_chunks += 1,
            Encoding::Delta => {
                peer.delta_chunks += 1;
                peer.delta_saved_bytes += self.wants[c].len.saturating_sub(wire_len);
                self.delta_wire += wire_len;
                self.delta_whole += self.wants[c].len;
            }
        }
        if self.wants[c].optional {
            peer.fillers += 1;
        }
        if self.wants[c].allowed.count_ones() == 1 {
            peer.exclusive += 1;
        }
        self.state[c] = ChunkState::Done;
        self.remaining -= 1;
        self.stored_bytes += self.wants[c].len;
        if !self.wants[c].optional {
            self.required_left -= 1;
            if self.required_left == 0 {
                self.required_done = Some(Instant::now());
            }
            self.settle_fillers();
        }
        // Copies still in flight elsewhere (stolen) are now surplus; their
        // windows free up when they arrive.
    }

    fn peer_dead(&mut self, p: usize, reason: Option<String>) {
        if !self.peers[p].alive {
            return;
        }
        self.peers[p].alive = false;
        if self.peers[p].dropped.is_none() {
            self.peers[p].dropped = reason;
        }
        let mut held: Vec<usize> = self.peers[p].inflight.iter().map(|&(c, _)| c).collect();
        held.extend(self.peers[p].storing.iter().copied());
        // Requeueing pushes to the front: go from the lowest priority up so
        // the others' queues keep the caller's order.
        held.sort_unstable_by(|a, b| b.cmp(a));
        for c in held {
            self.release(p, c);
            self.requeue(c);
        }
        // Queued chunks only this peer could serve are now unavailable.
        let queued: Vec<usize> = self.peers[p].queue.drain(..).collect();
        for c in queued {
            if self.state[c] == ChunkState::Queued
                && !(0..self.peers.len()).any(|q| self.peers[q].alive && self.can_serve(q, c))
            {
                self.give_up(c);
            }
        }
        self.settle_fillers();
    }
}

struct PeerCtx {
    index: usize,
    addr: SocketAddr,
    key: ClusterKey,
    opts: FetchOptions,
    sched: Arc<Shared>,
    progress: Arc<FetchProgress>,
    writer: std::sync::mpsc::Sender<WriteJob>,
    pool: Arc<BufPool>,
    /// This fetch's store, where the bases of deltas are read.
    store: Arc<LocalStore>,
    conns: Option<Arc<ConnPool>>,
}

/// How a chunk's bytes came on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Raw,
    Zstd,
    /// The blocks that differ from the chunk's base (`ChunkWant::base`).
    Delta,
}

/// Outcome of verifying and storing one received chunk.
struct Stored {
    c: usize,
    wire_len: u64,
    encoding: Encoding,
    result: Result<(), TransferError>,
}

/// Runs one peer until the fetch is finished or the peer fails; returns why
/// it was dropped (None: finished normally).
async fn run_peer(ctx: &PeerCtx) -> Option<String> {
    if ctx.sched.lock().finished() {
        return None;
    }
    let (sock, peer_id) = match checkout(ctx.conns.as_deref(), ctx.addr, &ctx.key, &ctx.opts).await {
        Ok(x) => x,
        Err(e) => {
            warn!(peer = %ctx.addr, error = %e, "peer unavailable for this fetch");
            return Some(e.to_string());
        }
    };
    ctx.sched.lock().peers[ctx.index].id = Some(peer_id.clone());
    let label = ctx.addr.to_string();
    let (mut rd, mut wr) = sock.into_split();
    let received = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame, TransferError>>(8);
    let rx_counter = received.clone();
    let reader_pool = ctx.pool.clone();
    // Told to stop (the fetch is over and nothing is outstanding on the
    // connection, so no frame is on its way), the reader hands its half
    // back for the connection to be kept.
    let (stop_reader, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        loop {
            let buf = reader_pool.take();
            let r = tokio::select! {
                biased;
                _ = &mut stopped => return Some(rd),
                r = read_frame_into(&mut rd, MAX_FRAME_LEN, Some(&rx_counter), buf) => r,
            };
            let stop = r.is_err();
            if tx.send(r).await.is_err() || stop {
                return None;
            }
        }
    });
    let mut reader = AbortOnDrop(Some(reader));

    let mut stores: JoinSet<Stored> = JoinSet::new();
    let mut request_id = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = 0u64;
    let mut last_progress = Instant::now();
    let mut rate_mark = (Instant::now(), 0u64);

    loop {
        // Request more while the window allows.
        let (batch, rate, finished, idle) = {
            let mut s = ctx.sched.lock();
            let batch = if s.finished() {
                Vec::new()
            } else {
                s.take_batch(ctx.index, ctx.opts.batch)
            };
            // Chunks with a base go in a delta request of their own; the
            // server answers both in the order they were sent.
            let mut plain = Vec::new();
            let mut based = Vec::new();
            for &c in &batch {
                let w = &s.wants[c];
                match w.base {
                    Some(base) => based.push(wire::BasedAsk { want: w.fp, base }),
                    None => plain.push(w.fp),
                }
            }
            let peer = &s.peers[ctx.index];
            (
                (plain, based),
                peer.rate as u64,
                s.finished(),
                peer.inflight.is_empty(),
            )
        };
        let (plain, based) = batch;
        if !plain.is_empty() || !based.is_empty() {
            let mut frames = Vec::new();
            let zstd = ctx.opts.zstd;
            let mut next_id = || {
                request_id += 1;
                request_id
            };
            if !plain.is_empty() {
                frames.extend(wire::encode_chunk_request(next_id(), zstd, rate, &plain));
            }
            if !based.is_empty() {
                frames.extend(wire::encode_delta_request(next_id(), zstd, rate, &based));
            }
            if let Err(e) = wr.write_all(&frames).await {
                return Some(format!("sending a request: {e}"));
            }
            last_progress = Instant::now();
            continue;
        }
        if finished && stores.is_empty() {
            let clean = ctx.sched.lock().peers[ctx.index].inflight.is_empty();
            if clean && ctx.conns.is_some() {
                if let Some(handle) = reader.0.take() {
                    let _ = stop_reader.send(());
                    if let Ok(Some(rd)) = handle.await {
                        if let Ok(sock) = rd.reunite(wr) {
                            checkin(ctx.conns.as_deref(), ctx.addr, sock, peer_id);
                        }
                    }
                }
            }
            return None;
        }
        if idle && stores.is_empty() {
            // Nothing to do until another peer fails or finishes.
            let notified = ctx.sched.wake.notified();
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            last_progress = Instant::now();
            continue;
        }
        tokio::select! {
            msg = rx.recv() => {
                let frame = match msg {
                    Some(Ok(f)) => f,
                    Some(Err(TransferError::Closed)) | None => return Some("connection closed".into()),
                    Some(Err(e)) => return Some(e.to_string()),
                };
                if let Err(reason) = on_frame(ctx, &label, frame, &mut stores) {
                    return Some(reason);
                }
            }
            Some(joined) = stores.join_next(), if !stores.is_empty() => {
                let Ok(done) = joined else {
                    return Some("storing a chunk panicked".into());
                };
                match done.result {
                    Ok(()) => {
                        let mut s = ctx.sched.lock();
                        let was_done = s.state[done.c] == ChunkState::Done;
                        let len = s.wants[done.c].len;
                        s.chunk_stored(ctx.index, done.c, done.wire_len, done.encoding);
                        if s.finished() {
                            ctx.sched.wake.notify_waiters();
                        }
                        drop(s);
                        metrics::counter!("edgeshift_received_bytes_total", "peer" => label.clone()).increment(done.wire_len);
                        if !was_done {
                            metrics::counter!("edgeshift_received_chunks_total", "peer" => label.clone()).increment(1);
                            ctx.progress.bytes.fetch_add(len, Ordering::Relaxed);
                            ctx.progress.chunks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(TransferError::Store(StoreError::ChunkRejected { fp, actual })) => {
                        metrics::counter!("edgeshift_verification_failures_total", "peer" => label.clone()).increment(1);
                        warn!(peer = %ctx.addr, chunk = %fp, got = %actual, "peer sent wrong bytes; dropped for this fetch");
                        return Some(format!("sent wrong bytes for chunk {fp}"));
                    }
                    Err(e @ TransferError::BaseUnavailable { .. }) => {
                        warn!(peer = %ctx.addr, error = %e, "delta not usable");
                        ctx.sched.lock().base_unusable(ctx.index, done.c, done.wire_len);
                        ctx.sched.wake.notify_waiters();
                    }
                    Err(TransferError::BadChunk { fp, reason }) => {
                        metrics::counter!("edgeshift_verification_failures_total", "peer" => label.clone()).increment(1);
                        warn!(peer = %ctx.addr, chunk = %fp, %reason, "peer sent a bad chunk; dropped for this fetch");
                        return Some(format!("bad chunk {fp}: {reason}"));
                    }
                    Err(e) => {
                        // The local store failed (disk full, I/O error): no peer can fix that.
                        let mut s = ctx.sched.lock();
                        s.fatal.get_or_insert_with(|| e.to_string());
                        drop(s);
                        ctx.sched.wake.notify_waiters();
                        return Some(format!("local store failed: {e}"));
                    }
                }
            }
            _ = tick.tick() => {
                let now_seen = received.load(Ordering::Relaxed);
                let now = Instant::now();
                if now_seen != last_seen {
                    last_seen = now_seen;
                    last_progress = now;
                } else if !idle && now - last_progress > ctx.opts.stall_timeout {
                    warn!(peer = %ctx.addr, "peer stalled; dropped for this fetch");
                    return Some(format!("stalled: nothing received for {:?}", ctx.opts.stall_timeout));
                }
                // Goodput sample every tick (~100 ms) while busy.
                let dt = (now - rate_mark.0).as_secs_f64();
                if dt >= 0.09 {
                    let sample = (now_seen - rate_mark.1) as f64 / dt;
                    let mut s = ctx.sched.lock();
                    let peer = &mut s.peers[ctx.index];
                    if !idle && sample > 0.0 {
                        peer.rate = if peer.rate == 0.0 { sample } else { 0.5 * peer.rate + 0.5 * sample };
                    }
                    rate_mark = (now, now_seen);
                }
            }
        }
        if ctx.sched.lock().fatal.is_some() {
            return Some("fetch aborted".into());
        }
    }
}

/// Handles one frame from a peer; an error string drops the peer.
fn on_frame(ctx: &PeerCtx, label: &str, frame: Frame, stores: &mut JoinSet<Stored>) -> Result<(), String> {
    match frame.kind {
        FrameKind::Chunk => {
            let (head, _) = wire::decode_chunk(&frame.body).map_err(|e| e.to_string())?;
            let fp = head.fingerprint;
            let zstd = frame.header.flags() & wire::FLAG_ZSTD != 0;
            let wire_len = (frame.body.len() - wire::CHUNK_HEAD_LEN) as u64;
            let encoding = if zstd { Encoding::Zstd } else { Encoding::Raw };
            let Some((c, want_len)) = book_arrival(ctx, label, &fp, None, wire_len, encoding)? else {
                return Ok(());
            };
            let raw_len = head.raw_len.get();
            spawn_store(ctx, stores, c, fp, wire_len, encoding, move || {
                verify(&fp, want_len, raw_len, zstd, frame.body, wire::CHUNK_HEAD_LEN)
            });
            Ok(())
        }
        FrameKind::Delta => {
            let (head, _, _) = wire::decode_delta(&frame.body).map_err(|e| e.to_string())?;
            let fp = head.fingerprint;
            let wire_len = (frame.body.len() - wire::DELTA_HEAD_LEN) as u64;
            let arrival = book_arrival(ctx, label, &fp, Some(&head.base), wire_len, Encoding::Delta)?;
            let Some((c, want_len)) = arrival else {
                return Ok(());
            };
            let store = ctx.store.clone();
            spawn_store(ctx, stores, c, fp, wire_len, Encoding::Delta, move || {
                rebuild(&store, &fp, want_len, &head.base, &frame.body)
            });
            Ok(())
        }
        FrameKind::Missing => {
            let fp = wire::decode_fingerprint(frame.kind, &frame.body).map_err(|e| e.to_string())?;
            let mut s = ctx.sched.lock();
            let Some(&c) = s.index.get(&fp) else {
                return Err(format!("reported chunk {fp} missing, which was never requested"));
            };
            debug!(peer = %ctx.addr, chunk = %fp, "peer lacks chunk");
            s.chunk_lacking(ctx.index, c);
            drop(s);
            ctx.sched.wake.notify_waiters();
            Ok(())
        }
        _ => {
            let e = unexpected(&frame);
            info!(peer = %ctx.addr, error = %e, "peer ended the session");
            Err(e.to_string())
        }
    }
}

/// Books chunk `fp` arriving from this peer (as a delta against `base`,
/// if given): its index and expected length, or None when another peer's
/// copy already won (the window is freed, the bytes counted). An error
/// names how the peer broke the protocol.
fn book_arrival(
    ctx: &PeerCtx,
    label: &str,
    fp: &Fingerprint,
    base: Option<&Fingerprint>,
    wire_len: u64,
    encoding: Encoding,
) -> Result<Option<(usize, u64)>, String> {
    let mut s = ctx.sched.lock();
    let Some(&c) = s.index.get(fp) else {
        return Err(format!("sent chunk {fp}, which was never requested"));
    };
    if let Some(b) = base {
        if s.wants[c].base != Some(*b) {
            return Err(format!(
                "sent a delta for chunk {fp} against a base it was not given"
            ));
        }
    }
    if !s.arrived(ctx.index, c) {
        return Err(format!("sent chunk {fp}, which was not requested from it"));
    }
    if s.state[c] == ChunkState::Done {
        s.chunk_stored(ctx.index, c, wire_len, encoding);
        drop(s);
        metrics::counter!("edgeshift_received_bytes_total", "peer" => label.to_string()).increment(wire_len);
        return Ok(None);
    }
    Ok(Some((c, s.wants[c].len)))
}

/// Verifies a received chunk off the async workers (`check` returns the
/// buffer holding it and where it starts), hands it to the writer thread
/// and reports the outcome in `stores`.
fn spawn_store(
    ctx: &PeerCtx,
    stores: &mut JoinSet<Stored>,
    c: usize,
    fp: Fingerprint,
    wire_len: u64,
    encoding: Encoding,
    check: impl FnOnce() -> Result<(Vec<u8>, usize), TransferError> + Send + 'static,
) {
    let writer = ctx.writer.clone();
    stores.spawn(async move {
        let result = match tokio::task::spawn_blocking(check).await {
            Ok(Ok((buf, start))) => {
                let (done, wait) = tokio::sync::oneshot::channel();
                if writer.send(WriteJob { fp, buf, start, done }).is_err() {
                    Err(TransferError::WriterStopped)
                } else {
                    match wait.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(TransferError::Store(e)),
                        Err(_) => Err(TransferError::WriterStopped),
                    }
                }
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransferError::BadChunk {
                fp,
                reason: "verification panicked".into(),
            }),
        };
        Stored {
            c,
            wire_len,
            encoding,
            result,
        }
    });
}

/// Rebuilds chunk `fp` from a delta body against `base`, read (and
/// checked) from this store, then checks the result's fingerprint: a wrong
/// delta is a bad chunk from the peer; a base this store cannot read is a
/// local failure.
fn rebuild(
    store: &LocalStore,
    fp: &Fingerprint,
    want_len: u64,
    base: &Fingerprint,
    body: &[u8],
) -> Result<(Vec<u8>, usize), TransferError> {
    let bad = |reason: String| TransferError::BadChunk { fp: *fp, reason };
    let (head, bitmap, payload) = wire::decode_delta(body).map_err(|e| bad(e.to_string()))?;
    check_announced(fp, head.raw_len.get(), want_len)?;
    let mut buf = vec![0u8; want_len as usize];
    // A base whose length differs from the chunk's fails the read (its
    // length is checked), like a corrupt one.
    store
        .read_chunk_into(base, &mut buf)
        .map_err(|e| TransferError::BaseUnavailable {
            fp: *fp,
            base: *base,
            reason: e.to_string(),
        })?;
    edgeshift_common::delta::apply(&mut buf, bitmap, payload).map_err(|e| bad(format!("delta: {e}")))?;
    check_fingerprint(fp, &buf)?;
    Ok((buf, 0))
}

/// A payload announcing another length than the manifest's is a bad chunk.
fn check_announced(fp: &Fingerprint, raw_len: u32, want_len: u64) -> Result<(), TransferError> {
    if raw_len as u64 == want_len {
        return Ok(());
    }
    Err(TransferError::BadChunk {
        fp: *fp,
        reason: format!("announced {raw_len} bytes, the manifest says {want_len}"),
    })
}

/// Bytes that do not hash to the fingerprint asked for are rejected.
fn check_fingerprint(fp: &Fingerprint, bytes: &[u8]) -> Result<(), TransferError> {
    // Single-threaded BLAKE3 (SIMD within the chunk): for chunks of at most a
    // few MiB, fanning out to rayon costs more than it saves on a busy host.
    let actual = Fingerprint::of(bytes);
    if actual != *fp {
        return Err(TransferError::Store(StoreError::ChunkRejected {
            fp: *fp,
            actual,
        }));
    }
    Ok(())
}

/// Checks a received chunk against the manifest's length and its
/// fingerprint (decompressing first if needed). Returns the buffer holding
/// the chunk and where the chunk starts in it (no copy for raw payloads).
fn verify(
    fp: &Fingerprint,
    want_len: u64,
    raw_len: u32,
    zstd: bool,
    body: Vec<u8>,
    head_len: usize,
) -> Result<(Vec<u8>, usize), TransferError> {
    let bad = |reason: String| TransferError::BadChunk { fp: *fp, reason };
    check_announced(fp, raw_len, want_len)?;
    let (buf, start) = if zstd {
        // Bounded by the manifest's length, so a zstd bomb cannot grow past it.
        let raw = zstd::bulk::decompress(&body[head_len..], want_len as usize)
            .map_err(|e| bad(format!("zstd: {e}")))?;
        (raw, 0)
    } else {
        (body, head_len)
    };
    let bytes = &buf[start..];
    if bytes.len() as u64 != want_len {
        return Err(bad(format!(
            "{} bytes, the manifest says {want_len}",
            bytes.len()
        )));
    }
    check_fingerprint(fp, bytes)?;
    Ok((buf, start))
}

/// A verified chunk for the writer thread, and where to report its outcome.
struct WriteJob {
    fp: Fingerprint,
    /// The chunk is `buf[start..]`.
    buf: Vec<u8>,
    start: usize,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Longest a received chunk waits before its batch is made durable.
const COMMIT_DELAY: Duration = Duration::from_millis(100);

/// Makes verified chunks durable in batches ([`LocalStore::batch`]: one
/// parallel sync per batch instead of one per chunk). A chunk counts as
/// fetched only once its batch is committed, so an interrupted fetch never
/// believes it has a chunk that is not on disk. Staging the next batch
/// overlaps with committing the previous one (a second, scoped thread).
fn writer_thread(store: Arc<LocalStore>, rx: std::sync::mpsc::Receiver<WriteJob>, pool: Arc<BufPool>) {
    use std::sync::mpsc::RecvTimeoutError;
    type Waiting = Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>;
    let store: &LocalStore = &store;
    std::thread::scope(|scope| {
        let (commit_tx, commit_rx) =
            std::sync::mpsc::sync_channel::<(crate::store::local::ChunkBatch<'_>, Waiting)>(1);
        scope.spawn(move || {
            for (mut batch, waiting) in commit_rx {
                let t = Instant::now();
                let n = batch.len();
                let result = batch.commit();
                debug!(
                    chunks = n,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "chunk batch committed"
                );
                match result {
                    Ok(_) => {
                        for d in waiting {
                            let _ = d.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        let text = e.to_string();
                        for d in waiting {
                            let _ = d.send(Err(StoreError::Io {
                                op: "commit chunk batch",
                                path: store.root().to_path_buf(),
                                source: std::io::Error::other(text.clone()),
                            }));
                        }
                    }
                }
            }
        });
        while let Ok(first) = rx.recv() {
            let mut batch = store.batch();
            let mut stage_time = Duration::ZERO;
            let mut waiting = Vec::new();
            let started = Instant::now();
            let mut next = Some(first);
            loop {
                if let Some(job) = next.take() {
                    let t = Instant::now();
                    let staged = batch.stage(&job.fp, &job.buf[job.start..]);
                    stage_time += t.elapsed();
                    pool.put(job.buf);
                    match staged {
                        Ok(()) => waiting.push(job.done),
                        Err(e) => {
                            let _ = job.done.send(Err(e));
                        }
                    }
                }
                if batch.is_full() || started.elapsed() >= COMMIT_DELAY {
                    break;
                }
                // Commit as soon as the stream pauses, so the tail is not delayed.
                match rx.recv_timeout(Duration::from_millis(2)) {
                    Ok(job) => next = Some(job),
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            debug!(
                chunks = batch.len(),
                stage_ms = stage_time.as_secs_f64() * 1e3,
                "chunk batch staged"
            );
            if commit_tx.send((batch, waiting)).is_err() {
                return;
            }
        }
    });
}

/// Receive buffers handed back by the writer once their chunk is staged.
#[derive(Default)]
struct BufPool(Mutex<(Vec<Vec<u8>>, usize)>);

impl BufPool {
    /// Most bytes of spare buffers kept (a few fast windows' worth).
    const MAX_BYTES: usize = 64 << 20;

    fn take(&self) -> Vec<u8> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match g.0.pop() {
            Some(buf) => {
                g.1 -= buf.capacity();
                buf
            }
            None => Vec::new(),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 + buf.capacity() <= Self::MAX_BYTES {
            g.1 += buf.capacity();
            g.0.push(buf);
        }
    }
}

/// A task aborted when its owner is dropped, unless taken out first.
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16)))
            .collect()
    }

    fn wants(n: usize, len: u64) -> Vec<ChunkWant> {
        (0..n)
            .map(|i| ChunkWant {
                optional: false,
                fp: Fingerprint::of(&(i as u64).to_le_bytes()),
                len,
                sources: None,
                base: None,
            })
            .collect()
    }

    fn opts() -> FetchOptions {
        FetchOptions {
            min_window: 100,
            max_window: 1000,
            initial_window: 300,
            ..FetchOptions::default()
        }
    }

    #[test]
    fn chunks_that_may_come_as_deltas_are_charged_at_the_measured_share() {
        let mut w = wants(20, 100);
        for x in &mut w {
            x.base = Some(Fingerprint::of(b"earlier version"));
        }
        let mut s = Sched::new(&addrs(1), w, &opts());
        // Before any delta: half a chunk each, so the 300-byte initial
        // window asks for 6 where whole chunks would be 3.
        assert_eq!(s.take_batch(0, 32), vec![0, 1, 2, 3, 4, 5]);
        // A delta of 10 bytes of 100: the next are charged 10 each.
        assert!(s.arrived(0, 0));
        s.chunk_stored(0, 0, 10, Encoding::Delta);
        assert_eq!(s.peers[0].delta_chunks, 1);
        assert_eq!(s.peers[0].delta_saved_bytes, 90);
        assert_eq!(s.expected_wire(6), 10);
        // 5 still in flight at 50: 250 charged; 5 more fit under 300.
        assert_eq!(s.take_batch(0, 32).len(), 5);
        // A chunk without a base is charged whole.
        let plain = Sched::new(&addrs(1), wants(2, 100), &opts());
        assert_eq!(plain.expected_wire(0), 100);
    }

    #[test]
    fn windows_follow_measured_rates_and_work_is_shared_in_order() {
        let mut s = Sched::new(&addrs(2), wants(20, 100), &opts());
        // Unmeasured: the initial window (3 chunks of 100 bytes).
        assert_eq!(s.take_batch(0, 32), vec![0, 1, 2]);
        assert_eq!(s.take_batch(1, 32), vec![3, 4, 5]);
        // Full windows take nothing more.
        assert!(s.take_batch(0, 32).is_empty());
        // Peer 1 measured 10x faster: its window grows to the cap.
        s.peers[1].rate = 10_000.0;
        s.peers[0].rate = 1_000.0;
        assert_eq!(s.take_batch(1, 32).len(), 7);
        // Arrival frees window; storing completes the chunk.
        assert!(s.arrived(0, 0));
        assert!(!s.arrived(0, 0), "a chunk arrives once");
        s.chunk_stored(0, 0, 100, Encoding::Raw);
        assert_eq!(s.state[0], ChunkState::Done);
        assert_eq!(s.remaining, 19);
        assert_eq!(s.peers[0].chunks, 1);
    }

    #[test]
    fn a_peer_takes_what_only_it_holds_before_shared_chunks() {
        let a = addrs(2);
        let mut w = wants(8, 100);
        // Chunks 5..8 are held by peer 0 alone (as a migration's source
        // alone holds what the guest wrote); 0..5 by both.
        for x in &mut w[5..] {
            x.sources = Some(vec![a[0]]);
        }
        let mut s = Sched::new(&a, w, &opts());
        assert_eq!(s.take_batch(0, 32), vec![5, 6, 7], "peer 0 starts with its own");
        assert_eq!(
            s.take_batch(1, 32),
            vec![0, 1, 2],
            "peer 1 takes the shared ones in order"
        );
    }

    #[test]
    fn optional_chunks_fill_the_tail_and_are_left_out_after_it() {
        let a = addrs(2);
        let mut w = wants(6, 100);
        // 0..3 required, 3..6 filler; chunk 0 only at peer 1.
        w[0].sources = Some(vec![a[1]]);
        for x in &mut w[3..] {
            x.optional = true;
        }
        let mut s = Sched::new(&a, w, &opts());
        // Peer 0 takes its required share, then fills with optional chunks
        // while peer 1 still has required work on its way.
        assert_eq!(s.take_batch(1, 1), vec![0]);
        assert_eq!(s.take_batch(0, 32), vec![1, 2, 3]);
        for c in [1, 2, 3] {
            assert!(s.arrived(0, c));
            s.chunk_stored(0, c, 100, Encoding::Raw);
        }
        assert_eq!(
            s.take_batch(0, 32),
            vec![4, 5],
            "filler while chunk 0 is on its way"
        );
        // Chunk 4 arrives; then chunk 0, the last required one: the filler
        // still in flight (5) completes, nothing more is asked for.
        assert!(s.arrived(0, 4));
        s.chunk_stored(0, 4, 100, Encoding::Raw);
        assert!(s.arrived(1, 0));
        s.chunk_stored(1, 0, 100, Encoding::Raw);
        assert!(!s.finished(), "5 is still on its way");
        assert!(s.arrived(0, 5));
        s.chunk_stored(0, 5, 100, Encoding::Raw);
        assert!(s.finished());

        // Required work done before the filler was asked for: left out.
        let mut w = wants(4, 100);
        for x in &mut w[2..] {
            x.optional = true;
        }
        let mut s = Sched::new(&addrs(1), w, &opts());
        assert_eq!(s.take_batch(0, 2), vec![0, 1]);
        for c in [0, 1] {
            assert!(s.arrived(0, c));
            s.chunk_stored(0, c, 100, Encoding::Raw);
        }
        assert!(s.finished());
        assert_eq!(s.state[2], ChunkState::Unavailable);
        assert_eq!(s.state[3], ChunkState::Unavailable);
        // Only optional chunks: nothing to fill, all left out at once.
        let mut w = wants(2, 100);
        for x in &mut w {
            x.optional = true;
        }
        assert!(Sched::new(&addrs(1), w, &opts()).finished());
    }

    #[test]
    fn a_dead_peer_returns_its_chunks_and_a_lacking_chunk_moves_on() {
        let mut s = Sched::new(&addrs(2), wants(6, 100), &opts());
        let a = s.take_batch(0, 32);
        assert_eq!(a, vec![0, 1, 2]);
        // Chunk 1 arrived and is being stored when peer 0 dies.
        assert!(s.arrived(0, 1));
        s.peer_dead(0, Some("killed".into()));
        for c in [0, 1, 2] {
            assert_eq!(s.state[c], ChunkState::Queued, "chunk {c} requeued");
        }
        // Peer 1 gets them first, in the caller's order.
        let b = s.take_batch(1, 32);
        assert_eq!(b, vec![0, 1, 2]);
        // Peer 1 lacks chunk 0: nobody else is alive, so it is unavailable.
        s.chunk_lacking(1, 0);
        assert_eq!(s.state[0], ChunkState::Unavailable);
        assert_eq!(s.remaining, 5);
        assert_eq!(s.peers[0].dropped.as_deref(), Some("killed"));
    }

    #[test]
    fn per_chunk_sources_restrict_and_idle_fast_peers_steal_the_tail() {
        let a = addrs(2);
        let mut w = wants(4, 100);
        w[0].sources = Some(vec![a[1]]);
        w[1].sources = Some(vec![a[1]]);
        w[3].sources = Some(vec!["10.0.0.1:1".parse().expect("addr")]);
        let mut s = Sched::new(&a, w, &opts());
        // Chunk 3's only source is not a peer: unavailable from the start.
        assert_eq!(s.state[3], ChunkState::Unavailable);
        assert_eq!(s.take_batch(0, 32), vec![2]);
        assert_eq!(s.take_batch(1, 32), vec![0, 1]);
        // Peer 0 is idle and much faster: it steals the chunk peer 1 would
        // deliver last, but never one it may not serve.
        s.peers[0].rate = 1e6;
        s.peers[1].rate = 10.0;
        s.arrived(0, 2);
        s.chunk_stored(0, 2, 100, Encoding::Raw);
        assert!(s.take_batch(0, 32).is_empty(), "0 and 1 are restricted to peer 1");

        let mut s = Sched::new(&a, wants(4, 100), &opts());
        assert_eq!(s.take_batch(1, 32), vec![0, 1, 2]);
        assert_eq!(s.take_batch(0, 32), vec![3]);
        s.peers[0].rate = 1e6;
        s.peers[1].rate = 10.0;
        s.arrived(0, 3);
        s.chunk_stored(0, 3, 100, Encoding::Raw);
        assert_eq!(
            s.take_batch(0, 32),
            vec![2],
            "steals the latest request at the slow peer"
        );
        // The stolen copy wins; the slow copy is a duplicate when it arrives.
        s.arrived(0, 2);
        s.chunk_stored(0, 2, 100, Encoding::Raw);
        assert!(s.arrived(1, 2));
        s.chunk_stored(1, 2, 100, Encoding::Raw);
        assert_eq!(s.peers[1].duplicates, 1);
        assert_eq!(s.peers[1].chunks, 0);
    }

    #[test]
    fn verify_rejects_wrong_lengths_bytes_and_bad_zstd() {
        let data = vec![7u8; 4096];
        let fp = Fingerprint::of(&data);
        let mut body = vec![0u8; wire::CHUNK_HEAD_LEN];
        body.extend_from_slice(&data);
        let (buf, start) = verify(&fp, 4096, 4096, false, body.clone(), wire::CHUNK_HEAD_LEN).expect("valid");
        assert_eq!(&buf[start..], &data[..]);
        // Announced length differs from the manifest.
        assert!(matches!(
            verify(&fp, 4096, 4095, false, body.clone(), wire::CHUNK_HEAD_LEN),
            Err(TransferError::BadChunk { .. })
        ));
        // Payload shorter than the manifest says.
        assert!(matches!(
            verify(
                &fp,
                4096,
                4096,
                false,
                body[..body.len() - 1].to_vec(),
                wire::CHUNK_HEAD_LEN
            ),
            Err(TransferError::BadChunk { .. })
        ));
        // Right length, wrong bytes.
        let mut flipped = body.clone();
        flipped[wire::CHUNK_HEAD_LEN] ^= 1;
        assert!(matches!(
            verify(&fp, 4096, 4096, false, flipped, wire::CHUNK_HEAD_LEN),
            Err(TransferError::Store(StoreError::ChunkRejected { .. }))
        ));
        // zstd: round trip, garbage, and a bomb larger than the manifest allows.
        let mut z = vec![0u8; wire::CHUNK_HEAD_LEN];
        z.extend(zstd::bulk::compress(&data, 1).expect("compress"));
        let (buf, start) = verify(&fp, 4096, 4096, true, z, wire::CHUNK_HEAD_LEN).expect("zstd valid");
        assert_eq!(&buf[start..], &data[..]);
        let mut garbage = vec![0u8; wire::CHUNK_HEAD_LEN];
        garbage.extend_from_slice(b"not zstd at all");
        assert!(verify(&fp, 4096, 4096, true, garbage, wire::CHUNK_HEAD_LEN).is_err());
        let mut bomb = vec![0u8; wire::CHUNK_HEAD_LEN];
        bomb.extend(zstd::bulk::compress(&vec![7u8; 1 << 20], 1).expect("compress"));
        assert!(verify(&fp, 4096, 4096, true, bomb, wire::CHUNK_HEAD_LEN).is_err());
    }
}
