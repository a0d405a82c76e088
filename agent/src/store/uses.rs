//! Which chunks this edge used since the coordinator last heard: chunks served
//! to peers and chunks of images that VMs or fetches started using here. The
//! coordinator's LRU and LFU policies rank an edge's chunks by these uses;
//! without them they could only rank by arrival.

use std::collections::HashSet;
use std::sync::Mutex;

use edgeshift_common::Fingerprint;

/// A set of used chunks, shared by the chunk server (which records) and the
/// coordinator link (which drains it into each heartbeat).
#[derive(Debug, Default)]
pub struct ChunkUses {
    used: Mutex<HashSet<Fingerprint>>,
}

impl ChunkUses {
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes one use of `fp` (a set: uses between two heartbeats count once).
    pub fn record(&self, fp: Fingerprint) {
        if fp.is_zero_chunk() {
            return;
        }
        // A poisoned lock only means a recorder panicked mid-insert; the set
        // itself is still a valid set, so keep using it.
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.insert(fp);
    }

    /// Notes a use of every chunk in `fps`.
    pub fn record_all<'a>(&self, fps: impl IntoIterator<Item = &'a Fingerprint>) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.extend(fps.into_iter().filter(|f| !f.is_zero_chunk()).copied());
    }

    /// Takes every use recorded so far, leaving the set empty.
    pub fn drain(&self) -> Vec<Fingerprint> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.drain().collect()
    }

    pub fn len(&self) -> usize {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_are_a_set_drained_once_and_zero_chunks_ignored() {
        let u = ChunkUses::new();
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        let zero = Fingerprint::ZERO_CHUNK;
        u.record(a);
        u.record(a);
        u.record_all([&b, &zero]);
        u.record(zero);
        let mut got = u.drain();
        got.sort_by_key(|f| f.0);
        assert_eq!(got, vec![a, b]);
        assert!(u.is_empty(), "drain leaves nothing behind");
    }
}
