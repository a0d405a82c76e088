//! The scheduler's typed indices: which peer, which chunk, and sets of
//! peers, so a chunk's number is never taken for a peer's.

use std::ops::{Index, IndexMut};

/// A peer of this fetch: its place in the fetcher's peer list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PeerIdx(u16);

impl PeerIdx {
    /// The `i`th peer; `i` < [`PeerSet::CAPACITY`] (the fetcher refuses more peers).
    pub(crate) fn new(i: usize) -> Self {
        debug_assert!(i < PeerSet::CAPACITY, "peer {i} of at most 64");
        PeerIdx(i as u16)
    }

    pub(crate) fn get(self) -> usize {
        self.0 as usize
    }

    /// Every peer of a fetch with `n` peers, in order.
    pub(crate) fn all(n: usize) -> impl Iterator<Item = PeerIdx> {
        (0..n).map(PeerIdx::new)
    }
}

/// A chunk of this fetch: its place in the scheduler's list of wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ChunkIdx(u32);

impl ChunkIdx {
    /// Most chunks one fetch may hold (the fetcher refuses more).
    pub(crate) const CAPACITY: usize = u32::MAX as usize;

    pub(crate) fn new(i: usize) -> Self {
        debug_assert!(i < Self::CAPACITY, "chunk {i} of fewer than 2^32");
        ChunkIdx(i as u32)
    }

    pub(crate) fn get(self) -> usize {
        self.0 as usize
    }

    /// Every chunk of a fetch with `n` chunks, in order.
    pub(crate) fn all(n: usize) -> impl Iterator<Item = ChunkIdx> {
        (0..n).map(ChunkIdx::new)
    }
}

/// A set of peers (one bit each; a fetch has at most 64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PeerSet(u64);

impl PeerSet {
    pub(crate) const CAPACITY: usize = 64;

    /// The first `n` peers.
    pub(crate) fn first(n: usize) -> Self {
        if n >= Self::CAPACITY {
            PeerSet(u64::MAX)
        } else {
            PeerSet((1u64 << n) - 1)
        }
    }

    pub(crate) fn only(p: PeerIdx) -> Self {
        PeerSet(1 << p.get())
    }

    pub(crate) fn contains(self, p: PeerIdx) -> bool {
        self.0 & (1 << p.get()) != 0
    }

    pub(crate) fn insert(&mut self, p: PeerIdx) {
        self.0 |= 1 << p.get();
    }

    pub(crate) fn remove(&mut self, p: PeerIdx) {
        self.0 &= !(1 << p.get());
    }

    pub(crate) fn len(self) -> u32 {
        self.0.count_ones()
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }
}

// Per-peer and per-chunk lists are indexed by their typed index only.
impl<T> Index<PeerIdx> for Vec<T> {
    type Output = T;
    fn index(&self, p: PeerIdx) -> &T {
        &self[p.get()]
    }
}

impl<T> IndexMut<PeerIdx> for Vec<T> {
    fn index_mut(&mut self, p: PeerIdx) -> &mut T {
        &mut self[p.get()]
    }
}

impl<T> Index<ChunkIdx> for Vec<T> {
    type Output = T;
    fn index(&self, c: ChunkIdx) -> &T {
        &self[c.get()]
    }
}

impl<T> IndexMut<ChunkIdx> for Vec<T> {
    fn index_mut(&mut self, c: ChunkIdx) -> &mut T {
        &mut self[c.get()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_sets_hold_up_to_64_peers() {
        assert!(PeerSet::default().is_empty());
        assert_eq!(PeerSet::first(3).len(), 3);
        assert_eq!(PeerSet::first(64).len(), 64);
        assert!(PeerSet::first(64).contains(PeerIdx::new(63)));
        let mut s = PeerSet::only(PeerIdx::new(5));
        assert!(s.contains(PeerIdx::new(5)) && !s.contains(PeerIdx::new(4)));
        s.insert(PeerIdx::new(63));
        assert_eq!(s.len(), 2);
        s.remove(PeerIdx::new(5));
        assert_eq!(s, PeerSet::only(PeerIdx::new(63)));
    }

    #[test]
    fn typed_indices_index_their_lists() {
        let v = ["a", "b", "c"].to_vec();
        assert_eq!(v[PeerIdx::new(1)], "b");
        assert_eq!(v[ChunkIdx::new(2)], "c");
        assert_eq!(ChunkIdx::all(3).map(ChunkIdx::get).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(PeerIdx::all(2).map(PeerIdx::get).collect::<Vec<_>>(), [0, 1]);
    }
}
