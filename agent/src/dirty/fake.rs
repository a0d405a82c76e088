//! A tracker fed by hand, for unit tests of what sits above the seam.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{chunk_shift, split_span, DeviceId, DirtyError, DirtyTracker, RawChunk, RawCounts, TrackerKind};

#[derive(Default)]
struct FakeState {
    watched: HashSet<DeviceId>,
    chunks: HashMap<(DeviceId, u64), (u64, u64)>,
    events: u64,
    dropped: u64,
    truncated: u64,
}

/// Counts the writes a test reports through its [`FakeHandle`], with the
/// same chunk split and device filter as the real trackers.
pub struct FakeTracker {
    chunk_size: u64,
    state: Arc<Mutex<FakeState>>,
    shift: u32,
}

/// Feeds writes into a [`FakeTracker`] (cloneable, usable from any thread).
#[derive(Clone)]
pub struct FakeHandle {
    state: Arc<Mutex<FakeState>>,
    shift: u32,
}

fn lock(state: &Mutex<FakeState>) -> MutexGuard<'_, FakeState> {
    // A test that panicked while holding the lock leaves plain counters behind.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeTracker {
    pub fn new(chunk_size: u64) -> Result<Self, DirtyError> {
        Ok(FakeTracker {
            chunk_size,
            shift: chunk_shift(chunk_size)?,
            state: Arc::default(),
        })
    }

    pub fn handle(&self) -> FakeHandle {
        FakeHandle {
            state: self.state.clone(),
            shift: self.shift,
        }
    }
}

impl FakeHandle {
    /// A write of `len` bytes at byte `offset` of `dev`, as a bio would be.
    pub fn write(&self, dev: DeviceId, offset: u64, len: u64) {
        let mut st = lock(&self.state);
        if !st.watched.contains(&dev) || len == 0 {
            return;
        }
        st.events += 1;
        let mut touched = Vec::new();
        if split_span(offset, len, self.shift, |c, b| touched.push((c, b))) {
            st.truncated += 1;
        }
        for (c, b) in touched {
            let e = st.chunks.entry((dev, c)).or_default();
            e.0 += 1;
            e.1 += b;
        }
    }

    /// Reports `n` lost updates, as a full map would.
    pub fn drop_events(&self, n: u64) {
        lock(&self.state).dropped += n;
    }
}

impl DirtyTracker for FakeTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Fake
    }

    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn watch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        lock(&self.state).watched.insert(dev);
        Ok(())
    }

    fn unwatch(&mut self, dev: DeviceId) -> Result<(), DirtyError> {
        lock(&self.state).watched.remove(&dev);
        Ok(())
    }

    fn read_counts(&mut self) -> Result<RawCounts, DirtyError> {
        let st = lock(&self.state);
        Ok(RawCounts {
            chunks: st
                .chunks
                .iter()
                .map(|(&(dev, index), &(writes, bytes))| RawChunk {
                    dev,
                    index,
                    writes,
                    bytes,
                })
                .collect(),
            events: st.events,
            dropped: st.dropped,
            truncated: st.truncated,
        })
    }
}
