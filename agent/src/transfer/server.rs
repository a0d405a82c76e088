//! The chunk server inside `edgeshift agent`.
//!
//! One task per connection: authenticate (mutual TLS, [`super::trust`]),
//! then answer manifest and chunk requests in order. An uncompressed chunk
//! goes over TLS as one large write from a reused buffer the chunk file is
//! read into (page cache → buffer → rustls seals it in place); over the
//! test-only plaintext transport it goes from the file to the socket with
//! `sendfile(2)` (docs/wire.md has the figures behind both). A chunk is compressed with zstd only when the client
//! allows it and doing so makes it arrive sooner on that client's path. A
//! chunk asked for together with the version the client holds (a delta
//! request) goes as the 4 KiB blocks that differ, when those are at most
//! three quarters of it.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeshift_common::wire::{self, error_code, FrameKind, MAX_CHUNK_LEN, MAX_FRAME_LEN};
use edgeshift_common::Fingerprint;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};

use super::stream::PeerStream;
use super::trust::{secure_server, Trust};
use tracing::{debug, info, warn};

use super::admission::{sanitize, Admission, RateLimitedLog, Ticket, ACCEPT_BACKOFF};
use super::conn::{read_body_into, read_header, Frame, AUTH_TIMEOUT};
use super::TransferError;
use crate::store::{ChunkUses, LocalStore};

/// What a server needs: how peers authenticate and the store it serves.
#[derive(Debug)]
pub struct ServerConfig {
    pub trust: Trust,
    pub store: Arc<LocalStore>,
    pub zstd: ZstdPolicy,
    /// Where served chunks are noted for the coordinator's LRU/LFU ranking
    /// (the coordinator link drains it); `None` when no coordinator is used.
    pub uses: Option<Arc<ChunkUses>>,
}

pub use super::compress::ZstdPolicy;

/// Accepts connections until the listener fails; one task per peer.
///
/// An accept error (EMFILE under a flood) pauses the loop instead of ending
/// it; a connection beyond the handshake bounds ([`super::admission`]) is
/// closed at once, before it costs a handshake.
pub async fn serve(listener: TcpListener, cfg: Arc<ServerConfig>) -> Result<(), TransferError> {
    let admission = Arc::new(Admission::for_this_process());
    loop {
        let (sock, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                if let Some(suppressed) = ACCEPT_ERRORS.allow() {
                    warn!(error = %e, suppressed, "accepting a peer failed; pausing");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(ticket) = admission.admit(addr.ip()) else {
            metrics::counter!("edgeshift_preauth_refused_total").increment(1);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let cfg = cfg.clone();
        tokio::spawn(async move {
            handle_connection(sock, addr, cfg, ticket).await;
        });
    }
}

static ACCEPT_ERRORS: RateLimitedLog = RateLimitedLog::new();
static PREAUTH_FAILURES: RateLimitedLog = RateLimitedLog::new();

/// Per-connection compression bookkeeping: after repeated chunks that did not
/// shrink enough, only every 16th is tried (incompressible images waste no CPU).
#[derive(Default)]
struct ZstdState {
    misses: u32,
    skipped: u32,
}

/// What a connection keeps between chunks.
#[derive(Default)]
struct ConnScratch {
    zstd: ZstdState,
    /// The last request's body buffer, reused.
    request: Vec<u8>,
    /// A chunk frame (prefix and bytes) for TLS, reused: no page faults of
    /// a fresh allocation per chunk.
    frame: Vec<u8>,
}

async fn handle_connection(sock: TcpStream, addr: SocketAddr, cfg: Arc<ServerConfig>, ticket: Ticket) {
    let (mut sock, peer) =
        match tokio::time::timeout(AUTH_TIMEOUT, secure_server(&cfg.trust, sock, addr)).await {
            Ok(Ok(authenticated)) => authenticated,
            Ok(Err(e)) => {
                if let Some(suppressed) = PREAUTH_FAILURES.allow() {
                    warn!(peer = %addr, error = %e, suppressed, "peer failed authentication; dropped");
                }
                metrics::counter!("edgeshift_auth_failures_total", "side" => "server").increment(1);
                return;
            }
            Err(_) => {
                if let Some(suppressed) = PREAUTH_FAILURES.allow() {
                    warn!(peer = %addr, suppressed, "peer did not authenticate in time; dropped");
                }
                metrics::counter!("edgeshift_auth_failures_total", "side" => "server").increment(1);
                return;
            }
        };
    drop(ticket);
    // The name is the certificate's (checked against identity::check_name),
    // or in plaintext mode whatever the peer said: made safe either way.
    let peer = sanitize(&peer);
    info!(peer = %addr, id = %peer, "peer authenticated");
    let mut scratch = ConnScratch::default();
    let mut idle_since = Instant::now();
    loop {
        let frame = match read_request(&mut sock, &mut scratch.request).await {
            Ok(f) => f,
            Err(TransferError::Closed) => {
                debug!(peer = %addr, "peer closed the connection");
                return;
            }
            Err(TransferError::Wire(e)) => {
                warn!(peer = %addr, error = %e, "malformed frame; connection dropped");
                metrics::counter!("edgeshift_malformed_frames_total", "peer" => peer.clone()).increment(1);
                let code = if matches!(e, wire::WireError::TooLong { .. }) {
                    error_code::TOO_LONG
                } else {
                    error_code::MALFORMED
                };
                let _ = sock.write_all(&wire::encode_error(0, code, &e.to_string())).await;
                let _ = sock.flush().await;
                return;
            }
            Err(TransferError::Timeout(what)) => {
                warn!(peer = %addr, id = %peer, "request not received in {REQUEST_DEADLINE:?} ({what}); connection dropped");
                return;
            }
            Err(e) => {
                debug!(peer = %addr, error = %e, "connection lost");
                return;
            }
        };
        let rid = frame.header.request_id();
        let serve_start = Instant::now();
        let result = match frame.kind {
            FrameKind::ManifestRequest => match wire::decode_fingerprint(frame.kind, &frame.body) {
                Ok(id) => send_manifest(&mut sock, &cfg, rid, &id).await,
                Err(e) => Err(e.into()),
            },
            FrameKind::ChunkRequest | FrameKind::DeltaRequest => {
                // Either way a list of chunks, each maybe with the base the
                // client holds (a delta request).
                let asked = if frame.kind == FrameKind::ChunkRequest {
                    wire::decode_chunk_request(&frame.body)
                        .map(|(head, fps)| (head, fps.iter().map(|fp| (*fp, None)).collect::<Vec<_>>()))
                } else {
                    wire::decode_delta_request(&frame.body)
                        .map(|(head, asks)| (head, asks.iter().map(|a| (a.want, Some(a.base))).collect()))
                };
                match asked {
                    Ok((head, asks)) => {
                        let zstd_ok = frame.header.flags() & wire::FLAG_ZSTD_OK != 0;
                        let path_rate = head.path_rate.get();
                        let mut r = Ok(());
                        debug!(peer = %addr, chunks = asks.len(), idle_ms = (serve_start - idle_since).as_secs_f64() * 1e3, "chunk request");
                        let asks = publishing_last(&cfg, asks);
                        for (fp, base) in &asks {
                            r = send_chunk(
                                &mut sock,
                                &cfg,
                                &peer,
                                rid,
                                fp,
                                base.as_ref(),
                                zstd_ok,
                                path_rate,
                                &mut scratch,
                            )
                            .await;
                            if r.is_err() {
                                break;
                            }
                        }
                        debug!(peer = %addr, chunks = asks.len(), serve_ms = serve_start.elapsed().as_secs_f64() * 1e3, "chunk request served");
                        r
                    }
                    Err(e) => Err(e.into()),
                }
            }
            FrameKind::HasRequest => match wire::decode_has_request(&frame.body) {
                Ok(fps) => send_holdings(&mut sock, &cfg, rid, fps.to_vec()).await,
                Err(e) => Err(e.into()),
            },
            other => Err(TransferError::Unexpected(format!("{other:?}"))),
        };
        if let Err(e) = result {
            warn!(peer = %addr, id = %peer, error = %e, "request failed; connection dropped");
            if matches!(e, TransferError::Wire(_) | TransferError::Unexpected(_)) {
                metrics::counter!("edgeshift_malformed_frames_total", "peer" => peer.clone()).increment(1);
                let _ = sock
                    .write_all(&wire::encode_error(rid, error_code::MALFORMED, &e.to_string()))
                    .await;
                let _ = sock.flush().await;
            }
            return;
        }
        // TLS: rustls may hold sealed records the socket had no room for
        // when the last write returned; they must leave before we wait for
        // the next request (a plaintext socket has nothing to flush).
        if let Err(e) = sock.flush().await {
            debug!(peer = %addr, error = %e, "connection lost");
            return;
        }
        scratch.request = frame.body;
        idle_since = Instant::now();
    }
}

/// Most time a request's body may take to arrive once its header has: a
/// peer trickling a byte a second is dropped (issue 21, finding 6). An
/// idle connection between requests has no deadline (pooled ones are idle).
const REQUEST_DEADLINE: Duration = Duration::from_secs(20);

/// Reads one request: its announced length is checked against what that
/// kind of request can hold before anything is allocated, and its body
/// must arrive within [`REQUEST_DEADLINE`].
async fn read_request(sock: &mut PeerStream, buf: &mut Vec<u8>) -> Result<Frame, TransferError> {
    let (header, kind) = read_header(sock, MAX_FRAME_LEN).await?;
    let max = wire::max_request_body(kind);
    if header.body_len() > max {
        return Err(TransferError::Wire(wire::WireError::TooLong {
            len: header.body_len(),
            max,
        }));
    }
    let body = std::mem::take(buf);
    tokio::time::timeout(REQUEST_DEADLINE, read_body_into(sock, header, kind, None, body))
        .await
        .map_err(|_| TransferError::Timeout("the body of a request"))?
}

/// `asks` with the chunks a publish in progress names but has not placed
/// yet moved after the others (each group in its order): the path carries
/// what is there while they are placed. A migration's source publishes the
/// chunks it just read while the destination already asks for them; served
/// strictly in order, its path would sit idle meanwhile (`docs/migration.md`).
fn publishing_last(
    cfg: &ServerConfig,
    asks: Vec<(Fingerprint, Option<Fingerprint>)>,
) -> Vec<(Fingerprint, Option<Fingerprint>)> {
    // A stat per chunk, and the intents only when one is absent: cheap
    // enough for the async worker (open_chunk_file opens inline too).
    let absent: Vec<bool> = asks
        .iter()
        .map(|(fp, _)| !cfg.store.chunk_path(fp).exists())
        .collect();
    if !absent.contains(&true) {
        return asks;
    }
    let publishing = cfg.store.being_published_set();
    let (later, mut now): (Vec<_>, Vec<_>) = asks
        .into_iter()
        .zip(absent)
        .partition(|((fp, _), absent)| *absent && publishing.contains(fp));
    now.extend(later);
    now.into_iter().map(|(a, _)| a).collect()
}

/// Answers a holdings query: which of `fps` this store holds (a chunk that
/// cannot be checked counts as not held; the client then asks elsewhere).
async fn send_holdings(
    sock: &mut PeerStream,
    cfg: &ServerConfig,
    rid: u64,
    fps: Vec<Fingerprint>,
) -> Result<(), TransferError> {
    let store = cfg.store.clone();
    let held = tokio::task::spawn_blocking(move || {
        let mut held: Vec<bool> = fps
            .iter()
            .map(|fp| crate::store::ChunkStore::has_chunk(&*store, fp).unwrap_or(false))
            .collect();
        // Chunks a publish in progress names are about to appear.
        if held.iter().any(|h| !h) {
            let publishing = store.being_published_set();
            for (h, fp) in held.iter_mut().zip(&fps) {
                *h = *h || publishing.contains(fp);
            }
        }
        held
    })
    .await
    .map_err(|e| TransferError::Unexpected(format!("holdings check: {e}")))?;
    metrics::counter!("edgeshift_holdings_queries_total").increment(1);
    sock.write_all(&wire::encode_has_reply(rid, &held)).await?;
    Ok(())
}

async fn send_manifest(
    sock: &mut PeerStream,
    cfg: &ServerConfig,
    rid: u64,
    id: &Fingerprint,
) -> Result<(), TransferError> {
    let path = cfg.store.manifest_path(id);
    match tokio::fs::read(&path).await {
        Ok(bytes) if bytes.len() <= MAX_FRAME_LEN as usize => {
            sock.write_all(&wire::encode(FrameKind::Manifest, 0, rid, &[&bytes]))
                .await?;
        }
        Ok(_) => {
            sock.write_all(&wire::encode_error(
                rid,
                error_code::INTERNAL,
                "manifest too large for one frame",
            ))
            .await?;
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            sock.write_all(&wire::encode(FrameKind::Missing, 0, rid, &[id.as_bytes()]))
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Answers a request for chunk `fp`: `Missing`, a delta against `base`
/// (the client's earlier version, for a delta request) when this store
/// holds it and the blocks that differ are at most three quarters of the
/// chunk, else the whole chunk (zstd-compressed when that arrives sooner).
#[allow(clippy::too_many_arguments)]
async fn send_chunk(
    sock: &mut PeerStream,
    cfg: &ServerConfig,
    peer: &str,
    rid: u64,
    fp: &Fingerprint,
    base: Option<&Fingerprint>,
    zstd_ok: bool,
    path_rate: u64,
    scratch: &mut ConnScratch,
) -> Result<(), TransferError> {
    let zstate = &mut scratch.zstd;
    let path = cfg.store.chunk_path(fp);
    let file = match open_chunk_file(cfg, &path, fp).await {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            metrics::counter!("edgeshift_chunks_missing_total", "peer" => peer.to_string()).increment(1);
            sock.write_all(&wire::encode(FrameKind::Missing, 0, rid, &[fp.as_bytes()]))
                .await?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata()?.len();
    if len > MAX_CHUNK_LEN as u64 || fp.is_zero_chunk() {
        warn!(chunk = %fp, len, "refusing to serve an oversized or reserved chunk");
        sock.write_all(&wire::encode(FrameKind::Missing, 0, rid, &[fp.as_bytes()]))
            .await?;
        return Ok(());
    }
    let len32 = len as u32;

    // The chunk's bytes once read into user space (for a delta), so that
    // compressing it does not read it again.
    let mut read: Option<Vec<u8>> = None;
    if let Some(base) = base.filter(|b| len > 0 && !b.is_zero_chunk() && *b != fp) {
        if let Ok(base_file) = File::open(cfg.store.chunk_path(base)) {
            let want_file = file.try_clone()?;
            // Both versions are read and compared off the async workers.
            let (new, delta) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let mut new = vec![0u8; len as usize];
                want_file.read_exact_at(&mut new, 0)?;
                let mut old = Vec::new();
                (&base_file).read_to_end(&mut old)?;
                let delta = edgeshift_common::delta::encode(&old, &new, new.len() / 4 * 3);
                Ok((new, delta))
            })
            .await
            .map_err(|e| TransferError::Io(std::io::Error::other(e)))??;
            if let Some((bitmap, payload)) = delta {
                let level = if zstd_ok {
                    cfg.zstd.level_for(path_rate)
                } else {
                    None
                };
                let frame = delta_frame(rid, fp, base, len32, bitmap, payload, level, path_rate).await?;
                sock.write_all(&frame).await?;
                let wire_bytes = (frame.len() - wire::HEADER_LEN - wire::DELTA_HEAD_LEN) as u64;
                metrics::counter!("edgeshift_chunks_delta_total", "peer" => peer.to_string()).increment(1);
                metrics::counter!("edgeshift_delta_saved_bytes_total", "peer" => peer.to_string())
                    .increment(len.saturating_sub(wire_bytes));
                served(cfg, peer, fp, wire_bytes);
                return Ok(());
            }
            read = Some(new);
        }
    }

    let level = if zstd_ok {
        cfg.zstd.level_for(path_rate)
    } else {
        None
    };
    let try_zstd = level.is_some() && {
        if zstate.misses >= 4 {
            zstate.skipped += 1;
            zstate.skipped.is_multiple_of(16)
        } else {
            true
        }
    };
    let wire_bytes = if let Some(level) = level.filter(|_| try_zstd) {
        // Compression needs the bytes in user space; this path is only taken
        // on links slow enough that the CPU is not the bottleneck.
        // Reading and compressing run off the async workers.
        let (raw, compressed, spent) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let raw = match read {
                Some(raw) => raw,
                None => {
                    let mut raw = Vec::with_capacity(len as usize);
                    let mut f = file;
                    f.read_to_end(&mut raw)?;
                    raw
                }
            };
            let t = Instant::now();
            let compressed = zstd::bulk::compress(&raw, level)?;
            Ok((raw, compressed, t.elapsed()))
        })
        .await
        .map_err(|e| TransferError::Io(std::io::Error::other(e)))??;
        if ZstdPolicy::finishes_sooner(raw.len(), compressed.len(), spent, path_rate) {
            zstate.misses = 0;
            let prefix = wire::encode_chunk_prefix(rid, fp, raw.len() as u32, compressed.len() as u32, true);
            sock.write_all(&prefix).await?;
            sock.write_all(&compressed).await?;
            metrics::counter!("edgeshift_chunks_compressed_total", "peer" => peer.to_string()).increment(1);
            compressed.len() as u64
        } else {
            zstate.misses += 1;
            let prefix = wire::encode_chunk_prefix(rid, fp, raw.len() as u32, raw.len() as u32, false);
            sock.write_all(&prefix).await?;
            sock.write_all(&raw).await?;
            raw.len() as u64
        }
    } else {
        let prefix = wire::encode_chunk_prefix(rid, fp, len32, len32, false);
        match sock {
            PeerStream::Plain(tcp) => {
                tcp.write_all(&prefix).await?;
                // sendfile reads from offset 0 whatever the file's position.
                sendfile_all(tcp, &file, len).await?;
            }
            PeerStream::Tls(_) => {
                // Prefix and bytes in one buffer and one write: rustls seals
                // it into full-size records (docs/wire.md, TLS costs). The
                // read is a page-cache copy of at most one chunk, done
                // inline like the open above.
                let frame = &mut scratch.frame;
                frame.clear();
                frame.extend_from_slice(&prefix);
                frame.resize(prefix.len() + len as usize, 0);
                match read {
                    Some(bytes) => frame[prefix.len()..].copy_from_slice(&bytes),
                    None => file.read_exact_at(&mut frame[prefix.len()..], 0)?,
                }
                sock.write_all(frame).await?;
            }
        }
        len
    };
    served(cfg, peer, fp, wire_bytes);
    Ok(())
}

/// A delta's frame: its bitmap and blocks compressed at `level` as one zstd
/// frame when that arrives sooner on a path of `path_rate` bytes/s
/// (compressed off the async workers), else as they are.
#[allow(clippy::too_many_arguments)]
async fn delta_frame(
    rid: u64,
    fp: &Fingerprint,
    base: &Fingerprint,
    len: u32,
    bitmap: Vec<u8>,
    payload: Vec<u8>,
    level: Option<i32>,
    path_rate: u64,
) -> Result<Vec<u8>, TransferError> {
    let Some(level) = level.filter(|_| !payload.is_empty()) else {
        return Ok(wire::encode_delta(rid, fp, base, len, &bitmap, &payload));
    };
    let (fp, base) = (*fp, *base);
    tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let t = Instant::now();
        let mut body = bitmap;
        body.extend_from_slice(&payload);
        let compressed = zstd::bulk::compress(&body, level)?;
        if ZstdPolicy::finishes_sooner(body.len(), compressed.len(), t.elapsed(), path_rate) {
            Ok(wire::encode_delta_zstd(rid, &fp, &base, len, &compressed))
        } else {
            let (bitmap, payload) = body.split_at(edgeshift_common::delta::bitmap_len(len as usize));
            Ok(wire::encode_delta(rid, &fp, &base, len, bitmap, payload))
        }
    })
    .await
    .map_err(|e| TransferError::Io(std::io::Error::other(e)))?
    .map_err(TransferError::Io)
}

/// Counts a chunk served to `peer` in `wire_bytes`, and its use.
fn served(cfg: &ServerConfig, peer: &str, fp: &Fingerprint, wire_bytes: u64) {
    metrics::counter!("edgeshift_served_bytes_total", "peer" => peer.to_string()).increment(wire_bytes);
    metrics::counter!("edgeshift_served_chunks_total", "peer" => peer.to_string()).increment(1);
    if let Some(u) = &cfg.uses {
        u.record(*fp);
    }
}

/// Most a request waits for a chunk that a publish in progress names.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

/// Opens chunk `fp`'s file; one that a publish in progress names (written
/// on another thread after its intent, see `store::publish`) is waited for.
async fn open_chunk_file(
    cfg: &ServerConfig,
    path: &std::path::Path,
    fp: &Fingerprint,
) -> std::io::Result<File> {
    match File::open(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        other => return other,
    }
    let store = cfg.store.clone();
    let f = *fp;
    let publishing = tokio::task::spawn_blocking(move || store.being_published(&f))
        .await
        .unwrap_or(false);
    if !publishing {
        // Where a migration's pull met `Missing` for a chunk its source had
        // just read (seen once in CI), this says the chunk had no intent.
        debug!(chunk = %fp, "answering Missing: no such chunk, and no publish in progress names it");
        return Err(ErrorKind::NotFound.into());
    }
    let waited = Instant::now();
    let deadline = waited + PUBLISH_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        match File::open(path) {
            Err(e) if e.kind() == ErrorKind::NotFound && Instant::now() < deadline => {}
            other => {
                debug!(chunk = %fp, wait_ms = waited.elapsed().as_secs_f64() * 1e3, "waited for a chunk being published");
                return other;
            }
        }
    }
}

/// Sends `len` bytes of `file` from offset 0 on `sock` with sendfile(2),
/// waiting for socket space between partial sends.
async fn sendfile_all(sock: &TcpStream, file: &File, len: u64) -> Result<(), TransferError> {
    let sock_fd = sock.as_raw_fd();
    let file_fd = file.as_raw_fd();
    let mut offset: libc::off_t = 0;
    while (offset as u64) < len {
        sock.writable().await?;
        let remaining = (len - offset as u64) as usize;
        let res = sock.try_io(Interest::WRITABLE, || {
            // SAFETY: both descriptors are owned by values borrowed for the
            // whole call, and `offset` is a live local the kernel updates.
            let n = unsafe { libc::sendfile(sock_fd, file_fd, &mut offset, remaining) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(0) => {
                return Err(TransferError::Io(std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "chunk file shrank while being sent",
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
