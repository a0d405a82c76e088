//! The scheduler: which peer asks for which chunk next. Pure data, no I/O:
//! the peer tasks report what happened (arrived, stored, lacking, dead) and
//! take batches to request.
//!
//! Work is pulled, not pushed: a peer takes more chunks whenever its
//! in-flight bytes fall below its window, sized from that path's measured
//! goodput, so each path carries work in proportion to its throughput and
//! nothing waits behind a slow path beyond its window. At the tail, an idle
//! peer re-requests the chunk a slower peer would deliver last (stealing);
//! the first verified copy wins.

mod index;
mod peer;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use edgeshift_common::Fingerprint;

pub(crate) use self::index::{ChunkIdx, PeerIdx, PeerSet};
use self::peer::Asked;
pub(crate) use self::peer::PeerState;
use super::options::FetchOptions;
use super::want::ChunkWant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChunkState {
    Queued,
    InFlight,
    Done,
    /// No live, allowed peer has it.
    Unavailable,
}

/// How a chunk's bytes came on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Raw,
    Zstd,
    /// The blocks that differ from the chunk's base (`ChunkWant::base`).
    Delta,
}

/// One chunk of the fetch, as the scheduler tracks it.
pub(crate) struct Chunk {
    pub(crate) fp: Fingerprint,
    pub(crate) len: u64,
    /// The peers that may serve it.
    allowed: PeerSet,
    pub(crate) optional: bool,
    pub(crate) base: Option<Fingerprint>,
    /// The peers known to lack `base`: asked for the chunk whole.
    base_lacking: PeerSet,
    pub(crate) state: ChunkState,
    /// The peers it is in flight at.
    holders: PeerSet,
    /// The peers that said they do not hold it.
    lacking: PeerSet,
}

/// The chunks a finished fetch did not store.
pub(crate) struct LeftOut {
    /// Optional chunks given up (the fetch succeeds without them).
    pub(crate) skipped: Vec<Fingerprint>,
    /// Chunks that are not optional and were not stored: the fetch failed.
    pub(crate) missing: Vec<Fingerprint>,
}

pub(crate) struct Sched {
    chunks: Vec<Chunk>,
    index: HashMap<Fingerprint, ChunkIdx>,
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
    /// The same for chunks sent whole (raw or zstd): the window and the
    /// measured goodput are both in wire bytes.
    whole_wire: u64,
    whole_len: u64,
}

impl Sched {
    /// `addrs` holds at most [`PeerSet::CAPACITY`] peers and `wants` fewer
    /// than [`ChunkIdx::CAPACITY`] chunks (the fetcher checks both).
    pub(crate) fn new(addrs: &[SocketAddr], wants: Vec<ChunkWant>, opts: &FetchOptions) -> Self {
        let all = PeerSet::first(addrs.len());
        let mut index = HashMap::new();
        let mut chunks = Vec::new();
        for w in wants {
            if w.fp.is_zero_chunk() || index.contains_key(&w.fp) {
                continue;
            }
            let allowed = match &w.sources {
                None => all,
                Some(list) => {
                    let mut set = PeerSet::default();
                    for (i, a) in addrs.iter().enumerate() {
                        if list.contains(a) {
                            set.insert(PeerIdx::new(i));
                        }
                    }
                    set
                }
            };
            index.insert(w.fp, ChunkIdx::new(chunks.len()));
            chunks.push(Chunk {
                fp: w.fp,
                len: w.len,
                allowed,
                optional: w.optional,
                base: w.base.filter(|b| !b.is_zero_chunk() && *b != w.fp),
                base_lacking: PeerSet::default(),
                state: ChunkState::Queued,
                holders: PeerSet::default(),
                lacking: PeerSet::default(),
            });
        }
        let n = chunks.len();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let p = PeerIdx::new(i);
                // Chunks fewer peers may serve first (stable: the caller's
                // priority order within each group), so a peer spends
                // itself on what only it can send before it takes shared
                // work the others could do.
                let mut q: Vec<ChunkIdx> = ChunkIdx::all(n)
                    .filter(|&c| chunks[c].allowed.contains(p))
                    .collect();
                q.sort_by_key(|&c| chunks[c].allowed.len());
                PeerState::new(*a, q.into())
            })
            .collect();
        let required_left = chunks.iter().filter(|c| !c.optional).count();
        let mut s = Sched {
            chunks,
            index,
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
            whole_wire: 0,
            whole_len: 0,
        };
        for c in ChunkIdx::all(n) {
            if s.chunks[c].allowed.is_empty() {
                s.give_up(c);
            }
        }
        s.settle_fillers();
        s
    }

    /// Notes which peers lack which chunks' bases (`lacking`, by chunk),
    /// from the holdings probe: those peers are asked for such a chunk
    /// whole, and each peer's queue puts the chunks it can send as deltas
    /// before the ones it would send whole (within the same number of
    /// sources), so the holders of a base take its chunks first.
    pub(crate) fn note_bases_lacking(&mut self, lacking: &HashMap<Fingerprint, PeerSet>) {
        for c in &mut self.chunks {
            if let Some(set) = c.base.and_then(|_| lacking.get(&c.fp)) {
                c.base_lacking = *set;
            }
        }
        for (i, peer) in self.peers.iter_mut().enumerate() {
            let p = PeerIdx::new(i);
            let chunks = &self.chunks;
            peer.queue.make_contiguous().sort_by_key(|&c| {
                let w = &chunks[c];
                (w.allowed.len(), w.base.is_some() && w.base_lacking.contains(p))
            });
        }
    }

    /// The base chunk `c` should be asked against at peer `p`: None when it
    /// has none or `p` is known to lack it.
    pub(crate) fn base_at(&self, p: PeerIdx, c: ChunkIdx) -> Option<Fingerprint> {
        let w = &self.chunks[c];
        w.base.filter(|_| !w.base_lacking.contains(p))
    }

    pub(crate) fn finished(&self) -> bool {
        self.remaining == 0 || self.fatal.is_some()
    }

    /// The chunks of this fetch, in the caller's order, each once.
    pub(crate) fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    pub(crate) fn chunk(&self, c: ChunkIdx) -> &Chunk {
        &self.chunks[c]
    }

    /// The chunk named `fp`, if this fetch wants it.
    pub(crate) fn chunk_of(&self, fp: &Fingerprint) -> Option<ChunkIdx> {
        self.index.get(fp).copied()
    }

    pub(crate) fn peers(&self) -> &[PeerState] {
        &self.peers
    }

    pub(crate) fn peer(&self, p: PeerIdx) -> &PeerState {
        &self.peers[p]
    }

    pub(crate) fn peer_mut(&mut self, p: PeerIdx) -> &mut PeerState {
        &mut self.peers[p]
    }

    /// Bytes of the chunks stored so far.
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// When the last chunk that is not optional was stored.
    pub(crate) fn required_done(&self) -> Option<Instant> {
        self.required_done
    }

    /// Why the fetch was aborted (the local store failed), if it was.
    pub(crate) fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// Aborts the fetch: a local failure no peer can fix. The first reason stays.
    pub(crate) fn abort(&mut self, reason: String) {
        self.fatal.get_or_insert(reason);
    }

    /// The chunks not stored, once the fetch is over.
    pub(crate) fn left_out(&self) -> LeftOut {
        let (skipped, missing): (Vec<&Chunk>, Vec<&Chunk>) = self
            .chunks
            .iter()
            .filter(|c| c.state != ChunkState::Done)
            .partition(|c| c.optional && c.state == ChunkState::Unavailable);
        LeftOut {
            skipped: skipped.iter().map(|c| c.fp).collect(),
            missing: missing.iter().map(|c| c.fp).collect(),
        }
    }

    /// Marks chunk `c` as one nobody will send.
    fn give_up(&mut self, c: ChunkIdx) {
        self.chunks[c].state = ChunkState::Unavailable;
        self.remaining -= 1;
        if !self.chunks[c].optional {
            self.required_left -= 1;
        }
    }

    /// Once no chunk that is not optional is queued or in flight, the
    /// optional ones still queued are left out.
    fn settle_fillers(&mut self) {
        if self.required_left > 0 {
            return;
        }
        for c in ChunkIdx::all(self.chunks.len()) {
            if self.chunks[c].optional && self.chunks[c].state == ChunkState::Queued {
                self.give_up(c);
            }
        }
    }

    fn window(&self, p: PeerIdx) -> u64 {
        // A little of this path's goodput (`window_time`) keeps it busy
        // without parking much work behind it.
        let rate = self.peers[p].rate;
        let by_rate = if rate > 0.0 {
            (rate * self.window_secs) as u64
        } else {
            self.initial_window
        };
        by_rate.clamp(self.min_window, self.max_window)
    }

    fn can_serve(&self, p: PeerIdx, c: ChunkIdx) -> bool {
        self.chunks[c].allowed.contains(p) && !self.chunks[c].lacking.contains(p)
    }

    /// Chunks peer `p` should request now (possibly none).
    pub(crate) fn take_batch(&mut self, p: PeerIdx, max: usize) -> Vec<ChunkIdx> {
        let window = self.window(p);
        let mut out = Vec::new();
        while out.len() < max && self.peers[p].inflight_bytes < window {
            let Some(c) = self.peers[p].queue.pop_front() else {
                break;
            };
            if self.chunks[c].state != ChunkState::Queued || !self.can_serve(p, c) {
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

    fn assign(&mut self, p: PeerIdx, c: ChunkIdx) {
        self.chunks[c].state = ChunkState::InFlight;
        self.chunks[c].holders.insert(p);
        let charged = self.expected_wire(p, c);
        self.peers[p].inflight.push_back(Asked { chunk: c, charged });
        self.peers[p].inflight_bytes += charged;
    }

    /// Bytes chunk `c` is expected to take on the wire: a chunk with a base
    /// may come as a delta, at the share of a whole chunk the deltas of this
    /// fetch took so far (half before the first); a chunk sent whole, at
    /// the share zstd left of the whole chunks so far (all of it before the
    /// first). Charging its whole length against a window sized in wire
    /// bytes would leave the path idle between small answers, which only
    /// shows once round trips are long (`docs/wire.md`, deltas;
    /// `docs/wan.md`: at 60 ms, 2.5x compression held each 50 Mbit/s path
    /// to ~20 Mbit/s).
    fn expected_wire(&self, p: PeerIdx, c: ChunkIdx) -> u64 {
        let w = &self.chunks[c];
        if self.base_at(p, c).is_none() {
            if self.whole_len == 0 {
                return w.len;
            }
            let share = (self.whole_wire as f64 / self.whole_len as f64).min(1.0);
            return ((w.len as f64 * share) as u64).max(1);
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
    fn steal_for(&self, p: PeerIdx) -> Option<ChunkIdx> {
        let my_rate = self.peers[p].planning_rate();
        let mut best: Option<(f64, ChunkIdx)> = None;
        for (q, peer) in self.peers.iter().enumerate() {
            let q = PeerIdx::new(q);
            if q == p || !peer.alive || peer.inflight.is_empty() {
                continue;
            }
            let their_finish = peer.inflight_bytes as f64 / peer.planning_rate();
            // Latest-requested chunk there that is still only at q and that p may serve.
            let Some(c) = peer.inflight.iter().rev().map(|a| a.chunk).find(|&c| {
                self.chunks[c].state == ChunkState::InFlight
                    && self.chunks[c].holders == PeerSet::only(q)
                    && self.can_serve(p, c)
            }) else {
                continue;
            };
            let my_finish = (self.peers[p].inflight_bytes + self.chunks[c].len) as f64 / my_rate;
            if my_finish < 0.8 * their_finish && best.is_none_or(|(t, _)| their_finish > t) {
                best = Some((their_finish, c));
            }
        }
        best.map(|(_, c)| c)
    }

    /// Chunk `c` arrived from `p`: it no longer counts against the window,
    /// but stays `p`'s until stored. False if `p` was not asked for it.
    pub(crate) fn arrived(&mut self, p: PeerIdx, c: ChunkIdx) -> bool {
        let peer = &mut self.peers[p];
        let Some(pos) = peer.inflight.iter().position(|a| a.chunk == c) else {
            return false;
        };
        let charged = peer.inflight.remove(pos).map_or(0, |a| a.charged);
        peer.inflight_bytes = peer.inflight_bytes.saturating_sub(charged);
        peer.storing.push(c);
        true
    }

    /// Forgets chunk `c` from peer `p` (requested or arrived).
    fn release(&mut self, p: PeerIdx, c: ChunkIdx) {
        self.arrived(p, c);
        let peer = &mut self.peers[p];
        if let Some(pos) = peer.storing.iter().position(|&x| x == c) {
            peer.storing.swap_remove(pos);
        }
        self.chunks[c].holders.remove(p);
    }

    /// Puts `c` back for other peers, or marks it unavailable if none may serve it.
    fn requeue(&mut self, c: ChunkIdx) {
        if self.chunks[c].state != ChunkState::InFlight || !self.chunks[c].holders.is_empty() {
            return;
        }
        let mut any = false;
        for q in PeerIdx::all(self.peers.len()) {
            if self.peers[q].alive && self.can_serve(q, c) {
                self.peers[q].queue.push_front(c);
                any = true;
            }
        }
        if any {
            self.chunks[c].state = ChunkState::Queued;
        } else {
            self.give_up(c);
        }
    }

    /// The base of chunk `c` could not be read here (evicted, damaged):
    /// `c` goes back to the queues, to be asked for whole.
    pub(crate) fn base_unusable(&mut self, p: PeerIdx, c: ChunkIdx, wire_len: u64) {
        self.chunks[c].base = None;
        self.peers[p].bytes += wire_len;
        self.release(p, c);
        self.requeue(c);
    }

    /// Peer `p` answered that it does not hold chunk `c`.
    pub(crate) fn chunk_lacking(&mut self, p: PeerIdx, c: ChunkIdx) {
        self.peers[p].lacking += 1;
        self.chunks[c].lacking.insert(p);
        self.release(p, c);
        self.requeue(c);
        self.settle_fillers();
    }

    /// Chunk `c` from peer `p` is verified and durable (or arrived after
    /// another copy won, a duplicate).
    pub(crate) fn chunk_stored(&mut self, p: PeerIdx, c: ChunkIdx, wire_len: u64, encoding: Encoding) {
        self.release(p, c);
        let peer = &mut self.peers[p];
        let chunk = &mut self.chunks[c];
        peer.bytes += wire_len;
        peer.last_chunk = Some(Instant::now());
        if chunk.state == ChunkState::Done {
            peer.duplicates += 1;
            return;
        }
        peer.chunks += 1;
        match encoding {
            Encoding::Raw => {
                self.whole_wire += wire_len;
                self.whole_len += chunk.len;
            }
            Encoding::Zstd => {
                peer.zstd_chunks += 1;
                self.whole_wire += wire_len;
                self.whole_len += chunk.len;
            }
            Encoding::Delta => {
                peer.delta_chunks += 1;
                peer.delta_saved_bytes += chunk.len.saturating_sub(wire_len);
                self.delta_wire += wire_len;
                self.delta_whole += chunk.len;
            }
        }
        if chunk.optional {
            peer.fillers += 1;
        }
        if chunk.allowed.len() == 1 {
            peer.exclusive += 1;
        }
        chunk.state = ChunkState::Done;
        self.remaining -= 1;
        self.stored_bytes += chunk.len;
        if !chunk.optional {
            self.required_left -= 1;
            if self.required_left == 0 {
                self.required_done = Some(Instant::now());
            }
            self.settle_fillers();
        }
        // Copies still in flight elsewhere (stolen) are now surplus; their
        // windows free up when they arrive.
    }

    /// Peer `p` failed or finished: what it held goes back to the others.
    pub(crate) fn peer_dead(&mut self, p: PeerIdx, reason: Option<String>) {
        if !self.peers[p].alive {
            return;
        }
        self.peers[p].alive = false;
        if self.peers[p].dropped.is_none() {
            self.peers[p].dropped = reason;
        }
        let mut held: Vec<ChunkIdx> = self.peers[p].inflight.iter().map(|a| a.chunk).collect();
        held.extend(self.peers[p].storing.iter().copied());
        // Requeueing pushes to the front: go from the lowest priority up so
        // the others' queues keep the caller's order.
        held.sort_unstable_by(|a, b| b.cmp(a));
        for c in held {
            self.release(p, c);
            self.requeue(c);
        }
        // Queued chunks only this peer could serve are now unavailable.
        let queued: Vec<ChunkIdx> = self.peers[p].queue.drain(..).collect();
        for c in queued {
            if self.chunks[c].state == ChunkState::Queued
                && !PeerIdx::all(self.peers.len()).any(|q| self.peers[q].alive && self.can_serve(q, c))
            {
                self.give_up(c);
            }
        }
        self.settle_fillers();
    }
}
