//! [`PeerState`]: what the scheduler knows of one peer during a fetch.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use super::index::ChunkIdx;
use crate::transfer::fetch::report::PeerReport;

/// A chunk requested from a peer, with the bytes it was expected to take
/// on the wire when asked for (what it holds of the peer's window).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    pub(crate) chunk: ChunkIdx,
    pub(crate) charged: u64,
}

pub(crate) struct PeerState {
    pub(crate) addr: SocketAddr,
    pub(crate) id: Option<String>,
    pub(crate) alive: bool,
    /// Candidate chunks in priority order (may hold stale entries; skipped on pop).
    pub(crate) queue: VecDeque<ChunkIdx>,
    /// Requested and not yet received, in request order.
    pub(crate) inflight: VecDeque<Asked>,
    /// Expected wire bytes of `inflight`: what the window limits.
    pub(crate) inflight_bytes: u64,
    /// Received, being verified and made durable.
    pub(crate) storing: Vec<ChunkIdx>,
    /// Smoothed goodput, bytes/s (0 = not measured yet).
    pub(crate) rate: f64,
    pub(crate) bytes: u64,
    pub(crate) chunks: u64,
    pub(crate) duplicates: u64,
    pub(crate) lacking: u64,
    pub(crate) zstd_chunks: u64,
    pub(crate) delta_chunks: u64,
    pub(crate) delta_saved_bytes: u64,
    /// Of `chunks`, the optional ones, and the ones only this peer could send.
    pub(crate) fillers: u64,
    pub(crate) exclusive: u64,
    pub(crate) first_request: Option<Instant>,
    pub(crate) last_chunk: Option<Instant>,
    pub(crate) dropped: Option<String>,
}

impl PeerState {
    /// A live peer with nothing asked yet and `queue` to take from.
    pub(crate) fn new(addr: SocketAddr, queue: VecDeque<ChunkIdx>) -> Self {
        PeerState {
            addr,
            id: None,
            alive: true,
            queue,
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
        }
    }

    pub(crate) fn report(&self) -> PeerReport {
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
    pub(crate) fn planning_rate(&self) -> f64 {
        if self.rate > 0.0 {
            self.rate
        } else {
            1e6
        }
    }

    /// Folds in a goodput sample (bytes/s) taken while busy.
    pub(crate) fn record_goodput(&mut self, sample: f64) {
        self.rate = if self.rate == 0.0 {
            sample
        } else {
            0.5 * self.rate + 0.5 * sample
        };
    }

    /// Nothing requested and not yet received.
    pub(crate) fn idle(&self) -> bool {
        self.inflight.is_empty()
    }
}
