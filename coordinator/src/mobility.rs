//! Where a VM is likely to go next, learned from the moves the coordinator
//! sees (the handoffs it orders, and moves an operator's system reports).
//!
//! A first-order model over moves: the state is the VM's last move
//! (`from → at`), and the prediction is the edge most often reached next
//! from that state, fleet-wide (users follow roads: who came from the west
//! mostly goes on east). A state never seen falls back to the edge most
//! often reached from `at` alone. A prediction needs [`MIN_SEEN`]
//! observations and [`MIN_SHARE`] of them.

use std::collections::BTreeMap;

/// Observations a state needs before it predicts.
pub const MIN_SEEN: u32 = 2;
/// Share of a state's observations the predicted edge must have.
pub const MIN_SHARE: f64 = 0.4;

/// Next-edge counts of one state.
#[derive(Debug, Default, Clone)]
struct Next {
    counts: BTreeMap<String, u32>,
    total: u32,
}

impl Next {
    fn add(&mut self, to: &str) {
        *self.counts.entry(to.to_string()).or_insert(0) += 1;
        self.total += 1;
    }

    /// The most frequent next edge and its share; none on a tie.
    fn best(&self) -> Option<(&str, f64)> {
        if self.total < MIN_SEEN {
            return None;
        }
        let (edge, n) = self.counts.iter().max_by_key(|(_, n)| **n)?;
        if self.counts.values().filter(|c| *c == n).count() > 1 {
            return None;
        }
        let share = f64::from(*n) / f64::from(self.total);
        (share >= MIN_SHARE).then_some((edge.as_str(), share))
    }
}

/// The model, and each VM's last move.
#[derive(Debug, Default)]
pub struct Mobility {
    /// (from, at) → next.
    by_move: BTreeMap<(String, String), Next>,
    /// at → next.
    by_edge: BTreeMap<String, Next>,
    /// VM → (from, at) of its last move.
    last: BTreeMap<String, (String, String)>,
}

/// A prediction for one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub edge: String,
    /// Share of the state's observations that went there.
    pub share: f64,
}

impl Mobility {
    /// Records that `vm` moved `from → to`; its previous move (if it
    /// ended at `from`) makes this a transition of the model.
    pub fn record(&mut self, vm: &str, from: &str, to: &str) {
        if from == to {
            return;
        }
        if let Some((prev, at)) = self.last.get(vm) {
            if at == from {
                self.by_move
                    .entry((prev.clone(), at.clone()))
                    .or_default()
                    .add(to);
            }
        }
        self.by_edge.entry(from.to_string()).or_default().add(to);
        self.last
            .insert(vm.to_string(), (from.to_string(), to.to_string()));
    }

    /// Where `vm` is likely to go next from where its last move took it.
    pub fn predict(&self, vm: &str) -> Option<Prediction> {
        let (from, at) = self.last.get(vm)?;
        let best = self
            .by_move
            .get(&(from.clone(), at.clone()))
            .and_then(Next::best)
            .or_else(|| self.by_edge.get(at).and_then(Next::best))?;
        Some(Prediction {
            edge: best.0.to_string(),
            share: best.1,
        })
        .filter(|p| &p.edge != at)
    }

    /// VMs whose moves are known.
    pub fn vms(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_move_predicts_the_next() {
        let mut m = Mobility::default();
        // Two VMs drive east along a → b → c → d, one west d → c → b.
        for (vm, path) in [("v1", ["a", "b", "c", "d"]), ("v2", ["d", "c", "b", "a"])] {
            for w in path.windows(2) {
                m.record(vm, w[0], w[1]);
            }
        }
        assert_eq!(m.predict("v1"), None, "nothing seen twice from (c, d)");
        // A third VM eastbound a → b: (a, b) → c was seen once; b alone saw
        // c once and a once: a tie, no answer yet.
        m.record("v3", "a", "b");
        assert_eq!(m.predict("v3"), None);
        m.record("v3", "b", "c");
        m.record("v4", "a", "b");
        // (a, b) → c seen twice now (v1, v3).
        assert_eq!(m.predict("v4").map(|p| p.edge), Some("c".to_string()));
        // Westbound at b, the model says a, not c.
        m.record("v5", "d", "c");
        m.record("v5", "c", "b");
        m.record("v6", "c", "b");
        m.record("v6", "b", "a");
        m.record("v7", "c", "b");
        assert_eq!(m.predict("v7").map(|p| p.edge), Some("a".to_string()));
        assert!(m.predict("nobody").is_none());
    }

    #[test]
    fn an_unseen_move_falls_back_to_the_edge_alone() {
        let mut m = Mobility::default();
        for vm in ["v1", "v2", "v3"] {
            m.record(vm, "x", "hub");
            m.record(vm, "hub", "y");
        }
        // v4 arrives at hub from z (never seen): hub → y is the habit.
        m.record("v4", "z", "hub");
        let p = m.predict("v4").expect("prediction");
        assert_eq!(p.edge, "y");
        assert!(p.share > 0.7, "{p:?}");
    }
}
