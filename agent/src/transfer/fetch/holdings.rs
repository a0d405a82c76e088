//! The holdings probe: before a fetch, ask every peer at once which of the
//! wanted chunks (and of their delta bases) it holds, so nobody is asked
//! for a chunk it lacks, each peer takes first what only it holds, and a
//! chunk is asked for as a delta only where its base is.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeshift_common::wire::{self, FrameKind, MAX_FRAME_LEN};
use edgeshift_common::Fingerprint;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tracing::{debug, info};

use super::options::FetchOptions;
use super::schedule::{PeerIdx, PeerSet};
use super::want::ChunkWant;
use crate::transfer::conn::{read_frame, unexpected};
use crate::transfer::dial::DialOptions;
use crate::transfer::pool::{checkin, checkout, ConnPool};
use crate::transfer::{TransferError, Trust};

/// Asks every peer at once which of `wants` it holds and narrows each
/// want's sources to the peers that said yes (a peer that could not be
/// asked stays a candidate; a chunk nobody claims keeps its sources, so
/// the fetch itself reports it). Costs one connection and a query of 32
/// bytes per chunk (and base) per peer; saves a `Missing` round trip per
/// chunk a peer lacks and lets the scheduler put exclusive chunks first.
/// Returns, per wanted chunk with a base, the peers that said they lack
/// the base.
pub(crate) async fn narrow_to_holders(
    peers: &[SocketAddr],
    trust: &Trust,
    opts: &FetchOptions,
    pool: Option<&Arc<ConnPool>>,
    wants: &mut [ChunkWant],
) -> HashMap<Fingerprint, PeerSet> {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, &addr) in peers.iter().enumerate() {
        let mut fps: Vec<Fingerprint> = wants
            .iter()
            .filter(|w| !w.fp.is_zero_chunk() && w.may_come_from(&addr))
            .map(|w| w.fp)
            .collect();
        // The bases after the chunks: one answer per fingerprint, in order.
        fps.extend(
            wants
                .iter()
                .filter(|w| !w.fp.is_zero_chunk() && w.may_come_from(&addr))
                .filter_map(|w| w.base),
        );
        let trust = trust.clone();
        let dial = opts.dial();
        let pool = pool.cloned();
        tasks.spawn(async move {
            let limit = dial.connect_timeout + Duration::from_secs(10);
            let r = tokio::time::timeout(limit, query_holdings(addr, &trust, &dial, &fps, pool.as_deref())).await;
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
            (PeerIdx::new(i), fps, held)
        });
    }
    // Per chunk, the peers known to lack it.
    let mut lacks: HashMap<Fingerprint, PeerSet> = HashMap::new();
    let mut answered = 0;
    while let Some(r) = tasks.join_next().await {
        let Ok((p, fps, Some(held))) = r else { continue };
        answered += 1;
        for (fp, h) in fps.iter().zip(held) {
            if !h {
                lacks.entry(*fp).or_default().insert(p);
            }
        }
    }
    let mut base_lacking: HashMap<Fingerprint, PeerSet> = HashMap::new();
    for w in wants.iter() {
        let Some(base) = w.base else { continue };
        if let Some(&lack) = lacks.get(&base) {
            base_lacking.insert(w.fp, lack);
        }
    }
    let mut narrowed = 0;
    for w in wants.iter_mut() {
        let Some(&lack) = lacks.get(&w.fp) else { continue };
        let keep: Vec<SocketAddr> = peers
            .iter()
            .enumerate()
            .filter(|(i, a)| !lack.contains(PeerIdx::new(*i)) && w.may_come_from(a))
            .map(|(_, a)| *a)
            .collect();
        if !keep.is_empty() {
            w.sources = Some(keep);
            narrowed += 1;
        }
    }
    info!(
        peers = peers.len(),
        answered,
        chunks = wants.len(),
        narrowed,
        bases_lacking = base_lacking.len(),
        seconds = started.elapsed().as_secs_f64(),
        "asked the peers what they hold"
    );
    base_lacking
}

/// One holdings query: connects, asks about `fps` (in frames of at most
/// [`wire::MAX_HAS`]), returns one answer per fingerprint.
async fn query_holdings(
    addr: SocketAddr,
    trust: &Trust,
    dial: &DialOptions,
    fps: &[Fingerprint],
    pool: Option<&ConnPool>,
) -> Result<Vec<bool>, TransferError> {
    let (mut sock, id) = checkout(pool, addr, trust, dial).await?;
    let mut held = Vec::with_capacity(fps.len());
    for (n, part) in fps.chunks(wire::MAX_HAS).enumerate() {
        let rid = n as u64 + 1;
        sock.write_all(&wire::encode_has_request(rid, part)).await?;
        // TLS buffers sealed records until flushed.
        sock.flush().await?;
        let frame = read_frame(&mut sock, MAX_FRAME_LEN, None).await?;
        if frame.kind != FrameKind::HasReply || frame.header.request_id() != rid {
            return Err(unexpected(&frame));
        }
        held.extend(wire::decode_has_reply(&frame.body, part.len())?);
    }
    // Nothing is outstanding on it: the chunk requests may use it next.
    checkin(pool, addr, sock, id);
    Ok(held)
}
