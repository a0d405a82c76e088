//! The agent daemon's background link to the coordinator.
//!
//! On (re)connect: register (address, capacity), publish local manifests,
//! report the full inventory with the local pins. Then every interval: a
//! delta (chunks added and removed since the last report, usage), and a poll
//! of the orders: GC drops are checked against the local pins under the pin
//! lock before deleting; prefetch orders run through the transfer fetcher,
//! one at a time, and their lease is released after. With a
//! [`HandoffRunner`] it also reports the VMs running here and starts the
//! handoffs ordered for them (each in threads of its own). A 404 "unknown edge"
//! (the coordinator restarted) or a lost connection leads to a reconnect.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeshift_common::{Fingerprint, ManifestId};

use super::client::{Client, Delta, Orders};
use super::handoff::{HandoffConfig, HandoffRunner};
use super::pins::{GcOutcome, LocalPins};
use super::CoordError;
use crate::store::{ChunkStore, ChunkUses, LocalStore};
use crate::transfer::fetch::{basis, ChunkWant, FetchOptions, Fetcher};
use crate::transfer::Trust;

#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This edge's id at the coordinator (the agent's node id).
    pub edge: String,
    /// Where peers reach this edge's chunk server.
    pub advertise: String,
    /// Bytes the store may use.
    pub capacity: u64,
    /// Time between heartbeats.
    pub interval: Duration,
}

/// What one step did (for logs and tests).
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub reconnected: bool,
    pub added: usize,
    pub removed: usize,
    pub gc: GcOutcome,
    pub prefetched_chunks: u64,
}

pub struct Link {
    client: Client,
    cfg: LinkConfig,
    store: Arc<LocalStore>,
    pins: LocalPins,
    trust: Option<Trust>,
    /// Chunks the coordinator has been told about; None = must (re)connect.
    reported: Option<HashSet<Fingerprint>>,
    published: HashSet<ManifestId>,
    /// Chunks this process is working on; GC never deletes them.
    busy: Arc<Mutex<HashSet<Fingerprint>>>,
    /// Chunks used here since the last heartbeat (served, or in an image
    /// newly pinned), reported as `accessed` for the LRU/LFU ranking.
    uses: Arc<ChunkUses>,
    /// Pins seen at the last heartbeat: a new pin is a VM or fetch starting
    /// to use that image here.
    seen_pins: HashSet<ManifestId>,
    rt: Option<tokio::runtime::Runtime>,
    /// Reports this edge's VMs and runs the handoffs ordered for them.
    handoffs: Option<HandoffRunner>,
}

/// The address peers should use: `listen`, or when it is a wildcard, this
/// host's address on the route to the coordinator.
pub fn advertise_addr(listen: SocketAddr, coordinator_url: &str) -> String {
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    let hostport = coordinator_url
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    // Connecting a UDP socket only looks the route up; nothing is sent.
    let route_from = |target: SocketAddr| {
        let s = UdpSocket::bind(("0.0.0.0", 0)).ok()?;
        s.connect(target).ok()?;
        s.local_addr().ok().map(|a| a.ip())
    };
    let mut ip = hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .and_then(route_from);
    if ip.is_none_or(|i| i.is_loopback()) {
        // The coordinator is on this host: peers still need a routable
        // address; take the one on the route into the edge network (the
        // 198.18.0.0/15 benchmarking range in tests).
        ip = route_from(SocketAddr::from(([198, 18, 0, 1], 9)))
            .filter(|i| !i.is_loopback())
            .or(ip);
    }
    match ip {
        Some(ip) => SocketAddr::new(ip, listen.port()).to_string(),
        None => listen.to_string(),
    }
}

impl Link {
    pub fn new(
        client: Client,
        cfg: LinkConfig,
        store: Arc<LocalStore>,
        trust: Option<Trust>,
    ) -> Result<Self, CoordError> {
        let pins = LocalPins::for_store(&store)?;
        Ok(Link {
            client,
            cfg,
            store,
            pins,
            trust,
            reported: None,
            published: HashSet::new(),
            busy: Arc::new(Mutex::new(HashSet::new())),
            uses: Arc::new(ChunkUses::new()),
            seen_pins: HashSet::new(),
            rt: None,
            handoffs: None,
        })
    }

    /// Reports this edge's VMs and carries out the handoffs ordered for them.
    pub fn with_handoffs(mut self, cfg: HandoffConfig) -> Self {
        self.handoffs = Some(HandoffRunner::new(cfg));
        self
    }

    /// Starts the handoffs ordered for this edge's VMs.
    fn start_handoffs(&mut self, orders: &Orders) {
        let Some(runner) = &mut self.handoffs else {
            return;
        };
        for o in &orders.handoffs {
            if let Err(e) = runner.start(o, &self.client, &self.cfg.advertise) {
                tracing::warn!(vm = %o.vm, id = o.id, error = %e, "starting the ordered handoff");
            }
        }
    }

    fn report_vms(&mut self) -> Result<(), CoordError> {
        if let Some(runner) = &self.handoffs {
            self.client.report_vms(&self.cfg.edge, &runner.report()?)?;
        }
        Ok(())
    }

    /// Where the chunk server notes the chunks it serves.
    pub fn uses(&self) -> Arc<ChunkUses> {
        self.uses.clone()
    }

    /// Records every chunk of images pinned since the last look as used.
    fn note_new_pins(&mut self) -> Result<(), CoordError> {
        let now: HashSet<ManifestId> = self.pins.list()?.into_iter().collect();
        let new: Vec<ManifestId> = now.difference(&self.seen_pins).copied().collect();
        for id in &new {
            match self.store.get_manifest(id) {
                Ok(m) => self.uses.record_all(&m.chunks),
                // Pinned before its manifest landed: counted when it is here.
                Err(e) => {
                    tracing::debug!(manifest = %id, error = %e, "pinned image not readable yet");
                    continue;
                }
            }
            self.seen_pins.insert(*id);
        }
        self.seen_pins.retain(|id| now.contains(id));
        Ok(())
    }

    /// The set GC must leave alone; other parts of the agent may add to it.
    pub fn busy(&self) -> Arc<Mutex<HashSet<Fingerprint>>> {
        self.busy.clone()
    }

    fn publish_new_manifests(&mut self) -> Result<(), CoordError> {
        for id in self.store.list_manifests()? {
            if self.published.contains(&id) {
                continue;
            }
            let m = self.store.get_manifest(&id)?;
            self.client.publish(&m)?;
            self.published.insert(id);
        }
        Ok(())
    }

    /// Register, publish, full inventory with pins.
    pub fn connect(&mut self) -> Result<(), CoordError> {
        self.client
            .register(&self.cfg.edge, &self.cfg.advertise, self.cfg.capacity)?;
        self.published.clear();
        self.publish_new_manifests()?;
        let chunks = self.store.list_chunks()?;
        let usage = self.store.stats()?.chunk_bytes;
        let pins = self.pins.list()?;
        // A pin whose manifest is not here cannot be published; report the rest.
        let pins: Vec<_> = pins.into_iter().filter(|p| self.published.contains(p)).collect();
        self.client.inventory(&self.cfg.edge, &chunks, usage, &pins)?;
        tracing::info!(
            edge = %self.cfg.edge,
            coordinator = %self.client.base(),
            chunks = chunks.len(),
            pins = pins.len(),
            "reported full inventory"
        );
        self.reported = Some(chunks.into_iter().collect());
        Ok(())
    }

    /// Sends what changed since the last report.
    pub fn heartbeat(&mut self) -> Result<(usize, usize), CoordError> {
        self.publish_new_manifests()?;
        let now: HashSet<Fingerprint> = self.store.list_chunks()?.into_iter().collect();
        let usage = self.store.stats()?.chunk_bytes;
        self.note_new_pins()?;
        let before = self.reported.get_or_insert_with(HashSet::new);
        let delta = Delta {
            added: now.difference(before).copied().collect(),
            removed: before.difference(&now).copied().collect(),
            accessed: self.uses.drain(),
            usage,
        };
        if let Err(e) = self.client.delta(&self.cfg.edge, &delta) {
            // Not reported: keep the uses for the next heartbeat.
            self.uses.record_all(&delta.accessed);
            return Err(e);
        }
        self.reported = Some(now);
        Ok((delta.added.len(), delta.removed.len()))
    }

    /// Carries out GC drops (after the local check) and prefetch orders.
    pub fn execute(&mut self, orders: &Orders) -> Result<(GcOutcome, u64), CoordError> {
        let mut gc = GcOutcome::default();
        if !orders.drop.is_empty() {
            let busy = self.busy.lock().map(|b| b.clone()).unwrap_or_default();
            gc = self.pins.collect(&self.store, &orders.drop, &busy)?;
            tracing::info!(
                removed = gc.removed.len(),
                kept = gc.kept_pinned.len(),
                policy = %orders.policy,
                "GC order carried out"
            );
        }
        let mut fetched = 0;
        if !orders.prefetch.is_empty() {
            let r = self.prefetch(orders);
            if let Some(lease) = orders.lease {
                if let Err(e) = self.client.release(lease) {
                    tracing::debug!(lease, error = %e, "releasing the prefetch lease");
                }
            }
            fetched = r?;
        }
        Ok((gc, fetched))
    }

    fn prefetch(&mut self, orders: &Orders) -> Result<u64, CoordError> {
        let Some(trust) = self.trust.clone() else {
            tracing::debug!("prefetch order ignored: no cluster key to talk to peers");
            return Ok(0);
        };
        let mut peers: Vec<SocketAddr> = Vec::new();
        let mut wants = Vec::new();
        for o in &orders.prefetch {
            // An earlier version of the image held here: its chunks come as
            // deltas from a holder of both (`transfer::fetch::basis`).
            let basis = match self.store.get_manifest(&o.manifest) {
                Ok(m) => basis::basis_for(&self.store, &m).unwrap_or_default(),
                Err(_) => basis::Basis::default(),
            };
            for c in &o.chunks {
                if self.store.has_chunk(&c.fp)? {
                    continue;
                }
                let addr = c
                    .addr
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| CoordError::BadPeer {
                        addr: c.addr.clone(),
                        reason: "does not resolve".into(),
                    })?;
                if !peers.contains(&addr) {
                    peers.push(addr);
                }
                wants.push(ChunkWant {
                    optional: false,
                    base: basis.base_of(&c.fp),
                    fp: c.fp,
                    len: c.bytes,
                    sources: Some(vec![addr]),
                });
            }
        }
        if wants.is_empty() {
            return Ok(0);
        }
        if let Ok(mut b) = self.busy.lock() {
            b.extend(wants.iter().map(|w| w.fp));
        }
        let fps: Vec<Fingerprint> = wants.iter().map(|w| w.fp).collect();
        let fetcher = Fetcher::with_options(self.store.clone(), peers, trust, FetchOptions::default());
        if self.rt.is_none() {
            self.rt = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| CoordError::Transfer(e.into()))?,
            );
        }
        let result = match &self.rt {
            Some(rt) => rt.block_on(fetcher.fetch_chunks(wants)),
            None => return Ok(0),
        };
        if let Ok(mut b) = self.busy.lock() {
            for f in &fps {
                b.remove(f);
            }
        }
        let report = result?;
        let rates = super::fetch::path_rates(&report);
        if !rates.is_empty() {
            self.client.paths(&self.cfg.edge, &rates)?;
        }
        metrics::counter!("edgeshift_prefetched_chunks_total").increment(report.chunks_fetched);
        tracing::info!(chunks = report.chunks_fetched, "prefetch done");
        Ok(report.chunks_fetched)
    }

    /// One round: (re)connect if needed, heartbeat, poll and carry out orders.
    pub fn step(&mut self) -> Result<StepReport, CoordError> {
        let mut rep = StepReport::default();
        if self.reported.is_none() {
            self.connect()?;
            rep.reconnected = true;
        }
        let r = (|| -> Result<(), CoordError> {
            let (added, removed) = self.heartbeat()?;
            rep.added = added;
            rep.removed = removed;
            match self.report_vms() {
                Err(e) if e.is_unknown_edge() || matches!(e, CoordError::Unreachable { .. }) => {
                    return Err(e)
                }
                // A coordinator without the handoff API still gets heartbeats and gives orders.
                Err(e) => tracing::warn!(error = %e, "reporting this edge's VMs"),
                Ok(()) => {}
            }
            let orders = self.client.orders(&self.cfg.edge)?;
            // Before GC and prefetch, which may take a while.
            self.start_handoffs(&orders);
            let (gc, fetched) = self.execute(&orders)?;
            rep.gc = gc;
            rep.prefetched_chunks = fetched;
            if !rep.gc.removed.is_empty() || fetched > 0 {
                self.heartbeat()?;
            }
            Ok(())
        })();
        if let Err(e) = r {
            if e.is_unknown_edge() || matches!(e, CoordError::Unreachable { .. }) {
                // Start over with a full report next time.
                self.reported = None;
            }
            return Err(e);
        }
        Ok(rep)
    }

    /// Runs until `stop` is set, logging errors and retrying.
    pub fn run(mut self, stop: Arc<AtomicBool>) {
        let mut backoff = self.cfg.interval;
        while !stop.load(Ordering::Relaxed) {
            match self.step() {
                Ok(r) => {
                    backoff = self.cfg.interval;
                    tracing::debug!(?r.added, ?r.removed, removed = r.gc.removed.len(), prefetched = r.prefetched_chunks, "coordinator step");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "coordinator link");
                    metrics::counter!("edgeshift_coordinator_errors_total").increment(1);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
            let mut slept = Duration::ZERO;
            while slept < backoff && !stop.load(Ordering::Relaxed) {
                let d = Duration::from_millis(200).min(backoff - slept);
                std::thread::sleep(d);
                slept += d;
            }
        }
    }
}

/// Starts the link in its own thread; set `stop` to end it.
pub fn spawn(link: Link, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("coordinator-link".into())
        .spawn(move || link.run(stop))
}

/// A running link; stops (and joins its thread) on drop.
pub struct LinkHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    uses: Arc<ChunkUses>,
    first_step: Option<String>,
}

impl LinkHandle {
    /// Why the first exchange with the coordinator (registration and full
    /// inventory, done before [`start`] returns) failed; `None` if it went
    /// through. The link keeps retrying either way.
    pub fn first_step_error(&self) -> Option<&str> {
        self.first_step.as_deref()
    }

    /// Where the chunk server notes served chunks (see [`Link::uses`]).
    pub fn uses(&self) -> Arc<ChunkUses> {
        self.uses.clone()
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `edgeshift agent --coordinator URL --capacity SIZE` starts: a link
/// for the edge `edge` describes (its id, its cluster trust, its VMs and
/// migration listener, whose ordered handoffs it runs), presenting its
/// `tls` files, whose chunk server listens on `listen`.
pub fn start(
    url: &str,
    tls: Option<&edgeshift_common::identity::TlsFiles>,
    capacity: u64,
    listen: SocketAddr,
    store: Arc<LocalStore>,
    edge: HandoffConfig,
) -> Result<LinkHandle, CoordError> {
    let client = Client::new(url, tls)?;
    let cfg = LinkConfig {
        edge: edge.id.clone(),
        advertise: advertise_addr(listen, url),
        capacity,
        interval: Duration::from_secs(5),
    };
    tracing::info!(coordinator = %url, advertise = %cfg.advertise, capacity, "coordinator link starting");
    let link = Link::new(client, cfg, store, Some(edge.trust.clone()))?;
    let mut link = link.with_handoffs(edge);
    // The first exchange before the daemon says it is ready, so that its
    // readiness says whether the coordinator was reached.
    let first_step = link.step().err().map(|e| e.to_string());
    let uses = link.uses();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = spawn(link, stop.clone()).map_err(|e| CoordError::Transfer(e.into()))?;
    Ok(LinkHandle {
        stop,
        thread: Some(thread),
        uses,
        first_step,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address_is_never_a_wildcard() {
        let fixed: SocketAddr = "10.1.2.3:7070".parse().expect("addr");
        assert_eq!(advertise_addr(fixed, "http://127.0.0.1:1"), "10.1.2.3:7070");
        let any: SocketAddr = "0.0.0.0:7070".parse().expect("addr");
        let a: SocketAddr = advertise_addr(any, "http://127.0.0.1:1").parse().expect("addr");
        assert_eq!(a.port(), 7070);
        assert!(!a.ip().is_unspecified(), "{a}");
    }
}
