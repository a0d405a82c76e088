//! One peer's task during a fetch: a connection, a reader, and a loop that
//! requests what the scheduler hands it, books what arrives, has it
//! verified and stored, and watches for stalls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use edgeshift_common::wire::{self, FrameKind, MAX_FRAME_LEN};
use edgeshift_common::Fingerprint;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::options::FetchOptions;
use super::receive::{read_received, BufPools, Received};
use super::report::FetchProgress;
use super::schedule::{ChunkIdx, ChunkState, Encoding, PeerIdx, Sched};
use super::verify::{rebuild, verify, ChunkBytes};
use super::writer::WriteJob;
use crate::store::{LocalStore, StoreError};
use crate::transfer::conn::unexpected;
use crate::transfer::pool::{checkin, checkout, ConnPool};
use crate::transfer::{TransferError, Trust};

/// The scheduler shared by a fetch's peer tasks, and the bell they ring
/// when a peer fails or the fetch finishes (idle peers wait on it).
pub(crate) struct Shared {
    state: Mutex<Sched>,
    pub(crate) wake: Notify,
}

impl Shared {
    pub(crate) fn new(sched: Sched) -> Self {
        Shared {
            state: Mutex::new(sched),
            wake: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Sched> {
        // A panic while holding the lock is a bug in this module; the state
        // itself stays consistent enough to report, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one peer's task works with.
pub(crate) struct PeerCtx {
    pub(crate) index: PeerIdx,
    pub(crate) addr: SocketAddr,
    pub(crate) trust: Trust,
    pub(crate) opts: FetchOptions,
    pub(crate) sched: Arc<Shared>,
    pub(crate) progress: Arc<FetchProgress>,
    pub(crate) writer: Sender<WriteJob>,
    pub(crate) pool: Arc<BufPools>,
    /// This fetch's store: where chunks are staged and the bases of deltas read.
    pub(crate) store: Arc<LocalStore>,
    pub(crate) conns: Option<Arc<ConnPool>>,
    /// Told each chunk stored (`Fetcher::with_placement`).
    pub(crate) placement: Option<Sender<Option<Fingerprint>>>,
}

/// Outcome of verifying and storing one received chunk.
struct Stored {
    c: ChunkIdx,
    wire_len: u64,
    encoding: Encoding,
    result: Result<(), TransferError>,
}

/// Runs one peer until the fetch is finished or the peer fails; returns why
/// it was dropped (None: finished normally).
pub(crate) async fn run_peer(ctx: &PeerCtx) -> Option<String> {
    if ctx.sched.lock().finished() {
        return None;
    }
    let (sock, peer_id) = match checkout(ctx.conns.as_deref(), ctx.addr, &ctx.trust, &ctx.opts.dial()).await {
        Ok(x) => x,
        Err(e) => {
            warn!(peer = %ctx.addr, error = %e, "peer unavailable for this fetch");
            return Some(e.to_string());
        }
    };
    ctx.sched.lock().peer_mut(ctx.index).id = Some(peer_id.clone());
    let label = ctx.addr.to_string();
    let (mut rd, mut wr) = tokio::io::split(sock);
    let received = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Received, TransferError>>(8);
    let rx_counter = received.clone();
    let reader_pool = ctx.pool.clone();
    // Told to stop (the fetch is over and nothing is outstanding on the
    // connection, so no frame is on its way), the reader hands its half
    // back for the connection to be kept.
    let (stop_reader, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        loop {
            let r = tokio::select! {
                biased;
                _ = &mut stopped => return Some(rd),
                r = read_received(&mut rd, MAX_FRAME_LEN, &rx_counter, &reader_pool) => r,
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
    let mut floor = RateFloor::new(Instant::now(), &ctx.opts);

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
                let fp = s.chunk(c).fp;
                match s.base_at(ctx.index, c) {
                    Some(base) => based.push(wire::BasedAsk { want: fp, base }),
                    None => plain.push(fp),
                }
            }
            let peer = s.peer(ctx.index);
            ((plain, based), peer.rate as u64, s.finished(), peer.idle())
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
            // TLS buffers sealed records until flushed.
            let sent = match wr.write_all(&frames).await {
                Ok(()) => wr.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                return Some(format!("sending a request: {e}"));
            }
            last_progress = Instant::now();
            continue;
        }
        if finished && stores.is_empty() {
            let clean = ctx.sched.lock().peer(ctx.index).idle();
            if clean && ctx.conns.is_some() {
                if let Some(handle) = reader.0.take() {
                    let _ = stop_reader.send(());
                    if let Ok(Some(rd)) = handle.await {
                        if rd.is_pair_of(&wr) {
                            checkin(ctx.conns.as_deref(), ctx.addr, rd.unsplit(wr), peer_id);
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
            floor.restart(last_progress, received.load(Ordering::Relaxed));
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
                if let Err(reason) = on_stored(ctx, &label, done) {
                    return Some(reason);
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
                if idle {
                    floor.restart(now, now_seen);
                } else if let Some(reason) = floor.check(now, now_seen) {
                    warn!(peer = %ctx.addr, "{reason}; dropped for this fetch");
                    return Some(reason);
                }
                // Goodput sample every tick while busy.
                let dt = (now - rate_mark.0).as_secs_f64();
                if dt >= 0.09 {
                    let sample = (now_seen - rate_mark.1) as f64 / dt;
                    if !idle && sample > 0.0 {
                        ctx.sched.lock().peer_mut(ctx.index).record_goodput(sample);
                    }
                    rate_mark = (now, now_seen);
                }
            }
        }
        if ctx.sched.lock().fatal().is_some() {
            return Some("fetch aborted".into());
        }
    }
}

/// The overall deadline on a busy peer: over every `stall_timeout` it must
/// deliver at least `min_peer_rate` bytes a second. "Nothing received"
/// alone lets a peer that trickles a byte at a time hold its chunks forever.
struct RateFloor {
    since: Instant,
    bytes_at_start: u64,
    window: Duration,
    min_bytes: u64,
}

impl RateFloor {
    fn new(now: Instant, opts: &FetchOptions) -> Self {
        let window = opts.stall_timeout.max(Duration::from_secs(1));
        RateFloor {
            since: now,
            bytes_at_start: 0,
            window,
            min_bytes: (opts.min_peer_rate as f64 * window.as_secs_f64()) as u64,
        }
    }

    /// Starts a new window (the peer had nothing to do).
    fn restart(&mut self, now: Instant, seen: u64) {
        self.since = now;
        self.bytes_at_start = seen;
    }

    /// `Some(reason)` when a whole window went by below the floor.
    fn check(&mut self, now: Instant, seen: u64) -> Option<String> {
        if now - self.since < self.window {
            return None;
        }
        let got = seen.saturating_sub(self.bytes_at_start);
        if got < self.min_bytes {
            return Some(format!(
                "too slow: {got} bytes in {:?} (the floor is {} bytes/s)",
                self.window,
                self.min_bytes as f64 / self.window.as_secs_f64()
            ));
        }
        self.restart(now, seen);
        None
    }
}

/// Books the outcome of verifying and storing one chunk; an error string
/// drops the peer.
fn on_stored(ctx: &PeerCtx, label: &str, done: Stored) -> Result<(), String> {
    match done.result {
        Ok(()) => {
            let mut s = ctx.sched.lock();
            let was_done = s.chunk(done.c).state == ChunkState::Done;
            let len = s.chunk(done.c).len;
            s.chunk_stored(ctx.index, done.c, done.wire_len, done.encoding);
            if s.finished() {
                ctx.sched.wake.notify_waiters();
            }
            drop(s);
            metrics::counter!("edgeshift_received_bytes_total", "peer" => label.to_string())
                .increment(done.wire_len);
            if !was_done {
                if let Some(sink) = &ctx.placement {
                    // The image's writer gone means the fetch's caller gave up on it.
                    let _ = sink.send(Some(ctx.sched.lock().chunk(done.c).fp));
                }
                metrics::counter!("edgeshift_received_chunks_total", "peer" => label.to_string())
                    .increment(1);
                ctx.progress.bytes.fetch_add(len, Ordering::Relaxed);
                ctx.progress.chunks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
        Err(TransferError::Store(StoreError::ChunkRejected { fp, actual })) => {
            metrics::counter!("edgeshift_verification_failures_total", "peer" => label.to_string())
                .increment(1);
            warn!(peer = %ctx.addr, chunk = %fp, got = %actual, "peer sent wrong bytes; dropped for this fetch");
            Err(format!("sent wrong bytes for chunk {fp}"))
        }
        Err(e @ TransferError::BaseUnavailable { .. }) => {
            warn!(peer = %ctx.addr, error = %e, "delta not usable");
            ctx.sched.lock().base_unusable(ctx.index, done.c, done.wire_len);
            ctx.sched.wake.notify_waiters();
            Ok(())
        }
        Err(TransferError::BadChunk { fp, reason }) => {
            metrics::counter!("edgeshift_verification_failures_total", "peer" => label.to_string())
                .increment(1);
            warn!(peer = %ctx.addr, chunk = %fp, %reason, "peer sent a bad chunk; dropped for this fetch");
            Err(format!("bad chunk {fp}: {reason}"))
        }
        Err(e) => {
            // The local store failed (disk full, I/O error): no peer can fix that.
            ctx.sched.lock().abort(e.to_string());
            ctx.sched.wake.notify_waiters();
            Err(format!("local store failed: {e}"))
        }
    }
}

/// Handles one frame from a peer; an error string drops the peer.
fn on_frame(ctx: &PeerCtx, label: &str, got: Received, stores: &mut JoinSet<Stored>) -> Result<(), String> {
    let Received { frame, payload } = got;
    match frame.kind {
        FrameKind::Chunk => {
            let (head, _) = wire::decode_chunk(&frame.body).map_err(|e| e.to_string())?;
            let fp = head.fingerprint;
            let zstd = frame.header.flags() & wire::FLAG_ZSTD != 0;
            let received = match payload {
                Some(p) => {
                    ctx.pool.put_vec(frame.body);
                    ChunkBytes::Aligned(p)
                }
                None => ChunkBytes::Framed {
                    body: frame.body,
                    start: wire::CHUNK_HEAD_LEN,
                },
            };
            let wire_len = received.bytes().len() as u64;
            let encoding = if zstd { Encoding::Zstd } else { Encoding::Raw };
            let Some((c, want_len)) = book_arrival(ctx, label, &fp, None, wire_len, encoding)? else {
                recycle(&ctx.pool, received);
                return Ok(());
            };
            let raw_len = head.raw_len.get();
            spawn_store(ctx, stores, c, fp, wire_len, encoding, move || {
                verify(&fp, want_len, raw_len, zstd, received)
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
            let zstd = frame.header.flags() & wire::FLAG_ZSTD != 0;
            spawn_store(ctx, stores, c, fp, wire_len, Encoding::Delta, move || {
                rebuild(&store, &fp, want_len, &head.base, &frame.body, zstd)
            });
            Ok(())
        }
        FrameKind::Missing => {
            let fp = wire::decode_fingerprint(frame.kind, &frame.body).map_err(|e| e.to_string())?;
            let mut s = ctx.sched.lock();
            let Some(c) = s.chunk_of(&fp) else {
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
) -> Result<Option<(ChunkIdx, u64)>, String> {
    let mut s = ctx.sched.lock();
    let Some(c) = s.chunk_of(fp) else {
        return Err(format!("sent chunk {fp}, which was never requested"));
    };
    if let Some(b) = base {
        if s.chunk(c).base != Some(*b) {
            return Err(format!(
                "sent a delta for chunk {fp} against a base it was not given"
            ));
        }
    }
    if !s.arrived(ctx.index, c) {
        return Err(format!("sent chunk {fp}, which was not requested from it"));
    }
    if s.chunk(c).state == ChunkState::Done {
        s.chunk_stored(ctx.index, c, wire_len, encoding);
        drop(s);
        metrics::counter!("edgeshift_received_bytes_total", "peer" => label.to_string()).increment(wire_len);
        return Ok(None);
    }
    Ok(Some((c, s.chunk(c).len)))
}

/// Verifies a received chunk off the async workers (`check` returns its
/// bytes) and writes it to a temp file there too, so chunks are checked and
/// written on every core while the next ones arrive; then hands it to the
/// writer thread to be made durable, and reports the outcome in `stores`.
fn spawn_store(
    ctx: &PeerCtx,
    stores: &mut JoinSet<Stored>,
    c: ChunkIdx,
    fp: Fingerprint,
    wire_len: u64,
    encoding: Encoding,
    check: impl FnOnce() -> Result<ChunkBytes, TransferError> + Send + 'static,
) {
    let writer = ctx.writer.clone();
    let (store, pool) = (ctx.store.clone(), ctx.pool.clone());
    let check_and_stage = move || {
        let chunk = check()?;
        let staged = store.stage_chunk(&fp, chunk.bytes());
        recycle(&pool, chunk);
        Ok::<_, TransferError>(staged?)
    };
    stores.spawn(async move {
        let result = match tokio::task::spawn_blocking(check_and_stage).await {
            Ok(Ok(staged)) => {
                let (done, wait) = tokio::sync::oneshot::channel();
                if writer.send(WriteJob { staged, done }).is_err() {
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

/// Gives a chunk's buffer back for the next frames.
fn recycle(pool: &BufPools, chunk: ChunkBytes) {
    match chunk {
        ChunkBytes::Framed { body, .. } => pool.put_vec(body),
        ChunkBytes::Aligned(p) => pool.put_aligned(p.buf),
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
