//! Cache policies: the order in which an edge's unprotected chunks are given
//! up when it must free space. Chosen per deployment, switchable at run time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ledger::{Access, ChunkId, Edge, Ledger};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("unknown cache policy {0:?} (choose lru, lfu or popularity)")]
    Unknown(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least recently used goes first.
    #[default]
    Lru,
    /// Least frequently used goes first (recency breaks ties).
    Lfu,
    /// Chunks that the fewest catalogue images use go first; among those,
    /// chunks with the most copies elsewhere in the fleet (cheapest to get back).
    Popularity,
}

impl FromStr for Policy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(Policy::Lru),
            "lfu" => Ok(Policy::Lfu),
            "popularity" => Ok(Policy::Popularity),
            _ => Err(PolicyError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Lru => "lru",
            Policy::Lfu => "lfu",
            Policy::Popularity => "popularity",
        })
    }
}

/// Sort key: smaller = evicted sooner. The chunk id comes last so the order
/// is total; ids depend on interning order, which only breaks exact ties.
pub type EvictKey = (u64, u64, u64, ChunkId);

impl Policy {
    pub fn key(self, ledger: &Ledger, edge: &Edge, cid: ChunkId) -> EvictKey {
        let a: Access = edge.access.get(&cid).copied().unwrap_or_default();
        match self {
            Policy::Lru => (a.last, a.count as u64, 0, cid),
            Policy::Lfu => (a.count as u64, a.last, 0, cid),
            Policy::Popularity => (
                ledger.image_refs(cid) as u64,
                u16::MAX as u64 - ledger.holders(cid) as u64,
                a.last,
                cid,
            ),
        }
    }

    /// The edge's unprotected chunks (not pinned, not leased), first victim first.
    pub fn eviction_order(self, ledger: &Ledger, edge: &Edge) -> Vec<ChunkId> {
        let mut keyed: Vec<(EvictKey, ChunkId)> = edge
            .chunks
            .iter()
            .filter(|&c| !edge.is_protected(c))
            .map(|c| (self.key(ledger, edge, c), c))
            .collect();
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, c)| c).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

    fn fp(n: u32) -> Fingerprint {
        Fingerprint::of(&n.to_le_bytes())
    }

    fn order(l: &Ledger, p: Policy) -> Vec<Fingerprint> {
        let e = l.edge("a").expect("edge");
        p.eviction_order(l, e)
            .into_iter()
            .map(|c| l.interner.fp(c))
            .collect()
    }

    /// Chunks 1..=4 arrive in that order; then 1 is read three times, 3 once,
    /// then 2 once (most recently).
    fn scripted() -> Ledger {
        let mut l = Ledger::new(4096);
        l.register("a", "x:1", 1 << 30).expect("register");
        l.put_inventory("a", &[], 0).expect("inv");
        for n in 1..=4 {
            l.apply_delta("a", &[fp(n)], &[], &[], 0).expect("delta");
        }
        for _ in 0..3 {
            l.apply_delta("a", &[], &[], &[fp(1)], 0).expect("delta");
        }
        l.apply_delta("a", &[], &[], &[fp(3)], 0).expect("delta");
        l.apply_delta("a", &[], &[], &[fp(2)], 0).expect("delta");
        l
    }

    #[test]
    fn lru_evicts_least_recent_first() {
        let l = scripted();
        assert_eq!(order(&l, Policy::Lru), vec![fp(4), fp(1), fp(3), fp(2)]);
    }

    #[test]
    fn lfu_evicts_least_frequent_first() {
        let l = scripted();
        // counts: 1→4, 2→2, 3→2, 4→1; ties (2, 3) broken by recency.
        assert_eq!(order(&l, Policy::Lfu), vec![fp(4), fp(3), fp(2), fp(1)]);
    }

    #[test]
    fn popularity_keeps_what_most_images_use() {
        let mut l = scripted();
        let cs = ChunkSize::new(4096).expect("valid");
        // chunk 4 is in three images, 3 in two, 1 in one, 2 in none.
        for img in [&[4u32, 3, 1][..], &[4, 3], &[4]] {
            let chunks: Vec<_> = img.iter().map(|&n| fp(n)).collect();
            l.publish(&Manifest::new(cs, 4096 * chunks.len() as u64, chunks));
        }
        assert_eq!(order(&l, Policy::Popularity), vec![fp(2), fp(1), fp(3), fp(4)]);
    }

    #[test]
    fn protected_chunks_are_never_candidates() {
        let mut l = scripted();
        let cs = ChunkSize::new(4096).expect("valid");
        let m = l.publish(&Manifest::new(cs, 4096, vec![fp(4)]));
        l.pin("a", &m).expect("pin");
        let a = l.edge_ix("a").expect("ix");
        let c2 = l.interner.get(&fp(2)).expect("id");
        l.lease(vec![(a, c2)], u64::MAX);
        for p in [Policy::Lru, Policy::Lfu, Policy::Popularity] {
            let o = order(&l, p);
            assert_eq!(o.len(), 2, "{p}");
            assert!(!o.contains(&fp(4)) && !o.contains(&fp(2)), "{p}");
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!("LRU".parse(), Ok(Policy::Lru));
        assert_eq!("popularity".parse(), Ok(Policy::Popularity));
        assert_eq!("fifo".parse::<Policy>(), Err(PolicyError::Unknown("fifo".into())));
    }
}
