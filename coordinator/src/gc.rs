//! Garbage collection by watermarks: when an edge's usage passes the high
//! watermark, pick unprotected chunks in policy order until the usage would
//! fall under the low watermark. Pinned and leased (in-flight) chunks are
//! never picked; the agent checks its own pins again before deleting.

use serde::{Deserialize, Serialize};

use roaring::RoaringBitmap;

use crate::ledger::{ChunkId, Edge, Ledger};
use crate::policy::Policy;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GcError {
    #[error("watermarks must satisfy 0 < low ({low}) <= high ({high}) <= 1")]
    BadWatermarks { high: f64, low: f64 },
}

/// Fractions of an edge's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Watermarks {
    pub high: f64,
    pub low: f64,
}

impl Default for Watermarks {
    fn default() -> Self {
        Watermarks {
            high: 0.90,
            low: 0.75,
        }
    }
}

impl Watermarks {
    pub fn new(high: f64, low: f64) -> Result<Self, GcError> {
        if !(low > 0.0 && low <= high && high <= 1.0) {
            return Err(GcError::BadWatermarks { high, low });
        }
        Ok(Watermarks { high, low })
    }

    pub fn high_bytes(&self, capacity: u64) -> u64 {
        (capacity as f64 * self.high) as u64
    }

    pub fn low_bytes(&self, capacity: u64) -> u64 {
        (capacity as f64 * self.low) as u64
    }
}

/// What GC decided for one edge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcPlan {
    pub drop: Vec<ChunkId>,
    pub bytes: u64,
    /// True when protected chunks keep the edge above its low watermark.
    pub short: bool,
}

/// Chunks `edge` should drop now, first victim first (empty under the high
/// watermark). Chunks in `deferred` (those of images hinted to arrive here)
/// go only after every other candidate, each group in policy order.
pub fn plan(
    ledger: &Ledger,
    edge: &Edge,
    policy: Policy,
    marks: Watermarks,
    deferred: &RoaringBitmap,
) -> GcPlan {
    if edge.usage <= marks.high_bytes(edge.capacity) {
        return GcPlan::default();
    }
    let target = edge.usage - marks.low_bytes(edge.capacity);
    let mut out = GcPlan::default();
    let (later, first): (Vec<ChunkId>, Vec<ChunkId>) = policy
        .eviction_order(ledger, edge)
        .into_iter()
        .partition(|c| deferred.contains(*c));
    for cid in first.into_iter().chain(later) {
        if out.bytes >= target {
            break;
        }
        out.bytes += ledger.chunk_len(cid);
        out.drop.push(cid);
    }
    out.short = out.bytes < target;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::{ChunkSize, Fingerprint, Manifest};

    fn fp(n: u32) -> Fingerprint {
        Fingerprint::of(&n.to_le_bytes())
    }

    /// An edge of capacity 10 chunks holding `n` chunks of 4 KiB, added in order.
    fn edge_with(n: u32) -> Ledger {
        let mut l = Ledger::new(4096);
        l.register("a", "x:1", 10 * 4096).expect("register");
        l.put_inventory("a", &[], 0).expect("inv");
        for i in 0..n {
            l.apply_delta("a", &[fp(i)], &[], &[], (i as u64 + 1) * 4096)
                .expect("delta");
        }
        l
    }

    #[test]
    fn nothing_under_high_watermark() {
        let l = edge_with(9);
        let p = plan(
            &l,
            l.edge("a").expect("edge"),
            Policy::Lru,
            Watermarks::default(),
            &RoaringBitmap::new(),
        );
        assert_eq!(p, GcPlan::default());
    }

    #[test]
    fn drops_oldest_until_under_low() {
        let l = edge_with(10);
        let marks = Watermarks::new(0.9, 0.6).expect("marks");
        let p = plan(
            &l,
            l.edge("a").expect("edge"),
            Policy::Lru,
            marks,
            &RoaringBitmap::new(),
        );
        // 10 chunks, low = 6 chunks: drop the 4 oldest.
        let got: Vec<_> = p.drop.iter().map(|&c| l.interner.fp(c)).collect();
        assert_eq!(got, vec![fp(0), fp(1), fp(2), fp(3)]);
        assert_eq!(p.bytes, 4 * 4096);
        assert!(!p.short);
    }

    #[test]
    fn never_drops_pinned_or_leased() {
        let mut l = edge_with(10);
        let cs = ChunkSize::new(4096).expect("valid");
        let m = l.publish(&Manifest::new(cs, 3 * 4096, vec![fp(0), fp(1), fp(2)]));
        l.pin("a", &m).expect("pin");
        let a = l.edge_ix("a").expect("ix");
        let c3 = l.interner.get(&fp(3)).expect("id");
        l.lease(vec![(a, c3)], u64::MAX);
        let marks = Watermarks::new(0.9, 0.6).expect("marks");
        for p in [Policy::Lru, Policy::Lfu, Policy::Popularity] {
            let g = plan(&l, l.edge("a").expect("edge"), p, marks, &RoaringBitmap::new());
            let got: Vec<_> = g.drop.iter().map(|&c| l.interner.fp(c)).collect();
            for kept in [0, 1, 2, 3] {
                assert!(!got.contains(&fp(kept)), "{p} dropped protected chunk {kept}");
            }
            assert_eq!(got.len(), 4, "{p}");
        }
        // Everything pinned: nothing to drop, and GC says it fell short.
        let all = l.publish(&Manifest::new(cs, 10 * 4096, (0..10).map(fp).collect()));
        l.pin("a", &all).expect("pin");
        let g = plan(
            &l,
            l.edge("a").expect("edge"),
            Policy::Lru,
            marks,
            &RoaringBitmap::new(),
        );
        assert!(g.drop.is_empty() && g.short);
    }

    #[test]
    fn hinted_chunks_go_last() {
        let l = edge_with(10);
        let marks = Watermarks::new(0.9, 0.6).expect("marks");
        let deferred: RoaringBitmap = [0u32, 1]
            .iter()
            .map(|&n| l.interner.get(&fp(n)).expect("id"))
            .collect();
        let p = plan(&l, l.edge("a").expect("edge"), Policy::Lru, marks, &deferred);
        let got: Vec<_> = p.drop.iter().map(|&c| l.interner.fp(c)).collect();
        assert_eq!(got, vec![fp(2), fp(3), fp(4), fp(5)]);
    }

    #[test]
    fn watermarks_are_checked() {
        assert!(Watermarks::new(0.5, 0.6).is_err());
        assert!(Watermarks::new(1.5, 0.6).is_err());
        assert!(Watermarks::new(0.9, 0.0).is_err());
        assert!(Watermarks::new(f64::NAN, 0.5).is_err());
        assert!(Watermarks::new(0.9, 0.9).is_ok());
    }
}
