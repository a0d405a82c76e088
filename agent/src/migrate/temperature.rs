//! Chunk temperature: how often each chunk of a live disk is rewritten, and
//! the order that follows (coldest first, the hottest held for the pause).
//!
//! The rates here are observed by the engine itself: each slice of the live
//! device is compared with the one before, and a chunk's temperature is the
//! number of observations in which it had changed. The eBPF tracker
//! (`dirty`) measures the same thing from block-layer tracepoints without
//! reading the disk; its rates can be fed in through [`Temperature::add_rates`].

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
    heat: Vec<f64>,
}

/// A chunk observed rewritten this often counts as hot.
pub const HOT: f64 = 2.0;

impl Temperature {
    pub fn new(chunks: usize) -> Self {
        Temperature {
            heat: vec![0.0; chunks],
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

    /// Adds writes counted for one chunk (by the dirty tracker).
    pub fn add_heat(&mut self, index: usize, writes: f64) {
        if let Some(h) = self.heat.get_mut(index) {
            *h += writes;
        }
    }

    pub fn heat(&self, index: usize) -> f64 {
        self.heat.get(index).copied().unwrap_or(0.0)
    }

    pub fn is_hot(&self, index: usize) -> bool {
        self.heat(index) >= HOT
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
                candidates.sort_by(|&a, &b| {
                    self.heat(a as usize)
                        .total_cmp(&self.heat(b as usize))
                        .then(a.cmp(&b))
                });
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
    }
}
