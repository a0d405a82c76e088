//! Chunk temperature: how often each chunk of a live disk is rewritten, and
//! the order that follows (coldest first, the hottest held for the pause).
//!
//! A chunk's temperature is the number of observations (a slice of the live
//! device compared with the one before: the plan's slice against the boot
//! image, the writes seen while the plan sliced, then every round) in which
//! it had changed. Among chunks of equal temperature, the write count of the
//! eBPF tracker (`dirty`, block-layer writes per chunk) orders them: one
//! guest write is often several block writes, so counts alone would call a
//! chunk written once "hot".

use edgeshift_common::Manifest;

/// The send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum Ordering {
    /// Coldest first; chunks seen rewritten at least twice wait for the pause.
    ColdFirst,
    /// Plain index order, nothing held back (the comparison baseline).
    Index,
}

/// Per-chunk write observations.
#[derive(Debug, Clone)]
pub struct Temperature {
    /// Observations in which the chunk had changed (plus external rates).
    heat: Vec<f64>,
    /// Block-layer writes the tracker counted (the tie-breaker).
    writes: Vec<f64>,
}

/// A chunk seen changed in this many observations counts as hot.
pub const HOT: f64 = 2.0;

impl Temperature {
    pub fn new(chunks: usize) -> Self {
        Temperature {
            heat: vec![0.0; chunks],
            writes: vec![0.0; chunks],
        }
    }

    /// Records a new observation: every chunk that differs between `before`
    /// and `after` warms by one. Returns the indices that changed.
    pub fn observe(&mut self, before: &Manifest, after: &Manifest) -> Vec<u32> {
        let mut changed = Vec::new();
        for (i, (a, b)) in before.chunks.iter().zip(&after.chunks).enumerate() {
            if a != b {
                if let Some(h) = self.heat.get_mut(i) {
                    *h += 1.0;
                }
                changed.push(i as u32);
            }
        }
        changed
    }

    /// Adds externally measured rates (writes per second, per chunk).
    pub fn add_rates(&mut self, rates: &[f64]) {
        for (h, r) in self.heat.iter_mut().zip(rates) {
            *h += r;
        }
    }

    /// Adds writes counted for one chunk (by the dirty tracker): they order
    /// chunks of equal temperature, and do not make a chunk hot.
    pub fn add_writes(&mut self, index: usize, writes: f64) {
        if let Some(w) = self.writes.get_mut(index) {
            *w += writes;
        }
    }

    fn writes(&self, index: usize) -> f64 {
        self.writes.get(index).copied().unwrap_or(0.0)
    }

    pub fn heat(&self, index: usize) -> f64 {
        self.heat.get(index).copied().unwrap_or(0.0)
    }

    pub fn is_hot(&self, index: usize) -> bool {
        self.heat(index) >= HOT
    }

    /// Makes a chunk hot now: the boot log saw it written repeatedly and
    /// lately (it is being written), before any observation of ours.
    pub fn mark_hot(&mut self, index: usize) {
        if let Some(h) = self.heat.get_mut(index) {
            *h = h.max(HOT);
        }
    }

    /// Splits `candidates` into the hottest `room` hot chunks, which wait
    /// for the pause (sent earlier they would likely be written again and
    /// sent twice), and the rest in send order, coldest first. With
    /// [`Ordering::Index`] nothing waits.
    pub fn hold_hottest(
        &self,
        candidates: Vec<u32>,
        ordering: Ordering,
        room: usize,
    ) -> (Vec<u32>, Vec<u32>) {
        if ordering == Ordering::Index {
            return (Vec::new(), self.order(candidates, ordering, false));
        }
        let (mut hot, cold): (Vec<u32>, Vec<u32>) =
            candidates.into_iter().partition(|&i| self.is_hot(i as usize));
        hot.sort_by(|&a, &b| self.colder(b, a).then(a.cmp(&b)));
        let rest = hot.split_off(room.min(hot.len()));
        let mut send = cold;
        send.extend(rest);
        (hot, self.order(send, ordering, false))
    }

    /// `Less` when chunk `a` is colder than `b`: less heat, then fewer
    /// block writes.
    fn colder(&self, a: u32, b: u32) -> std::cmp::Ordering {
        let (a, b) = (a as usize, b as usize);
        self.heat(a)
            .total_cmp(&self.heat(b))
            .then(self.writes(a).total_cmp(&self.writes(b)))
    }

    /// Orders `candidates` for sending; with [`Ordering::ColdFirst`] and
    /// `hold_hot`, hot chunks are left out (they go in the pause).
    pub fn order(&self, mut candidates: Vec<u32>, ordering: Ordering, hold_hot: bool) -> Vec<u32> {
        match ordering {
            Ordering::Index => {
                candidates.sort_unstable();
                candidates
            }
            Ordering::ColdFirst => {
                if hold_hot {
                    candidates.retain(|&i| !self.is_hot(i as usize));
                }
                candidates.sort_by(|&a, &b| self.colder(a, b).then(a.cmp(&b)));
                candidates
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeshift_common::{ChunkSize, Fingerprint};

    fn m(fps: &[u8]) -> Manifest {
        let cs = ChunkSize::new(4096).expect("chunk size");
        Manifest::new(
            cs,
            fps.len() as u64 * 4096,
            fps.iter().map(|&b| Fingerprint([b; 32])).collect(),
        )
    }

    #[test]
    fn cold_first_holds_hot_chunks_and_index_order_does_not() {
        let mut t = Temperature::new(4);
        assert_eq!(t.observe(&m(&[1, 2, 3, 4]), &m(&[1, 9, 3, 8])), vec![1, 3]);
        assert_eq!(t.observe(&m(&[1, 9, 3, 8]), &m(&[1, 10, 3, 8])), vec![1]);
        assert!(t.is_hot(1) && !t.is_hot(3) && !t.is_hot(0));
        assert_eq!(
            t.order(vec![3, 2, 1, 0], Ordering::ColdFirst, true),
            vec![0, 2, 3]
        );
        assert_eq!(
            t.order(vec![3, 2, 1, 0], Ordering::ColdFirst, false),
            vec![0, 2, 3, 1]
        );
        assert_eq!(t.order(vec![3, 2, 1, 0], Ordering::Index, true), vec![0, 1, 2, 3]);
        t.add_rates(&[5.0]);
        assert_eq!(t.order(vec![0, 2], Ordering::ColdFirst, false), vec![2, 0]);
        // Block writes break ties but never make a chunk hot.
        let mut t = Temperature::new(3);
        t.add_writes(0, 50.0);
        t.add_writes(2, 3.0);
        t.add_writes(7, 1.0);
        assert!(!t.is_hot(0));
        assert_eq!(t.order(vec![0, 1, 2], Ordering::ColdFirst, true), vec![1, 2, 0]);
    }

    #[test]
    fn the_hottest_wait_within_the_room_the_rest_go_coldest_first() {
        let mut t = Temperature::new(6);
        // 1 and 4 hot by observation, 5 by the boot log; among them the
        // block-write counts rank 4, 5, 1.
        t.observe(&m(&[1, 2, 3, 4, 5, 6]), &m(&[1, 9, 3, 4, 8, 6]));
        t.observe(&m(&[1, 9, 3, 4, 8, 6]), &m(&[1, 10, 3, 4, 7, 6]));
        t.mark_hot(5);
        t.mark_hot(99); // out of range: ignored
        t.add_writes(4, 9.0);
        t.add_writes(5, 3.0);
        t.add_writes(2, 1.0);
        assert!(t.is_hot(5));
        let all = vec![0, 1, 2, 3, 4, 5];
        assert_eq!(
            t.hold_hottest(all.clone(), Ordering::ColdFirst, 2),
            (vec![4, 5], vec![0, 3, 2, 1])
        );
        assert_eq!(
            t.hold_hottest(all.clone(), Ordering::ColdFirst, 10),
            (vec![4, 5, 1], vec![0, 3, 2])
        );
        assert_eq!(
            t.hold_hottest(all.clone(), Ordering::ColdFirst, 0),
            (vec![], vec![0, 3, 2, 1, 5, 4])
        );
        assert_eq!(
            t.hold_hottest(all, Ordering::Index, 10),
            (vec![], vec![0, 1, 2, 3, 4, 5])
        );
    }
}
